"""stack.credentials: a credentials file the stack cannot read is never replaced by new secrets."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.errors import CredentialsError
from stack.credentials import load_or_create

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    "content", ['{"deid_secret": "the-installs-secret", "s3": {', "[]", '"the-installs-secret"']
)
def test_a_credentials_file_that_holds_no_object_is_an_error_and_is_not_overwritten(
    tmp_path: Path, content: str
) -> None:
    credentials = tmp_path / "credentials.json"
    credentials.write_text(content)
    with pytest.raises(CredentialsError, match=r"credentials\.json"):
        load_or_create(credentials, tmp_path / "api_keys.json")
    assert credentials.read_text() == content  # new keys and a new de-identification secret, before
    assert not (tmp_path / "api_keys.json").exists()
