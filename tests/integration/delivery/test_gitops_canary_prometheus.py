"""canary.py's PromQL against a real Prometheus scraping a real exporter of the contract metrics.

The exporter is prometheus_client in this process, emitting exactly the gateway's metric names
and labels while a thread plays traffic for both stages; Prometheus (Debian's binary, from the
shared fixture) scrapes it. Canaries run side by side, each with its own Prometheus: a healthy
one, one that never detects anything, one that is slow, one that is down, and one that finds as
many boxes as production, as sure of them, but elsewhere (only the agreement catches it).
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server

from delivery.canary import analyze
from delivery.policy import CanaryPolicy
from tests.fixtures.servers import free_port

pytestmark = [pytest.mark.integration]

POLICY = CanaryPolicy(window="30s", min_requests=20)
BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


@dataclass(frozen=True)
class Behaviour:
    """How the canary stage answers, compared with a production that finds 2 boxes at 0.6 in 50 ms."""

    detections: int = 2
    confidence: float = 0.6
    latency_s: float = 0.05
    down: bool = False  # the gateway falls back to production and counts the canary unavailable
    # F1 of its answer against production's on the same image (the gateway's production mirror)
    agreement: float = 1.0
    # weight 100: every request goes to the canary; production's series exist from before, flat
    takes_all: bool = False


class FakeGatewayTraffic:
    """Real metrics, simulated requests: the contract names, labels and histogram buckets."""

    def __init__(self, canary: Behaviour) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("cxr_gateway_requests", "", ["route", "status", "stage"], registry=r)
        self.duration = Histogram(
            "cxr_gateway_request_duration_seconds", "", ["route", "stage"], buckets=BUCKETS, registry=r
        )
        self.images = Counter("cxr_images_processed", "", ["stage", "model_version"], registry=r)
        self.detections = Counter("cxr_detections", "", ["stage", "model_version", "class_name"], registry=r)
        self.confidence = Histogram("cxr_detection_confidence", "", ["stage"], registry=r)
        self.rejected = Counter("cxr_gateway_rejected", "", ["stage", "reason"], registry=r)
        self.agreement = Histogram("cxr_shadow_agreement", "", ["stage"], registry=r)
        self.behaviours = {"production": Behaviour(), "canary": canary}
        if canary.takes_all:  # production served before the weight reached 100: its series exist
            self.requests.labels("/v1/detect", "200", "production")
            self.duration.labels("/v1/detect", "production")
            self.images.labels("production", "1")
            self.detections.labels("production", "1", "Cardiomegaly")
            self.confidence.labels("production")
        self.port = free_port()
        self.server, self.thread = start_http_server(self.port, addr="127.0.0.1", registry=r)
        self._stop = threading.Event()
        self._player = threading.Thread(target=self._play, daemon=True)
        self._player.start()

    def _one(self, stage: str) -> None:
        b = self.behaviours[stage]
        if b.down:  # as DetectionService._run_stage: counted unavailable, served by production
            self.rejected.labels(stage, "stage_unavailable").inc()
            stage, b = "production", self.behaviours["production"]
        version = "2" if stage == "canary" else "1"
        self.requests.labels("/v1/detect", "200", stage).inc()
        self.duration.labels("/v1/detect", stage).observe(b.latency_s)
        self.images.labels(stage, version).inc()
        for _ in range(b.detections):
            self.detections.labels(stage, version, "Cardiomegaly").inc()
            self.confidence.labels(stage).observe(b.confidence)
        if stage == "canary":  # CXR_SHADOW_FRACTION 1: each image the canary served also ran on production
            self.agreement.labels(stage).observe(b.agreement)

    def _play(self) -> None:
        while not self._stop.is_set():  # 50 % canary: the weight-50 step of the issue
            if not self.behaviours["canary"].takes_all:
                self._one("production")
            self._one("canary")
            self._stop.wait(0.05)

    def stop(self) -> None:
        self._stop.set()
        self.server.shutdown()


def wait_for_samples(url: str, minimum: int, timeout_s: float = 60.0) -> None:
    """Poll Prometheus until the window holds enough scrapes for rate() (no fixed sleep)."""
    query = 'count_over_time(cxr_gateway_requests_total{stage="production"}[30s])'
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        result = httpx.get(f"{url}/api/v1/query", params={"query": query}, timeout=5).json()["data"]["result"]
        if result and float(result[0]["value"][1]) >= minimum:
            return
        time.sleep(0.5)
    raise AssertionError(f"Prometheus at {url} did not collect {minimum} scrapes in {timeout_s} s")


@pytest.fixture(scope="module")
def scenarios(prometheus_factory: Any) -> Iterator[dict[str, Any]]:
    canaries = {
        "healthy": Behaviour(detections=2, confidence=0.62, latency_s=0.05, agreement=0.9),
        "blind": Behaviour(detections=0, agreement=0.0),
        "slow": Behaviour(latency_s=2.0),
        "down": Behaviour(down=True),
        "elsewhere": Behaviour(agreement=0.2),
        "all traffic": Behaviour(agreement=0.9, takes_all=True),
    }
    traffic = {name: FakeGatewayTraffic(b) for name, b in canaries.items()}
    servers = {name: prometheus_factory([f"127.0.0.1:{t.port}"]) for name, t in traffic.items()}
    for server in servers.values():
        wait_for_samples(server.url, minimum=3)
    yield {name: server.url for name, server in servers.items()}
    for t in traffic.values():
        t.stop()


def test_healthy_canary_passes_with_real_numbers(scenarios: dict[str, str]) -> None:
    result = analyze(scenarios["healthy"], POLICY)
    assert result.verdict == "pass", result.lines()
    assert result.canary_requests >= POLICY.min_requests
    checks = {c.name: c for c in result.checks}
    assert checks["5xx rate"].value == 0.0
    assert checks["detections per image shift"].value == pytest.approx(0.0, abs=0.05)
    assert checks["mean confidence shift"].value == pytest.approx(0.02, abs=0.01)
    assert checks["shadow/online agreement"].value == pytest.approx(0.9)
    assert checks["shadow/online agreement"].passed is True


def test_canary_that_detects_nothing_fails_on_detections_per_image(scenarios: dict[str, str]) -> None:
    result = analyze(scenarios["blind"], POLICY)
    assert result.verdict == "fail"
    checks = {c.name: c for c in result.checks}
    assert checks["detections per image shift"].value == pytest.approx(1.0, abs=0.01)
    assert checks["detections per image shift"].passed is False


def test_slow_canary_fails_on_p95_latency_ratio(scenarios: dict[str, str]) -> None:
    result = analyze(scenarios["slow"], POLICY)
    assert result.verdict == "fail"
    ratio = next(c for c in result.checks if c.name == "p95 latency canary/production")
    assert ratio.value is not None and ratio.value > 10


def test_a_canary_that_is_down_fails_instead_of_waiting_inconclusive_for_ever(
    scenarios: dict[str, str],
) -> None:
    """Its requests were served by production and counted there: it had no traffic of its own."""
    result = analyze(scenarios["down"], POLICY)
    assert result.verdict == "fail", result.lines()
    assert result.canary_requests >= POLICY.min_requests
    checks = {c.name: c for c in result.checks}
    assert checks["5xx rate"].value == pytest.approx(1.0) and checks["5xx rate"].passed is False


def test_a_canary_whose_boxes_disagree_with_production_fails_on_agreement_alone(
    scenarios: dict[str, str],
) -> None:
    """As many boxes as production, as confident, elsewhere: was "no data" (n/a) and passed."""
    result = analyze(scenarios["elsewhere"], POLICY)
    assert result.verdict == "fail", result.lines()
    failed = {c.name: c for c in result.checks if c.passed is False}
    assert set(failed) == {"shadow/online agreement"}, result.lines()
    assert failed["shadow/online agreement"].value == pytest.approx(0.2)


def test_a_canary_that_is_down_has_no_agreement_to_judge(scenarios: dict[str, str]) -> None:
    """Its requests were served by production: nothing was mirrored, so the check is n/a, not 1 or 0."""
    checks = {c.name: c for c in analyze(scenarios["down"], POLICY).checks}
    assert checks["shadow/online agreement"].value is None
    assert checks["shadow/online agreement"].passed is None


def test_a_healthy_canary_at_weight_100_passes_without_production_traffic(scenarios: dict[str, str]) -> None:
    """At 100 % production serves nothing: judged "inconclusive" for that, the ladder's last step
    never passed and the canary kept all of production's traffic for good."""
    result = analyze(scenarios["all traffic"], POLICY, canary_weight=100)
    assert result.verdict == "pass", result.lines()
    assert result.production_requests == 0 and result.canary_requests >= POLICY.min_requests
    checks = {c.name: c for c in result.checks}
    assert checks["5xx rate"].passed is True and checks["shadow/online agreement"].passed is True
    assert checks["p95 latency canary/production"].value is None  # nothing to compare with
    # below 100 the same numbers are a production that lost its traffic: wait, as before
    assert analyze(scenarios["all traffic"], POLICY, canary_weight=50).verdict == "inconclusive"


def test_too_much_required_traffic_is_inconclusive(scenarios: dict[str, str]) -> None:
    result = analyze(scenarios["healthy"], POLICY.model_copy(update={"min_requests": 10**9}))
    assert result.verdict == "inconclusive"


def test_cli_analyze_exits_3_on_a_failing_canary(scenarios: dict[str, str], tmp_path: Any) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "delivery",
            "canary",
            "analyze",
            "--prometheus-url",
            scenarios["blind"],
            "--window",
            "30s",
            "--gitops-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**__import__("os").environ, "CXR_STACK_DIR": str(tmp_path)},
    )
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "detections per image shift: FAIL" in proc.stdout
