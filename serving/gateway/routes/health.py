"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from serving.gateway.deps import StateDep
from serving.gateway.middleware import error_body

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> JSONResponse:
    return JSONResponse({"status": "ok"})


@router.get("/readyz")
async def readyz(request: Request, state: StateDep) -> JSONResponse:
    """Ready only when every configured stage's backend has the model loaded.

    The 503 carries the error object every 4xx/5xx carries (DESIGN.md: ``{"error": {"code",
    "message", "request_id"}}``) beside ``ready`` and ``stages``: a client or load balancer that
    reads the error contract learns which stage is not ready instead of finding no ``error``.
    """
    stages = {}
    for stage in state.settings.serving_stages:
        ok = await state.backend.ready(stage)
        state.metrics.stage_ready.labels(stage).set(1 if ok else 0)
        stages[stage] = ok
    ready = all(stages.values())
    body: dict[str, Any] = {"ready": ready, "stages": stages}
    if not ready:
        down = ", ".join(s for s, ok in stages.items() if not ok)
        body |= error_body(
            "not_ready",
            f"stage(s) {down}: no model loaded or the inference server cannot be reached",
            str(request.state.request_id),
        )
    return JSONResponse(body, status_code=200 if ready else 503)


@router.get("/metrics")
async def metrics(state: StateDep) -> Response:
    await state.detector.publish_stage_state()  # readiness as of this scrape, every stage
    state.metrics.spool_depth.set(state.feedback.spool.depth())
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
