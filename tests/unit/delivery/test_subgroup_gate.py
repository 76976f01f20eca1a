"""The subgroup gate: a subgroup far below overall, on enough images, stops a promotion (or warns)."""

from __future__ import annotations

from pathlib import Path

import pytest

from delivery.gates import GateReport, VersionFacts, staging_gates, subgroup_gate
from delivery.policy import GatePolicy, load_policy
from training.subgroups import SUBGROUP_TAG, SubgroupMetrics, encode_tag

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[3]
POLICY = GatePolicy(max_subgroup_gap=0.1, min_subgroup_images=20)


def group(value: str, images: int, map40: float, reference: float = 0.40) -> SubgroupMetrics:
    return SubgroupMetrics(
        attribute="manufacturer",
        value=value,
        images=images,
        instances=images * 2,
        map40=map40,
        reference_map40=reference,
    )


def facts(*groups: SubgroupMetrics) -> VersionFacts:
    tags = {"parity_max_abs_diff": "9e-05", "map50": "0.45", "map40": "0.40"}
    if groups:
        tags[SUBGROUP_TAG] = encode_tag(groups)
    return VersionFacts("7", tags)


def test_a_subgroup_more_than_the_gap_below_overall_is_refused() -> None:
    candidate = facts(group("Aurora Phantom DR", 80, 0.42), group("Dunmore Phantom CR", 30, 0.25))
    result = subgroup_gate(candidate, POLICY)
    assert not result.passed and not result.warning
    assert "manufacturer=Dunmore Phantom CR" in result.observed and "gap +0.150" in result.observed
    report = GateReport("staging", "7", staging_gates(candidate, POLICY))
    assert not report.passed and [r.name for r in report.failed] == ["subgroup mAP@0.4 gap"]
    assert "FAIL" in report.lines()[0]


def test_a_subgroup_exactly_at_the_gap_or_level_with_overall_passes() -> None:
    at_gap = subgroup_gate(facts(group("A", 50, 0.40), group("B", 50, 0.30)), POLICY)
    assert at_gap.passed and not at_gap.warning
    equal = subgroup_gate(facts(group("A", 50, 0.40), group("B", 50, 0.40)), POLICY)
    assert equal.passed and "2 subgroups judged" in equal.observed
    assert all(r.passed for r in staging_gates(facts(group("A", 50, 0.40)), POLICY))


def test_warn_mode_passes_but_says_warn() -> None:
    warn = POLICY.model_copy(update={"subgroup_action": "warn"})
    result = subgroup_gate(facts(group("Dunmore Phantom CR", 30, 0.1)), warn)
    assert result.passed and result.warning
    assert ": WARN (" in result.line() and "Dunmore" in result.line()
    report = GateReport("staging", "7", staging_gates(facts(group("D", 30, 0.1)), warn))
    assert report.passed and report.lines()[0].endswith("pass with 1 WARN")


def test_a_subgroup_with_too_few_images_is_not_judged() -> None:
    result = subgroup_gate(facts(group("Big", 100, 0.40), group("Rare", 19, 0.0)), POLICY)
    assert result.passed and not result.warning
    assert "1 not judged" in result.observed
    nothing = subgroup_gate(facts(group("Rare", 19, 0.0)), POLICY)
    assert nothing.passed and "no subgroup measured" in nothing.observed


def test_a_version_registered_before_subgroups_passes_as_not_measured() -> None:
    result = subgroup_gate(facts(), POLICY)
    assert result.passed and "not measured" in result.observed and ": pass (" in result.line()


def test_an_unreadable_tag_fails() -> None:
    candidate = VersionFacts("7", {SUBGROUP_TAG: "{broken"})
    assert not subgroup_gate(candidate, POLICY).passed


def test_the_committed_policy_judges_subgroups_and_fails_by_default() -> None:
    gates = load_policy(REPO).gates
    assert (
        gates.subgroup_action == "fail" and 0 < gates.max_subgroup_gap < 1 and gates.min_subgroup_images >= 1
    )
    with pytest.raises(ValueError, match="subgroup_action"):
        GatePolicy(subgroup_action="ignore")  # type: ignore[arg-type]
