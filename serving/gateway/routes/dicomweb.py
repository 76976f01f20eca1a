"""``POST /dicomweb/studies``: DICOMweb STOW-RS; each stored instance is run through the detector."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse

from serving.gateway.auth import Principal
from serving.gateway.deps import PacsDep, StateDep, charge_images
from serving.gateway.state import GatewayState
from serving.gateway.uploads import read_body
from serving.inference.detector import DetectionReply

router = APIRouter(prefix="/dicomweb", tags=["dicomweb"])

_STOW_DOC: dict[str, Any] = {
    "requestBody": {
        "content": {
            'multipart/related; type="application/dicom"': {"schema": {"type": "string", "format": "binary"}}
        },
        "required": True,
    }
}


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


def sent_back_ids(replies: list[DetectionReply]) -> list[str]:
    """The results a send-back of ``replies`` builds on: each study's images the worklist holds."""
    return [rid for reply in replies if reply.study is not None for rid in reply.study.result_ids]


_SEND_BACK = Query(
    description="send the SR and presentation states back to every PACS serving this caller's tenant "
    "(true; CXR_PACS_DESTINATIONS callers), to none (false); default: those of them with auto true",
)


async def _store(
    request: Request, state: GatewayState, principal: Principal, study: str | None, send_back: bool | None
) -> JSONResponse:
    body = await read_body(request, state.settings.max_body_bytes)
    instances = await state.stow.split(request.headers.get("content-type", ""), body)
    del body
    charge_images(state, principal, len(instances))  # each instance is a detection, as in a batch

    named: list[str] = []  # the audit line names every result stored, even when a later instance fails
    studies: list[str | None] = []  # and every study, as its keyed hash
    request.state.result_ids, request.state.study_uids = named, studies

    def stored(reply: DetectionReply) -> None:
        request.state.stage = reply.outcome.stage
        request.state.model_version = reply.outcome.model.version
        request.state.study_uid = reply.study_uid  # the audit line keeps its keyed hash, never the UID
        named.append(reply.record.request_id)
        studies.append(reply.study_uid)

    result = await state.stow.store(
        instances,
        study=study,
        tenant=principal.tenant,
        base_url=base_url(request, state.settings.public_base_url),
        on_stored=stored,
    )
    request.state.detections = result.detections
    headers = {}
    if state.sendback is not None:
        destinations = state.sendback.choose(principal.tenant, send_back)
        if destinations and result.replies:
            if await state.sendback.replies(result.replies, destinations, state.results, principal.tenant):
                named.extend(sent_back_ids(result.replies))  # the studies' earlier results went too
            headers["X-CXR-Sent-Back"] = ",".join(d.name for d in destinations)
    return JSONResponse(
        result.body(), status_code=result.status, media_type="application/dicom+json", headers=headers
    )


@router.post("/studies", openapi_extra=_STOW_DOC, summary="STOW-RS: store (and detect on) instances")
async def stow(
    request: Request,
    state: StateDep,
    principal: PacsDep,
    send_back: Annotated[bool | None, _SEND_BACK] = None,
) -> JSONResponse:
    return await _store(request, state, principal, None, send_back)


@router.post("/studies/{study}", openapi_extra=_STOW_DOC, summary="STOW-RS into one study")
async def stow_study(
    study: str,
    request: Request,
    state: StateDep,
    principal: PacsDep,
    send_back: Annotated[bool | None, _SEND_BACK] = None,
) -> JSONResponse:
    from serving.pacs.pull import check_uid

    check_uid(study, "the study UID in the path")  # it becomes the study's worklist key and its URL
    return await _store(request, state, principal, study, send_back)
