"""Image and label quality checks, reported per dataset version (JSON + a rich table).

Checks run on statistics each worker computes while it has the pixels in
memory (:func:`image_stats`), so the report costs no second decode. Near
duplicates use ``imagehash``'s perceptual hash; the pairwise comparison is a
vectorised XOR + popcount over 64-bit hashes (15k images: 112M pairs in
seconds). Duplicates are not dropped: the split keeps each duplicate
group on one side so the same picture cannot leak from train into test.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import cv2
import imagehash
import numpy as np
import pandas as pd
from PIL import Image
from rich.console import Console
from rich.table import Table
from rich.text import Text

from data_pipeline.annotations import COORDS
from data_pipeline.classes import NO_FINDING_ID
from data_pipeline.config import QualityThresholds
from data_pipeline.drift import intensity_mean_std, level_histogram

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ImageStats:
    """What the checks need to know about one decoded image."""

    image_id: str
    width: int
    height: int
    mean: float
    std: float
    saturated_fraction: float
    phash: str  # 64 hex chars: 256-bit perceptual hash (16x16 DCT signs)
    histogram: list[int] = field(default_factory=list)  # 64 bins of 8-bit levels, for drift references


def image_stats(image_id: str, pixels_u8: np.ndarray, width: int, height: int) -> ImageStats:
    """Statistics of an 8-bit (after VOI) image; ``width``/``height`` are the ORIGINAL sizes."""
    # one histogram pass gives mean, std, saturation and the drift histogram
    hist = level_histogram(pixels_u8)
    mean, std = intensity_mean_std(hist)
    saturated = float(hist[0] + hist[255]) / max(float(hist.sum()), 1.0)
    # 256 bits, not imagehash's default 64: chest radiographs look alike at 8x8 and would all "match".
    # Hashing a 256 px copy gives the same DCT signs 5x faster than letting PIL shrink 1024 px.
    h, w = pixels_u8.shape[:2]
    if max(h, w) > 256:
        scale = 256 / max(h, w)
        small = cv2.resize(
            pixels_u8, (max(round(w * scale), 1), max(round(h * scale), 1)), interpolation=cv2.INTER_AREA
        )
    else:
        small = pixels_u8
    phash = str(imagehash.phash(Image.fromarray(small), hash_size=16))
    return ImageStats(
        image_id=image_id,
        width=width,
        height=height,
        mean=mean,
        std=std,
        saturated_fraction=saturated,
        phash=phash,
        histogram=hist.reshape(64, 4).sum(axis=1).astype(int).tolist(),
    )


@dataclass
class QualityReport:
    """Failing items by check; ``excluded`` are the images left out of the dataset."""

    thresholds: dict[str, Any]
    n_images: int
    image_failures: dict[str, list[str]] = field(default_factory=dict)
    duplicate_groups: list[list[str]] = field(default_factory=list)
    decode_failures: dict[str, str] = field(default_factory=dict)
    label_failures: dict[str, list[str]] = field(default_factory=dict)
    quarantined_rows: list[dict[str, Any]] = field(default_factory=list)
    unannotated_images: list[str] = field(default_factory=list)
    excluded: list[str] = field(default_factory=list)
    #: entries of the image folder that were not read, path -> why (a symbolic link, never followed;
    #: data_pipeline/export.py ``scan_image_folder``)
    refused_files: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["summary"] = self.summary()
        return data

    def summary(self) -> dict[str, int]:
        """Counts per check, for the manifest and the terminal."""
        out = {f"image.{k}": len(v) for k, v in sorted(self.image_failures.items())}
        out.update({f"label.{k}": len(v) for k, v in sorted(self.label_failures.items())})
        out["image.decode_failed"] = len(self.decode_failures)
        out["image.near_duplicate_groups"] = len(self.duplicate_groups)
        out["rows.quarantined"] = len(self.quarantined_rows)
        out["image.unannotated"] = len(self.unannotated_images)
        out["image.excluded"] = len(self.excluded)
        out["file.refused"] = len(self.refused_files)
        return out

    def render(self, console: Console, max_ids: int = 5) -> None:
        """A rich table: check, count, first failing ids.

        Ids are file stems and reasons quote CSV cells: they go in as :class:`~rich.text.Text`, so a
        ``[/x]`` in a name is printed, never parsed as markup.
        """
        table = Table(title=f"Quality report ({self.n_images} images)")
        table.add_column("check")
        table.add_column("count", justify="right")
        table.add_column("examples (ids / lines)")

        def ids(items: list[str]) -> Text:
            more = f" … +{len(items) - max_ids}" if len(items) > max_ids else ""
            return Text(", ".join(str(i)[:12] for i in items[:max_ids]) + more)

        for name, items in sorted(self.image_failures.items()):
            table.add_row(f"image: {name}", str(len(items)), ids(items))
        table.add_row(
            "image: decode failed", str(len(self.decode_failures)), ids(sorted(self.decode_failures))
        )
        table.add_row(
            "image: near-duplicate groups",
            str(len(self.duplicate_groups)),
            ids(["+".join(g) for g in self.duplicate_groups]),
        )
        for name, items in sorted(self.label_failures.items()):
            table.add_row(f"label: {name}", str(len(items)), ids(items))
        table.add_row(
            "rows quarantined",
            str(len(self.quarantined_rows)),
            ids([f"line {r['line']}: {r['reason']}" for r in self.quarantined_rows]),
        )
        table.add_row("image: unannotated", str(len(self.unannotated_images)), ids(self.unannotated_images))
        table.add_row("image: excluded from dataset", str(len(self.excluded)), ids(self.excluded))
        table.add_row(
            "file: refused, not read",
            str(len(self.refused_files)),
            ids(list(self.refused_files)),
        )
        console.print(table)


def check_images(stats: list[ImageStats], thresholds: QualityThresholds) -> dict[str, list[str]]:
    """Per-image failures: blank, saturated, too small, extreme aspect ratio."""
    failures: dict[str, list[str]] = {"blank": [], "saturated": [], "too_small": [], "extreme_aspect": []}
    for s in stats:
        if s.std < thresholds.min_std:
            failures["blank"].append(s.image_id)
        if s.saturated_fraction > thresholds.max_saturated_fraction:
            failures["saturated"].append(s.image_id)
        if min(s.width, s.height) < thresholds.min_side:
            failures["too_small"].append(s.image_id)
        if max(s.width, s.height) / max(min(s.width, s.height), 1) > thresholds.max_aspect_ratio:
            failures["extreme_aspect"].append(s.image_id)
    return failures


def _words(phashes: Sequence[str]) -> np.ndarray:
    """Each 64-hex-char hash as 4 uint64 words, so XOR + popcount stays vectorised."""
    return np.array([[int(h[k : k + 16], 16) for k in range(0, 64, 16)] for h in phashes], dtype=np.uint64)


def near_any(candidates: Mapping[str, str], references: Sequence[str], max_distance: int) -> set[str]:
    """Ids of ``candidates`` (id -> perceptual hash) within ``max_distance`` bits of any reference hash.

    The golden set's hold-out (data_pipeline/ingest.py): a copy of a golden image under another
    patient (re-exported, re-anonymised) is the same image, and must not be trained on either.
    """
    refs = [h for h in references if len(h) == 64]
    if not candidates or not refs:
        return set()
    ids = list(candidates)
    hashes, ref_words = _words([candidates[i] for i in ids]), _words(refs)
    near: set[str] = set()
    chunk = 2048
    for start in range(0, len(hashes), chunk):
        block = hashes[start : start + chunk]
        dist = np.bitwise_count(block[:, None, :] ^ ref_words[None, :, :]).sum(axis=2)
        near.update(ids[start + r] for r in np.nonzero((dist <= max_distance).any(axis=1))[0])
    return near


def near_duplicate_groups(stats: list[ImageStats], max_distance: int) -> list[list[str]]:
    """Groups (connected components) of images whose perceptual hashes differ in <= max_distance bits."""
    if len(stats) < 2:
        return []
    hashes = _words([s.phash for s in stats])
    ids = [s.image_id for s in stats]
    parent = list(range(len(ids)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    chunk = 2048
    for start in range(0, len(hashes), chunk):
        block = hashes[start : start + chunk]
        dist = np.bitwise_count(block[:, None, :] ^ hashes[None, :, :]).sum(axis=2)
        rows, cols = np.nonzero(dist <= max_distance)
        for r, c in zip(rows + start, cols, strict=True):
            if c > r:
                a, b = find(int(r)), find(int(c))
                if a != b:
                    parent[max(a, b)] = min(a, b)
    groups: dict[int, list[str]] = {}
    for i, image_id in enumerate(ids):
        groups.setdefault(find(i), []).append(image_id)
    return sorted((sorted(g) for g in groups.values() if len(g) > 1), key=lambda g: g[0])


def check_labels(
    fused: pd.DataFrame, sizes: Mapping[str, tuple[int, int]], thresholds: QualityThresholds
) -> dict[str, list[str]]:
    """Label failures by image id: tiny boxes, boxes outside the image, class outside 0..14."""
    failures: dict[str, list[str]] = {"tiny_box": [], "box_outside_image": [], "class_out_of_range": []}
    if fused.empty:
        return failures
    bad_class = ~fused["class_id"].between(0, NO_FINDING_ID)
    failures["class_out_of_range"] = sorted(set(fused.loc[bad_class, "image_id"]))
    boxes = fused[fused["class_id"] != NO_FINDING_ID]
    if len(boxes):
        w = boxes[COORDS[2]] - boxes[COORDS[0]]
        h = boxes[COORDS[3]] - boxes[COORDS[1]]
        tiny = (w < thresholds.min_box_side_px) | (h < thresholds.min_box_side_px)
        failures["tiny_box"] = sorted(set(boxes.loc[tiny, "image_id"]))
        width = boxes["image_id"].map(lambda i: sizes.get(i, (np.inf, np.inf))[0])
        height = boxes["image_id"].map(lambda i: sizes.get(i, (np.inf, np.inf))[1])
        outside = (
            (boxes["x_min"] < 0) | (boxes["y_min"] < 0) | (boxes["x_max"] > width) | (boxes["y_max"] > height)
        )
        failures["box_outside_image"] = sorted(set(boxes.loc[outside, "image_id"]))
    return failures
