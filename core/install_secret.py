"""The per-install secret behind every pseudonym (feedback de-identification, PatientID hashes).

A secret with a default in code is public: anyone can hash candidate
PatientIDs with it and reverse the pseudonyms by search. So there is none.
The secret is, in order:

1. the explicit setting (``CXR_DEID_SECRET`` for the gateway, ``CXR_PATIENT_SALT``
   for the data pipeline), for sites that manage it themselves;
2. ``deid_secret`` in ``<stack_dir>/credentials.json``, which ``cxr stack up``
   generates on first start next to the other stack secrets;
3. ``<stack_dir>/install_secret`` (mode 0600), generated here on first use and
   read back afterwards, so a gateway or CLI run without the stack still keeps
   one stable secret per install.

Same secret, same pseudonyms (two images of a study stay one study, dataset
versions stay deterministic); another install, other pseudonyms.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from core.credentials import read_credentials
from core.errors import CredentialsError

SECRET_FILE = "install_secret"


def _from_credentials(stack_dir: Path) -> str:
    try:
        creds = read_credentials(stack_dir)
    except CredentialsError:  # a garbled file must not stop a gateway that has its own secret file
        return ""
    return creds.deid_secret if creds else ""


def _read_file(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def resolve_install_secret(explicit: str, stack_dir: Path) -> str:
    """The install's secret: explicit, else credentials.json, else generated once into ``install_secret``."""
    if explicit.strip():
        return explicit.strip()
    from_credentials = _from_credentials(stack_dir)
    if from_credentials:
        return from_credentials
    path = stack_dir / SECRET_FILE
    existing = _read_file(path)
    if existing:
        return existing
    stack_dir.mkdir(parents=True, exist_ok=True)
    secret = secrets.token_hex(32)
    tmp = stack_dir / f".{SECRET_FILE}.{secrets.token_hex(4)}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(secret + "\n")
    try:
        # link, not rename: when two processes race, the first one's secret wins for both
        os.link(tmp, path)
    except FileExistsError:
        if not _read_file(path):  # an empty or unreadable leftover: replace it
            os.replace(tmp, path)
    except OSError:  # a file system without hard links
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return _read_file(path) or secret
