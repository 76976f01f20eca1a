"""``GET /v1/worklist``: the caller's recently analysed studies, priority first, for radiologists.

Each entry names the study's results (``result_ids``), which the review page opens through
``GET /v1/results/{id}``; those accesses are audited one by one like any other. The listing itself
is audited by the middleware as a request to this route with the caller's key, naming every result
it listed (``result_ids``) and every study by its keyed hash (``study_hashes``); study UIDs never
enter the audit log or the gateway's log.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse

from serving.errors import NotFound
from serving.gateway.deps import RadiologistDep, StateDep
from serving.triage.worklist import MAX_LIST

router = APIRouter(prefix="/v1", tags=["worklist"])

#: the widest window a listing may ask for: a week (the worklist is for what is waiting now)
MAX_HOURS = 24 * 7


@router.get("/worklist", summary="Recently analysed studies, priority first, then oldest first")
async def worklist(
    request: Request,
    state: StateDep,
    principal: RadiologistDep,
    hours: Annotated[
        float | None,
        Query(
            gt=0, le=MAX_HOURS, description="studies analysed in the last H hours; default CXR_WORKLIST_HOURS"
        ),
    ] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_LIST, description="at most this many studies")] = 100,
) -> JSONResponse:
    if state.worklist is None:
        raise NotFound("this gateway keeps no worklist (its state was built without one)")
    window = hours if hours is not None else state.settings.worklist_hours
    now = datetime.now(UTC)
    # never a study past the results' retention, as for its results: the retention job runs hourly
    # (and a database it cannot reach keeps its rows), a read must not wait for it
    since = max(now - timedelta(hours=window), now - timedelta(days=state.settings.results_retention_days))
    studies = await state.cpu.run(state.worklist.list, principal.tenant, since, limit)
    # the audit line names what the listing disclosed: each result, each study as its keyed hash
    request.state.result_ids = [rid for s in studies for rid in s.result_ids]
    request.state.study_uids = [s.study_uid for s in studies]
    body: dict[str, Any] = {
        "studies": [s.to_json() for s in studies],
        "threshold": state.settings.triage_threshold,
        "hours": window,
    }
    return JSONResponse(body, headers={"Cache-Control": "no-store"})
