"""Fuse several radiologists' boxes per image and class with Weighted Boxes Fusion.

VinDr-CXR has three readers per training image who rarely draw the same
rectangle; training on all three sets teaches the model three answers. WBF
(``ensemble_boxes``) averages overlapping boxes of the same class, each reader
being one "model", and with every input score 1.0 and
``conf_type="box_and_model_avg"`` the fused score is exactly the share of
readers who drew that finding: ``n_readers = score * readers_on_image``.

Speed: the 70k-row VinDr file must fuse in seconds. Rows are sorted once and
each image is a contiguous slice of numpy arrays (no pandas groupby per
image); WBF itself runs once per image for all classes.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import pandas as pd
from ensemble_boxes import weighted_boxes_fusion

from data_pipeline.annotations import COORDS
from data_pipeline.classes import ALL_LABELS, NO_FINDING, NO_FINDING_ID

log = logging.getLogger(__name__)

FUSED_COLUMNS = ["image_id", "class_id", "class_name", *COORDS, "score", "n_readers", "readers_on_image"]


@dataclass(frozen=True)
class FusionConfig:
    """WBF IoU threshold, minimum agreeing readers (a count and a share of readers), minimum input score.

    ``min_reader_share`` 0.5 keeps a finding drawn by at least half of the
    image's readers (2 of 3 on VinDr-CXR training images, 1 of 1 on a
    radiologist's feedback). A box only one of three readers drew is more
    often that reader's slip than a finding the other two missed, and as
    ground truth it is noise no model can learn: on the default 300
    synthetic phantoms (whose true findings are known) 65 of 516 fused boxes
    matched no true finding (same class, IoU >= 0.5) when every reader's box
    was kept; the majority rule kept 435 of the 451 true findings and no
    unmatched box. VinDr-CXR's own test labels are a
    consensus for the same reason. Set it to 0 to keep every reader's box.
    """

    iou_thr: float = 0.4
    min_readers: int = 1
    skip_box_thr: float = 0.0
    min_reader_share: float = 0.5

    def required_readers(self, readers_on_image: int) -> int:
        """Agreeing readers a fused box needs on an image read by ``readers_on_image`` readers."""
        by_share = math.ceil(self.min_reader_share * readers_on_image - 1e-9)
        return max(self.min_readers, by_share)


def fuse_image(
    boxes: np.ndarray,
    labels: np.ndarray,
    reader_idx: np.ndarray,
    n_readers: int,
    width: float,
    height: float,
    config: FusionConfig,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Fuse one image's boxes. Returns (boxes_xyxy_px, labels, score, n_agreeing) after the reader filter.

    ``reader_idx`` gives each box's reader as 0..n_readers-1; readers who drew
    nothing still count in ``n_readers`` (they voted "no finding").
    """
    if len(boxes) == 0:
        empty = np.zeros((0,), dtype=np.float64)
        return np.zeros((0, 4)), empty.astype(int), empty, empty.astype(int)
    scale = np.array([width, height, width, height], dtype=np.float64)
    norm = np.clip(boxes / scale, 0.0, 1.0)
    boxes_list, scores_list, labels_list = [], [], []
    for r in range(n_readers):
        mask = reader_idx == r
        boxes_list.append(norm[mask])
        scores_list.append(np.ones(int(mask.sum())))
        labels_list.append(labels[mask])
    with warnings.catch_warnings():
        warnings.simplefilter(
            "ignore"
        )  # ensemble_boxes warns on zero-area boxes; the schema already judged them
        fused, scores, fused_labels = weighted_boxes_fusion(
            boxes_list,
            scores_list,
            labels_list,
            iou_thr=config.iou_thr,
            skip_box_thr=config.skip_box_thr,
            conf_type="box_and_model_avg",
        )
    agreeing = np.rint(scores * n_readers).astype(int)
    keep = agreeing >= config.required_readers(n_readers)
    fused_px = fused[keep] * scale
    # deterministic order regardless of WBF's internal sorting: class, then x_min, y_min
    order = np.lexsort((fused_px[:, 1], fused_px[:, 0], fused_labels[keep]))
    return fused_px[order], fused_labels[keep][order].astype(int), scores[keep][order], agreeing[keep][order]


def fuse_annotations(
    frame: pd.DataFrame,
    config: FusionConfig,
    sizes: Mapping[str, tuple[int, int]] | None = None,
    progress: Callable[[int], None] | None = None,
) -> pd.DataFrame:
    """Fuse a validated annotation frame (see :mod:`data_pipeline.annotations`) into one row per finding.

    ``sizes`` (image_id -> (width, height)) normalizes coordinates for WBF;
    without it an image's extent is taken as its largest coordinate, which
    leaves IoU unchanged. Images with no fused box get one "No finding" row
    whose score is the share of readers who said "No finding".
    """
    if frame.empty:
        return pd.DataFrame(columns=FUSED_COLUMNS)
    image_codes, image_index = pd.factorize(frame["image_id"], sort=True)
    image_names = np.asarray(image_index, dtype=object)
    n_images = len(image_names)
    all_rads = pd.factorize(frame["rad_id"], sort=True)[0].astype(np.int64)
    all_classes = frame["class_id"].to_numpy(dtype=np.int64)
    all_coords = frame[COORDS].to_numpy(dtype=np.float64)
    order = _canonical_order(image_codes, all_rads, all_classes, all_coords)
    codes = image_codes[order]
    class_ids = all_classes[order]
    coords = all_coords[order]
    rad_codes = all_rads[order]

    # readers per image, vectorised: each (image, reader) pair gets a local index 0..n-1
    n_rad = int(rad_codes.max()) + 1
    pairs, pair_of_row = np.unique(codes.astype(np.int64) * n_rad + rad_codes, return_inverse=True)
    pair_image = pairs // n_rad
    first_pair = np.searchsorted(pair_image, np.arange(n_images))
    readers_per_image = np.bincount(pair_image, minlength=n_images)
    local_reader = pair_of_row - first_pair[codes]
    is_box = class_ids != NO_FINDING_ID
    said_none = np.zeros(len(pairs), dtype=bool)
    said_none[pair_of_row[~is_box]] = True
    none_share = np.bincount(pair_image[said_none], minlength=n_images) / readers_per_image

    box_rows = np.flatnonzero(is_box)
    box_codes = codes[box_rows]
    starts = np.flatnonzero(np.r_[True, box_codes[1:] != box_codes[:-1]]) if len(box_rows) else box_rows
    ends = np.r_[starts[1:], len(box_rows)]
    parts: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
    fused_any = np.zeros(n_images, dtype=bool)
    for n, (s, e) in enumerate(zip(starts, ends, strict=True)):
        rows = box_rows[s:e]
        code = int(codes[rows[0]])
        boxes = coords[rows]
        image_id = image_names[code]
        if sizes is not None and image_id in sizes:
            width, height = float(sizes[image_id][0]), float(sizes[image_id][1])
        else:
            width, height = float(max(boxes[:, 2].max(), 1.0)), float(max(boxes[:, 3].max(), 1.0))
        fused, labels, scores, agreeing = fuse_image(
            boxes, class_ids[rows], local_reader[rows], int(readers_per_image[code]), width, height, config
        )
        if len(labels):
            fused_any[code] = True
            parts.append((np.full(len(labels), code), fused, labels, scores, agreeing))
        if progress is not None and n % 500 == 0:
            progress(n)
    # every image without a fused box is "No finding", scored by the readers who said so
    empty = np.flatnonzero(~fused_any)
    parts.append(
        (
            empty,
            np.full((len(empty), 4), np.nan),
            np.full(len(empty), NO_FINDING_ID),
            none_share[empty],
            np.rint(none_share[empty] * readers_per_image[empty]).astype(int),
        )
    )
    out_codes = np.concatenate([p[0] for p in parts]).astype(np.int64)
    boxes_all = np.concatenate([p[1] for p in parts])
    labels_all = np.concatenate([p[2] for p in parts]).astype(int)
    scores_all = np.concatenate([p[3] for p in parts]).astype(np.float64)
    agree_all = np.concatenate([p[4] for p in parts]).astype(int)
    final = np.argsort(out_codes, kind="stable")  # image order; within an image, fuse_image's order
    labels_all = labels_all[final]
    boxes_all = boxes_all[final]
    result = pd.DataFrame(
        {
            "image_id": image_names[out_codes[final]],
            "class_id": labels_all,
            "class_name": [ALL_LABELS[c] for c in labels_all],
            "x_min": boxes_all[:, 0],
            "y_min": boxes_all[:, 1],
            "x_max": boxes_all[:, 2],
            "y_max": boxes_all[:, 3],
            "score": scores_all[final],
            "n_readers": agree_all[final],
            "readers_on_image": readers_per_image[out_codes[final]],
        }
    )
    log.info(
        "event=fusion_done images=%d rows_in=%d boxes_out=%d no_finding=%d",
        n_images,
        len(frame),
        int((labels_all != NO_FINDING_ID).sum()),
        int((labels_all == NO_FINDING_ID).sum()),
    )
    return result


def _canonical_order(
    image_codes: np.ndarray, rad_codes: np.ndarray, class_ids: np.ndarray, coords: np.ndarray
) -> np.ndarray:
    """Row order by image, reader, class, then coordinates: whatever order the CSV rows came in.

    WBF clusters greedily, box by box, in input order (all scores tie at 1.0), and a box that
    overlaps two others joins whichever cluster formed first; readers are WBF's "models" in
    the order of their codes. With the file's row order (and reader codes by first appearance)
    the same readings in another row order fused into other boxes, or other reader counts
    (2 of 3 against 3 of 3), so the labels and the dataset version depended on row order.
    ``rad_codes`` must come from a sorted factorize, so they too ignore the file's order.
    """
    x_min, y_min, x_max, y_max = coords.T
    return np.lexsort((y_max, x_max, y_min, x_min, class_ids, rad_codes, image_codes))


def no_consensus_images(fused: pd.DataFrame, config: FusionConfig) -> list[str]:
    """Images fusion labelled "No finding" although too few of their readers said so; sorted ids.

    An image whose readers mostly drew findings, but no finding reached the reader threshold (three
    readers, three different findings), got the same empty label file as a normal chest: a negative
    that contradicts every reader. It has no trustworthy label either way, so the build leaves it
    out and the quality report lists it (``label.no_consensus``). "No finding" stands when at least
    :meth:`FusionConfig.required_readers` of the image's readers said it, as a box needs as many.
    """
    if fused.empty:
        return []
    none = fused[fused["class_id"] == NO_FINDING_ID]
    needed = none["readers_on_image"].map(lambda n: config.required_readers(int(n)))
    return sorted({str(i) for i in none.loc[none["n_readers"] < needed, "image_id"]})


def fused_boxes_by_image(fused: pd.DataFrame) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """image_id -> (class_ids, xyxy boxes) of real findings (No finding rows give empty arrays)."""
    result: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for image_id, group in fused.groupby("image_id", sort=True):
        findings = group[group["class_id"] != NO_FINDING_ID]
        result[str(image_id)] = (
            findings["class_id"].to_numpy(dtype=int),
            findings[COORDS].to_numpy(dtype=np.float64),
        )
    return result


__all__ = [
    "FUSED_COLUMNS",
    "NO_FINDING",
    "FusionConfig",
    "fuse_annotations",
    "fuse_image",
    "fused_boxes_by_image",
    "no_consensus_images",
]
