"""The gateway's one middleware: request id, security and cache headers, size check, metrics, audit line.

Written as a plain ASGI middleware, not with ``@app.middleware("http")``:
Starlette's ``BaseHTTPMiddleware`` runs every request's app in a second task
behind memory streams and re-wraps ``receive``, which an 8 MiB upload then
crosses chunk by chunk on the event loop. Here the body goes straight from
uvicorn to the route; this class only watches ``http.response.start``.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterable
from typing import Any

from fastapi.responses import JSONResponse
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serving.errors import PayloadTooLarge
from serving.gateway.audit import AuditEntry, audited_id, now_iso, uid_hash
from serving.gateway.state import GatewayState

log = logging.getLogger(__name__)

UNTRACKED = {"/metrics", "/healthz", "/readyz"}
INTERNAL_ERROR = "internal error; the request id is in the gateway log"

# On every response (API answers too: none is meant to be framed, sniffed or run as a page).
# The review page loads only its own /static files; previews are blob: URLs.
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' blob: data:; object-src 'none'; base-uri 'none'; "
        "frame-ancestors 'none'; form-action 'self'"
    ),
}
# The Swagger UI page starts with an inline script (FastAPI writes it); its assets are this
# server's (fastapi-offline), so nothing may load from elsewhere: the pages' policy, plus inline code.
DOCS_PATHS = {"/docs", "/docs/oauth2-redirect"}
DOCS_CSP = (
    f"{SECURITY_HEADERS['Content-Security-Policy']}; "
    "script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'"
)
# Answers carry results, pixels and study lists of a tenant: no browser or proxy keeps them
# (the review page fetches with its key header, which no-store does not hinder). Routes may say
# more; only the pages and their static files may be kept, and only revalidated (no-cache): an
# upgrade's review.js is then the next load's, not a stale copy's for hours.
NO_STORE = "no-store"
REVALIDATE = "no-cache"


def _cacheable(path: str) -> bool:
    return path in ("/", *DOCS_PATHS) or path.startswith(("/static/", "/static-offline-docs/"))


def error_body(code: str, message: str, request_id: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "request_id": request_id}}


def _header(scope: Scope, name: bytes) -> str:
    for key, value in scope.get("headers", ()):
        if key == name:
            return bytes(value).decode("latin-1")
    return ""


def _request_id(incoming: str) -> str:
    """The client's ``X-Request-ID`` when it is a plain ASCII token (<= 64 chars), else a new one.

    ASCII: ``isalnum`` also takes "é" and "ª" (the header is read as Latin-1), so a name put there
    reached every log line and the audit log as it was.
    """
    if 0 < len(incoming) <= 64 and incoming.isascii() and incoming.replace("-", "").isalnum():
        return incoming
    return uuid.uuid4().hex


def _declared_over(declared: str, limit: int) -> bool:
    """Whether a Content-Length of ASCII digits names more than ``limit`` bytes; other values: the route's.

    ASCII only: ``"²".isdigit()`` is True but ``int("²")`` fails. Compared by length before ``int``:
    Python refuses ``int()`` of more than 4300 digits (ValueError), which made such a header a 500
    here; the route's reader answers any value that is not a number with a 400.
    """
    if not (declared.isascii() and declared.isdigit()):
        return False
    digits = declared.lstrip("0") or "0"
    return len(digits) > len(str(limit)) or int(digits) > limit


def _shown(declared: str) -> str:
    """A declared length as an error message quotes it: a value of thousands of digits is not echoed."""
    return declared if len(declared) <= 20 else f"{declared[:20]}... ({len(declared)} digits)"


def _named(one: str | None, many: Iterable[str | None] | None) -> list[str]:
    """What a route named: ``many`` then ``one``, in order, each once, without empties."""
    return list(dict.fromkeys(x for x in (*(many or ()), one) if x))


class ObserveMiddleware:
    """Tags each request with an id, refuses declared oversize bodies, then counts and audits it."""

    def __init__(self, app: ASGIApp, state: GatewayState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = _request_id(_header(scope, b"x-request-id"))
        request_state: dict[str, Any] = scope.setdefault("state", {})  # what request.state reads and writes
        request_state["request_id"] = rid
        start = time.perf_counter()
        status = 500
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                started = True
                status = int(message["status"])
                headers = MutableHeaders(scope=message)
                headers["X-Request-ID"] = rid
                path = str(scope.get("path", ""))
                for name, value in SECURITY_HEADERS.items():
                    if name == "Content-Security-Policy" and path in DOCS_PATHS:
                        value = DOCS_CSP
                    headers.setdefault(name, value)
                headers.setdefault("Cache-Control", REVALIDATE if _cacheable(path) else NO_STORE)
            await send(message)

        limit = self.state.settings.max_body_bytes
        declared = _header(scope, b"content-length")
        try:
            if _declared_over(declared, limit):
                exc = PayloadTooLarge(
                    f"body of {_shown(declared)} bytes exceeds the {limit}-byte limit (CXR_MAX_BODY_BYTES)"
                )
                await JSONResponse(error_body(exc.code, exc.message, rid), status_code=exc.status)(
                    scope, receive, send_with_id
                )
            else:
                await self.app(scope, receive, send_with_id)
        except Exception:  # the handlers cover everything; this keeps the audit line for the impossible case
            log.exception("middleware_unhandled request_id=%s", rid)
            if started:
                raise
            response = JSONResponse(error_body("internal_error", INTERNAL_ERROR, rid), status_code=500)
            await response(scope, receive, send_with_id)
        finally:
            self._observe(scope, request_state, rid, status, time.perf_counter() - start)

    def _observe(
        self, scope: Scope, request_state: dict[str, Any], rid: str, status: int, elapsed: float
    ) -> None:
        route = scope.get("route")
        path = getattr(route, "path", None) or "unmatched"
        if path in UNTRACKED:
            return
        state = self.state
        stage = request_state.get("stage") or "none"
        state.metrics.requests.labels(path, str(status), stage).inc()
        state.metrics.request_duration.labels(path, stage).observe(elapsed)
        principal = request_state.get("principal")
        salt = state.secret
        # every access to a result names it: the route's {request_id}, or what the route set; an id
        # from outside that cannot name a result (a UID, a name) only as its keyed hash
        named = _named(
            request_state.get("result_id") or scope.get("path_params", {}).get("request_id"),
            request_state.get("result_ids"),
        )
        result_ids = list(dict.fromkeys(audited_id(rid, salt) for rid in named))
        # studies by keyed hash only: the UIDs never reach the line
        study_uids = _named(request_state.get("study_uid"), request_state.get("study_uids"))
        study_hashes = [h for h in (uid_hash(uid, salt) for uid in study_uids) if h]
        state.audit.write(
            AuditEntry(
                time=now_iso(),
                request_id=rid,
                key_id=getattr(principal, "key_id", None),
                role=principal.role.name if principal else None,
                route=path,
                method=scope.get("method", ""),
                status=status,
                result_id=result_ids[0] if len(result_ids) == 1 else None,
                result_ids=result_ids or None,
                tenant=getattr(principal, "tenant", None),
                study_hash=study_hashes[0] if len(study_hashes) == 1 else None,
                study_hashes=study_hashes or None,
                sop_hash=uid_hash(request_state.get("sop_uid"), salt),
                model_version=request_state.get("model_version"),
                stage=request_state.get("stage"),
                detections=request_state.get("detections"),
                duration_ms=round(elapsed * 1000, 2),
            )
        )
