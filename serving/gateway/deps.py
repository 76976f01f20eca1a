"""FastAPI dependencies as named ``Annotated`` aliases; route handlers stay thin.

All are ``async def`` although none awaits: FastAPI runs a plain ``def``
dependency in its thread pool, three thread hops per request for a dict lookup
and a sha256 of the key. Nothing here may block.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable
from typing import Annotated

from fastapi import Depends, Header, Request

from serving.config import ServingSettings
from serving.errors import RateLimited, Unauthorized
from serving.gateway.auth import Principal, Role, extract_key
from serving.gateway.state import GatewayState


async def get_state(request: Request) -> GatewayState:
    state: GatewayState = request.app.state.cxr
    return state


StateDep = Annotated[GatewayState, Depends(get_state)]


async def get_settings(state: StateDep) -> ServingSettings:
    return state.settings


SettingsDep = Annotated[ServingSettings, Depends(get_settings)]


async def get_principal(
    request: Request,
    state: StateDep,
    authorization: Annotated[str | None, Header(include_in_schema=False)] = None,
    x_api_key: Annotated[str | None, Header(include_in_schema=False)] = None,
) -> Principal:
    """Authenticate the API key, then charge the key's rate limit.

    Each missing or unknown key costs the client address a token of its own
    bucket (CXR_AUTH_FAIL_RATE_PER_S, CXR_AUTH_FAIL_BURST); once it is empty
    every request from there is a 429 before its key is even looked at, so
    guessing keys is no faster than the refill.
    """
    if state.keys is None:
        principal = Principal(key_id="anonymous", role=Role.admin)
    else:
        address = request.client.host if request.client else "unknown"
        try:
            state.auth_failures.check(address, charge=False)
        except RateLimited as exc:
            raise RateLimited(
                f"too many requests with a missing or unknown API key from {address}; "
                f"retry in {exc.retry_after_s} s",
                retry_after_s=exc.retry_after_s,
            ) from None
        try:
            principal = state.keys.authenticate(extract_key(authorization, x_api_key))
        except Unauthorized:
            with contextlib.suppress(RateLimited):
                state.auth_failures.check(address)
            raise
    request.state.principal = principal
    state.limiter.check(principal.key_id)
    return principal


def require(role: Role) -> Callable[[Principal], Awaitable[Principal]]:
    async def dependency(principal: Annotated[Principal, Depends(get_principal)]) -> Principal:
        principal.require(role)
        return principal

    dependency.__name__ = f"require_{role.name}"
    return dependency


PacsDep = Annotated[Principal, Depends(require(Role.pacs))]
RadiologistDep = Annotated[Principal, Depends(require(Role.radiologist))]
OperatorDep = Annotated[Principal, Depends(require(Role.operator))]
AdminDep = Annotated[Principal, Depends(require(Role.admin))]
