"""Per-class operating points and calibration, chosen on the validation split and stored with the version.

One global confidence threshold serves no class well: a rare, subtle finding needs a low one to
be found at all, a frequent, obvious one a higher one to keep false alarms down. So each class
gets its own threshold on the model's raw score, chosen on the validation split (never on test,
which stays the unbiased estimate) for a target (``EvalConfig.operating_point``):

- ``sensitivity``: the HIGHEST threshold whose sensitivity (recall of the class's boxes at
  IoU 0.4, VinDr-CXR's) reaches ``target_sensitivity``; when the target is out of reach, the
  threshold of the highest sensitivity the model reaches, flagged ``target_met: false``.
- ``f1``: the threshold of the highest F1 (the highest such threshold on ties).

A class with no boxes in the split, or whose detections never match one, gets the global
``conf_threshold`` (rule ``fallback``, with a note saying why). The calibrator is fitted on the
same split (:mod:`training.calibration`). The result is one small artifact,
:class:`core.operating_points.OperatingPoints`, written as ``operating_points.json`` beside the
ONNX so the registered version carries it and the gateway applies it.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from core.operating_points import OPERATING_POINTS_FILE, ClassOperatingPoint, OperatingPoints
from core.prediction_reference import PredictionReference, build_prediction_reference
from training.calibration import Detections, fit_calibration
from training.config import EvalConfig
from training.dataset import DatasetRef
from training.evaluate import evaluate
from training.paired import ImageResult
from training.predictors import Predictor

log = logging.getLogger(__name__)

#: VinDr-CXR's IoU: the column of ``ImageResult.correct``
IOU = 0.4


@dataclass(frozen=True)
class ThresholdChoice:
    """A class's threshold, the rule that chose it and what it achieves on the split."""

    threshold: float
    rule: Literal["sensitivity", "f1", "fallback"]
    sensitivity: float | None = None
    precision: float | None = None
    target_met: bool | None = None
    note: str = ""


def choose_threshold(
    conf: np.ndarray,
    correct: np.ndarray,
    instances: int,
    *,
    target: Literal["sensitivity", "f1"],
    target_sensitivity: float,
    fallback: float,
) -> ThresholdChoice:
    """The threshold on raw scores for one class's detections (kept when score >= threshold).

    ``correct`` marks the detections that matched a box (each box at most once), ``instances``
    is the number of boxes, so the sensitivity at threshold t is
    sum(correct[conf >= t]) / instances.
    """
    if instances == 0:
        return ThresholdChoice(fallback, "fallback", note="no instances in the split: global threshold")
    c = np.asarray(conf, dtype=np.float64)
    y = np.asarray(correct, dtype=bool)
    if not y.any():
        return ThresholdChoice(
            fallback, "fallback", 0.0, None, False if target == "sensitivity" else None,
            note="no detection matched a box in the split: global threshold",
        )  # fmt: skip
    order = np.argsort(-c, kind="stable")
    c, y = c[order], y[order]
    tp = np.cumsum(y)
    kept = np.arange(1, len(c) + 1)
    # a threshold keeps every detection with an equal score: only the last of each tie is a choice
    ends = np.r_[np.flatnonzero(c[1:] != c[:-1]), len(c) - 1]
    recall = tp[ends] / instances
    precision = tp[ends] / kept[ends]
    if target == "sensitivity":
        reached = np.flatnonzero(recall >= target_sensitivity - 1e-12)
        met = bool(reached.size)
        pick = int(reached[0]) if met else int(np.argmax(recall))  # argmax: the first (highest) maximum
        note = (
            "" if met else f"target sensitivity {target_sensitivity} out of reach: {recall[pick]:.3f} at most"
        )
        return ThresholdChoice(
            float(c[ends[pick]]), "sensitivity", float(recall[pick]), float(precision[pick]), met, note
        )
    # F1 = 2 TP / (kept + boxes), one correctly rounded division: equal F1s are equal floats, so
    # argmax keeps the documented tie rule (the highest threshold). 2PR / (P + R) rounds each tie
    # differently (4/6, 4/6 vs 5/9, 5/6) and let round-off pick a lower threshold, more false alarms.
    f1 = 2 * tp[ends] / (kept[ends] + instances)
    pick = int(np.argmax(f1))
    return ThresholdChoice(float(c[ends[pick]]), "f1", float(recall[pick]), float(precision[pick]))


def flatten(results: Sequence[ImageResult]) -> tuple[Detections, np.ndarray]:
    """Every image's detections as one :class:`Detections`, and the ground-truth class of every box."""
    if not results:
        empty = np.zeros(0)
        return Detections(empty, empty.astype(int), empty.astype(bool), empty.astype(int)), empty.astype(int)
    dets = Detections(
        conf=np.concatenate([np.asarray(r.conf, dtype=np.float64) for r in results]),
        cls=np.concatenate([np.asarray(r.pred_cls).astype(int) for r in results]),
        correct=np.concatenate([np.asarray(r.correct, dtype=bool) for r in results]),
        image=np.concatenate([np.full(len(r.conf), i, dtype=int) for i, r in enumerate(results)]),
    )
    gt = np.concatenate([np.asarray(r.gt_cls).astype(int) for r in results])
    return dets, gt


def build_operating_points(
    results: Sequence[ImageResult],
    class_names: Sequence[str],
    cfg: EvalConfig,
    *,
    onnx_sha256: str = "",
    dataset_version: str = "",
    split: str = "val",
) -> OperatingPoints:
    """Thresholds and calibrators of every class from one split's matched detections."""
    dets, gt = flatten(results)
    classes = list(range(len(class_names)))
    sample = dets.where(dets.conf >= cfg.calibration_min_conf)
    fitted = fit_calibration(
        sample, classes, cfg.calibration, min_samples=cfg.calibration_min_samples, bins=cfg.ece_bins
    )
    points = []
    for cid in classes:
        mask = dets.cls == cid
        choice = choose_threshold(
            dets.conf[mask],
            dets.correct[mask],
            int((gt == cid).sum()),
            target=cfg.operating_point,
            target_sensitivity=cfg.target_sensitivity,
            fallback=cfg.conf_threshold,
        )
        own = fitted.per_class.get(cid)
        calibrator = fitted.calibrator_for(cid)
        points.append(
            ClassOperatingPoint(
                class_id=cid,
                class_name=class_names[cid],
                threshold=choice.threshold,
                rule=choice.rule,
                instances=int((gt == cid).sum()),
                sensitivity=choice.sensitivity,
                precision=choice.precision,
                target_met=choice.target_met,
                calibrated_threshold=float(np.clip(calibrator.apply(np.array([choice.threshold]))[0], 0, 1)),
                calibrator=own,
                samples=fitted.samples[cid],
                ece_before=fitted.ece_before[cid],
                ece_after=fitted.ece_after[cid],
                note=choice.note,
            )
        )
        if choice.rule == "fallback" or choice.target_met is False:
            log.warning("event=operating_point_fallback class=%s note=%s", class_names[cid], choice.note)
    measured = [p for p in points if p.ece_before is not None and p.ece_after is not None]
    ops = OperatingPoints(
        onnx_sha256=onnx_sha256,
        dataset_version=dataset_version,
        split=split,
        iou=IOU,
        target=cfg.operating_point,
        target_sensitivity=cfg.target_sensitivity if cfg.operating_point == "sensitivity" else None,
        fallback_threshold=cfg.conf_threshold,
        calibration=cfg.calibration,
        calibration_min_conf=cfg.calibration_min_conf,
        calibration_min_samples=cfg.calibration_min_samples,
        ece_bins=cfg.ece_bins,
        calibrator=fitted.global_calibrator,
        classes=points,
        ece_before=float(np.mean([p.ece_before for p in measured])) if measured else None,
        ece_after=float(np.mean([p.ece_after for p in measured])) if measured else None,
    )
    reference = prediction_reference(results, ops, class_names, split=split)
    return ops.model_copy(update={"prediction_reference": reference})


def prediction_reference(
    results: Sequence[ImageResult],
    ops: OperatingPoints,
    class_names: Sequence[str],
    *,
    split: str = "val",
) -> PredictionReference | None:
    """How the model answers the split as the gateway would: the reference of prediction drift.

    Each image keeps the detections whose raw score reaches its class's threshold and reports
    them with the confidence the gateway returns (calibrated by ``ops``), exactly what
    ``serving.inference.postprocess.to_detections`` does with these operating points; the
    gateway's window of answers is then compared with like.
    """
    thresholds = ops.thresholds(len(class_names))
    images: list[list[tuple[int, float]]] = []
    for r in results:
        cls = np.asarray(r.pred_cls).astype(np.int64)
        conf = np.asarray(r.conf, dtype=np.float64)
        known = (cls >= 0) & (cls < len(class_names))
        keep = np.zeros(len(cls), dtype=bool)
        keep[known] = conf[known] >= thresholds[cls[known]]
        shown = np.clip(ops.calibrate(conf[keep], cls[keep]), 0.0, 1.0)
        images.append(list(zip(cls[keep].tolist(), shown.tolist(), strict=True)))
    return build_prediction_reference(images, class_names, split=split)


def operating_points_on_split(
    predictor: Predictor,
    dataset: DatasetRef,
    cfg: EvalConfig,
    *,
    onnx_sha256: str = "",
    split: str = "val",
) -> OperatingPoints:
    """Evaluate ``predictor`` (the exported model: what is served) on ``split`` and choose its points.

    The detections are the gateway's, one class per anchor (its best): with ultralytics' mAP
    counting (every class above 0.001 on an anchor), a runner-up class the gateway never serves
    counted towards its class's sensitivity, calibration and the prediction-drift reference.
    """
    results: list[ImageResult] = []
    evaluate(predictor, dataset, cfg, split=split, latency=False, results=results, multi_label=False)
    ops = build_operating_points(
        results,
        predictor.class_names,
        cfg,
        onnx_sha256=onnx_sha256,
        dataset_version=dataset.version,
        split=split,
    )
    log.info("event=operating_points split=%s %s", split, ops.tag())
    return ops


def write_operating_points(ops: OperatingPoints, directory: Path) -> Path:
    """``<directory>/operating_points.json``, beside the ONNX it belongs to."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / OPERATING_POINTS_FILE
    path.write_text(ops.to_json())
    return path


def _metric_key(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def operating_point_metrics(ops: OperatingPoints) -> dict[str, float]:
    """MLflow metrics: per-class threshold and ECE before/after, and the mean ECE."""
    prefix = ops.split
    out: dict[str, float] = {}
    if ops.ece_before is not None and ops.ece_after is not None:
        out[f"{prefix}/ece_before_mean"] = ops.ece_before
        out[f"{prefix}/ece_after_mean"] = ops.ece_after
    for c in ops.classes:
        key = _metric_key(c.class_name)
        out[f"{prefix}/threshold/{key}"] = c.threshold
        if c.ece_before is not None and c.ece_after is not None:
            out[f"{prefix}/ece_before/{key}"] = c.ece_before
            out[f"{prefix}/ece_after/{key}"] = c.ece_after
    return out


def operating_point_tags(ops: OperatingPoints | None) -> dict[str, str]:
    """Registry tags of the version: the artifact's hash (what the gateway must find) and a summary."""
    if ops is None:
        return {}
    return {"operating_points_sha256": ops.sha256(), "operating_points": ops.tag()}


def _fmt(value: float | None, digits: int = 3) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def card_section(ops: OperatingPoints | None) -> str:
    """The model card's "Operating points and calibration" section (markdown, ending with one newline)."""
    if ops is None:
        return (
            "## Operating points and calibration\n"
            "None: the split to choose them on was empty. The gateway applies its global confidence "
            "threshold and returns raw scores.\n"
        )
    rule = (
        f"the highest threshold reaching sensitivity {ops.target_sensitivity} at IoU {ops.iou}"
        if ops.target == "sensitivity"
        else f"the threshold of maximum F1 at IoU {ops.iou}"
    )
    rows = "\n".join(
        f"| {c.class_id} | {c.class_name} | {c.instances} | {c.threshold:.4f} | {c.calibrated_threshold:.4f} "
        f"| {c.rule}{'' if c.target_met is not False else ' (not met)'} | {_fmt(c.sensitivity)} "
        f"| {_fmt(c.precision)} | {c.samples} | {_fmt(c.ece_before, 4)} | {_fmt(c.ece_after, 4)} |"
        for c in ops.classes
    )
    notes = "".join(f"\n- {c.class_name}: {c.note}" for c in ops.classes if c.note)
    return f"""## Operating points and calibration (split `{ops.split}`)
Per-class thresholds on the raw score, chosen as {rule}; the gateway applies them unless a request
passes its own `conf` (which then filters the returned, calibrated confidence). Classes without
boxes in the split use the global threshold {ops.fallback_threshold}. Calibrator: **{ops.calibration}**
(per class with >= {ops.calibration_min_samples} detections of both outcomes, else one global),
fitted on detections with raw score >= {ops.calibration_min_conf}; the gateway returns the
calibrated confidence. ECE: {ops.ece_bins} equal-width bins; "after" is measured out of fold
(2 folds by image), mean over classes {_fmt(ops.ece_before, 4)} -> {_fmt(ops.ece_after, 4)}.
Artifact `{OPERATING_POINTS_FILE}` sha256 `{ops.sha256()}`.

| id | finding | boxes | threshold | calibrated | rule | sens. | prec. | detections | ECE before | ECE after |
| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |
{rows}
{notes}
"""
