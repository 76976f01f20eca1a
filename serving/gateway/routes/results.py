"""``GET /v1/results/{request_id}`` (JSON), ``.../sr`` (DICOM SR), ``.../preview.png``, ``.../pixels``
and ``.../saliency.png`` (occlusion saliency of its boxes: :mod:`serving.inference.saliency`)."""

from __future__ import annotations

import io
from typing import Annotated

import numpy as np
from fastapi import APIRouter, Query
from fastapi.responses import JSONResponse, Response
from PIL import Image

from serving.dicom.sr import sr_bytes
from serving.errors import Conflict, NotFound
from serving.gateway.deps import PacsDep, RadiologistDep, StateDep
from serving.gateway.state import GatewayState
from serving.inference.saliency import SaliencyService

router = APIRouter(prefix="/v1/results", tags=["results"])

PREVIEW_MAX_SIDE = 1024
#: the VOI LUT functions of PS3.3 C.11.2.1.3 that :func:`data_pipeline.dicom_io.window` applies
VOI_FUNCTIONS = frozenset({"LINEAR", "LINEAR_EXACT", "SIGMOID"})


def voi_function(value: str) -> str:
    """The VOILUTFunction to name in ``X-CXR-Window-Function``: one of :data:`VOI_FUNCTIONS`.

    The value comes from the uploaded DICOM, so it is whatever a client wrote: a byte such as
    0xB5 decodes to a character whose upper case is not Latin-1 (micro sign -> Greek capital
    mu), and a header value that Latin-1 cannot encode made ``GET .../pixels`` a 500. Any other
    value is named ``LINEAR``, which is what :func:`~data_pipeline.dicom_io.window` (the preview
    and the model's input) applies for it, so the review page keeps drawing what the decoder shows.
    """
    return value if value in VOI_FUNCTIONS else "LINEAR"


def render_preview(source: bytes) -> bytes:
    """PNG of the image as a reader sees it (VOI applied), at most 1024 px a side."""
    from data_pipeline.dicom_io import decode_bytes
    from data_pipeline.geometry import resize_longest

    img = resize_longest(decode_bytes(source).to_uint8(), PREVIEW_MAX_SIDE)
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(img)).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def render_pixels(source: bytes) -> tuple[bytes, dict[str, str]]:
    """The values behind the image for window/level in the review page: raw uint16 and their meaning.

    Values after the Modality LUT, at most 1024 px a side, quantised to 16 bits over their range:
    ``value = code * X-CXR-Value-Slope + X-CXR-Value-Intercept``. The ``X-CXR-Window-*`` headers
    carry the source's own VOI window (:func:`~data_pipeline.dicom_io.decode_windowable`).
    """
    from data_pipeline.dicom_io import decode_windowable
    from data_pipeline.geometry import resize_longest

    image = decode_windowable(source)
    values = resize_longest(image.values, PREVIEW_MAX_SIDE)
    lo, hi = float(values.min()), float(values.max())
    slope = (hi - lo) / 65535.0 if hi > lo else 1.0
    codes = np.rint((values - np.float32(lo)) * np.float32(1.0 / slope)).clip(0, 65535).astype("<u2")
    rows, cols = codes.shape
    headers = {
        "X-CXR-Columns": str(cols),
        "X-CXR-Rows": str(rows),
        "X-CXR-Value-Slope": repr(slope),
        "X-CXR-Value-Intercept": repr(lo),
        "X-CXR-Window-Center": repr(image.window.center),
        "X-CXR-Window-Width": repr(image.window.width),
        "X-CXR-Window-Function": voi_function(image.window.function),
        "X-CXR-Invert": "1" if image.invert else "0",
    }
    return codes.tobytes(), headers


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
        headers={
            "Content-Disposition": f'attachment; filename="{request_id}-sr.dcm"',
        },
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
    return Response(png, media_type="image/png")


@router.get(
    "/{request_id}/pixels",
    response_class=Response,
    responses={200: {"content": {"application/octet-stream": {}}}},
)
async def get_pixels(request_id: str, state: StateDep, principal: RadiologistDep) -> Response:
    """Little-endian uint16 values (rows x cols) for window/level; their scale and VOI in X-CXR-* headers."""
    record = await state.cpu.run(state.results.get, request_id, principal.tenant)
    if record.source is None:
        raise NotFound(
            f"the source image of '{request_id}' is no longer kept (CXR_SOURCE_RETENTION_HOURS); detect again"
        )
    body, headers = await state.cpu.run(render_pixels, record.source)
    return Response(
        body,
        media_type="application/octet-stream",
        headers=headers,
    )


def saliency_service(state: GatewayState) -> SaliencyService:
    """The gateway's one :class:`SaliencyService` (its cache and concurrency slots), made on first use."""
    service = state.extras.get("saliency")
    if not isinstance(service, SaliencyService):
        service = SaliencyService(state.settings, state.detector, state.results, state.cpu)
        state.extras["saliency"] = service
    return service


@router.get(
    "/{request_id}/saliency.png",
    response_class=Response,
    responses={200: {"content": {"image/png": {}}}},
)
async def get_saliency(
    request_id: str,
    state: StateDep,
    principal: RadiologistDep,
    box: Annotated[int | None, Query(ge=0, description="explain this box only (index in detections)")] = None,
) -> Response:
    """Where the model looked for the result's boxes: an RGBA heat map at the image's aspect.

    Occlusion on the served model (:mod:`serving.inference.saliency`), computed on first request
    and then cached with the result; ``X-CXR-Saliency-Peak`` is the largest share of a box's score
    one patch took away (the map itself is scaled to its peak).
    """
    image = await saliency_service(state).get(request_id, principal.tenant, box)
    return Response(
        image.png,
        media_type="image/png",
        headers=image.headers(),
    )
