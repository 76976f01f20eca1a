"""One study's PACS routes: pull and analyse it (``/analyze``), send its results back (``/send-back``)."""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse

from serving.errors import InvalidImage, StudyNotAnalysed, StudyResultsMissing
from serving.gateway.deps import PacsDep, StateDep, charge_images
from serving.gateway.routes.dicomweb import base_url, sent_back_ids
from serving.inference.detector import study_triage
from serving.pacs.pull import PacsPull, check_uid

router = APIRouter(prefix="/v1/studies", tags=["pacs"])


@router.post("/{study_uid}/analyze", summary="DICOMweb pull: fetch a study from the PACS and analyse it")
async def analyze_study(
    study_uid: str,
    request: Request,
    state: StateDep,
    principal: PacsDep,
    send_back: Annotated[
        bool,
        Query(
            description="send SR + presentation states to every PACS serving the caller's tenant "
            "(default true)"
        ),
    ] = True,
) -> JSONResponse:
    """QIDO-RS + WADO-RS from ``CXR_PACS_DICOMWEB_URL``, then the STOW-RS path for each radiograph."""
    check_uid(study_uid, "the study UID")
    # the audit line names the study (as its keyed hash) whether or not the pull or analysis succeeds
    request.state.study_uid = study_uid
    pull = PacsPull(state.settings)
    listed = await asyncio.to_thread(pull.instances, study_uid)  # network: not the CPU pool
    # each radiograph is a detection, as in a batch; charged before the fetch, which a refusal spares
    charge_images(state, principal, len(listed))
    instances = await asyncio.to_thread(pull.fetch_study, study_uid, listed)
    # every result as it is stored, as STOW-RS does: a 503 on a later image still names the earlier ones
    named: list[str] = []
    request.state.result_ids = named
    result = await state.stow.store(
        instances,
        study=study_uid,
        tenant=principal.tenant,
        base_url=base_url(request, state.settings.public_base_url),
        on_stored=lambda reply: named.append(reply.record.request_id),
    )
    del instances
    replies = result.replies
    if not replies:
        raise InvalidImage(f"none of the study's {len(result.outcomes)} radiographs could be analysed")
    request.state.detections = result.detections
    request.state.stage = replies[-1].outcome.stage
    request.state.model_version = replies[-1].outcome.model.version
    sent_to: list[str] = []
    queued = 0
    if state.sendback is not None and send_back:
        destinations = state.sendback.choose(principal.tenant, True)
        queued = await state.sendback.replies(replies, destinations, state.results, principal.tenant)
        if queued:
            named.extend(sent_back_ids(replies))  # the study's earlier results went too
        sent_to = [d.name for d in destinations]
    study = study_triage(replies)
    body = {
        "study_uid": study_uid,
        "triage": study.as_dict() if study else None,
        "results": [r.record.response for r in replies],
        "failed": sum(o.failure_reason is not None for o in result.outcomes),
        "sent_to": sent_to,
        "objects_queued": queued,
    }
    return JSONResponse(body)


@router.post("/{study_uid}/send-back", summary="Send a study's results, as analysed so far, back to the PACS")
async def send_back_study(
    study_uid: str, request: Request, state: StateDep, principal: PacsDep
) -> JSONResponse:
    """The study's SR and presentation states, built from every image the gateway analysed for it.

    The DIMSE SCP hands each image over as it arrives (STOW-RS with ``send_back=false``) and
    calls this once the study settled (``serving/dimse/forwarder.py``): the objects cover the
    whole study, with the worklist's triage, exactly as a STOW-RS upload of the study with
    ``send_back=true`` would have built them. 404 ``study_not_analysed`` when no image of the
    study was analysed here; 409 ``study_results_missing`` when none of them can be built any
    more (results or sources past retention). Either way the caller holds the images and can
    send them again.
    """
    check_uid(study_uid, "the study UID")
    request.state.study_uid = study_uid  # the audit line keeps its keyed hash, never the UID
    triage = None
    if state.worklist is not None:
        triage = await state.cpu.run(state.worklist.get, principal.tenant, study_uid)
    if triage is None:
        raise StudyNotAnalysed("no image of this study was analysed by this gateway (or its results expired)")
    sent_to: list[str] = []
    queued = images = 0
    if state.sendback is not None:
        destinations = state.sendback.choose(principal.tenant, True)
        queued, images = await state.sendback.settled_study(
            triage, destinations, state.results, principal.tenant
        )
        if destinations and not images:
            raise StudyResultsMissing(
                f"the study's {triage.images} analysed image(s) are no longer held here "
                "(results or sources expired): send the images again"
            )
        sent_to = [d.name for d in destinations]
        if queued:
            request.state.result_ids = list(triage.result_ids)  # the results the objects are built from
    body = {
        "study_uid": study_uid,
        "triage": triage.as_dict(),
        "images": images,  # those the objects cover (0 when nothing is sent back)
        "sent_to": sent_to,
        "objects_queued": queued,
    }
    return JSONResponse(body)
