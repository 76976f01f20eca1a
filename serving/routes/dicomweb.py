"""``POST /dicomweb/studies``: DICOMweb STOW-RS; each stored instance is run through the detector."""

from __future__ import annotations

import io
import logging
from typing import Any

import pydicom
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from serving.deps import PacsDep, StateDep
from serving.dicomweb import (
    FAILURE_CANNOT_UNDERSTAND,
    FAILURE_NOT_SUPPORTED,
    FAILURE_PROCESSING,
    StowOutcome,
    split_related,
    stow_response,
    stow_status,
)
from serving.errors import InvalidImage, ServingError, UnsupportedMediaType
from serving.uploads import read_body

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
    try:
        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, force=True)
        return (
            str(ds.get("SOPClassUID", "")),
            str(ds.get("SOPInstanceUID", "")),
            str(ds.get("StudyInstanceUID", "")),
        )
    except Exception:
        return "", "", ""


def base_url(request: Request, configured: str) -> str:
    """Where clients reach this gateway, for RetrieveURLs.

    CXR_PUBLIC_BASE_URL wins (behind an ingress); else the Host header, except
    that dicomweb-client sends Host without the port, so a port-less Host on a
    non-default port is completed from the socket the request arrived on.
    """
    if configured:
        return configured.rstrip("/")
    base = str(request.base_url).rstrip("/")
    host = request.headers.get("host", "")
    server = request.scope.get("server")
    if host and ":" not in host and server and server[1] not in (80, 443):
        base = f"{request.url.scheme}://{host}:{server[1]}"
    return base


async def _store(request: Request, state: Any, study: str | None) -> JSONResponse:
    body = await read_body(request, state.settings.max_body_bytes)
    instances = split_related(request.headers.get("content-type", ""), body)
    base = base_url(request, state.settings.public_base_url)
    outcomes: list[StowOutcome] = []
    detections = 0
    for data in instances:
        sop_class, sop_uid, study_uid = _uids(data)
        if study and study_uid and study_uid != study:
            outcomes.append(StowOutcome(sop_class, sop_uid, failure_reason=FAILURE_NOT_SUPPORTED))
            continue
        try:
            [reply] = await state.detector.detect([data])
        except (InvalidImage, UnsupportedMediaType) as exc:
            log.info("stow_instance_rejected reason=%s", exc.message)
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
    return await _store(request, state, None)


@router.post("/studies/{study}", openapi_extra=_STOW_DOC, summary="STOW-RS into one study")
async def stow_study(study: str, request: Request, state: StateDep, principal: PacsDep) -> JSONResponse:
    return await _store(request, state, study)
