"""The paired bootstrap over patients refuses a worse model, passes an equal one, and pairs honestly."""

from __future__ import annotations

import numpy as np
import pytest

from training.paired import ImageResult, PairingError, non_inferior, paired_bootstrap

pytestmark = pytest.mark.unit


def _golden(n_patients: int = 60, seed: int = 1) -> tuple[list[int], dict[str, str], list[np.ndarray]]:
    """Two images per patient, 1-3 boxes of classes 0-2 each (no-finding images too)."""
    rng = np.random.default_rng(seed)
    gts, patient_of = [], {}
    for p in range(n_patients):
        for k in range(2):
            image = f"p{p}-i{k}"
            patient_of[image] = f"patient-{p}"
            gts.append(rng.integers(0, 3, size=int(rng.integers(0, 4))))
    return list(range(len(gts))), patient_of, gts


def _model(gts: list[np.ndarray], ids: list[str], hit_rate: float, seed: int) -> list[ImageResult]:
    """A model that finds each true box with ``hit_rate`` and adds one low-confidence false positive."""
    rng = np.random.default_rng(seed)
    out = []
    for image_id, gt in zip(ids, gts, strict=True):
        found = gt[rng.random(len(gt)) < hit_rate]
        conf = np.concatenate([rng.uniform(0.5, 1.0, len(found)), [0.1]])
        cls = np.concatenate([found, [int(rng.integers(0, 3))]]).astype(float)
        correct = np.concatenate([np.ones(len(found), bool), [False]])
        out.append(ImageResult(image_id, correct, conf, cls, gt))
    return out


@pytest.fixture(scope="module")
def golden() -> tuple[list[str], dict[str, str], list[np.ndarray]]:
    _, patient_of, gts = _golden()
    return list(patient_of), patient_of, gts


def test_a_clearly_worse_candidate_is_refused(
    golden: tuple[list[str], dict[str, str], list[np.ndarray]],
) -> None:
    ids, patient_of, gts = golden
    production = _model(gts, ids, hit_rate=0.9, seed=2)
    worse = _model(gts, ids, hit_rate=0.5, seed=3)
    comparison = paired_bootstrap(worse, production, patient_of, resamples=300, seed=0)
    assert comparison.overall.diff < 0 and comparison.overall.high < 0
    verdict = non_inferior(comparison, margin=0.0, min_instances=10)
    assert not verdict.passed and "mAP@0.4" in verdict.reasons[0]
    assert comparison.patients == 60 and sum(comparison.instances.values()) == sum(len(g) for g in gts)


def test_the_same_model_is_passed_with_a_zero_width_interval(
    golden: tuple[list[str], dict[str, str], list[np.ndarray]],
) -> None:
    ids, patient_of, gts = golden
    production = _model(gts, ids, hit_rate=0.8, seed=2)
    comparison = paired_bootstrap(production, production, patient_of, resamples=200, seed=0)
    assert comparison.overall == type(comparison.overall)(0.0, 0.0, 0.0)
    assert non_inferior(comparison).passed
    assert comparison.table({0: "Aortic enlargement"})[2].startswith("| overall (mAP) |")


def test_an_equally_good_retrain_passes_non_inferiority_with_a_small_margin(
    golden: tuple[list[str], dict[str, str], list[np.ndarray]],
) -> None:
    ids, patient_of, gts = golden
    production = _model(gts, ids, hit_rate=0.85, seed=2)
    retrain = _model(gts, ids, hit_rate=0.85, seed=7)  # same skill, other misses
    comparison = paired_bootstrap(retrain, production, patient_of, resamples=300, seed=0)
    assert comparison.overall.low < 0 < comparison.overall.high or abs(comparison.overall.diff) < 0.05
    assert non_inferior(comparison, margin=0.1, min_instances=10).passed


def test_resampling_is_by_patient_and_seeded(
    golden: tuple[list[str], dict[str, str], list[np.ndarray]],
) -> None:
    ids, patient_of, gts = golden
    a, b = _model(gts, ids, 0.9, 2), _model(gts, ids, 0.6, 3)
    first = paired_bootstrap(a, b, patient_of, resamples=100, seed=5)
    assert first == paired_bootstrap(a, b, patient_of, resamples=100, seed=5)
    one_patient = dict.fromkeys(patient_of, "everyone")  # one unit: every resample is the whole set
    collapsed = paired_bootstrap(a, b, one_patient, resamples=50, seed=5)
    assert (
        collapsed.patients == 1 and collapsed.overall.low == collapsed.overall.high == collapsed.overall.diff
    )


def test_models_evaluated_on_different_images_cannot_be_compared(
    golden: tuple[list[str], dict[str, str], list[np.ndarray]],
) -> None:
    ids, patient_of, gts = golden
    a = _model(gts, ids, 0.9, 2)
    with pytest.raises(PairingError, match="different images"):
        paired_bootstrap(a, a[1:], patient_of)
    with pytest.raises(PairingError, match="no patient"):
        paired_bootstrap(a, a, {})


def _rare_class_golden(
    candidate_finds_common: bool, candidate_finds_rare: bool
) -> tuple[list[ImageResult], list[ImageResult], dict[str, str]]:
    """20 patients, one image each: class 0 on every image, class 1 on patient 0's image only.

    The reference finds every box; the candidate finds the boxes the flags say.
    """
    candidate, reference, patient_of = [], [], {}
    for p in range(20):
        image = f"img{p}"
        patient_of[image] = f"patient-{p}"
        gt = np.array([0, 1]) if p == 0 else np.array([0])
        reference.append(
            ImageResult(image, np.ones(len(gt), bool), np.full(len(gt), 0.9), gt.astype(float), gt)
        )
        found = [candidate_finds_common] + ([candidate_finds_rare] if p == 0 else [])
        candidate.append(ImageResult(image, np.array(found), np.full(len(gt), 0.9), gt.astype(float), gt))
    return candidate, reference, patient_of


def test_a_resample_without_a_class_does_not_count_as_no_difference_for_it() -> None:
    """Every resample that holds the rare class shows the candidate missing it: its CI stays below 0."""
    candidate, reference, patient_of = _rare_class_golden(
        candidate_finds_common=True, candidate_finds_rare=False
    )
    comparison = paired_bootstrap(candidate, reference, patient_of, resamples=400, seed=0)
    rare = comparison.per_class[1]
    assert rare.diff < -0.9
    assert rare.high < 0  # was 0.0: the ~36 % of resamples without patient 0 counted as "difference 0"


def test_a_resample_s_map_averages_only_the_classes_it_holds() -> None:
    """The candidate misses every common box (AP diff -1) and matches the rare one: a resample without
    the rare class has an mAP difference of -1, not the -0.5 of averaging in an absent class."""
    candidate, reference, patient_of = _rare_class_golden(
        candidate_finds_common=False, candidate_finds_rare=True
    )
    comparison = paired_bootstrap(candidate, reference, patient_of, resamples=400, seed=0)
    assert comparison.overall.diff == pytest.approx(-0.5, abs=0.01)
    assert comparison.overall.low == pytest.approx(-1.0, abs=0.01)


def test_a_set_without_any_box_cannot_show_non_inferiority() -> None:
    """No ground truth: a 0.0 difference is no evidence; a candidate boxing every image must not pass."""
    patient_of = {f"img{p}": f"patient-{p}" for p in range(10)}
    none = np.zeros(0, dtype=int)
    reference = [ImageResult(i, np.zeros(0, bool), np.zeros(0), np.zeros(0), none) for i in patient_of]
    noisy = [ImageResult(i, np.zeros(1, bool), np.array([0.95]), np.array([3.0]), none) for i in patient_of]
    comparison = paired_bootstrap(noisy, reference, patient_of, resamples=50, seed=0)
    verdict = non_inferior(comparison, margin=0.05, min_instances=10)
    assert not verdict.passed and "no ground-truth box" in verdict.reasons[0]
