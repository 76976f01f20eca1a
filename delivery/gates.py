"""Promotion gates: each one a named comparison with its numbers and a verdict.

Gates are pure functions of facts (registry tags, a latency measurement, a canary analysis)
and the policy, so they are tested without servers and every verdict can be printed and put
into the promotion commit as it was decided.
"""

from __future__ import annotations

from dataclasses import dataclass

from core.stages import Stage
from delivery.policy import GatePolicy
from training.registry import VersionFacts


@dataclass(frozen=True)
class GateResult:
    """One gate: what was measured, against what, and whether it passed."""

    name: str
    passed: bool
    observed: str
    expected: str

    def line(self) -> str:
        verdict = "pass" if self.passed else "FAIL"
        return f"- {self.name}: {verdict} ({self.observed}; needs {self.expected})"


@dataclass(frozen=True)
class GateReport:
    """All gates evaluated for one promotion."""

    stage: Stage
    version: str
    results: list[GateResult]

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.results)

    @property
    def failed(self) -> list[GateResult]:
        return [r for r in self.results if not r.passed]

    def lines(self) -> list[str]:
        head = f"Gates for {self.stage} (version {self.version}): {'pass' if self.passed else 'FAIL'}"
        return [head, *(r.line() for r in self.results)]


def _missing(name: str, key: str) -> GateResult:
    return GateResult(
        name, False, f"tag {key!r} missing on the registered version", "the tag set by training"
    )


def _at_most(name: str, value: float | None, limit: float, key: str) -> GateResult:
    if value is None:
        return _missing(name, key)
    return GateResult(name, value <= limit, f"{key}={value:.4g}", f"<= {limit:.4g}")


def _at_least(name: str, value: float | None, floor: float, key: str) -> GateResult:
    if value is None:
        return _missing(name, key)
    return GateResult(name, value >= floor, f"{key}={value:.4g}", f">= {floor:.4g}")


def staging_gates(candidate: VersionFacts, policy: GatePolicy) -> list[GateResult]:
    """Parity of the exported ONNX with PyTorch, and the metric floors."""
    return [
        _at_most(
            "onnx parity",
            candidate.number("parity_max_abs_diff"),
            policy.max_parity_abs_diff,
            "parity_max_abs_diff",
        ),
        _at_least("mAP@0.5 floor", candidate.number("map50"), policy.min_map50, "map50"),
        _at_least("mAP@0.4 floor", candidate.number("map40"), policy.min_map40, "map40"),
    ]


def regression_gate(
    candidate: VersionFacts, production: VersionFacts | None, policy: GatePolicy
) -> GateResult:
    """Not worse than the model now in production by more than delta mAP@0.5 on the test set."""
    name = "mAP@0.5 vs production"
    mine = candidate.number("map50")
    if mine is None:
        return _missing(name, "map50")
    if production is None:
        return GateResult(name, True, f"map50={mine:.4g}, no production model yet", "nothing to compare")
    theirs = production.number("map50")
    if theirs is None:
        return GateResult(
            name,
            True,
            f"map50={mine:.4g}, production v{production.version} has no map50",
            "nothing to compare",
        )
    floor = theirs - policy.max_map50_drop
    return GateResult(
        name,
        mine >= floor,
        f"map50={mine:.4g} vs production v{production.version} {theirs:.4g}",
        f">= {floor:.4g} (delta {policy.max_map50_drop:g})",
    )


def latency_gate(p95_ms: float | None, policy: GatePolicy) -> GateResult:
    """Batch-1 ONNX Runtime latency of the candidate within the budget."""
    if p95_ms is None:
        return GateResult("latency budget", False, "not measured (ONNX unavailable)", "a measurement")
    return GateResult(
        "latency budget",
        p95_ms <= policy.latency_budget_ms,
        f"p95={p95_ms:.1f} ms",
        f"<= {policy.latency_budget_ms:g} ms",
    )


def canary_gates(
    candidate: VersionFacts, production: VersionFacts | None, p95_ms: float | None, policy: GatePolicy
) -> list[GateResult]:
    """Staging gates, plus no regression against production, plus the latency budget."""
    return [
        *staging_gates(candidate, policy),
        regression_gate(candidate, production, policy),
        latency_gate(p95_ms, policy),
    ]


def production_gates(version: str, canary_version: str, verdict: str, summary: str) -> list[GateResult]:
    """The canary analysis passed for exactly this version."""
    return [
        GateResult(
            "serving as canary",
            canary_version == version,
            f"canary serves {canary_version or 'nothing'}",
            f"version {version}",
        ),
        GateResult("canary analysis", verdict == "pass", f"{verdict}: {summary}", "pass"),
    ]
