"""Promotion gates: each verdict follows from the numbers and the policy."""

from __future__ import annotations

import pytest

from delivery.gates import (
    GateReport,
    VersionFacts,
    latency_gate,
    production_gates,
    regression_gate,
    staging_gates,
)
from delivery.policy import GatePolicy

pytestmark = pytest.mark.unit

POLICY = GatePolicy(
    max_parity_abs_diff=1e-3, min_map50=0.3, min_map40=0.25, max_map50_drop=0.02, latency_budget_ms=100.0
)


def facts(version: str = "2", **tags: object) -> VersionFacts:
    base = {"parity_max_abs_diff": "9e-05", "map50": "0.41", "map40": "0.38"}
    base.update({k: str(v) for k, v in tags.items()})
    return VersionFacts(version, base)


def test_staging_gates_pass_for_a_model_above_every_floor() -> None:
    results = staging_gates(facts(), POLICY)
    assert [r.passed for r in results] == [True, True, True, True]  # the last: subgroups, not measured
    assert "parity_max_abs_diff=9e-05" in results[0].line()


@pytest.mark.parametrize(
    ("tag", "value", "failing"),
    [
        ("parity_max_abs_diff", 0.01, "onnx parity"),
        ("map50", 0.29, "mAP@0.5 floor"),
        ("map40", 0.1, "mAP@0.4 floor"),
    ],
)
def test_staging_gate_fails_when_its_number_crosses_the_floor(tag: str, value: float, failing: str) -> None:
    report = GateReport("staging", "2", staging_gates(facts(**{tag: value}), POLICY))
    assert not report.passed
    assert [r.name for r in report.failed] == [failing]
    assert "FAIL" in report.lines()[0]


def test_missing_lineage_tag_fails_the_gate_and_says_which_tag() -> None:
    candidate = VersionFacts("2", {"map50": "0.5", "map40": "0.5"})
    parity = staging_gates(candidate, POLICY)[0]
    assert not parity.passed
    assert "parity_max_abs_diff" in parity.observed


def test_regression_gate_allows_exactly_delta_and_not_more() -> None:
    production = facts("1", map50=0.50)
    assert regression_gate(facts(map50=0.48), production, POLICY).passed
    worse = regression_gate(facts(map50=0.479), production, POLICY)
    assert not worse.passed
    assert "production v1" in worse.observed


def test_regression_gate_passes_when_nothing_is_in_production_yet() -> None:
    result = regression_gate(facts(map50=0.31), None, POLICY)
    assert result.passed
    assert "no production model" in result.observed


def test_latency_gate_compares_p95_with_the_budget_and_fails_unmeasured() -> None:
    assert latency_gate(99.0, POLICY).passed
    assert not latency_gate(101.0, POLICY).passed
    assert not latency_gate(None, POLICY).passed


def test_production_gate_needs_this_version_in_canary_and_a_passed_analysis() -> None:
    assert all(r.passed for r in production_gates("3", "3", "pass", "ok"))
    assert not production_gates("3", "2", "pass", "ok")[0].passed
    assert not production_gates("3", "3", "inconclusive", "too little traffic")[1].passed


def test_production_gate_needs_the_variant_the_canary_analysis_judged() -> None:
    """An INT8 canary's traffic says nothing of fp32, and the other way round."""
    assert production_gates("3", "3", "pass", "ok", variant="int8", canary_variant="int8")[0].passed
    refused = production_gates("3", "3", "pass", "ok", variant="fp32", canary_variant="int8")[0]
    assert not refused.passed
    assert (refused.observed, refused.expected) == ("canary serves 3 (int8)", "version 3 (fp32)")
