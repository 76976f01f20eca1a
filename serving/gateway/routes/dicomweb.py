"""``POST /dicomweb/studies``: DICOMweb STOW-RS; each stored instance is run through the detector."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from serving.dicom.stow import (
    FAILURE_CANNOT_UNDERSTAND,
    FAILURE_NOT_SUPPORTED,
    FAILURE_PROCESSING,
    StowOutcome,
    split_related,
    stow_response,
    stow_status,
)
from serving.errors import InvalidImage, ServingError, UnsupportedMediaType
from serving.gateway.auth import Principal
from serving.gateway.deps import PacsDep, StateDep
from serving.gateway.state import GatewayState
from serving.gateway.uploads import read_body

router = APIRouter(prefix="/dicomweb", tags=["dicomweb"])
log = logging.getLogger(__name__)

_STOW_DOC: dict[str, Any] = {
    "requestBody": {
        "content": {
            'multipart/related; type="application/dicom"': {"schema": {"type": "string", "format": "binary"}}
        },
        "required": True,
    }
}


def _uids(data: bytes) -> tuple[str, str, str]:
    """SOP Class, SOP Instance and Study UIDs through the guarded reader (blocking: run in the pool)."""
    from data_pipeline.dicom_io import read_header
    from data_pipeline.errors import ImageDecodeError

    try:
        ds = read_header(data)
    except ImageDecodeError:
        return "", "", ""  # the detector refuses it with the reason; the status names no UIDs
    return (
        str(ds.get("SOPClassUID", "")),
        str(ds.get("SOPInstanceUID", "")),
        str(ds.get("StudyInstanceUID", "")),
    )


def base_url(request: Request, configured: str) -> str:
    """Where clients reach this gateway, for RetrieveURLs.

    CXR_PUBLIC_BASE_URL wins (behind an ingress); else the address the server
    socket accepted the connection on. Never the Host header: a client must not
    choose the URL the gateway hands to other systems.
    """
    if configured:
        return configured.rstrip("/")
    scheme = str(request.scope.get("scheme") or "http")
    root = str(request.scope.get("root_path") or "").rstrip("/")  # the server's --root-path, not a header
    server = request.scope.get("server")
    if not server:  # a unix socket: no address to name
        return f"{scheme}://localhost{root}"
    host, port = str(server[0]), server[1]
    if ":" in host:
        host = f"[{host}]"
    if port is None or (scheme, port) in (("http", 80), ("https", 443)):
        return f"{scheme}://{host}{root}"
    return f"{scheme}://{host}:{port}{root}"


async def _store(
    request: Request, state: GatewayState, principal: Principal, study: str | None
) -> JSONResponse:
    body = await read_body(request, state.settings.max_body_bytes)
    offload = state.detector.pipeline.offload
    # parsing 64 MiB of parts and every header runs in the worker pool: never on the event loop
    instances = await offload(split_related, request.headers.get("content-type", ""), body)
    del body
    base = base_url(request, state.settings.public_base_url)
    outcomes: list[StowOutcome] = []
    detections = 0
    for data in instances:
        sop_class, sop_uid, study_uid = await offload(_uids, data)
        if study and study_uid and study_uid != study:
            outcomes.append(StowOutcome(sop_class, sop_uid, failure_reason=FAILURE_NOT_SUPPORTED))
            continue
        try:
            [reply] = await state.detector.detect([data], tenant=principal.tenant)
        except (InvalidImage, UnsupportedMediaType) as exc:
            log.info("stow_instance_rejected code=%s", exc.code)  # the message may quote the file
            outcomes.append(StowOutcome(sop_class, sop_uid, failure_reason=FAILURE_CANNOT_UNDERSTAND))
            continue
        except ServingError as exc:
            if exc.status in (503, 504):
                raise  # the whole request should be retried later, not reported as a bad instance
            outcomes.append(StowOutcome(sop_class, sop_uid, failure_reason=FAILURE_PROCESSING))
            continue
        detections += len(reply.outcome.detections)
        request.state.stage = reply.outcome.stage
        request.state.model_version = reply.outcome.model.version
        rid = reply.record.request_id
        outcomes.append(StowOutcome(sop_class, sop_uid, retrieve_url=f"{base}/v1/results/{rid}/sr"))
    request.state.detections = detections
    study_url = f"{base}/dicomweb/studies/{study}" if study else None
    return JSONResponse(
        stow_response(outcomes, study_url),
        status_code=stow_status(outcomes),
        media_type="application/dicom+json",
    )


@router.post("/studies", openapi_extra=_STOW_DOC, summary="STOW-RS: store (and detect on) instances")
async def stow(request: Request, state: StateDep, principal: PacsDep) -> JSONResponse:
    return await _store(request, state, principal, None)


@router.post("/studies/{study}", openapi_extra=_STOW_DOC, summary="STOW-RS into one study")
async def stow_study(study: str, request: Request, state: StateDep, principal: PacsDep) -> JSONResponse:
    return await _store(request, state, principal, study)
