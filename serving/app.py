"""The gateway application: ``uvicorn --factory serving.app:create_app``.

Wires state, middleware (request id, size limit, audit, request metrics),
the JSON error contract and the routes. Nothing happens at import time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from serving.audit import AuditEntry, now_iso, uid_hash
from serving.backend import InferenceBackend
from serving.config import ServingSettings
from serving.errors import PayloadTooLarge, ServingError
from serving.postprocess import warm_up
from serving.results import BlobStore
from serving.routes import admin, detect, dicomweb, feedback, health, results, review
from serving.routes.review import STATIC_DIR
from serving.state import GatewayState, build_state

log = logging.getLogger(__name__)

_UNTRACKED = {"/metrics", "/healthz", "/readyz"}


def error_body(code: str, message: str, request_id: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "request_id": request_id}}


def _request_id(request: Request) -> str:
    return getattr(request.state, "request_id", None) or uuid.uuid4().hex


def _install_error_handlers(app: FastAPI) -> None:
    async def serving_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ServingError)
        headers = {"Retry-After": str(exc.retry_after_s)} if exc.retry_after_s else None
        if exc.status >= 500:
            log.warning("request_failed code=%s message=%s", exc.code, exc.message)
        return JSONResponse(
            error_body(exc.code, exc.message, _request_id(request)), status_code=exc.status, headers=headers
        )

    async def validation_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e.get('loc', ())) or 'request'}: {e.get('msg', '')}"
            for e in exc.errors()
        )
        return JSONResponse(
            error_body("invalid_request", f"request is invalid: {problems}", _request_id(request)),
            status_code=422,
        )

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        code = {404: "not_found", 405: "method_not_allowed", 400: "invalid_request"}.get(
            exc.status_code, "http_error"
        )
        return JSONResponse(
            error_body(code, str(exc.detail), _request_id(request)),
            status_code=exc.status_code,
            headers=exc.headers,
        )

    async def unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unhandled_error request_id=%s", _request_id(request))
        return JSONResponse(
            error_body(
                "internal_error", "internal error; the request id is in the gateway log", _request_id(request)
            ),
            status_code=500,
        )

    app.add_exception_handler(ServingError, serving_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, unexpected)


def _install_middleware(app: FastAPI, state: GatewayState) -> None:
    @app.middleware("http")
    async def observe(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        incoming = request.headers.get("x-request-id", "")
        rid = (
            incoming if 0 < len(incoming) <= 64 and incoming.replace("-", "").isalnum() else uuid.uuid4().hex
        )
        request.state.request_id = rid
        start = time.perf_counter()
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > state.settings.max_body_bytes:
            exc = PayloadTooLarge(
                f"body of {declared} bytes exceeds the {state.settings.max_body_bytes}-byte limit "
                "(CXR_MAX_BODY_BYTES)"
            )
            response: Response = JSONResponse(error_body(exc.code, exc.message, rid), status_code=exc.status)
        else:
            try:
                response = await call_next(request)
            except Exception:  # handlers cover everything; this keeps the audit line for the impossible case
                log.exception("middleware_unhandled request_id=%s", rid)
                response = JSONResponse(error_body("internal_error", "internal error", rid), status_code=500)
        response.headers["X-Request-ID"] = rid
        elapsed = time.perf_counter() - start
        route = request.scope.get("route")
        path = getattr(route, "path", None) or "unmatched"
        if path in _UNTRACKED:
            return response
        stage = getattr(request.state, "stage", None) or "none"
        state.metrics.requests.labels(path, str(response.status_code), stage).inc()
        state.metrics.request_duration.labels(path, stage).observe(elapsed)
        principal = getattr(request.state, "principal", None)
        salt = state.settings.deid_salt
        state.audit.write(
            AuditEntry(
                time=now_iso(),
                request_id=rid,
                key_id=getattr(principal, "key_id", None),
                role=principal.role.name if principal else None,
                route=path,
                method=request.method,
                status=response.status_code,
                study_hash=uid_hash(getattr(request.state, "study_uid", None), salt),
                sop_hash=uid_hash(getattr(request.state, "sop_uid", None), salt),
                model_version=getattr(request.state, "model_version", None),
                stage=getattr(request.state, "stage", None),
                detections=getattr(request.state, "detections", None),
                duration_ms=round(elapsed * 1000, 2),
            )
        )
        return response


async def _housekeeping(state: GatewayState) -> None:
    """Redeliver spooled feedback every CXR_SPOOL_RETRY_S seconds; purge expired results hourly."""
    last_purge = 0.0
    while True:
        await asyncio.sleep(state.settings.spool_retry_s)
        if state.settings.store_results and time.monotonic() - last_purge > 3600:
            last_purge = time.monotonic()
            try:
                await asyncio.to_thread(state.results.purge)
            except Exception as exc:
                log.warning("results_purge_error error=%s", exc)
        try:
            if state.feedback.spool.depth():
                delivered = await asyncio.to_thread(state.feedback.deliver_spooled)
                if delivered:
                    state.metrics.feedback.labels("delivered_from_spool").inc(delivered)
            state.metrics.spool_depth.set(state.feedback.spool.depth())
        except Exception as exc:  # keep the loop alive whatever the store does
            log.warning("spool_delivery_error error=%s", exc)


def create_app(
    settings: ServingSettings | None = None,
    *,
    backend: InferenceBackend | None = None,
    store: BlobStore | None = None,
    use_store: bool = True,
) -> FastAPI:
    """Build the gateway; with no arguments everything comes from ``CXR_*`` variables."""
    settings = settings or ServingSettings()
    state = build_state(settings, backend=backend, store=store, use_store=use_store)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.detector.refresh_routing(force=True)
        await asyncio.to_thread(warm_up)
        task = asyncio.create_task(_housekeeping(state))
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await state.detector.close()
            await state.backend.close()

    app = FastAPI(
        title="CXR Detect gateway",
        version="0.1.0",
        description="Chest X-ray findings: DICOM/PNG/JPEG in; boxes in original pixels and DICOM SR out.",
        lifespan=lifespan,
    )
    app.state.cxr = state
    _install_error_handlers(app)
    _install_middleware(app, state)
    for module in (detect, results, feedback, admin, dicomweb, health, review):
        app.include_router(module.router)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app
