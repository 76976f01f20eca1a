"""``GET /v1/results/{request_id}`` (JSON), ``.../sr`` (DICOM SR) and ``.../preview.png``."""

from __future__ import annotations

import io

import numpy as np
from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from PIL import Image

from serving.dicom.sr import sr_bytes
from serving.errors import Conflict, NotFound
from serving.gateway.deps import PacsDep, RadiologistDep, StateDep

router = APIRouter(prefix="/v1/results", tags=["results"])

PREVIEW_MAX_SIDE = 1024


def render_preview(source: bytes) -> bytes:
    """PNG of the image as a reader sees it (VOI applied), at most 1024 px a side."""
    from data_pipeline.dicom_io import decode_bytes
    from data_pipeline.geometry import resize_longest

    img = resize_longest(decode_bytes(source).to_uint8(), PREVIEW_MAX_SIDE)
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(img)).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


@router.get("/{request_id}")
async def get_result(request_id: str, state: StateDep, principal: PacsDep) -> JSONResponse:
    record = await state.cpu.run(state.results.get, request_id, principal.tenant)
    return JSONResponse(record.response)


@router.get(
    "/{request_id}/sr", response_class=Response, responses={200: {"content": {"application/dicom": {}}}}
)
async def get_sr(request_id: str, state: StateDep, principal: PacsDep) -> Response:
    record = await state.cpu.run(state.results.get, request_id, principal.tenant)
    if record.source_format != "dicom":
        raise Conflict(
            f"result '{request_id}' came from a {record.source_format.upper()} upload; SRs need DICOM"
        )
    if record.source is None:
        raise NotFound(
            f"the source DICOM of '{request_id}' is no longer kept (CXR_SOURCE_RETENTION_HOURS); detect again"
        )
    body = await state.cpu.run(sr_bytes, record.source, record.response)
    return Response(
        body,
        media_type="application/dicom",
        headers={"Content-Disposition": f'attachment; filename="{request_id}-sr.dcm"'},
    )


@router.get(
    "/{request_id}/preview.png", response_class=Response, responses={200: {"content": {"image/png": {}}}}
)
async def get_preview(request_id: str, state: StateDep, principal: RadiologistDep) -> Response:
    record = await state.cpu.run(state.results.get, request_id, principal.tenant)
    if record.source is None:
        raise NotFound(
            f"the source image of '{request_id}' is no longer kept (CXR_SOURCE_RETENTION_HOURS); detect again"
        )
    png = await state.cpu.run(render_preview, record.source)
    return Response(png, media_type="image/png", headers={"Cache-Control": "private, max-age=300"})
