"""core.install_secret: the install's secret is never silently replaced by a new one.

A new secret changes every pseudonym (PatientID hashes, de-identified UIDs, feedback ids): what
was stored under the old one no longer matches. So a secret that exists but cannot be read is an
error, and a generated one is on disk, whole, before anything uses it.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from core.errors import CredentialsError
from core.install_secret import SECRET_FILE, resolve_install_secret

pytestmark = pytest.mark.unit


def test_a_generated_secret_is_fsynced_before_its_name_appears_and_its_name_before_it_is_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    steps: list[str] = []
    real_fsync, real_link = os.fsync, os.link

    def fsync(fd: int) -> None:
        path = Path(os.readlink(f"/proc/self/fd/{fd}"))
        if path.is_relative_to(tmp_path):
            name = path.relative_to(tmp_path).as_posix()
            steps.append("fsync " + ("tmp" if name.startswith(f"stack/.{SECRET_FILE}.") else name))
            if path.is_file():
                steps.append(f"   holding {len(path.read_text().strip())} chars")
        real_fsync(fd)

    def link(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        real_link(src, dst)
        steps.append(f"link tmp -> {Path(dst).name}")

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "link", link)
    secret = resolve_install_secret("", tmp_path / "stack")
    assert steps[-4:] == ["fsync tmp", "   holding 64 chars", f"link tmp -> {SECRET_FILE}", "fsync stack"]
    assert (tmp_path / "stack" / SECRET_FILE).read_text().strip() == secret
    assert [p.name for p in (tmp_path / "stack").iterdir()] == [SECRET_FILE]


def test_an_install_secret_that_cannot_be_read_is_an_error_and_is_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / SECRET_FILE
    path.write_text("the-sites-secret\n")
    real_read_text = Path.read_text

    def read_text(self: Path, *args: object, **kwargs: object) -> str:
        if self == path:
            raise PermissionError(13, "Permission denied", str(self))
        return real_read_text(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Path, "read_text", read_text)
    with pytest.raises(CredentialsError, match="cannot be read"):
        resolve_install_secret("", tmp_path)
    monkeypatch.undo()
    assert path.read_text() == "the-sites-secret\n"  # was replaced by a new secret


def test_an_empty_install_secret_is_an_error_not_silently_a_new_secret(tmp_path: Path) -> None:
    (tmp_path / SECRET_FILE).write_text("")  # what a power cut left of an unsynced write
    with pytest.raises(CredentialsError, match="empty"):
        resolve_install_secret("", tmp_path)
    assert (tmp_path / SECRET_FILE).read_text() == ""


def test_a_garbled_credentials_file_is_an_error_rather_than_a_new_secret(tmp_path: Path) -> None:
    (tmp_path / "credentials.json").write_text('{"deid_secret": "stack-secret", ')  # cut short
    with pytest.raises(CredentialsError, match="de-identification secret"):
        resolve_install_secret("", tmp_path)
    assert not (tmp_path / SECRET_FILE).exists()


def test_a_garbled_credentials_file_falls_back_on_the_install_secret_file(tmp_path: Path) -> None:
    (tmp_path / "credentials.json").write_text("{")
    (tmp_path / SECRET_FILE).write_text("generated-earlier\n")
    assert resolve_install_secret("", tmp_path) == "generated-earlier"


def test_the_secret_is_generated_once_and_then_read_back(tmp_path: Path) -> None:
    first = resolve_install_secret("", tmp_path / "a")
    assert len(first) == 64 and resolve_install_secret("", tmp_path / "a") == first
    assert os.stat(tmp_path / "a" / SECRET_FILE).st_mode & 0o777 == 0o600
