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

A secret that exists but cannot be read is an error, never a reason to make a new one: a new
secret silently changes every pseudonym, so stored hashes, splits and studies no longer match
(and the old one may be back after the fault is repaired). So the generated file is written
whole and fsync'd before its name appears, and its name is fsync'd before it is used: after a
power cut it is there with all its bytes, not empty.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from core.credentials import read_credentials
from core.durable import fsync_dir, make_dirs
from core.errors import CredentialsError

SECRET_FILE = "install_secret"


def read_secret_file(path: Path) -> str:
    """The secret in ``path``; "" when there is no such file.

    Raises :class:`CredentialsError` when the file is there but cannot be read, or is empty: only
    a person can tell a lost secret from a new install (so they delete the file knowingly).
    """
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        return ""
    except (OSError, ValueError) as exc:
        raise CredentialsError(f"the install secret {path} cannot be read ({exc}); fix its access") from exc
    if not text:
        raise CredentialsError(
            f"the install secret {path} is empty; restore it from a backup, or delete it to start new "
            "pseudonyms (every earlier one then stops matching)"
        )
    return text


def _generate(path: Path) -> str:
    """A new secret at ``path`` (0600 from its creation, whole and durable); another process's, if first."""
    make_dirs(path.parent)
    secret = secrets.token_hex(32)
    tmp = path.with_name(f".{SECRET_FILE}.{secrets.token_hex(8)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(secret + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        try:
            # link, not rename: when two processes race, the first one's secret wins for both
            os.link(tmp, path)
        except FileExistsError:
            pass
        except OSError:  # a file system without hard links
            os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)
    return read_secret_file(path) or secret


def resolve_install_secret(explicit: str, stack_dir: Path) -> str:
    """The install's secret: explicit, else credentials.json, else generated once into ``install_secret``.

    Raises :class:`CredentialsError` when ``credentials.json`` is garbled and there is no
    ``install_secret`` to fall back on (the secret is in that file), or when ``install_secret``
    is there but unreadable or empty.
    """
    if explicit.strip():
        return explicit.strip()
    try:
        creds = read_credentials(stack_dir)
    except CredentialsError as exc:
        garbled: CredentialsError | None = exc  # a gateway with its own secret file still starts
        creds = None
    else:
        garbled = None
    if creds is not None and creds.deid_secret:
        return creds.deid_secret
    path = stack_dir / SECRET_FILE
    existing = read_secret_file(path)
    if existing:
        return existing
    if garbled is not None:
        raise CredentialsError(f"{garbled}; it holds the install's de-identification secret") from garbled
    return _generate(path)
