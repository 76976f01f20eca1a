"""mAP@0.4 per subgroup (sex, age band, manufacturer, view), and the registry tag the promotion gate reads.

An overall mAP can hide a scanner or a group of patients the model serves badly. Every test image
carries its subgroup attributes in the dataset manifest (:mod:`data_pipeline.subgroups`); here the
per-image matched detections evaluation already keeps (:class:`training.paired.ImageResult`) are
grouped by each attribute's value and the AP recomputed on each group with the same function the
paired gate uses, so the numbers mean what the overall number means.

The comparison is class-matched: a group's mAP averages only the classes with boxes in that group,
so its reference is the overall AP averaged over those same classes (``reference_map40``), not the
headline mAP. Otherwise a group that merely holds more boxes of a hard, rare finding would look
worse than a group with the same per-class performance. ``gap`` = reference - group: positive is
worse than overall.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from collections.abc import Mapping, Sequence

import numpy as np
from pydantic import BaseModel, ValidationError

from data_pipeline.subgroups import ATTRIBUTES, UNKNOWN
from training.paired import ImageResult, _ap

#: registered-version tag with the figures (compact JSON); the promotion gate reads it
SUBGROUP_TAG = "subgroups_map40"
#: defaults of the gate's policy (delivery/policy.py imports them) and of the model card's flag
DEFAULT_MAX_GAP = 0.1
DEFAULT_MIN_IMAGES = 20
#: and ground-truth boxes: a group's mAP averages the classes with a box in it, so a group of 20
#: phantom images (~30 boxes, 1-3 a class) scores each class 0 or 1 by luck (delivery/policy.py)
DEFAULT_MIN_BOXES = 50
_TAG_LIMIT = 5000  # MLflow's limit on a tag value
_METRIC_UNSAFE = re.compile(r"[^\w.\- ]")  # MLflow metric names: alphanumerics, _ - . space and /


class SubgroupMetrics(BaseModel):
    """One attribute value's figures on the evaluated split."""

    attribute: str
    value: str
    images: int
    instances: int
    map40: float | None  # None: no ground-truth box in the group, AP undefined
    reference_map40: float | None  # the overall AP averaged over the same classes

    @property
    def gap(self) -> float | None:
        """How far below overall (class-matched) the group is; None when not measurable."""
        if self.map40 is None or self.reference_map40 is None:
            return None
        return self.reference_map40 - self.map40

    def judged(self, min_images: int = DEFAULT_MIN_IMAGES, min_boxes: int = DEFAULT_MIN_BOXES) -> bool:
        """Measured on enough images and boxes for its gap to be more than chance."""
        return self.gap is not None and self.images >= min_images and self.instances >= min_boxes

    def flagged(
        self,
        max_gap: float = DEFAULT_MAX_GAP,
        min_images: int = DEFAULT_MIN_IMAGES,
        min_boxes: int = DEFAULT_MIN_BOXES,
    ) -> bool:
        """Worse than overall by more than ``max_gap``, judged (:meth:`judged`)."""
        gap = self.gap
        return gap is not None and self.judged(min_images, min_boxes) and gap > max_gap + 1e-12

    def metric_prefix(self, split: str = "test") -> str:
        """``test/subgroup/<attribute>/<value>``, with characters MLflow refuses replaced by ``_``."""
        value = _METRIC_UNSAFE.sub("_", self.value).strip() or "_"
        value = "_" if set(value) <= {"."} else value  # "." and ".." would be path tricks to MLflow
        return f"{split}/subgroup/{_METRIC_UNSAFE.sub('_', self.attribute)}/{value}"


def subgroup_metrics(
    results: Sequence[ImageResult], attributes: Mapping[str, Mapping[str, str]]
) -> list[SubgroupMetrics]:
    """Figures for every value of every attribute among ``results``' images.

    ``attributes`` maps image id -> {attribute: value} (:meth:`DatasetRef.subgroups`). Images it
    does not list are left out of every group; when it lists none, there is nothing to report.
    An attribute an image lacks counts as ``unknown``, which is reported like any other value.
    """
    listed = [r for r in results if r.image_id in attributes]
    if not listed:
        return []
    classes = _classes(listed)
    overall = _ap(listed, classes)
    names = [*ATTRIBUTES, *sorted({k for r in listed for k in attributes[r.image_id]} - set(ATTRIBUTES))]
    out = []
    for name in names:
        groups: dict[str, list[ImageResult]] = defaultdict(list)
        for r in listed:
            groups[str(attributes[r.image_id].get(name) or UNKNOWN)].append(r)
        for value, members in sorted(groups.items()):
            present = _classes(members)
            instances = int(sum(len(r.gt_cls) for r in members))
            if len(present) == 0:
                out.append(
                    SubgroupMetrics(
                        attribute=name,
                        value=value,
                        images=len(members),
                        instances=0,
                        map40=None,
                        reference_map40=None,
                    )
                )
                continue
            index = np.searchsorted(classes, present)
            out.append(
                SubgroupMetrics(
                    attribute=name,
                    value=value,
                    images=len(members),
                    instances=instances,
                    map40=float(_ap(members, present).mean()),
                    reference_map40=float(overall[index].mean()),
                )
            )
    return out


def _classes(results: Sequence[ImageResult]) -> np.ndarray:
    return np.unique(np.concatenate([r.gt_cls for r in results] or [np.zeros(0)])).astype(int)


def encode_tag(metrics: Sequence[SubgroupMetrics]) -> str:
    """Compact JSON of the figures for the registered version, within MLflow's 5000-character limit.

    Rows are ``[attribute, value, images, instances, map40, reference_map40]``. When they do not fit,
    the groups with the fewest images go first (they are the least likely to be judged) and
    ``dropped`` says how many went.
    """
    rows = [
        [m.attribute, m.value[:64], m.images, m.instances, _round(m.map40), _round(m.reference_map40)]
        for m in sorted(metrics, key=lambda m: (-m.images, m.attribute, m.value))
    ]
    dropped = 0
    while True:
        text = json.dumps({"v": 1, "groups": rows, "dropped": dropped}, separators=(",", ":"))
        if len(text) <= _TAG_LIMIT or not rows:
            return text
        rows.pop()
        dropped += 1


def decode_tag(raw: str | None) -> list[SubgroupMetrics] | None:
    """The figures of :func:`encode_tag`; None when the tag is absent or unreadable."""
    if not raw:
        return None
    try:
        data = json.loads(raw)
        return [
            SubgroupMetrics(attribute=a, value=v, images=n, instances=b, map40=m, reference_map40=ref)
            for a, v, n, b, m, ref in data["groups"]
        ]
    except (ValueError, KeyError, TypeError, ValidationError):
        return None


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


#: characters that make Markdown of a value: a vendor's name is the DICOM's, i.e. anyone's text
_MARKDOWN = re.compile(r"([\\`*_\[\]<>|~])")  # what marks up text within a line; "40-49" stays


def _md(value: str) -> str:
    """A subgroup value as literal Markdown text (the Manufacturer comes from outside: "[x](url)"
    or "<img ...>" in it became a link or markup in the model card)."""
    return _MARKDOWN.sub(r"\\\1", value)


def markdown_rows(
    metrics: Sequence[SubgroupMetrics],
    max_gap: float = DEFAULT_MAX_GAP,
    min_images: int = DEFAULT_MIN_IMAGES,
    min_boxes: int = DEFAULT_MIN_BOXES,
) -> list[str]:
    """Table rows for the model card: attribute, value, images, mAP@0.4, gap vs overall, flagged."""
    rows = [
        "| attribute | value | images | boxes | mAP@0.4 | overall, same classes | gap | flagged |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for m in metrics:
        if m.gap is None:
            flag = "not measured (no boxes)"
        elif m.images < min_images:
            flag = "too few images"
        elif m.instances < min_boxes:
            flag = "too few boxes"
        else:
            flag = "**yes**" if m.flagged(max_gap, min_images, min_boxes) else "no"
        gap = "n/a" if m.gap is None else f"{m.gap:+.4f}"
        rows.append(
            f"| {m.attribute} | {_md(m.value)} | {m.images} | {m.instances} | {_fmt(m.map40)} "
            f"| {_fmt(m.reference_map40)} | {gap} | {flag} |"
        )
    return rows


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def run_metrics(metrics: Sequence[SubgroupMetrics], split: str = "test") -> dict[str, float]:
    """MLflow metrics: ``test/subgroup/<attribute>/<value>/{map40,images,gap}`` (gap when measured)."""
    out: dict[str, float] = {}
    for m in metrics:
        prefix = m.metric_prefix(split)
        out[f"{prefix}/images"] = float(m.images)
        if m.map40 is not None:
            out[f"{prefix}/map40"] = m.map40
        if m.gap is not None:
            out[f"{prefix}/gap"] = m.gap
    return out


def version_tags(metrics: Sequence[SubgroupMetrics]) -> dict[str, str]:
    """The registered version's subgroup tag; none when nothing was measured (the gate says so)."""
    return {SUBGROUP_TAG: encode_tag(metrics)} if metrics else {}


def card_section(
    metrics: Sequence[SubgroupMetrics],
    max_gap: float = DEFAULT_MAX_GAP,
    min_images: int = DEFAULT_MIN_IMAGES,
    min_boxes: int = DEFAULT_MIN_BOXES,
) -> str:
    """The model card's "Subgroups" section (markdown, ending with a blank line)."""
    head = "## Subgroups (ONNX, mAP@0.4 per sex, age band, manufacturer and view position)\n"
    if not metrics:
        return (
            f"{head}Not measured: the dataset's manifest records no subgroup attributes "
            "(built before the data pipeline kept them, or from PNG/JPEG without DICOM headers).\n\n"
        )
    flagged = [m for m in metrics if m.flagged(max_gap, min_images, min_boxes)]
    verdict = (
        f"**{len(flagged)} subgroup(s) more than {max_gap:g} below overall**: "
        + ", ".join(f"{m.attribute}={_md(m.value)} ({m.gap:+.4f})" for m in flagged)
        if flagged
        else f"No subgroup with at least {min_images} images and {min_boxes} boxes is more than "
        f"{max_gap:g} below overall."
    )
    table = "\n".join(markdown_rows(metrics, max_gap, min_images, min_boxes))
    return (
        f'{head}Each group\'s mAP averages the classes with boxes in that group; "overall, same classes" '
        "is the whole split's AP over those classes, and the gap is that minus the group's "
        f"(positive: worse). Flagged at the default gate threshold (gap > {max_gap:g} with at least "
        f"{min_images} images and {min_boxes} boxes); the promotion gate applies the committed "
        "delivery policy.\n"
        f"{verdict}\n\n{table}\n\n"
    )
