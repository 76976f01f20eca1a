"""FastAPI dependencies as named ``Annotated`` aliases; route handlers stay thin.

All are ``async def`` although none awaits: FastAPI runs a plain ``def``
dependency in its thread pool, three thread hops per request for a dict lookup
and a sha256 of the key. Nothing here may block.
"""

from __future__ import annotations

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

    The key is looked up first, always: a valid key is never refused by the
    failure limiter, only by its own rate limit. Checking the failure bucket
    before the lookup let one client with a stale key lock every key out of
    its address, and behind the cluster ingress every client shares one
    address, so one broken integration refused PACS, DIMSE forwarding and the
    radiologists alike.

    Only a failed attempt (missing, malformed or unknown key) touches the
    bucket of its client address (CXR_AUTH_FAIL_RATE_PER_S, CXR_AUTH_FAIL_BURST):
    it takes a token and is a 401, or, once the bucket is empty, a 429 with
    Retry-After. The bucket stays keyed by address, not by key, so a client
    cycling through many keys shares one bucket; a success does not
    refill it, or one valid key would reset the count for guesses at others.
    Past the burst a right guess gets 200 where a wrong one gets 429, so
    the limiter throttles and surfaces failed-auth traffic rather than hiding
    which key is valid; that is safe only while keys are long random tokens
    (the stack makes 192-bit ones), never short shared secrets.
    """
    if state.keys is None:
        principal = Principal(key_id="anonymous", role=Role.admin)
    else:
        try:
            principal = state.keys.authenticate(extract_key(authorization, x_api_key))
        except Unauthorized:
            address = request.client.host if request.client else "unknown"
            try:
                state.auth_failures.check(address)
            except RateLimited as exc:
                raise RateLimited(
                    f"too many requests with a missing or unknown API key from {address}; "
                    f"retry in {exc.retry_after_s} s",
                    retry_after_s=exc.retry_after_s,
                ) from None
            raise
    request.state.principal = principal
    state.limiter.check(principal.key_id)
    return principal


def charge_images(state: GatewayState, principal: Principal, images: int) -> None:
    """One rate-limit token per image a request runs through a model; :func:`get_principal` took the first.

    Every route that analyses several images in one call (a batch, a STOW-RS, a study pull) pays
    for each, or the cheapest of them is a way around the limit: a STOW-RS of 64 instances cost
    one token where a batch of 32 cost 32. Capped at the burst, so the refusal is a 429 with a
    finite Retry-After, never a request that can never pass.
    """
    if images > 1:
        state.limiter.check(principal.key_id, cost=min(images - 1, state.limiter.burst))


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
