"""``POST /v1/feedback``: a radiologist's corrections of one result."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from serving.errors import InvalidRequest
from serving.feedback.service import FeedbackIn
from serving.gateway.deps import RadiologistDep, StateDep
from serving.gateway.uploads import read_body

router = APIRouter(prefix="/v1", tags=["feedback"])


@router.post(
    "/feedback",
    openapi_extra={
        "requestBody": {
            "content": {"application/json": {"schema": FeedbackIn.model_json_schema()}},
            "required": True,
        }
    },
)
async def post_feedback(request: Request, state: StateDep, principal: RadiologistDep) -> JSONResponse:
    body = await read_body(request, state.settings.max_feedback_bytes, "CXR_MAX_FEEDBACK_BYTES")
    try:
        fb = FeedbackIn.model_validate_json(body or b"{}")
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in exc.errors())
        raise InvalidRequest(f"feedback body is invalid: {problems}") from exc
    request.state.result_id = fb.request_id  # the audit line names the result this feedback is about
    record = await state.cpu.run(state.results.get, fb.request_id, principal.tenant)
    receipt = await state.cpu.run(state.feedback.submit, fb, record, principal.key_id)
    state.metrics.feedback.labels(receipt.status).inc()
    state.metrics.spool_depth.set(state.feedback.spool.depth())
    status = 202 if receipt.status == "spooled" else 200
    return JSONResponse(
        {"feedback_id": receipt.feedback_id, "status": receipt.status, "rows": receipt.rows},
        status_code=status,
    )
