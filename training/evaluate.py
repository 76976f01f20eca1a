"""Detection metrics on a dataset split, identical for the PyTorch model and its ONNX export.

Ultralytics' validator computes mAP only at IoU 0.5:0.95 and uses rectangular
batches unlike the gateway; VinDr-CXR's competition metric is mAP at IoU 0.4.
So this module runs the serving path (square letterbox, raw head, NMS,
boxes back to original pixels) and then reuses ultralytics' own building
blocks for the statistics: ``box_iou``, the validator's greedy
``match_predictions`` (here with thresholds 0.5..0.95 plus 0.4),
``ap_per_class`` (the PR statistics; of its figures only the PR curve is
drawn, with ``plot_pr_curve``) and ``ConfusionMatrix`` (its plot).
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import cv2
import numpy as np
from pydantic import BaseModel

from core.triage import image_score, study_score
from data_pipeline.geometry import LetterboxParams, boxes_to_source, letterbox, yolo_to_xyxy
from training.config import EvalConfig
from training.dataset import DatasetRef
from training.errors import DatasetError
from training.paired import ImageResult
from training.predictors import Predictor
from training.subgroups import SubgroupMetrics, subgroup_metrics

log = logging.getLogger(__name__)

#: IoU thresholds: columns 0..9 are COCO's 0.50:0.95, column 10 is VinDr's 0.40.
IOU_THRESHOLDS = np.array([*np.linspace(0.5, 0.95, 10), 0.4])
BATCH = 8


class ClassMetrics(BaseModel):
    class_id: int
    class_name: str
    instances: int
    ap50: float
    ap40: float
    ap50_95: float
    precision: float
    recall: float


class EvalReport(BaseModel):
    """Everything the model card, the registry tags and the promotion gates read."""

    backend: str
    split: str
    images: int
    instances: int
    imgsz: int
    map50: float
    map50_95: float
    map40: float
    conf_threshold: float
    precision: float
    recall: float
    per_class: list[ClassMetrics]
    no_finding_auc: float | None = None  # image level: finding vs "No finding" (no_finding_auc())
    study_triage_auc: float | None = None  # study level: the worklist's score (study_triage_auc())
    latency_ms_b1: float | None = None
    latency_ms_b8: float | None = None
    plots: list[str] = []
    subgroups: list[SubgroupMetrics] = []  # mAP@0.4 per sex / age band / manufacturer / view (manifest)


@dataclass
class _Sample:
    tensor: np.ndarray
    params: LetterboxParams
    gt_boxes: np.ndarray
    gt_cls: np.ndarray
    image_id: str = ""


def preprocess(image_path: Path, imgsz: int) -> tuple[np.ndarray, LetterboxParams]:
    """Image file -> CHW float32 RGB 0..1 letterboxed exactly like the gateway does."""
    img = cv2.imread(str(image_path), cv2.IMREAD_COLOR)
    if img is None:
        raise DatasetError(f"cannot read image {image_path}")
    boxed, params = letterbox(cv2.cvtColor(img, cv2.COLOR_BGR2RGB), imgsz)
    return boxed.transpose(2, 0, 1).astype(np.float32) / 255.0, params


def _read_labels(label_file: Path, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    if not label_file.exists() or not label_file.read_text().strip():
        return np.zeros((0, 4)), np.zeros((0,), dtype=int)
    rows = np.loadtxt(label_file, ndmin=2)
    return yolo_to_xyxy(rows[:, 1:5], width, height), rows[:, 0].astype(int)


def _samples(dataset: DatasetRef, split: str, imgsz: int) -> Iterator[_Sample]:
    for image in dataset.images(split):
        tensor, params = preprocess(image, imgsz)
        boxes, cls = _read_labels(dataset.label_file(image), params.src_w, params.src_h)
        yield _Sample(tensor, params, boxes, cls, image.stem)


def _batches(samples: Iterator[_Sample], size: int) -> Iterator[list[_Sample]]:
    batch: list[_Sample] = []
    for sample in samples:
        batch.append(sample)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def detections(
    raw: np.ndarray, cfg: EvalConfig, conf: float = 0.001, *, multi_label: bool = True
) -> list[np.ndarray]:
    """Raw head output -> per image (n, 6) [x0, y0, x1, y1, conf, cls] in INPUT pixels (ultralytics NMS).

    ``multi_label``: every class above ``conf`` on an anchor is a detection, as ultralytics'
    validator counts them for mAP; False keeps each anchor's best class only, which is what the
    gateway serves (serving/inference/postprocess.py) and so what operating points are chosen on.
    """
    import torch
    from ultralytics.utils.nms import non_max_suppression

    # Ultralytics' own NMS loop, not torchvision's kernel (which it takes once torchvision is
    # imported): the same boxes, but importing torchvision (it imports torch._dynamo) cost the
    # training process more than the check stage's evaluations gained (docs/benchmarks.md).
    # No time limit: ultralytics stops NMS after 2 s + 0.05 s/image and drops the rest of the batch,
    # which makes a metric (and a promotion gate) depend on how busy the machine is. The work is
    # bounded by count instead: the 3,000 best candidates per image (of at most 300 kept), so a
    # barely trained model that scores everything above 0.001 stays seconds, not minutes.
    out = non_max_suppression(
        torch.from_numpy(raw),
        conf_thres=conf,
        iou_thres=cfg.nms_iou,
        multi_label=multi_label,
        max_det=300,
        max_nms=3000,
        max_time_img=float("inf"),
    )
    return [o.cpu().numpy() for o in out]


def _match(pred: np.ndarray, gt_boxes: np.ndarray, gt_cls: np.ndarray) -> np.ndarray:
    """(n_pred, len(IOU_THRESHOLDS)) bool: which detections are true positives at each IoU."""
    import torch
    from ultralytics.engine.validator import BaseValidator
    from ultralytics.utils.metrics import box_iou

    if len(pred) == 0 or len(gt_cls) == 0:
        return np.zeros((len(pred), len(IOU_THRESHOLDS)), dtype=bool)
    iou = box_iou(torch.from_numpy(gt_boxes).float(), torch.from_numpy(pred[:, :4]).float())
    matcher = SimpleNamespace(iouv=torch.from_numpy(IOU_THRESHOLDS))  # match_predictions reads only .iouv
    correct = BaseValidator.match_predictions(
        cast(Any, matcher), torch.from_numpy(pred[:, 5]).int(), torch.from_numpy(gt_cls).int(), iou
    )
    return correct.numpy()


def no_finding_auc(per_image: list[ImageResult]) -> float | None:
    """ROC AUC of "this image has a finding" scored by the image's highest detection confidence.

    The image-level question a worklist asks (normal or not?), answered from the boxes alone:
    an image's score is its most confident detection (0 without any; :func:`core.triage.image_score`,
    the gateway's definition), its truth whether any reader's box survived fusion ("No finding"
    images have none). None when the split holds only one kind of image (the AUC is undefined).
    """
    from sklearn.metrics import roc_auc_score

    truth = np.array([len(r.gt_cls) > 0 for r in per_image])
    if truth.all() or not truth.any():
        return None
    score = np.array([image_score(r.conf) for r in per_image])
    return float(roc_auc_score(truth, score))


def study_triage_auc(per_image: list[ImageResult], studies: Mapping[str, str] | None = None) -> float | None:
    """ROC AUC of the worklist's study score (core/triage.py) against "the study has any finding".

    A study's score is the maximum of its images' scores, its truth whether any of its images has
    a box ("No finding" phantoms and VinDr images have none). ``studies`` maps image id -> study;
    an image it does not name is a study of its own, which is what evaluation passes today: the
    dataset manifest keeps no study UID, and VinDr-CXR and the phantoms have one radiograph per
    study, so there the study AUC equals the image AUC computed through the study path. None when
    the split holds only one kind of study.
    """
    from sklearn.metrics import roc_auc_score

    scores: dict[str, list[float]] = {}
    truth: dict[str, bool] = {}
    for r in per_image:
        study = (studies or {}).get(r.image_id, r.image_id)
        scores.setdefault(study, []).append(image_score(r.conf))
        truth[study] = truth.get(study, False) or len(r.gt_cls) > 0
    labels = np.array([truth[s] for s in scores])
    if labels.all() or not labels.any():
        return None
    return float(roc_auc_score(labels, np.array([study_score(v) for v in scores.values()])))


def measure_latency(predictor: Predictor, sample: np.ndarray, batch: int, repeats: int) -> float:
    """Median milliseconds per image at a batch size, after one warm-up run."""
    x = np.repeat(sample[None], batch, axis=0)
    predictor(x)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        predictor(x)
        times.append((time.perf_counter() - t0) * 1000 / batch)
    return float(statistics.median(times))


def _draw_figures(
    plots_dir: Path,
    recall_grid: np.ndarray,
    precision_curves: np.ndarray,
    ap: np.ndarray,
    classes: np.ndarray,
    names: Mapping[int, str],
    confusion: Any,
) -> None:
    """The precision-recall curve and the normalised confusion matrix, ultralytics' own figures.

    Not ``ap_per_class(plot=True)``: that also draws F1-, precision- and recall-confidence
    curves nobody here reads (the operating points are chosen from the data, not a figure),
    and each of ultralytics' 250 dpi figures costs a second or more of the check stage.
    """
    from ultralytics.utils.metrics import plot_pr_curve

    plots_dir.mkdir(parents=True, exist_ok=True)
    if len(classes):  # rows of ap / precision_curves are ``classes``, as ap_per_class names them
        present = {row: names[int(c)] for row, c in enumerate(classes) if int(c) in names}
        plot_pr_curve(recall_grid, precision_curves, ap, plots_dir / "PR_curve.png", present)
    confusion.plot(normalize=True, save_dir=plots_dir)


def evaluate(
    predictor: Predictor,
    dataset: DatasetRef,
    cfg: EvalConfig,
    *,
    split: str = "test",
    plots_dir: Path | None = None,
    latency: bool = True,
    results: list[ImageResult] | None = None,
    multi_label: bool = True,
) -> EvalReport:
    """Run ``predictor`` on every image of ``split`` and compute the report.

    ``results``, when given, receives every image's matched detections at IoU 0.4 (in image
    order) for a paired comparison with another model on the same images (training/paired.py).
    ``multi_label`` as in :func:`detections`: the default is ultralytics' mAP; False measures the
    detections the gateway would serve (one class per anchor).
    """
    import torch
    from ultralytics.utils.metrics import ConfusionMatrix, ap_per_class

    names = dict(enumerate(predictor.class_names))
    confusion = ConfusionMatrix(names=names, task="detect")
    tps, confs, pcls, tcls = [], [], [], []
    op_tp = op_pred = 0
    n_images = 0
    first: np.ndarray | None = None
    per_image: list[ImageResult] = []  # also grouped by subgroup below
    for batch in _batches(_samples(dataset, split, predictor.imgsz), BATCH):
        raw = predictor(np.stack([s.tensor for s in batch]))
        for sample, pred in zip(batch, detections(raw, cfg, multi_label=multi_label), strict=True):
            n_images += 1
            first = sample.tensor if first is None else first
            pred = pred.copy()
            pred[:, :4] = boxes_to_source(pred[:, :4], sample.params)
            correct = _match(pred, sample.gt_boxes, sample.gt_cls)
            # IOU_THRESHOLDS ends with 0.4, VinDr-CXR's IoU: the paired and the subgroup gates' column
            per_image.append(
                ImageResult(sample.image_id, correct[:, -1], pred[:, 4], pred[:, 5], sample.gt_cls)
            )
            tps.append(correct)
            confs.append(pred[:, 4])
            pcls.append(pred[:, 5])
            tcls.append(sample.gt_cls)
            keep = pred[:, 4] >= cfg.conf_threshold
            op_pred += int(keep.sum())
            op_tp += int(correct[keep, 0].sum())
            confusion.process_batch(
                {
                    "bboxes": torch.from_numpy(pred[:, :4]).float(),
                    "conf": torch.from_numpy(pred[:, 4]).float(),
                    "cls": torch.from_numpy(pred[:, 5]).float(),
                },
                {"bboxes": torch.from_numpy(sample.gt_boxes).float(), "cls": torch.from_numpy(sample.gt_cls)},
                conf=cfg.conf_threshold,
            )
    if n_images == 0 or first is None:
        raise DatasetError(f"dataset {dataset.version} has no images in split '{split}'")

    tp = np.concatenate(tps) if tps else np.zeros((0, len(IOU_THRESHOLDS)), dtype=bool)
    conf = np.concatenate(confs)
    pred_cls = np.concatenate(pcls)
    target_cls = np.concatenate(tcls)
    _, _, _, _, _, ap, classes, *_, recall_grid, precision_curves = ap_per_class(
        tp, conf, pred_cls, target_cls, names=names
    )
    per_class = []
    for row, cid in enumerate(classes):
        in_class = pred_cls == cid
        keep = in_class & (conf >= cfg.conf_threshold)
        n_gt = int((target_cls == cid).sum())
        tp_c = int(tp[keep, 0].sum())
        per_class.append(
            ClassMetrics(
                class_id=int(cid),
                class_name=names.get(int(cid), str(cid)),
                instances=n_gt,
                ap50=float(ap[row, 0]),
                ap40=float(ap[row, 10]),
                ap50_95=float(ap[row, :10].mean()),
                precision=tp_c / max(int(keep.sum()), 1),
                recall=tp_c / max(n_gt, 1),
            )
        )
    if plots_dir is not None:
        _draw_figures(plots_dir, recall_grid, precision_curves, ap, classes, names, confusion)
    report = EvalReport(
        backend=predictor.backend,
        split=split,
        images=n_images,
        instances=len(target_cls),
        imgsz=predictor.imgsz,
        map50=float(ap[:, 0].mean()) if len(classes) else 0.0,
        map50_95=float(ap[:, :10].mean()) if len(classes) else 0.0,
        map40=float(ap[:, 10].mean()) if len(classes) else 0.0,
        conf_threshold=cfg.conf_threshold,
        precision=op_tp / max(op_pred, 1),
        recall=op_tp / max(len(target_cls), 1),
        per_class=per_class,
        plots=sorted(str(p) for p in plots_dir.glob("*.png")) if plots_dir is not None else [],
        subgroups=subgroup_metrics(per_image, dataset.subgroups()),
        no_finding_auc=no_finding_auc(per_image),
        study_triage_auc=study_triage_auc(per_image),
    )
    if results is not None:
        results.extend(per_image)
    if latency:
        report.latency_ms_b1 = measure_latency(predictor, first, 1, cfg.latency_repeats)
        report.latency_ms_b8 = measure_latency(predictor, first, 8, cfg.latency_repeats)
    log.info(
        "event=evaluated backend=%s split=%s images=%d map50=%.4f map40=%.4f map50_95=%.4f",
        report.backend,
        split,
        n_images,
        report.map50,
        report.map40,
        report.map50_95,
    )
    return report
