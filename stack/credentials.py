"""Secrets the one-machine stack generates on first ``up`` and keeps (mode 0600).

``credentials.json`` holds the S3 keys and one API key per gateway role in clear
(for the person who ran ``make up``); the gateway only ever sees ``api_keys.json``,
which holds SHA-256 hashes of those keys. It also holds ``deid_secret``, the
install's secret behind feedback pseudonyms and PatientID hashes, which the
gateway and the pipeline read from here (:mod:`core.install_secret`), and the
password of Orthanc's one user: kept here rather than beside Orthanc so that the
demo, the benchmark and a person find every generated secret in one file, read by
one reader (:func:`core.credentials.read_credentials`).
"""

from __future__ import annotations

import hashlib
import json
import secrets
from pathlib import Path

from core.credentials import StackCredentials, parse_credentials
from core.durable import fsync_dir, replace_durably
from core.errors import CredentialsError
from core.install_secret import SECRET_FILE, read_secret_file

ROLES: tuple[str, ...] = ("pacs", "radiologist", "operator", "admin")


def write_private(path: Path, text: str) -> None:
    """``text`` at ``path``, mode 0600 from its first byte, all or nothing, and only when it changed.

    ``credentials.json`` holds the install's de-identification secret and is written on every
    ``up`` and ``status``: truncated in place, a full disk or a crash mid-write left it empty or
    garbled, and a gateway then fell back to another secret (pseudonyms changed silently). A temp
    file beside it (created 0600, never readable by others), fsync'd and renamed, cannot.
    """
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    data = text.encode()
    try:
        if path.read_bytes() == data and (path.stat().st_mode & 0o777) == 0o600:
            return
    except OSError:
        pass
    replace_durably(path, data, mode=0o600)
    fsync_dir(path.parent)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def load_or_create(credentials_file: Path, api_keys_file: Path) -> StackCredentials:
    """Read the stack's secrets, generating any that are missing (idempotent).

    Raises :class:`CredentialsError` (and writes nothing) when the file exists but cannot be read
    or holds no JSON object: regenerating would replace the install's de-identification secret
    (every pseudonym changes) and keys that clients still hold, with no way back.
    """
    data: object = {}
    if credentials_file.exists():
        try:
            data = json.loads(credentials_file.read_text())
        except (OSError, ValueError) as exc:
            raise CredentialsError(f"{credentials_file} cannot be read ({exc}); repair it") from exc
        if not isinstance(data, dict):
            raise CredentialsError(f"{credentials_file} holds no JSON object; repair it")
    old = parse_credentials(data)
    # an install that ran before this key existed keeps the secret its gateway generated
    # (an empty or unreadable one is an error, as for the gateway: a new secret changes every pseudonym)
    earlier = "" if old.deid_secret else read_secret_file(credentials_file.parent / SECRET_FILE)
    creds = StackCredentials(
        s3_access_key=old.s3_access_key or "cxr" + secrets.token_hex(8),
        s3_secret_key=old.s3_secret_key or secrets.token_urlsafe(30),
        api_keys={
            role: old.api_keys.get(role) or f"cxr_{role}_{secrets.token_urlsafe(24)}" for role in ROLES
        },
        deid_secret=old.deid_secret or earlier or secrets.token_hex(32),
        orthanc_password=old.orthanc_password or secrets.token_urlsafe(24),
    )
    write_private(credentials_file, json.dumps(creds.to_json(), indent=2) + "\n")
    hashed = {
        "keys": [{"id": role, "role": role, "sha256": hash_key(key)} for role, key in creds.api_keys.items()]
    }
    write_private(api_keys_file, json.dumps(hashed, indent=2) + "\n")
    return creds


def write_env_file(path: Path, env: dict[str, str]) -> None:
    """The stack's ``CXR_*`` variables for CLI commands run beside it (mode 0600)."""
    lines = [f"{key}={value}" for key, value in sorted(env.items())]
    write_private(path, "\n".join(lines) + "\n")
