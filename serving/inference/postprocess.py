"""Raw model output -> detections in the ORIGINAL image's pixels.

NMS runs here, in the gateway, not in the graph (the model contract says
``nms: gateway``), so thresholds change per request without re-exporting.
The steps mirror ``ultralytics.utils.nms.non_max_suppression`` (best class per
anchor, confidence filter, top-30000, class-offset NMS, max_det) using
torchvision's ``batched_nms``; a test checks both give the same boxes.

With the served version's operating points (:mod:`core.operating_points`) the confidence
filter is per class on the raw score by default, a request's own threshold filters the
calibrated confidence it gets back, and every detection carries the calibrated confidence.
NMS itself always ranks raw scores, so calibration never changes which boxes survive it.
"""

from __future__ import annotations

import numpy as np

from core.operating_points import OperatingPoints
from data_pipeline.geometry import LetterboxParams, boxes_to_source
from serving.contract import Detection

MAX_NMS_CANDIDATES = 30000


def finite_anchors(pred: np.ndarray) -> np.ndarray:
    """(A,) bool: the anchors of a (4+nc, A) head output whose box and class scores are all finite.

    An fp16 engine (the ``fp16-trt`` variant) or a broken export can overflow to inf or NaN. Such an
    anchor is not a candidate at all: a NaN box would reach the JSON answer (which then fails to
    render), an inf width becomes a box over the whole image, and an inf score is no confidence.
    """
    return np.asarray(np.isfinite(pred).all(axis=0))


def finite_class_scores(pred: np.ndarray) -> np.ndarray:
    """The class scores (nc, A) of a head output, 0 for every anchor :func:`finite_anchors` refuses.

    What the triage score (``core.triage.head_image_score``) must read, so it never ranks a study by
    an anchor that NMS dropped as non-finite.
    """
    return np.where(finite_anchors(pred), pred[4:], np.float32(0.0))


def nms_one(
    pred: np.ndarray,
    conf_threshold: float | np.ndarray,
    iou_threshold: float,
    max_det: int,
    *,
    calibrated_by: OperatingPoints | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(4+nc, A) output of one image -> (boxes xyxy in model input px, raw confidences, class ids).

    Anchors with a non-finite box or score are never candidates (:func:`finite_anchors`).

    ``conf_threshold``: one threshold (kept when the score is above it), or one per class id
    (kept when the raw score is at least its class's, the operating points' rule). With
    ``calibrated_by`` a single threshold applies to the calibrated confidence instead.
    """
    import torch
    from torchvision.ops import batched_nms

    scores_all = pred[4:]
    cls = scores_all.argmax(axis=0)
    conf = scores_all[cls, np.arange(scores_all.shape[1])]
    if isinstance(conf_threshold, np.ndarray):
        keep = conf >= conf_threshold[cls]
    elif calibrated_by is not None:
        keep = calibrated_by.calibrate(conf, cls) > conf_threshold
    else:
        keep = conf > conf_threshold
    keep &= finite_anchors(pred)  # an inf score passes any threshold: refuse it explicitly
    if not keep.any():
        return np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64)
    xywh = pred[:4, keep].T
    conf, cls = conf[keep], cls[keep]
    boxes = np.empty_like(xywh)
    half_w, half_h = xywh[:, 2] / 2, xywh[:, 3] / 2
    boxes[:, 0] = xywh[:, 0] - half_w
    boxes[:, 1] = xywh[:, 1] - half_h
    boxes[:, 2] = xywh[:, 0] + half_w
    boxes[:, 3] = xywh[:, 1] + half_h
    if len(conf) > MAX_NMS_CANDIDATES:
        top = np.argsort(-conf, kind="stable")[:MAX_NMS_CANDIDATES]
        boxes, conf, cls = boxes[top], conf[top], cls[top]
    with torch.inference_mode():
        kept = batched_nms(
            torch.from_numpy(boxes), torch.from_numpy(conf), torch.from_numpy(cls), iou_threshold
        )
    idx = kept[:max_det].numpy()
    return boxes[idx], conf[idx], cls[idx]


def to_detections(
    pred: np.ndarray,
    params: LetterboxParams,
    class_names: tuple[str, ...],
    *,
    conf_threshold: float | None,
    iou_threshold: float,
    max_det: int,
    source_size: tuple[int, int] | None = None,
    operating_points: OperatingPoints | None = None,
) -> list[Detection]:
    """NMS on one image's output and map the kept boxes back through the letterbox.

    ``source_size`` is the original (width, height) when the letterboxed image
    was a shrunk copy (see ``preprocess.prepare``); boxes are scaled up to it.
    ``conf_threshold`` None means the ``operating_points``' per-class thresholds; a number
    filters the returned confidence (calibrated when the operating points calibrate).
    """
    threshold: float | np.ndarray
    if conf_threshold is None:
        if operating_points is None:
            raise ValueError("no confidence threshold: pass one, or the model's operating points")
        threshold = operating_points.thresholds(max(len(class_names), pred.shape[0] - 4))
    else:
        threshold = conf_threshold
    calibrating = operating_points is not None and operating_points.calibrated
    boxes, conf, cls = nms_one(
        pred.astype(np.float32, copy=False),
        threshold,
        iou_threshold,
        max_det,
        calibrated_by=operating_points if calibrating else None,
    )
    if len(conf) == 0:
        return []
    shown = operating_points.calibrate(conf, cls) if operating_points is not None and calibrating else conf
    source = np.asarray(boxes_to_source(boxes, params), dtype=np.float64)
    if source_size is not None and source_size != (params.src_w, params.src_h):
        width, height = source_size
        source[:, [0, 2]] = (source[:, [0, 2]] * (width / params.src_w)).clip(0, width)
        source[:, [1, 3]] = (source[:, [1, 3]] * (height / params.src_h)).clip(0, height)
    # a box that lies in the letterbox's padding (or past the input's edge) clips to a line on the
    # image's border: no finding of this image at all, and a zero-area region in the answer and SR
    inside = (source[:, 2] > source[:, 0]) & (source[:, 3] > source[:, 1])
    source, shown, conf, cls = source[inside], shown[inside], conf[inside], cls[inside]
    return [
        Detection(
            class_id=int(c),
            class_name=class_names[int(c)] if int(c) < len(class_names) else str(int(c)),
            confidence=float(s),
            box=(float(b[0]), float(b[1]), float(b[2]), float(b[3])),
            raw_confidence=float(r) if calibrating else None,
        )
        for b, s, r, c in zip(source, shown, conf, cls, strict=True)
    ]


def warm_up() -> None:
    """Import torch/torchvision and run one NMS now, so the first request does not pay ~2 s for it."""
    pred = np.zeros((5, 2), np.float32)
    pred[:4] = [[10, 20], [10, 20], [4, 4], [4, 4]]
    pred[4] = [0.9, 0.8]
    nms_one(pred, 0.5, 0.5, 10)
