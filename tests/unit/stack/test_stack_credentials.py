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


def test_an_empty_install_secret_beside_a_first_credentials_file_is_an_error_not_a_new_secret(
    tmp_path: Path,
) -> None:
    """The gateway's secret file of an install from before credentials.json held one: empty (a crash
    before it was fsync'd), it was taken as "none" and a new de-identification secret written."""
    (tmp_path / "install_secret").write_text("")
    with pytest.raises(CredentialsError, match="empty"):
        load_or_create(tmp_path / "credentials.json", tmp_path / "api_keys.json")
    assert not (tmp_path / "credentials.json").exists()


def test_the_gateways_earlier_secret_is_kept_when_credentials_are_first_made(tmp_path: Path) -> None:
    (tmp_path / "install_secret").write_text("the-gateways-secret\n")
    creds = load_or_create(tmp_path / "credentials.json", tmp_path / "api_keys.json")
    assert creds.deid_secret == "the-gateways-secret"
