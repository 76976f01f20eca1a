"""Operator and admin routes: models per stage, routing reload, key listing."""

from __future__ import annotations

import logging
from typing import Any

import httpx
from fastapi import APIRouter
from fastapi.responses import JSONResponse

from core.stages import STAGES
from serving.errors import ServingError
from serving.gateway.deps import AdminDep, OperatorDep, StateDep
from serving.inference.operating_points import describe as describe_operating_points

router = APIRouter(prefix="/v1", tags=["operations"])
log = logging.getLogger(__name__)


def lineage_tags(mlflow_uri: str, name: str, version: str) -> dict[str, str]:
    """The registry's lineage tags of a version (empty when MLflow cannot be reached).

    One REST call with a 2 s timeout instead of ``MlflowClient``: the client
    retries for minutes when the server is down (an operator page must not
    hang) and importing mlflow would double the gateway's start-up time.
    """
    if not version:
        return {}
    try:
        response = httpx.get(
            f"{mlflow_uri.rstrip('/')}/api/2.0/mlflow/model-versions/get",
            params={"name": name, "version": version},
            timeout=2.0,
        )
        response.raise_for_status()
        tags = response.json().get("model_version", {}).get("tags", [])
        return {str(t["key"]): str(t["value"]) for t in tags}
    except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
        log.info("lineage_unavailable name=%s version=%s error=%s", name, version, exc)
        return {}


@router.get("/models")
async def list_models(state: StateDep, principal: OperatorDep) -> JSONResponse:
    state.detector.refresh_routing()
    table = state.router.table
    out: dict[str, Any] = {"canary_weight": table.canary_weight, "stages": {}}
    for stage in STAGES:
        entry = table.stages.get(stage)
        info: dict[str, Any] = {
            "model_name": entry.model_name if entry else state.settings.model_name,
            "routing_version": entry.model_version if entry else "",
            "routing_variant": entry.variant if entry else "",
            "weight": table.canary_weight
            if stage == "canary"
            else (100 - table.canary_weight if stage == "production" else 0),
            "ready": await state.backend.ready(stage),
        }
        try:
            served = await state.backend.model(stage)
            info["served_version"] = served.version
            info["variant"] = served.variant
            info["imgsz"] = list(served.contract.imgsz)
            # the per-class thresholds /v1/detect applies by default, and the calibration it returns
            info["operating_points"] = describe_operating_points(
                served.operating_points, state.settings.conf_threshold
            )
        except ServingError as exc:
            info["served_version"] = None
            info["error"] = exc.message
        version = info.get("served_version") or info["routing_version"]
        info["lineage"] = await state.cpu.run(
            lineage_tags, state.settings.mlflow_uri, info["model_name"], version
        )
        out["stages"][stage] = info
    return JSONResponse(out)


@router.post("/routing/reload")
async def reload_routing(state: StateDep, principal: OperatorDep) -> JSONResponse:
    state.detector.refresh_routing(force=True)
    table = state.router.table
    return JSONResponse(
        {
            "canary_weight": table.canary_weight,
            "versions": {s: table.version(s) for s in STAGES},
        }
    )


@router.get("/admin/keys")
async def list_keys(state: StateDep, principal: AdminDep) -> JSONResponse:
    entries = state.keys.entries if state.keys else []
    return JSONResponse({"keys": [{"id": e.id, "role": e.role.name} for e in entries]})
