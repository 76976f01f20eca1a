"""The stack's ``credentials.json``: the one reader (and the record the stack writes).

``cxr stack up`` generates it (``stack/credentials.py``, mode 0600) with the S3 keys, one API
key per gateway role and the install secret. Every package that needs one of them when its
``CXR_*`` variable is unset reads it through :func:`read_credentials`, so a missing file, a
garbled one and a missing key mean the same thing everywhere.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from core.errors import CredentialsError

CREDENTIALS_FILE = "credentials.json"
DEID_SECRET_KEY = "deid_secret"
# Orthanc (the PACS twin) has one user; the name is fixed, only its password is a secret.
ORTHANC_USERNAME = "cxr"


@dataclass(frozen=True)
class StackCredentials:
    """What ``credentials.json`` holds; empty strings where it holds nothing."""

    s3_access_key: str = ""
    s3_secret_key: str = ""
    api_keys: dict[str, str] = field(default_factory=dict)
    deid_secret: str = ""
    orthanc_password: str = ""

    def to_json(self) -> dict[str, object]:
        return {
            "s3": {"access_key": self.s3_access_key, "secret_key": self.s3_secret_key},
            "api_keys": dict(self.api_keys),
            DEID_SECRET_KEY: self.deid_secret,
            "orthanc": {"username": ORTHANC_USERNAME, "password": self.orthanc_password},
        }


def credentials_path(stack_dir: Path) -> Path:
    return Path(stack_dir) / CREDENTIALS_FILE


def _text(value: object) -> str:
    return value.strip() if isinstance(value, str) else ""


def parse_credentials(data: object) -> StackCredentials:
    """The record from parsed JSON; fields of the wrong type count as absent."""
    if not isinstance(data, dict):
        return StackCredentials()
    s3 = data.get("s3") if isinstance(data.get("s3"), dict) else {}
    keys = data.get("api_keys") if isinstance(data.get("api_keys"), dict) else {}
    orthanc = data.get("orthanc") if isinstance(data.get("orthanc"), dict) else {}
    assert isinstance(s3, dict) and isinstance(keys, dict) and isinstance(orthanc, dict)
    return StackCredentials(
        s3_access_key=_text(s3.get("access_key")),
        s3_secret_key=_text(s3.get("secret_key")),
        api_keys={str(role): _text(key) for role, key in keys.items() if _text(key)},
        deid_secret=_text(data.get(DEID_SECRET_KEY)),
        orthanc_password=_text(orthanc.get("password")),
    )


def read_credentials(stack_dir: Path) -> StackCredentials | None:
    """The stack's credentials, ``None`` when the stack never ran here.

    Raises :class:`CredentialsError` when the file exists but cannot be read or parsed.
    """
    path = credentials_path(stack_dir)
    if not path.exists():
        return None
    try:
        return parse_credentials(json.loads(path.read_text()))
    except (OSError, ValueError) as exc:
        # not "re-run stack up": that refuses it too, rather than replace the secrets it holds
        raise CredentialsError(f"{path} is unreadable ({exc}); repair it or restore a backup") from exc


def resolve_s3_keys(access_key: str, secret_key: str, stack_dir: Path) -> tuple[str, str]:
    """S3 keys from the settings, each missing one taken from the stack's credentials."""
    if access_key and secret_key:
        return access_key, secret_key
    creds = read_credentials(stack_dir)
    if creds is None:
        return access_key, secret_key
    return access_key or creds.s3_access_key, secret_key or creds.s3_secret_key
