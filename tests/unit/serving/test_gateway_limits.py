"""Rate limit per key and bounded in-flight work per stage."""

from __future__ import annotations

import pytest

from serving.errors import Overloaded, RateLimited
from serving.limits import InflightGate, RateLimiter

pytestmark = pytest.mark.unit


def test_rate_limiter_allows_burst_then_refuses_with_retry_after() -> None:
    limiter = RateLimiter(rate=0.5, burst=3)
    for _ in range(3):
        limiter.check("k1")
    with pytest.raises(RateLimited) as info:
        limiter.check("k1")
    assert info.value.retry_after_s is not None and info.value.retry_after_s >= 1
    limiter.check("k2")  # another key has its own bucket


def test_inflight_gate_refuses_beyond_limit_and_frees_on_exit() -> None:
    gate = InflightGate(limit=2, retry_after_s=3)
    with gate.enter("production"), gate.enter("production"):
        with pytest.raises(Overloaded) as info, gate.enter("production"):
            pass
        assert info.value.retry_after_s == 3
        with gate.enter("canary"):
            pass
    with gate.enter("production", weight=2):
        assert gate.current["production"] == 2
    assert gate.current["production"] == 0


def test_rate_limit_over_http_gives_429_json_with_retry_after(onnx_client, keys) -> None:  # type: ignore[no-untyped-def]
    limiter = onnx_client.app.state.cxr.limiter
    saved = (limiter.rate, limiter.burst)
    limiter.rate, limiter.burst = 0.001, 1
    limiter._buckets.clear()
    try:
        statuses = [
            onnx_client.get("/v1/results/none", headers={"X-API-Key": keys["pacs"]}) for _ in range(3)
        ]
        assert statuses[-1].status_code == 429
        assert statuses[-1].json()["error"]["code"] == "rate_limited"
        assert int(statuses[-1].headers["Retry-After"]) >= 1
    finally:
        limiter.rate, limiter.burst = saved
        limiter._buckets.clear()
