"""Canary analysis: canary against production over a window, with real PromQL against Prometheus.

The queries here are the only copy (the canary CronJob runs ``cxr canary step``, which calls
them; there is no Argo Rollouts AnalysisTemplate). Each comparison is judged separately, so the
verdict always comes with the numbers that produced it.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Literal

import httpx

from delivery.errors import PrometheusError
from delivery.policy import CanaryPolicy

log = logging.getLogger(__name__)

Verdict = Literal["pass", "fail", "inconclusive"]
CANARY = "canary"
PRODUCTION = "production"


def _sum_increase(metric: str, selector: str, window: str) -> str:
    # `or vector(0)`: a stage that never produced a series (no detections at all) counts as 0,
    # not as "no data" -- an ONNX returning nothing must fail, not be skipped.
    return f"(sum(increase({metric}{{{selector}}}[{window}])) or vector(0))"


def _mean(histogram: str, stage: str, window: str) -> str:
    return (
        f'sum(rate({histogram}_sum{{stage="{stage}"}}[{window}])) / '
        f'sum(rate({histogram}_count{{stage="{stage}"}}[{window}]))'
    )


def _p95(stage: str, window: str) -> str:
    return (
        "histogram_quantile(0.95, sum by (le) "
        f'(rate(cxr_gateway_request_duration_seconds_bucket{{stage="{stage}"}}[{window}])))'
    )


def _detections_per_image(stage: str, window: str) -> str:
    detections = _sum_increase("cxr_detections_total", f'stage="{stage}"', window)
    images = f'sum(increase(cxr_images_processed_total{{stage="{stage}"}}[{window}]))'
    return f"({detections} / {images})"


def build_queries(window: str) -> dict[str, str]:
    """The PromQL of every comparison, keyed by metric name."""
    c, p = CANARY, PRODUCTION
    c_dpi, p_dpi = _detections_per_image(c, window), _detections_per_image(p, window)
    c_5xx = _sum_increase("cxr_gateway_requests_total", f'stage="{c}",status=~"5.."', window)
    p_5xx = _sum_increase("cxr_gateway_requests_total", f'stage="{p}",status=~"5.."', window)
    # A request routed to a canary that cannot answer is served by production (the gateway's
    # fallback) and counted there; only cxr_gateway_rejected_total{reason="stage_unavailable"}
    # remembers the canary. Counted as the canary's requests and errors: without it a canary that
    # is down had no traffic of its own, was judged "inconclusive" at every step, and was never
    # rolled back.
    c_down = _sum_increase("cxr_gateway_rejected_total", f'stage="{c}",reason="stage_unavailable"', window)
    c_served = _sum_increase("cxr_gateway_requests_total", f'stage="{c}"', window)
    c_requests = f"({c_served} + {c_down})"
    return {
        "canary-requests": c_requests,
        "production-requests": f'sum(increase(cxr_gateway_requests_total{{stage="{p}"}}[{window}]))',
        "error-rate": f"({c_5xx} + {c_down}) / {c_requests}",
        "production-error-rate": (
            f'{p_5xx} / sum(increase(cxr_gateway_requests_total{{stage="{p}"}}[{window}]))'
        ),
        "p95-latency-ratio": f"{_p95(c, window)} / {_p95(p, window)}",
        "detection-shift": f"abs({c_dpi} - {p_dpi}) / clamp_min({p_dpi}, 0.1)",
        "confidence-shift": (
            f"abs(({_mean('cxr_detection_confidence', c, window)}) - "
            f"({_mean('cxr_detection_confidence', p, window)}))"
        ),
        # The gateway runs a CXR_SHADOW_FRACTION share of the canary's images on production too
        # (DetectionService._shadow): the F1 of the two answers. No series when it mirrors none:
        # "no data", not judged.
        "agreement": _mean("cxr_shadow_agreement", c, window),
    }


@dataclass(frozen=True)
class Check:
    """One comparison: its value (None = no data), the limit, and its verdict."""

    name: str
    value: float | None
    limit: str
    passed: bool | None  # None: not judged (no data and not required)

    def line(self) -> str:
        shown = "no data" if self.value is None else f"{self.value:.4g}"
        verdict = {True: "pass", False: "FAIL", None: "n/a"}[self.passed]
        return f"- {self.name}: {verdict} ({shown}; limit {self.limit})"


@dataclass(frozen=True)
class CanaryAnalysis:
    """The verdict of one analysis and the numbers behind it."""

    verdict: Verdict
    window: str
    canary_requests: float
    production_requests: float
    checks: list[Check]
    reason: str

    def lines(self) -> list[str]:
        head = (
            f"Canary analysis over {self.window}: {self.verdict} ({self.reason}; "
            f"canary {self.canary_requests:.0f} requests, production {self.production_requests:.0f})"
        )
        return [head, *(c.line() for c in self.checks)]

    def summary(self) -> str:
        failed = [c.name for c in self.checks if c.passed is False]
        return self.reason if not failed else f"{self.reason}: {', '.join(failed)}"


class PrometheusClient:
    """Instant queries over Prometheus' HTTP API (``/api/v1/query``)."""

    def __init__(self, url: str, timeout_s: float = 10.0) -> None:
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s

    def scalar(self, query: str) -> float | None:
        """The query's single value; None when the result is empty or not a number (0/0)."""
        try:
            response = httpx.get(f"{self.url}/api/v1/query", params={"query": query}, timeout=self.timeout_s)
        except httpx.HTTPError as exc:
            raise PrometheusError(
                f"Prometheus at {self.url} is unreachable ({exc}); is the stack up (`cxr stack status`)?"
            ) from exc
        try:
            body = response.json()
        except ValueError as exc:
            raise PrometheusError(
                f"Prometheus at {self.url} answered {response.status_code} without JSON"
            ) from exc
        if body.get("status") != "success":
            raise PrometheusError(
                f"Prometheus rejected the query: {body.get('error', body)}\n  query: {query}"
            )
        result = body["data"]["result"]
        if not result:
            return None
        if len(result) > 1:
            raise PrometheusError(f"query returned {len(result)} series, expected one: {query}")
        value = float(result[0]["value"][1])
        return None if math.isnan(value) or math.isinf(value) else value


def _upper(name: str, value: float | None, limit: float, required: bool) -> Check:
    if value is None:
        return Check(name, None, f"<= {limit:g}", False if required else None)
    return Check(name, value, f"<= {limit:g}", value <= limit)


#: how unlikely the canary's 5xx count must be under ``max_error_rate`` to fail it below min_requests
_ERRORS_ALPHA = 0.01


def errors_conclusive(requests: float, error_rate: float, max_error_rate: float) -> bool:
    """Whether this many 5xx among so few requests already shows the rate above ``max_error_rate``.

    ``min_requests`` keeps a handful of requests from deciding a canary's fate, but it also kept
    a canary that answered every one of its 40 requests with a 5xx "inconclusive", at its weight,
    for as long as traffic stayed low. A one-sided binomial test says when the count alone is
    conclusive: the chance of at least this many errors at ``max_error_rate`` is below 1 %
    (3 of 10 requests at the default 2 %; a single error never is).
    """
    n = round(requests)  # increase() extrapolates: counts come back fractional
    errors = min(round(error_rate * requests), n)
    if n <= 0 or errors <= 0:
        return False
    return _binomial_at_least(errors, n, max_error_rate) < _ERRORS_ALPHA


def _binomial_at_least(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p), summed term by term in log space.

    ``math.comb(n, k) * p**k`` overflows a float from n ~ 1030 (a ``min_requests`` of a few thousand
    made ``canary analyze`` crash), and ``1 - P(X < k)`` loses the small tail to cancellation.
    """
    if k <= 0 or p >= 1:
        return 1.0
    if p <= 0:
        return 0.0
    log_p, log_q, log_n = math.log(p), math.log1p(-p), math.lgamma(n + 1)
    return math.fsum(
        math.exp(log_n - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * log_p + (n - i) * log_q)
        for i in range(k, n + 1)
    )


def judge(
    values: dict[str, float | None], policy: CanaryPolicy, canary_weight: int | None = None
) -> CanaryAnalysis:
    """Turn the query results into a verdict (pure: unit-tested without Prometheus).

    ``canary_weight`` 100: the gateway routes every request to the canary, so production serving
    none in the window is expected, not a reason to wait. The comparisons were judged at the
    lower weights; here the canary's own checks decide. Judged "inconclusive" instead, the last
    step of the ladder never passed once the window held only traffic at 100 (the CronJob runs
    every twice the window), and the canary kept all of production's traffic for good.

    Below ``min_requests`` the verdict is "inconclusive" unless the 5xx count is already
    conclusive (:func:`errors_conclusive`): then it fails, and ``canary step`` rolls it back.
    """
    canary_requests = values.get("canary-requests") or 0.0
    production_requests = values.get("production-requests") or 0.0
    error_rate = values.get("error-rate")
    production_errors = values.get("production-error-rate")
    agreement = values.get("agreement")
    checks = [
        _upper("5xx rate", error_rate, policy.max_error_rate, required=True),
        _upper("p95 latency canary/production", values.get("p95-latency-ratio"), policy.max_p95_ratio, False),
        _upper(
            "detections per image shift", values.get("detection-shift"), policy.max_detection_shift, False
        ),
        _upper("mean confidence shift", values.get("confidence-shift"), policy.max_confidence_shift, False),
        Check(
            "shadow/online agreement",
            agreement,
            f">= {policy.min_agreement:g}",
            None if agreement is None else agreement >= policy.min_agreement,
        ),
    ]
    if production_errors is not None:
        checks.append(Check("production 5xx rate (context)", production_errors, "informational", None))
    window = policy.window
    if canary_requests < policy.min_requests:
        if error_rate is not None and errors_conclusive(canary_requests, error_rate, policy.max_error_rate):
            return CanaryAnalysis(
                "fail",
                window,
                canary_requests,
                production_requests,
                checks,
                f"5xx already conclusive on {canary_requests:.0f} requests "
                f"(p < {_ERRORS_ALPHA:g} that the rate is within {policy.max_error_rate:g})",
            )
        return CanaryAnalysis(
            "inconclusive",
            window,
            canary_requests,
            production_requests,
            checks,
            f"too little canary traffic ({canary_requests:.0f} < {policy.min_requests} requests)",
        )
    if any(c.passed is False for c in checks):
        return CanaryAnalysis(
            "fail", window, canary_requests, production_requests, checks, "thresholds exceeded"
        )
    takes_all = canary_weight is not None and canary_weight >= 100
    if (
        not takes_all
        and production_requests < policy.min_requests
        and error_rate is not None
        and error_rate <= policy.max_error_rate
    ):
        # Without production traffic the comparisons are empty; only the absolute checks were judged.
        return CanaryAnalysis(
            "inconclusive",
            window,
            canary_requests,
            production_requests,
            checks,
            f"too little production traffic to compare ({production_requests:.0f} requests)",
        )
    return CanaryAnalysis(
        "pass", window, canary_requests, production_requests, checks, "all checks within limits"
    )


def analyze(prometheus_url: str, policy: CanaryPolicy, canary_weight: int | None = None) -> CanaryAnalysis:
    """Run every query against Prometheus now and judge the canary at ``canary_weight`` (:func:`judge`)."""
    client = PrometheusClient(prometheus_url)
    values = {name: client.scalar(query) for name, query in build_queries(policy.window).items()}
    result = judge(values, policy, canary_weight)
    log.info(
        "canary_analysis verdict=%s window=%s canary_requests=%.0f production_requests=%.0f %s",
        result.verdict,
        result.window,
        result.canary_requests,
        result.production_requests,
        " ".join(f"{c.name.replace(' ', '_').replace('/', '_')}={c.value}" for c in result.checks),
    )
    return result
