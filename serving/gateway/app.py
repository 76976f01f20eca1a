"""The gateway application: ``uvicorn --factory serving.gateway.app:create_app``.

Wires state, the middleware (request id, size limit, audit, request metrics:
``serving/gateway/middleware.py``), the JSON error contract and the routes. Nothing
happens at import time.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline
from starlette.exceptions import HTTPException as StarletteHTTPException

from serving import logsafe
from serving.config import ServingSettings
from serving.errors import InputLimitExceeded, ServingError, Unauthorized
from serving.gateway import handoff
from serving.gateway.middleware import INTERNAL_ERROR, ObserveMiddleware, error_body
from serving.gateway.routes import admin, detect, dicomweb, feedback, health, pacs, results, review, worklist
from serving.gateway.routes.review import STATIC_DIR
from serving.gateway.state import GatewayState, build_state
from serving.inference.backend import InferenceBackend
from serving.inference.postprocess import warm_up
from serving.results import BlobStore

log = logging.getLogger(__name__)

#: the retention job's last run, beside the result journal (read by ``cxr stack status``)
RETENTION_STATUS = "retention.json"


def _request_id(request: Request) -> str:
    return getattr(request.state, "request_id", None) or uuid.uuid4().hex


def _install_error_handlers(app: FastAPI) -> None:
    async def serving_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ServingError)
        headers = {"Retry-After": str(exc.retry_after_s)} if exc.retry_after_s else {}
        if isinstance(exc, Unauthorized):  # RFC 9110 15.5.2: a 401 names the scheme that authenticates
            headers["WWW-Authenticate"] = 'Bearer realm="cxr-detect"'
        if exc.status >= 500:
            log.warning("request_failed code=%s message=%s", exc.code, exc.message)
        body = error_body(exc.code, exc.message, _request_id(request))
        if isinstance(exc, InputLimitExceeded):
            # RFC 9457 problem details beside the project's error object: the limit is machine-readable
            problem = {
                "type": f"https://cxr-detect.invalid/problems/{exc.code}",
                "title": "DICOM refused by a limit of the guarded reader",
                "status": exc.status,
                "detail": exc.message,
                "limit": exc.limit,
            }
            return JSONResponse(
                {**problem, **body},
                status_code=exc.status,
                headers=headers,
                media_type="application/problem+json",
            )
        return JSONResponse(body, status_code=exc.status, headers=headers)

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
            error_body("internal_error", INTERNAL_ERROR, _request_id(request)),
            status_code=500,
        )

    app.add_exception_handler(ServingError, serving_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, unexpected)


def run_retention(state: GatewayState) -> None:
    """The retention job: purge expired results and identified sources, record the run for ``make status``.

    Blocking (the housekeeping loop runs it in a thread). The record is a small
    JSON file beside the result journal, so ``cxr stack status`` shows when the
    job last ran and what it deleted without asking the gateway.
    """
    started = datetime.now(UTC)
    if state.settings.ephemeral_disk:  # results whose copy the store missed: tried again
        state.results.persist_journal()
    report = state.results.purge(started)
    results_retention = timedelta(days=state.settings.results_retention_days)
    if state.worklist is not None:  # a study leaves the worklist with its results
        try:
            state.worklist.purge(started - results_retention)
        except Exception as exc:  # its database down: the next run tries again; dead letters go now
            log.warning("worklist_purge_failed error_type=%s", type(exc).__name__)
    dead_letters = 0
    if state.sendback is not None:  # objects a PACS refused for good carry the patient's identity
        dead_letters = state.sendback.outbox.purge_dead_letters(
            results_retention.total_seconds(), started.timestamp()
        )
        if dead_letters:
            log.info("pacs_dead_letters_purged objects=%d", dead_letters)
        handoff.purge_rejected(state, results_retention.total_seconds(), started.timestamp())
    state.metrics.housekeeping_runs.labels("results").inc(report.results)
    state.metrics.housekeeping_runs.labels("sources").inc(report.sources)
    state.metrics.housekeeping_runs.labels("dead_letters").inc(dead_letters)
    record = {
        "last_run": started.isoformat(timespec="seconds"),
        "results_deleted": report.results,
        "sources_deleted": report.sources,
        "dead_letters_deleted": dead_letters,
        "source_retention_hours": state.settings.source_retention_hours,
        "results_retention_days": state.settings.results_retention_days,
        "interval_s": state.settings.housekeeping_interval_s,
    }
    path = state.settings.resolved_results_dir.parent / RETENTION_STATUS
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record))
    tmp.replace(path)


async def _housekeeping(state: GatewayState) -> None:
    """Redeliver spooled feedback every CXR_SPOOL_RETRY_S; retention job every CXR_HOUSEKEEPING_INTERVAL_S."""
    last_purge: float | None = None
    while True:
        if last_purge is None or time.monotonic() - last_purge > state.settings.housekeeping_interval_s:
            last_purge = time.monotonic()
            try:
                await asyncio.to_thread(run_retention, state)
            except Exception as exc:
                log.warning("retention_job_error error_type=%s", type(exc).__name__)
        try:
            if await asyncio.to_thread(handoff.adopt, state) and state.sendback is not None:
                state.sendback.wake()
            await asyncio.to_thread(handoff.ship_audit, state)
        except Exception as exc:  # the store down: the handed-off objects wait there, the audit here
            log.warning("handoff_pass_error error_type=%s", type(exc).__name__)
        try:
            if state.feedback.spool.depth():
                delivered = await asyncio.to_thread(state.feedback.deliver_spooled)
                if delivered:
                    state.metrics.feedback.labels("delivered_from_spool").inc(delivered)
            state.metrics.spool_depth.set(state.feedback.spool.depth())
        except Exception as exc:  # keep the loop alive whatever the store does
            log.warning("spool_delivery_error error=%s", exc)
        await asyncio.sleep(state.settings.spool_retry_s)


def create_app(
    settings: ServingSettings | None = None,
    *,
    backend: InferenceBackend | None = None,
    store: BlobStore | None = None,
    use_store: bool = True,
) -> FastAPI:
    """Build the gateway; with no arguments everything comes from ``CXR_*`` variables."""
    settings = settings or ServingSettings()
    logsafe.install()  # before anything reads a DICOM: pydicom's warnings quote element values
    state = build_state(settings, backend=backend, store=store, use_store=use_store)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.detector.refresh_routing(force=True)
        await asyncio.to_thread(warm_up)
        if state.sendback is not None and state.sendback.destinations:
            await asyncio.to_thread(state.sendback.warm_up)
        tasks = [asyncio.create_task(_housekeeping(state))]
        if state.sendback is not None:
            tasks.append(asyncio.create_task(state.sendback.run()))
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            try:
                await state.detector.close()
                await state.backend.close()
                if state.worklist is not None:
                    state.worklist.close()
                state.audit.close()
            finally:
                # a replica whose disk dies with it hands on its queued PACS objects, results the store
                # missed, feedback and audit log, whatever closing the rest did
                await asyncio.to_thread(handoff.hand_on, state)

    # FastAPI's own /docs and /redoc load Swagger UI and ReDoc (and Google's fonts) from CDNs: on a
    # closed network the pages stay blank, and each load names the gateway to a host outside it.
    # fastapi-offline serves the same pages with the assets from its wheel (/static-offline-docs).
    app = FastAPIOffline(
        # Swagger UI would send the schema to validator.swagger.io for its badge
        swagger_ui_parameters={"validatorUrl": None},
        # ReDoc 2.5 cannot read this schema (it stops at the "$defs" pydantic writes); Swagger UI can
        redoc_url=None,
        title="CXR Detect gateway",
        version="0.1.0",
        description="Chest X-ray findings: DICOM/PNG/JPEG in; boxes in original pixels and DICOM SR out.",
        lifespan=lifespan,
        # Closed network: FastAPI's own OpenTelemetry adds OTLP exporters at startup when the
        # environment says FASTAPI_OTEL_AUTO_CONFIGURE=true, and would send request spans and
        # exception messages (which may quote a header value) to whatever endpoint the environment
        # names. The explicit value wins over the variable; Prometheus is the gateway's telemetry.
        telemetry={"auto_configure": False},
        # a path off by a trailing slash is a JSON 404 like any unknown path. Starlette's default
        # answers it with a 307 to the other spelling on the Host header's host, before any key is
        # checked; and it turned a study addressed with an empty UID into a silent redirect
        redirect_slashes=False,
    )
    app.state.cxr = state
    _install_error_handlers(app)
    app.add_middleware(ObserveMiddleware, state=state)
    for module in (detect, results, feedback, admin, dicomweb, pacs, health, review, worklist):
        app.include_router(module.router)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app
