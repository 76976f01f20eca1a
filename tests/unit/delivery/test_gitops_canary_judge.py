"""Canary verdicts from query results, and the weight ladder."""

from __future__ import annotations

from pathlib import Path

import pytest

from delivery.canary import build_queries, judge
from delivery.canary_step import next_weight
from delivery.errors import DeliveryError
from delivery.policy import POLICY_FILE, CanaryPolicy, load_policy

pytestmark = pytest.mark.unit

POLICY = CanaryPolicy(window="1m", min_requests=20)


def healthy(**overrides: float | None) -> dict[str, float | None]:
    values: dict[str, float | None] = {
        "canary-requests": 100.0,
        "production-requests": 400.0,
        "error-rate": 0.0,
        "production-error-rate": 0.0,
        "p95-latency-ratio": 1.05,
        "detection-shift": 0.1,
        "confidence-shift": 0.02,
        "agreement": None,
    }
    values.update(overrides)
    return values


def test_similar_canary_passes_with_every_number_reported() -> None:
    result = judge(healthy(), POLICY)
    assert result.verdict == "pass"
    text = "\n".join(result.lines())
    assert "1.05" in text and "canary 100 requests" in text


def test_too_little_canary_traffic_is_inconclusive_not_pass() -> None:
    result = judge(healthy(**{"canary-requests": 5.0}), POLICY)
    assert result.verdict == "inconclusive"
    assert "5 < 20" in result.reason


def test_a_canary_failing_every_request_fails_even_with_little_traffic() -> None:
    # 40 requests, all 5xx, under min_requests 50: was "inconclusive" at every step, never rolled back
    result = judge(healthy(**{"canary-requests": 40.0, "error-rate": 1.0}), CanaryPolicy())
    assert result.verdict == "fail" and "conclusive" in result.reason
    assert "5xx rate" in result.summary()
    three_of_ten = judge(healthy(**{"canary-requests": 10.0, "error-rate": 0.3}), CanaryPolicy())
    assert three_of_ten.verdict == "fail"


def test_one_error_among_few_requests_stays_inconclusive() -> None:
    for requests, rate in ((10.0, 0.1), (40.0, 0.05), (5.0, 0.0)):
        result = judge(healthy(**{"canary-requests": requests, "error-rate": rate}), CanaryPolicy())
        assert result.verdict == "inconclusive", (requests, rate, result.reason)


def test_the_few_requests_test_holds_for_a_high_min_requests() -> None:
    """``math.comb(n, k) * p**k`` overflowed a float from n ~ 1030: a site with min_requests 5000 had
    ``canary analyze`` crash with OverflowError on 1500 requests, half of them 5xx."""
    policy = CanaryPolicy(min_requests=5000)
    failing = judge(healthy(**{"canary-requests": 1500.0, "error-rate": 0.5}), policy)
    assert failing.verdict == "fail" and "conclusive" in failing.reason
    at_the_limit = judge(healthy(**{"canary-requests": 1500.0, "error-rate": 0.02}), policy)
    assert at_the_limit.verdict == "inconclusive"


@pytest.mark.parametrize(
    ("metric", "value", "check"),
    [
        ("error-rate", 0.2, "5xx rate"),
        ("p95-latency-ratio", 4.0, "p95 latency canary/production"),
        ("detection-shift", 1.0, "detections per image shift"),  # a canary that finds nothing
        ("confidence-shift", 0.4, "mean confidence shift"),
        ("agreement", 0.1, "shadow/online agreement"),
    ],
)
def test_each_threshold_alone_fails_the_canary(metric: str, value: float, check: str) -> None:
    result = judge(healthy(**{metric: value}), POLICY)
    assert result.verdict == "fail"
    assert check in result.summary()


def test_missing_error_rate_fails_because_it_is_required() -> None:
    assert judge(healthy(**{"error-rate": None}), POLICY).verdict == "fail"


def test_no_production_traffic_to_compare_is_inconclusive() -> None:
    values = healthy(
        **{
            "production-requests": 0.0,
            "p95-latency-ratio": None,
            "detection-shift": None,
            "confidence-shift": None,
        }
    )
    assert judge(values, POLICY).verdict == "inconclusive"


def test_queries_count_absent_detection_series_as_zero_and_use_the_window() -> None:
    queries = build_queries("7m")
    assert "or vector(0)" in queries["detection-shift"]
    assert all("[7m]" in q for q in queries.values())
    assert 'status=~"5.."' in queries["error-rate"]


def test_weight_ladder_climbs_then_stops_at_100() -> None:
    weights = [10, 50, 100]
    assert next_weight(0, weights) == 10
    assert next_weight(10, weights) == 50
    assert next_weight(50, weights) == 100
    assert next_weight(100, weights) is None


def test_policy_rejects_a_ladder_that_never_reaches_100() -> None:
    with pytest.raises(ValueError, match="up to 100"):
        CanaryPolicy(weights=[10, 50])


@pytest.mark.parametrize("window", ["0s", "0m", "00h"])
def test_policy_refuses_an_empty_window_prometheus_would_refuse_at_every_analysis(window: str) -> None:
    with pytest.raises(ValueError, match="window must be longer than 0"):
        CanaryPolicy(window=window)


@pytest.mark.parametrize("window", ["\u0665m", "\uff15m", "5m\n"])  # Arabic-Indic 5, fullwidth 5
def test_policy_refuses_a_window_in_digits_promql_does_not_read(window: str) -> None:
    """``\\d`` matched any Unicode digit: an Arabic-Indic 5m passed, then went to Prometheus in each query."""
    with pytest.raises(ValueError, match="window"):
        CanaryPolicy(window=window)


@pytest.mark.parametrize(
    "text",
    [b"canary:\n  window: 0s\n", b"canary:\n  max_error_rate: .nan\n", b"canary: {window: \xff5m}\n"],
)
def test_a_policy_file_with_an_empty_window_nan_or_not_utf8_is_one_clear_error(
    tmp_path: Path, text: bytes
) -> None:
    path = tmp_path / POLICY_FILE
    path.parent.mkdir(parents=True)
    path.write_bytes(text)
    with pytest.raises(DeliveryError, match=r"delivery-policy\.yaml is invalid, fix it before promoting"):
        load_policy(tmp_path)
