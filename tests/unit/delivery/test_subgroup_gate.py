"""The subgroup gate: a subgroup far below overall, on enough images, stops a promotion (or warns)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from delivery.gates import GateReport, VersionFacts, staging_gates, subgroup_gate
from delivery.policy import GatePolicy, load_policy
from training.subgroups import SUBGROUP_TAG, SubgroupMetrics, encode_tag

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[3]
POLICY = GatePolicy(max_subgroup_gap=0.1, min_subgroup_images=20, min_subgroup_boxes=40)


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


def test_a_subgroup_with_enough_images_but_few_boxes_is_not_judged() -> None:
    # 25 images, 30 boxes over many classes: each class's AP is 0 or 1 by chance
    noisy = SubgroupMetrics(
        attribute="age_band", value="80-89", images=25, instances=30, map40=0.15, reference_map40=0.40
    )
    result = subgroup_gate(facts(group("Big", 100, 0.40), noisy), GatePolicy())
    assert result.passed and "1 not judged" in result.observed and "50 boxes" in result.observed
    judged = subgroup_gate(facts(noisy), GatePolicy(min_subgroup_boxes=30))
    assert not judged.passed and "30 boxes" in judged.observed


def _simulated_splits(reps: int) -> list[tuple[list[SubgroupMetrics], list[SubgroupMetrics]]]:
    """Subgroup figures of ``reps`` 200-image phantom-like test splits (35 % without findings, else
    1-4 of 14 classes, recall 0.7, ~1 false positive per image), grouped by sex, 7 age bands, 4
    vendors and view: a model as good on every group as overall (no real gap), and the same model
    losing a third of its detections on vendor D (a real gap, D's figures only)."""
    from training.paired import ImageResult
    from training.subgroups import subgroup_metrics

    out = []
    for seed in range(reps):
        rng = np.random.default_rng(seed)
        results, attributes = [], {}
        for i in range(200):
            n = 0 if rng.random() < 0.35 else int(rng.choice([1, 1, 2, 2, 3, 4]))
            gt = rng.choice(14, size=n, replace=False) if n else np.zeros(0, int)
            hit = gt[rng.random(n) < 0.7]
            fp = int(rng.poisson(1.0))
            correct = np.r_[np.ones(len(hit), bool), np.zeros(fp, bool)]
            conf = np.r_[rng.beta(4, 2, len(hit)), rng.beta(2, 3, fp)]
            cls = np.r_[hit, rng.integers(0, 14, fp)].astype(float)
            results.append(ImageResult(f"i{i}", correct, conf, cls, np.asarray(gt, int)))
            attributes[f"i{i}"] = {
                "sex": str(rng.choice(["F", "M"])),
                "age_band": str(rng.choice([f"{d}0-{d}9" for d in range(2, 9)])),
                "manufacturer": str(rng.choice(["A", "B", "C", "D"])),
                "view": str(rng.choice(["PA", "AP"], p=[0.7, 0.3])),
            }
        worse = [
            ImageResult(
                r.image_id, r.correct & (rng.random(len(r.correct)) < 0.67), r.conf, r.pred_cls, r.gt_cls
            )
            if attributes[r.image_id]["manufacturer"] == "D"
            else r
            for r in results
        ]
        bad = [
            m for m in subgroup_metrics(worse, attributes) if (m.attribute, m.value) == ("manufacturer", "D")
        ]
        out.append((subgroup_metrics(results, attributes), bad))
    return out


def test_a_model_without_a_subgroup_gap_is_rarely_refused_by_chance_and_a_real_gap_is_caught() -> None:
    splits = _simulated_splits(reps=40)

    def rates(policy: GatePolicy) -> tuple[float, float]:
        refused = np.mean([not subgroup_gate(facts(*fair), policy).passed for fair, _ in splits])
        caught = np.mean([not subgroup_gate(facts(*bad), policy).passed for _, bad in splits])
        return float(refused), float(caught)

    by_images_only, caught_before = rates(GatePolicy(min_subgroup_boxes=0))
    refused, caught = rates(GatePolicy())
    assert by_images_only > 0.25  # judged by images alone: a third of fair models refused, by luck
    assert refused <= 0.1 and caught >= caught_before - 0.05 and caught >= 0.8, (refused, caught)
