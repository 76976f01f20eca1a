"""Secrets the one-machine stack generates on first ``up`` and keeps (mode 0600).

``credentials.json`` holds the S3 keys and one API key per gateway role in clear
(for the person who ran ``make up``); the gateway only ever sees ``api_keys.json``,
which holds SHA-256 hashes of those keys. It also holds ``deid_secret``, the
install's secret behind feedback pseudonyms and PatientID hashes, which the
gateway and the pipeline read from here (:mod:`core.install_secret`).
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from core.install_secret import CREDENTIALS_KEY, SECRET_FILE

ROLES: tuple[str, ...] = ("pacs", "radiologist", "operator", "admin")


@dataclass(frozen=True)
class StackCredentials:
    s3_access_key: str
    s3_secret_key: str
    api_keys: dict[str, str]
    deid_secret: str = ""

    def to_json(self) -> dict[str, object]:
        return {
            "s3": {"access_key": self.s3_access_key, "secret_key": self.s3_secret_key},
            "api_keys": dict(self.api_keys),
            CREDENTIALS_KEY: self.deid_secret,
        }


def _write_private(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    path.chmod(0o600)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def load_or_create(credentials_file: Path, api_keys_file: Path) -> StackCredentials:
    """Read the stack's secrets, generating any that are missing (idempotent)."""
    data: dict[str, object] = {}
    if credentials_file.exists():
        data = json.loads(credentials_file.read_text())
    s3 = data.get("s3") if isinstance(data.get("s3"), dict) else {}
    assert isinstance(s3, dict)
    keys_raw = data.get("api_keys") if isinstance(data.get("api_keys"), dict) else {}
    assert isinstance(keys_raw, dict)
    # an install that ran before this key existed keeps the secret its gateway generated
    generated = credentials_file.parent / SECRET_FILE
    earlier = generated.read_text().strip() if generated.exists() else ""
    creds = StackCredentials(
        s3_access_key=str(s3.get("access_key") or "cxr" + secrets.token_hex(8)),
        s3_secret_key=str(s3.get("secret_key") or secrets.token_urlsafe(30)),
        api_keys={
            role: str(keys_raw.get(role) or f"cxr_{role}_{secrets.token_urlsafe(24)}") for role in ROLES
        },
        deid_secret=str(data.get(CREDENTIALS_KEY) or earlier or secrets.token_hex(32)),
    )
    _write_private(credentials_file, json.dumps(creds.to_json(), indent=2) + "\n")
    hashed = {
        "keys": [{"id": role, "role": role, "sha256": hash_key(key)} for role, key in creds.api_keys.items()]
    }
    _write_private(api_keys_file, json.dumps(hashed, indent=2) + "\n")
    return creds


def write_env_file(path: Path, env: dict[str, str]) -> None:
    """The stack's ``CXR_*`` variables for CLI commands run beside it (mode 0600)."""
    lines = [f"{key}={value}" for key, value in sorted(env.items())]
    _write_private(path, "\n".join(lines) + "\n")
