"""API keys and roles.

Keys are stored only as sha256 hashes in a JSON file (``CXR_API_KEYS_FILE``,
``{"keys": [{"id", "role", "sha256"}]}``) so a leaked file does not leak keys.
Roles are ordered: each one can do everything the one before it can, which is
how radiology departments hand out access (integration < reader < operator).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from collections import Counter
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path

from pydantic import BaseModel, ValidationError, model_validator

from serving.errors import Forbidden, Unauthorized


class Role(IntEnum):
    """Ordered roles; a higher role includes every right of the lower ones."""

    pacs = 1
    radiologist = 2
    operator = 3
    admin = 4


class KeyEntry(BaseModel):
    id: str
    role: Role
    sha256: str
    # results are visible to the keys of one tenant only (a site or department); the
    # one-machine stack is one site, so its keys share the default tenant
    tenant: str = "default"

    model_config = {"use_enum_values": False}


class KeyFile(BaseModel):
    keys: list[KeyEntry]

    @model_validator(mode="after")
    def _ids_unique(self) -> KeyFile:
        """One id, one key: the rate limit, the audit line and feedback's ``rad_id`` know a caller by it.

        Two keys under one id (each site's stack names its keys ``<role>-1``, so merged files repeat
        them) shared one rate-limit bucket across tenants and were one caller in the audit log.
        """
        twice = sorted(i for i, n in Counter(entry.id for entry in self.keys).items() if n > 1)
        if twice:
            raise ValueError(f"key id '{twice[0]}' is used by more than one key; give each key its own id")
        return self


@dataclass(frozen=True)
class Principal:
    """Who is calling: the key id (safe to log), its role and the tenant whose results it sees."""

    key_id: str
    role: Role
    tenant: str = "default"

    def require(self, needed: Role) -> None:
        if self.role < needed:
            raise Forbidden(
                f"key '{self.key_id}' has role '{self.role.name}'; this route needs '{needed.name}' or higher"
            )


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def parse_role(value: str | int | Role) -> Role:
    if isinstance(value, Role):
        return value
    if isinstance(value, int):
        return Role(value)
    try:
        return Role[value]
    except KeyError as exc:
        raise ValueError(f"unknown role {value!r}; expected one of {[r.name for r in Role]}") from exc


class KeyStore:
    """Looks keys up by hash, in constant time per entry."""

    def __init__(self, entries: list[KeyEntry]) -> None:
        self._entries = entries

    @classmethod
    def from_file(cls, path: Path) -> KeyStore:
        try:
            raw = json.loads(path.read_text())
            raw["keys"] = [{**k, "role": parse_role(k["role"])} for k in raw.get("keys", [])]
            return cls(KeyFile.model_validate(raw).keys)
        except FileNotFoundError as exc:
            raise FileNotFoundError(
                f"API keys file {path} does not exist: run `cxr stack up` or set CXR_API_KEYS_FILE"
            ) from exc
        except (ValueError, KeyError, TypeError, ValidationError) as exc:
            raise ValueError(f"API keys file {path} is not valid: {exc}") from exc

    @property
    def entries(self) -> list[KeyEntry]:
        return list(self._entries)

    def authenticate(self, key: str | None) -> Principal:
        if not key:
            raise Unauthorized("missing API key: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'")
        digest = hash_key(key)
        for entry in self._entries:
            if hmac.compare_digest(entry.sha256, digest):
                return Principal(key_id=entry.id, role=entry.role, tenant=entry.tenant)
        raise Unauthorized("unknown API key")


def write_keys_file(path: Path, roles: list[str]) -> dict[str, str]:
    """Generate one key per role, write the hashed file (mode 0600) and return role -> plaintext key."""
    plain = {role: f"cxr_{role}_{secrets.token_urlsafe(24)}" for role in roles}
    data = {
        "keys": [
            {"id": f"{role}-1", "role": parse_role(role).name, "sha256": hash_key(key)}
            for role, key in plain.items()
        ]
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
    path.chmod(0o600)
    return plain


def extract_key(authorization: str | None, x_api_key: str | None) -> str | None:
    if x_api_key:
        return x_api_key.strip()
    if authorization:
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
        raise Unauthorized("Authorization header must be 'Bearer <key>'")
    return None
