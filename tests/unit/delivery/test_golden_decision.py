"""The golden gate's decision: an equally good candidate passes, a worse one is refused, itself always passes.

Seeded simulations of candidate and production results on a 100-image golden set (6 classes,
~20 boxes each). "Equally good" is a close retrain: the same detections with every confidence
moved by N(0, 0.05), so the ranking (and each AP) differs a little by chance and on average not
at all. The old rule (95 % CI low >= -margin overall AND for every class with 10 boxes, margin
0) refused such a candidate in every run; per class alone, at margin 0.05, in ~70 %.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from delivery import golden_gate as gg
from delivery.policy import GoldenPolicy, load_policy
from training.paired import ImageResult, non_inferior, paired_bootstrap

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[3]
CLASSES = 6
IMAGES = 100


def _production(rng: np.random.Generator) -> list[ImageResult]:
    """Each image: Poisson(1.2) boxes of 6 classes, 75 % found, ~1 false positive."""
    out = []
    for i in range(IMAGES):
        gt = rng.integers(0, CLASSES, size=rng.poisson(1.2))
        hit = gt[rng.random(len(gt)) < 0.75]
        fp = int(rng.poisson(1.0))
        out.append(
            ImageResult(
                f"i{i}",
                np.r_[np.ones(len(hit), bool), np.zeros(fp, bool)],
                np.r_[rng.beta(5, 2, len(hit)), rng.beta(2, 4, fp)],
                np.r_[hit, rng.integers(0, CLASSES, fp)].astype(float),
                gt.astype(int),
            )
        )
    return out


def _retrained(rng: np.random.Generator, base: list[ImageResult]) -> list[ImageResult]:
    """As good as ``base`` on average: its detections, each confidence moved by N(0, 0.05)."""
    return [
        ImageResult(
            r.image_id,
            r.correct,
            np.clip(r.conf + rng.normal(0, 0.05, r.conf.shape), 1e-3, 1),
            r.pred_cls,
            r.gt_cls,
        )
        for r in base
    ]


def _jitter(rng: np.random.Generator, conf: np.ndarray) -> np.ndarray:
    return np.clip(conf + rng.normal(0, 0.05, conf.shape), 1e-3, 1)


def _broken(base: list[ImageResult], cls: int) -> list[ImageResult]:
    """``base`` with every true positive of class ``cls`` turned into a miss."""
    return [
        ImageResult(r.image_id, r.correct & (r.pred_cls != cls), r.conf, r.pred_cls, r.gt_cls) for r in base
    ]


PATIENTS = {f"i{i}": f"p{i}" for i in range(IMAGES)}


def _decide(candidate: list[ImageResult], production: list[ImageResult], policy: GoldenPolicy) -> Any:
    """What golden_gate decides: the same two bootstraps, then :func:`gg.decide`."""
    run = dict(resamples=policy.resamples, seed=policy.seed)
    comparison = paired_bootstrap(candidate, production, PATIENTS, confidence=policy.confidence, **run)
    judged = gg.judged_classes(comparison, policy)
    screen = paired_bootstrap(
        candidate, production, PATIENTS, confidence=gg.screen_confidence(policy, len(judged)), **run
    )
    return comparison, gg.decide(comparison, screen, policy)


def test_an_equally_good_candidate_passes_and_the_old_rule_refused_it() -> None:
    policy = GoldenPolicy(margin=load_policy(REPO).golden.margin, resamples=100)  # the committed margin
    old_margin_zero = old_per_class = new = 0
    runs = 12
    for seed in range(runs):
        rng = np.random.default_rng(1000 + seed)
        production = _production(rng)
        comparison, verdict = _decide(_retrained(rng, production), production, policy)
        old_margin_zero += not non_inferior(comparison, margin=0.0, min_instances=10).passed
        old_per_class += not non_inferior(comparison, margin=policy.margin, min_instances=10).passed
        new += not verdict.passed
    assert old_margin_zero == runs  # margin 0: a superiority test, every equal retrain refused
    assert old_per_class / runs >= 0.3  # 14-class AND of wide per-class lower bounds
    assert new <= 1, new  # at most one run in 12


def test_a_candidate_with_the_same_results_passes_deterministically_whatever_the_margin() -> None:
    production = _production(np.random.default_rng(3))
    for margin in (0.0, 0.05):
        policy = GoldenPolicy(margin=margin, resamples=100)
        comparison, verdict = _decide(production, production, policy)
        assert verdict.passed, verdict.reasons
        assert (comparison.overall.low, comparison.overall.high) == (0.0, 0.0)


def test_a_candidate_that_lost_one_class_is_refused_and_the_class_is_named() -> None:
    production = _production(np.random.default_rng(4))
    comparison, verdict = _decide(_broken(production, 2), production, GoldenPolicy(resamples=200))
    assert comparison.instances[2] >= 10
    assert not verdict.passed
    assert any(reason.startswith("class 2: ") and "corrected CI high" in reason for reason in verdict.reasons)


def test_the_screen_confidence_splits_the_one_sided_level_over_the_judged_classes() -> None:
    policy = GoldenPolicy(confidence=0.95)
    assert gg.screen_confidence(policy, 1) == pytest.approx(0.95)
    assert (1 - gg.screen_confidence(policy, 14)) / 2 == pytest.approx(0.025 / 14)
    assert gg.screen_confidence(policy, 0) == pytest.approx(0.95)


def test_golden_gate_runs_the_screen_and_names_the_worse_class(monkeypatch: pytest.MonkeyPatch) -> None:
    production = _production(np.random.default_rng(5))
    results = {"2": production, "3": _broken(production, 1)}
    golden = SimpleNamespace(version="golden-1", patients=lambda: PATIENTS)
    monkeypatch.setattr(gg, "open_golden", lambda *a: golden)
    monkeypatch.setattr(gg, "golden_results", lambda onnx, g, cache, version: results[version])
    verdict = gg.golden_gate(
        gitops_dir=Path("unused"),
        cache_dir=Path("unused"),
        policy=GoldenPolicy(resamples=200),
        candidate="3",
        production="2",
        onnx_for=lambda version, variant: Path(f"v{version}.onnx"),
    )
    assert not verdict.result.passed and "class 1: " in verdict.result.observed
    assert "Bonferroni" in verdict.result.expected


def test_the_committed_policy_has_a_margin_an_equal_model_can_meet() -> None:
    golden = load_policy(REPO).golden
    assert golden.margin >= 0.05  # 0 (the setting's default, issue 18's) passes only an identical model
