"""``POST /v1/detect`` and ``POST /v1/detect/batch``."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import JSONResponse, Response

from core.stages import STAGES, Stage
from serving.dicom.sr import sr_bytes
from serving.errors import Conflict, InvalidRequest
from serving.gateway.auth import Role
from serving.gateway.deps import PacsDep, StateDep, charge_images
from serving.gateway.uploads import image_payloads
from serving.inference.detector import DetectionReply

router = APIRouter(prefix="/v1", tags=["detect"])

_UPLOAD_DOC: dict[str, Any] = {
    "requestBody": {
        "content": {
            "multipart/form-data": {
                "schema": {"type": "object", "properties": {"file": {"type": "string", "format": "binary"}}}
            },
            "application/dicom": {"schema": {"type": "string", "format": "binary"}},
            "image/png": {"schema": {"type": "string", "format": "binary"}},
            "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
        },
        "required": True,
    }
}


def forced_stage(request: Request, header: str | None) -> Stage | None:
    """The operator's ``X-CXR-Stage`` override; other roles may not choose a model."""
    if not header:
        return None
    principal = request.state.principal
    principal.require(Role.operator)
    value = header.strip().lower()
    if value not in STAGES:
        raise InvalidRequest(f"X-CXR-Stage must be one of {', '.join(STAGES)}, got '{header}'")
    return value


def _annotate(request: Request, reply: DetectionReply) -> None:
    request.state.stage = reply.outcome.stage
    request.state.model_version = reply.outcome.model.version
    request.state.study_uid = reply.study_uid
    request.state.sop_uid = reply.sop_uid
    request.state.detections = len(reply.outcome.detections)
    request.state.result_id = reply.record.request_id


@router.post("/detect", openapi_extra=_UPLOAD_DOC, summary="Detect findings on one radiograph")
async def detect(
    request: Request,
    state: StateDep,
    principal: PacsDep,
    conf: Annotated[
        float | None,
        Query(
            ge=0.0,
            le=1.0,
            description="threshold on the returned (calibrated) confidence; "
            "default: the served version's per-class operating points",
        ),
    ] = None,
    format: Annotated[Literal["json", "sr"], Query(description="json, or sr for a DICOM SR")] = "json",
    x_cxr_stage: Annotated[str | None, Header(description="operators: force a stage")] = None,
) -> Response:
    """One radiograph's findings: the DESIGN.md JSON, or with ``format=sr`` its DICOM SR.

    ``X-CXR-Result-ID`` names the stored result in either format. The SR body carries no
    ``request_id``, and ``X-Request-ID`` is only the correlation id (the client's own when it
    sent one), so without this header a ``format=sr`` caller could never address the result it
    just made: not ``GET /v1/results/{id}``, its preview, nor feedback on it.
    """
    forced = forced_stage(request, x_cxr_stage)
    [payload] = await image_payloads(request, state.settings.max_body_bytes)
    [reply] = await state.detector.detect([payload], conf=conf, forced=forced, tenant=principal.tenant)
    _annotate(request, reply)
    model = reply.outcome.model
    headers = {
        "X-CXR-Result-ID": reply.record.request_id,
        "X-CXR-Stage": reply.outcome.stage,
        "X-CXR-Model-Version": model.version,
        "X-CXR-Model-Variant": model.variant,
    }
    if format == "sr":
        if reply.record.source_format != "dicom":
            raise Conflict("format=sr needs a DICOM input: an SR must reference a DICOM source image")
        body = await state.cpu.run(sr_bytes, payload, reply.record.response)
        # the same document GET /v1/results/{id}/sr serves (RFC 9110 8.7: Content-Location)
        headers["Content-Location"] = f"/v1/results/{reply.record.request_id}/sr"
        return Response(body, media_type="application/dicom", headers=headers)
    return JSONResponse(reply.record.response, headers=headers)


@router.post("/detect/batch", openapi_extra=_UPLOAD_DOC, summary="Detect on several radiographs in one call")
async def detect_batch(
    request: Request,
    state: StateDep,
    principal: PacsDep,
    conf: Annotated[float | None, Query(ge=0.0, le=1.0)] = None,
    x_cxr_stage: Annotated[str | None, Header()] = None,
) -> JSONResponse:
    forced = forced_stage(request, x_cxr_stage)
    payloads = await image_payloads(request, state.settings.max_body_bytes, max_files=32)
    charge_images(state, principal, len(payloads))
    replies = await state.detector.detect(payloads, conf=conf, forced=forced, tenant=principal.tenant)
    request.state.detections = sum(len(r.outcome.detections) for r in replies)
    request.state.stage = replies[0].outcome.stage if replies else None
    request.state.result_ids = [r.record.request_id for r in replies]  # the audit line names each result
    request.state.study_uids = [r.study_uid for r in replies]  # kept as keyed hashes, never the UIDs
    return JSONResponse({"results": [r.record.response for r in replies]})
