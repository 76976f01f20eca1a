"""Paired bootstrap over patients: is a candidate model non-inferior to production on the same images?

Two mAP figures measured on different test splits say nothing about which model is better;
two measured on the same images still differ by chance. The gate therefore evaluates both
models on one image set, keeps every image's matched detections (:class:`ImageResult`), and
resamples PATIENTS with replacement (two radiographs of one patient are not independent): each
resample recomputes both models' AP on the very same images, so the spread of the difference is
the spread the sample allows, not the spread of two unrelated splits. The AP is ultralytics'
(`ap_per_class`, the one the training report uses) at IoU 0.4, VinDr-CXR's metric.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from training.errors import TrainingError


class PairingError(TrainingError):
    """The two models were not evaluated on the same images, or an image has no patient."""


@dataclass(frozen=True)
class ImageResult:
    """One image's detections, matched against its ground truth at the gate's IoU (0.4)."""

    image_id: str
    correct: np.ndarray  # (n_pred,) bool: the detection is a true positive
    conf: np.ndarray  # (n_pred,)
    pred_cls: np.ndarray  # (n_pred,)
    gt_cls: np.ndarray  # (n_gt,)


@dataclass(frozen=True)
class Interval:
    """A difference (candidate - reference) and its bootstrap confidence interval."""

    diff: float
    low: float
    high: float


@dataclass(frozen=True)
class PairedComparison:
    """Overall and per-class mAP@0.4 difference with CIs, from one paired bootstrap."""

    overall: Interval
    per_class: dict[int, Interval]
    instances: dict[int, int]  # ground-truth boxes per class in the evaluated set
    patients: int
    resamples: int
    confidence: float
    per_class_ap: dict[str, dict[int, float]] = field(default_factory=dict)  # "candidate"/"reference"

    def table(self, names: Mapping[int, str] | None = None) -> list[str]:
        """Markdown rows for the promotion commit, the model card and the MLflow version."""
        pct = round(self.confidence * 100)
        rows = [
            f"| class | instances | Δ AP@0.4 | {pct}% CI |",
            "| --- | --- | --- | --- |",
            f"| overall (mAP) | {sum(self.instances.values())} | {self.overall.diff:+.4f} | "
            f"[{self.overall.low:+.4f}, {self.overall.high:+.4f}] |",
        ]
        for cid, ci in sorted(self.per_class.items()):
            name = (names or {}).get(cid, str(cid))
            rows.append(
                f"| {name} | {self.instances[cid]} | {ci.diff:+.4f} | [{ci.low:+.4f}, {ci.high:+.4f}] |"
            )
        return rows


def _ap(results: Sequence[ImageResult], classes: np.ndarray) -> np.ndarray:
    """AP@0.4 per class of ``classes`` (0 where a class has no ground truth in this sample)."""
    from ultralytics.utils.metrics import ap_per_class

    out = np.zeros(len(classes))
    if not results:
        return out
    tp = np.concatenate([r.correct for r in results])[:, None]
    conf = np.concatenate([r.conf for r in results])
    pred_cls = np.concatenate([r.pred_cls for r in results])
    target = np.concatenate([r.gt_cls for r in results])
    if len(target) == 0:
        return out
    _, _, _, _, _, ap, present, *_ = ap_per_class(tp, conf, pred_cls, target)
    index = {int(c): i for i, c in enumerate(classes)}
    for row, cid in enumerate(present):
        if int(cid) in index:
            out[index[int(cid)]] = float(ap[row, 0])
    return out


def _check_pairing(
    candidate: Sequence[ImageResult], reference: Sequence[ImageResult], patient_of: Mapping[str, str]
) -> None:
    ids_c, ids_r = [r.image_id for r in candidate], [r.image_id for r in reference]
    if ids_c != ids_r:
        first = next((f"{a} vs {b}" for a, b in zip(ids_c, ids_r, strict=False) if a != b), "in length")
        raise PairingError(
            f"the models were evaluated on different images ({len(ids_c)} vs {len(ids_r)}, first "
            f"difference {first}); evaluate both on the same golden set"
        )
    missing = [i for i in ids_c if i not in patient_of]
    if missing:
        raise PairingError(f"{len(missing)} images have no patient (e.g. {missing[0]}): resampling needs one")
    for c, r in zip(candidate, reference, strict=True):
        if not np.array_equal(np.sort(c.gt_cls), np.sort(r.gt_cls)):
            raise PairingError(f"image {c.image_id} has different ground truth in the two evaluations")


def paired_bootstrap(
    candidate: Sequence[ImageResult],
    reference: Sequence[ImageResult],
    patient_of: Mapping[str, str],
    *,
    resamples: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> PairedComparison:
    """Candidate minus reference mAP@0.4 (overall and per class) with percentile CIs over patients."""
    if resamples < 1:
        raise PairingError("resamples must be at least 1")
    _check_pairing(candidate, reference, patient_of)
    by_patient: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(candidate):
        by_patient[patient_of[r.image_id]].append(i)
    groups = list(by_patient.values())
    classes = np.unique(np.concatenate([r.gt_cls for r in candidate] or [np.zeros(0)])).astype(int)
    instances = {int(c): int(sum((r.gt_cls == c).sum() for r in candidate)) for c in classes}

    def diff(indices: list[int]) -> tuple[float, np.ndarray, np.ndarray, np.ndarray]:
        """mAP difference and per-class differences on the images ``indices``.

        A class without a ground-truth box among those images has no AP (NaN, not 0): a resample
        that happens to draw none of its patients says nothing about it. Counting it as "both 0,
        difference 0" pulled every per-class interval towards 0 and averaged the resample's mAP over
        classes it did not hold (the full-set mAP averages over classes present, as ultralytics does).
        """
        sample = [candidate[i] for i in indices]
        ap_c = _ap(sample, classes)
        ap_r = _ap([reference[i] for i in indices], classes)
        present = np.isin(classes, np.concatenate([r.gt_cls for r in sample] or [np.zeros(0)]))
        per_class = np.where(present, ap_c - ap_r, np.nan)
        overall = float(per_class[present].mean()) if present.any() else float("nan")
        return overall, per_class, ap_c, ap_r

    full = list(range(len(candidate)))
    overall, per_class, ap_c, ap_r = diff(full)
    overall = 0.0 if np.isnan(overall) else overall  # no box at all: nothing differs (non_inferior refuses)
    rng = np.random.default_rng(seed)
    overall_samples = np.empty(resamples)
    class_samples = np.empty((resamples, len(classes)))
    for k in range(resamples):
        drawn = rng.integers(0, len(groups), size=len(groups))
        indices = [i for g in drawn for i in groups[g]]
        overall_samples[k], class_samples[k], _, _ = diff(indices)
    low, high = _interval(overall_samples, overall, confidence)
    bounds = [_interval(class_samples[:, j], float(per_class[j]), confidence) for j in range(len(classes))]
    return PairedComparison(
        overall=Interval(overall, float(low), float(high)),
        per_class={
            int(c): Interval(float(per_class[j]), bounds[j][0], bounds[j][1]) for j, c in enumerate(classes)
        },
        instances=instances,
        patients=len(groups),
        resamples=resamples,
        confidence=confidence,
        per_class_ap={
            "candidate": {int(c): float(ap_c[j]) for j, c in enumerate(classes)},
            "reference": {int(c): float(ap_r[j]) for j, c in enumerate(classes)},
        },
    )


def _interval(samples: np.ndarray, estimate: float, confidence: float) -> tuple[float, float]:
    """Percentile interval over the resamples where the figure is defined (not NaN).

    When no resample defined it (too few resamples to draw the class's patients), the full-set
    estimate is the only measurement there is, so the interval collapses onto it.
    """
    defined = samples[~np.isnan(samples)]
    if defined.size == 0:
        return estimate, estimate
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(defined, [tail, 100 - tail])
    return float(low), float(high)


@dataclass(frozen=True)
class NonInferiority:
    """The gate's verdict with the reasons a reviewer reads."""

    passed: bool
    reasons: list[str]


def non_inferior(
    comparison: PairedComparison, *, margin: float = 0.0, min_instances: int = 10
) -> NonInferiority:
    """Lower CI bound of the mAP difference >= -margin, and the same for every class with enough boxes.

    An evaluated set without a single ground-truth box measures no AP at all: its "difference 0,
    CI [0, 0]" is the absence of evidence, so it refuses rather than passing any candidate (one
    that boxes every normal radiograph included).
    """
    if not sum(comparison.instances.values()):
        return NonInferiority(
            False,
            [
                f"the {comparison.patients} patients' images hold no ground-truth box: mAP@0.4 is undefined "
                "and nothing shows the candidate non-inferior; evaluate on a set with findings"
            ],
        )
    reasons = []
    overall = comparison.overall
    if overall.low < -margin:
        reasons.append(f"mAP@0.4 difference {overall.diff:+.4f}, CI low {overall.low:+.4f} < -{margin}")
    for cid, ci in sorted(comparison.per_class.items()):
        if comparison.instances[cid] >= min_instances and ci.low < -margin:
            reasons.append(f"class {cid}: AP@0.4 difference {ci.diff:+.4f}, CI low {ci.low:+.4f} < -{margin}")
    return NonInferiority(not reasons, reasons)
