"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from serving.gateway.deps import StateDep

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> JSONResponse:
    return JSONResponse({"status": "ok"})


@router.get("/readyz")
async def readyz(state: StateDep) -> JSONResponse:
    """Ready only when every configured stage's backend has the model loaded."""
    stages = {}
    for stage in state.settings.serving_stages:
        ok = await state.backend.ready(stage)
        state.metrics.stage_ready.labels(stage).set(1 if ok else 0)
        stages[stage] = ok
    ready = all(stages.values())
    return JSONResponse({"ready": ready, "stages": stages}, status_code=200 if ready else 503)


@router.get("/metrics")
async def metrics(state: StateDep) -> Response:
    await state.detector.publish_stage_state()  # readiness as of this scrape, every stage
    state.metrics.spool_depth.set(state.feedback.spool.depth())
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
