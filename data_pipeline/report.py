"""A dataset version's report: the figures a person looks at before training on it.

A version's numbers (manifest counts, quality report) say whether the build
went through; they do not show a skewed class balance, boxes that are all the
same size, readers who rarely agree, or fused boxes drawn in the wrong place.
The report draws those: class counts per split, boxes per image, box sizes
and aspect ratios, reader agreement before fusion, and a grid of sample
images with their fused boxes. It is built at ingest into ``report/`` inside
the version (so it is listed in the manifest, uploaded to
``datasets/<version>/report/`` and fetched with the version), logged to every
training run that uses the version and linked from the model card.

Reader agreement needs the readers' boxes BEFORE fusion. Ingest keeps them
in the version as ``annotations_readers.csv`` (the checked VinDr rows of the
version's images), so ``cxr data report`` rebuilds the same report from any
version folder; an older version without that file gets the report without
the agreement figure, or with it from ``--annotations``.

matplotlib is imported inside the functions that draw, so importing this
module (the CLI, training's run) stays cheap.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from rich.console import Console

from data_pipeline.annotations import COLUMNS, COORDS, load_annotations
from data_pipeline.classes import ALL_LABELS, CLASS_NAMES, NO_FINDING_ID
from data_pipeline.errors import DatasetNotFound
from data_pipeline.executors import progress_bar
from data_pipeline.geometry import pairwise_iou
from data_pipeline.split import SPLITS

if TYPE_CHECKING:
    from matplotlib.axis import Axis
    from matplotlib.figure import Figure

log = logging.getLogger(__name__)

REPORT_DIR = "report"
INDEX = "index.html"
REPORT_JSON = "report.json"
READERS_CSV = "annotations_readers.csv"
FUSED_CSV = "annotations_fused.csv"
SAMPLES = 12
_THUMB_SIDE = 256  # px of a sample's longer side in the grid: legible boxes, a PNG of about 1 MB or less
_DPI = 100


@dataclass(frozen=True)
class ReportInputs:
    """What the report reads: one version's images (manifest entries), fused boxes and readers' boxes.

    ``images``: image id -> the manifest's entry (split, width, height, out_width, out_height).
    ``readers``: the pre-fusion VinDr rows, or None when the version does not carry them.
    """

    version: str
    root: Path
    images: Mapping[str, Mapping[str, Any]]
    fused: pd.DataFrame
    readers: pd.DataFrame | None

    def image_path(self, image_id: str) -> Path:
        return self.root / "images" / str(self.images[image_id]["split"]) / f"{image_id}.png"

    @classmethod
    def from_files(
        cls,
        version: str,
        root: Path,
        images: Mapping[str, Mapping[str, Any]],
        readers_csv: Path | None = None,
    ) -> ReportInputs:
        """Read the boxes from the version's CSV files as written (coordinates rounded).

        So the report drawn at ingest and one drawn later from the folder are the same bytes.
        """
        fused = pd.read_csv(root / FUSED_CSV, dtype={"image_id": str})
        readers_path = readers_csv or root / READERS_CSV
        if readers_csv is not None and not readers_csv.is_file():
            raise DatasetNotFound(f"readers' annotations {readers_csv} not found")
        readers = load_annotations(readers_path).frame if readers_path.is_file() else None
        return cls(version, root, images, fused, readers)


@dataclass(frozen=True)
class ReaderAgreement:
    """One value per (box, other reader of the image): the best IoU with that reader's same-class boxes.

    0 means the other reader drew no overlapping box of that class: readers who disagree on
    WHETHER a finding is there count, not only those who disagree on where.
    """

    ious: np.ndarray
    class_ids: np.ndarray

    @property
    def mean(self) -> float | None:
        return float(self.ious.mean()) if len(self.ious) else None

    def per_class(self) -> dict[str, dict[str, float]]:
        """Finding name -> {pairs, mean_iou, missed_share} for the classes some reader drew."""
        out: dict[str, dict[str, float]] = {}
        for cid in sorted(set(self.class_ids.tolist())):
            values = self.ious[self.class_ids == cid]
            out[ALL_LABELS[int(cid)]] = {
                "pairs": len(values),
                "mean_iou": round(float(values.mean()), 4),
                "missed_share": round(float((values == 0).mean()), 4),
            }
        return out


@dataclass(frozen=True)
class ReportSummary:
    """What :func:`build_report` wrote and its headline numbers (the full set is in ``report.json``)."""

    version: str
    out_dir: Path
    files: list[str]
    images: int
    boxes: int
    reader_agreement: float | None
    seconds: float

    @property
    def index(self) -> Path:
        return self.out_dir / INDEX


def load_version(path: Path, readers_csv: Path | None = None) -> ReportInputs:
    """The report's inputs from a version folder (``readers_csv`` overrides the version's own)."""
    path = Path(path)
    manifest_path = path / "manifest.json"
    if not manifest_path.is_file() or not (path / FUSED_CSV).is_file():
        raise DatasetNotFound(
            f"{path} is not a dataset version folder (no manifest.json or {FUSED_CSV}): pass a folder "
            "built by `cxr data ingest`, or a version to fetch from the object store"
        )
    manifest = json.loads(manifest_path.read_text())
    return ReportInputs.from_files(str(manifest["version"]), path, manifest["images"], readers_csv)


def reader_agreement(readers: pd.DataFrame) -> ReaderAgreement:
    """Agreement of the readers' boxes per image, before fusion (see :class:`ReaderAgreement`).

    Readers of an image are everyone with a row for it, "No finding" rows included: a reader who
    saw the image and drew nothing disagrees with one who drew a box. Images are contiguous slices
    of sorted arrays, as in :mod:`data_pipeline.fusion`, so VinDr's 70k rows take about a second.
    """
    empty = ReaderAgreement(np.zeros(0), np.zeros(0, dtype=int))
    if readers.empty:
        return empty
    image_codes = pd.factorize(readers["image_id"], sort=True)[0]
    order = np.argsort(image_codes, kind="stable")
    codes = image_codes[order]
    rads = pd.factorize(readers["rad_id"])[0][order]
    classes = readers["class_id"].to_numpy(dtype=np.int64)[order]
    coords = readers[COORDS].to_numpy(dtype=np.float64)[order]
    starts = np.flatnonzero(np.r_[True, codes[1:] != codes[:-1]])
    ends = np.r_[starts[1:], len(codes)]
    ious: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    for s, e in zip(starts, ends, strict=True):
        is_box = classes[s:e] != NO_FINDING_ID
        image_readers = np.unique(rads[s:e])
        if len(image_readers) < 2 or not is_box.any():
            continue
        box_rad, box_cls = rads[s:e][is_box], classes[s:e][is_box]
        iou = pairwise_iou(coords[s:e][is_box], coords[s:e][is_box])
        iou[box_cls[:, None] != box_cls[None, :]] = 0.0
        for other in image_readers:
            best = np.where(box_rad[None, :] == other, iou, 0.0).max(axis=1)
            mine = box_rad != other
            ious.append(best[mine])
            labels.append(box_cls[mine])
    if not ious:
        return empty
    return ReaderAgreement(np.concatenate(ious), np.concatenate(labels).astype(int))


# ---------------------------------------------------------------------------------- numbers


def split_counts(split_of: Mapping[str, str], fused: pd.DataFrame) -> dict[str, Any]:
    """Images per split and fused rows per split and label: the manifest's ``counts`` and the report's."""
    images = Counter(split_of.values())
    per_class: dict[str, dict[str, int]] = {s: {} for s in SPLITS}
    fused_split = fused["image_id"].map(split_of)
    for (split, cid), n in Counter(zip(fused_split, fused["class_id"], strict=True)).items():
        per_class[str(split)][ALL_LABELS[int(cid)]] = int(n)
    return {"images": {s: int(images.get(s, 0)) for s in SPLITS}, "boxes_per_class": per_class}


def _counts(inputs: ReportInputs) -> dict[str, Any]:
    return split_counts({i: str(m["split"]) for i, m in inputs.images.items()}, inputs.fused)


def _boxes(inputs: ReportInputs) -> pd.DataFrame:
    """Fused finding boxes with their size relative to the image and their aspect ratio (w / h)."""
    boxes = inputs.fused[inputs.fused["class_id"] != NO_FINDING_ID]
    width = boxes["image_id"].map(lambda i: float(inputs.images[i]["width"]))
    height = boxes["image_id"].map(lambda i: float(inputs.images[i]["height"]))
    w_px = boxes["x_max"] - boxes["x_min"]
    h_px = boxes["y_max"] - boxes["y_min"]
    return pd.DataFrame(
        {
            "image_id": boxes["image_id"],
            "class_id": boxes["class_id"].astype(int),
            "width_rel": w_px / width,
            "height_rel": h_px / height,
            "aspect": w_px / h_px.where(h_px > 0),
        }
    )


def _per_image(inputs: ReportInputs, boxes: pd.DataFrame) -> np.ndarray:
    """Finding boxes of every image of the version (0 for a "No finding" image)."""
    n = boxes["image_id"].value_counts()
    return np.array([int(n.get(i, 0)) for i in sorted(inputs.images)], dtype=int)


def _quantiles(values: pd.Series | np.ndarray) -> dict[str, float]:
    data = np.asarray(values, dtype=np.float64)
    data = data[np.isfinite(data)]
    if not len(data):
        return {}
    q = np.quantile(data, [0.05, 0.5, 0.95])
    return {"p5": round(float(q[0]), 4), "median": round(float(q[1]), 4), "p95": round(float(q[2]), 4)}


def _numbers(
    inputs: ReportInputs,
    counts: dict[str, Any],
    boxes: pd.DataFrame,
    per_image: np.ndarray,
    agreement: ReaderAgreement | None,
    samples: list[str],
    figures: list[str],
) -> dict[str, Any]:
    """``report.json``: every number the figures show, for a script or a later comparison."""
    histogram = Counter(per_image.tolist())
    return {
        "version": inputs.version,
        **counts,
        "boxes_per_image": {
            "mean": round(float(per_image.mean()), 4) if len(per_image) else 0.0,
            "max": int(per_image.max()) if len(per_image) else 0,
            "histogram": {str(k): int(histogram[k]) for k in sorted(histogram)},
        },
        "box_size": {
            "boxes": len(boxes),
            "width_rel": _quantiles(boxes["width_rel"]),
            "height_rel": _quantiles(boxes["height_rel"]),
            "aspect": _quantiles(boxes["aspect"]),
        },
        "reader_agreement": (
            {
                "available": True,
                "pairs": len(agreement.ious),
                "mean_iou": None if agreement.mean is None else round(agreement.mean, 4),
                "missed_share": round(float((agreement.ious == 0).mean()), 4)
                if len(agreement.ious)
                else None,
                "per_class": agreement.per_class(),
            }
            if agreement is not None
            else {"available": False}
        ),
        "samples": samples,
        "figures": figures,
    }


def pick_samples(inputs: ReportInputs, n: int = SAMPLES, seed: int = 0) -> list[str]:
    """Up to ``n`` image ids, rarest findings first, then other images with findings, then "No finding".

    Seeded, so the same version gives the same grid (and the same PNG bytes in the manifest).
    """
    rng = np.random.default_rng(seed)
    ids = sorted(inputs.images)
    shuffled = [ids[i] for i in rng.permutation(len(ids))]
    classes: dict[str, set[int]] = {}
    for image_id, cid in zip(inputs.fused["image_id"], inputs.fused["class_id"], strict=True):
        if int(cid) != NO_FINDING_ID:
            classes.setdefault(str(image_id), set()).add(int(cid))
    frequency = Counter(c for found in classes.values() for c in found)
    picked: list[str] = []
    for cid in sorted(frequency, key=lambda c: (frequency[c], c)):
        image = next((i for i in shuffled if cid in classes.get(i, ()) and i not in picked), None)
        if image is not None and len(picked) < n:
            picked.append(image)
    rest = [i for i in shuffled if i in classes and i not in picked]
    rest += [i for i in shuffled if i not in classes and i in inputs.images]
    return sorted(picked + rest[: max(n - len(picked), 0)])


# ---------------------------------------------------------------------------------- figures


def _figure(width_in: float, height_in: float, *, constrained: bool = True) -> Figure:
    """A figure outside pyplot: no global state, no GUI backend, safe in worker threads."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width_in, height_in), dpi=_DPI, layout="constrained" if constrained else None)


def _whole(axis: Axis) -> None:
    """Whole-number ticks on a count axis: a tick at 2.5 boxes on a small dataset confuses."""
    from matplotlib.ticker import MaxNLocator

    axis.set_major_locator(MaxNLocator(integer=True))


def _save(fig: Figure, path: Path) -> None:
    # no "Software" entry: the PNG's bytes depend on the data only (the manifest hashes them)
    fig.savefig(path, format="png", metadata={"Software": None})


def _plot_class_counts(counts: dict[str, Any], path: Path) -> None:
    labels = list(ALL_LABELS.values())
    fig = _figure(8, 6)
    ax = fig.add_subplot()
    y = np.arange(len(labels))
    height = 0.8 / len(SPLITS)
    for k, split in enumerate(SPLITS):
        values = [counts["boxes_per_class"][split].get(label, 0) for label in labels]
        ax.barh(
            y + (k - 1) * height, values, height=height, label=f"{split} ({counts['images'][split]} images)"
        )
    ax.set_yticks(y, labels)
    ax.invert_yaxis()
    ax.set_xlabel('fused boxes ("No finding": images)')
    ax.set_title("Class counts per split")
    _whole(ax.xaxis)
    ax.legend()
    _save(fig, path)


def _plot_boxes_per_image(per_image: np.ndarray, path: Path) -> None:
    fig = _figure(6, 3.5)
    ax = fig.add_subplot()
    top = int(per_image.max()) if len(per_image) else 0
    ax.hist(per_image, bins=(np.arange(top + 2) - 0.5).tolist(), rwidth=0.85)
    ax.set_xlabel("fused finding boxes on the image (0 = No finding)")
    ax.set_ylabel("images")
    ax.set_title("Boxes per image")
    _whole(ax.xaxis)
    _whole(ax.yaxis)
    _save(fig, path)


def _plot_box_sizes(boxes: pd.DataFrame, path: Path) -> None:
    fig = _figure(9, 3.5)
    bins = np.linspace(0.0, 1.0, 21).tolist()
    for k, (column, name) in enumerate((("width_rel", "width"), ("height_rel", "height"))):
        ax = fig.add_subplot(1, 2, k + 1)
        ax.hist(boxes[column].clip(0, 1), bins=bins)
        ax.set_xlabel(f"box {name} / image {name}")
        ax.set_ylabel("boxes")
        ax.set_title(f"Box {name} (relative)")
        _whole(ax.yaxis)
    _save(fig, path)


def _plot_aspect(boxes: pd.DataFrame, path: Path) -> None:
    fig = _figure(6, 3.5)
    ax = fig.add_subplot()
    aspect = boxes["aspect"].to_numpy(dtype=np.float64)
    aspect = aspect[np.isfinite(aspect) & (aspect > 0)]
    ax.hist(aspect.clip(1 / 16, 16), bins=np.geomspace(1 / 16, 16, 33).tolist())
    ax.set_xscale("log", base=2)
    ax.set_xlabel("box width / height (pixels; log scale)")
    ax.set_ylabel("boxes")
    ax.set_title("Box aspect ratio")
    _whole(ax.yaxis)
    _save(fig, path)


def _plot_agreement(agreement: ReaderAgreement, path: Path) -> None:
    fig = _figure(11, 4.5)
    left = fig.add_subplot(1, 2, 1)
    left.hist(agreement.ious, bins=np.linspace(0.0, 1.0, 21).tolist())
    left.set_xlabel("best same-class IoU with another reader's boxes (0: none there)")
    left.set_ylabel("(box, other reader) pairs")
    _whole(left.yaxis)
    mean = agreement.mean
    missed = float((agreement.ious == 0).mean()) if len(agreement.ious) else 0.0
    left.set_title(
        f"Readers before fusion: mean IoU {mean:.3f}, {missed:.0%} unmatched" if mean is not None else ""
    )
    right = fig.add_subplot(1, 2, 2)
    per_class = agreement.per_class()
    names = list(per_class)
    right.barh(np.arange(len(names)), [per_class[n]["mean_iou"] for n in names])
    right.set_yticks(np.arange(len(names)), names)
    right.invert_yaxis()
    right.set_xlim(0, 1)
    right.set_xlabel("mean IoU")
    right.set_title("Per class")
    _save(fig, path)


def _thumbnail(inputs: ReportInputs, image_id: str) -> tuple[np.ndarray, float, float]:
    """The exported PNG shrunk for the grid, and the scale from original pixels to it (x, y)."""
    import cv2

    from data_pipeline.geometry import resize_longest

    meta = inputs.images[image_id]
    img = cv2.imread(str(inputs.image_path(image_id)), cv2.IMREAD_GRAYSCALE)
    if img is None:
        img = np.zeros((int(meta["out_height"]), int(meta["out_width"])), dtype=np.uint8)
    small = resize_longest(img, _THUMB_SIDE)
    return small, small.shape[1] / float(meta["width"]), small.shape[0] / float(meta["height"])


def _plot_samples(inputs: ReportInputs, samples: list[str], path: Path) -> None:
    from matplotlib import colormaps
    from matplotlib.patches import Rectangle

    cols = 4
    rows = max((len(samples) + cols - 1) // cols, 1)
    panel = _THUMB_SIDE / _DPI  # one thumbnail pixel per figure pixel: nothing resampled twice
    title = 0.2  # inches above each thumbnail for its title
    # a fixed grid: the constrained layout's solver would take a quarter of the report's time here
    fig = _figure(panel * cols, (panel + title) * rows, constrained=False)
    top = 1 - title / ((panel + title) * rows)
    fig.subplots_adjust(left=0.005, right=0.995, bottom=0.005, top=top, wspace=0.02, hspace=title / panel)
    colors = colormaps["tab20"]
    by_image = {str(k): g for k, g in inputs.fused.groupby("image_id", sort=False)}
    for k, image_id in enumerate(samples):
        ax = fig.add_subplot(rows, cols, k + 1)
        img, sx, sy = _thumbnail(inputs, image_id)
        ax.imshow(img, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        ax.set_axis_off()
        ax.set_title(f"{image_id[:16]} ({inputs.images[image_id]['split']})", fontsize=7)
        rows_of = by_image.get(image_id)
        if rows_of is None:
            continue
        for row in rows_of[rows_of["class_id"] != NO_FINDING_ID].itertuples(index=False):
            x0, y0, x1, y1 = row.x_min * sx, row.y_min * sy, row.x_max * sx, row.y_max * sy
            color = colors(int(row.class_id) % 20)
            ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor=color, linewidth=1.2))
            ax.text(
                x0,
                y0,
                CLASS_NAMES[int(row.class_id)],
                color="white",
                fontsize=6,
                va="bottom",
                bbox={"facecolor": color, "edgecolor": "none", "pad": 0.5, "alpha": 0.8},
            )
    _save(fig, path)


# ---------------------------------------------------------------------------------- page

_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>Dataset {{ n.version }}</title>
<style>
body { font-family: sans-serif; margin: 1.5em; max-width: 70em; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
td, th { border: 1px solid #bbb; padding: 0.2em 0.6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
img { max-width: 100%; border: 1px solid #ddd; margin: 0.5em 0 1.5em; }
</style></head>
<body>
<h1>Dataset version <code>{{ n.version }}</code></h1>
<p>{{ total_images }} images, {{ n.box_size.boxes }} fused finding boxes, {{
  "%.2f"|format(n.boxes_per_image.mean) }} boxes per image (max {{ n.boxes_per_image.max }}).
Numbers: <a href="report.json">report.json</a>.</p>

<h2>Class counts per split</h2>
<table>
<tr><th>class</th>{% for s in splits %}<th>{{ s }}</th>{% endfor %}</tr>
<tr><th>images</th>{% for s in splits %}<td>{{ n.images[s] }}</td>{% endfor %}</tr>
{% for label in labels %}<tr><td>{{ label }}</td>{% for s in splits
  %}<td>{{ n.boxes_per_class[s].get(label, 0) }}</td>{% endfor %}</tr>
{% endfor %}</table>
<p>Findings count fused boxes; "No finding" counts images.</p>
<img src="class_counts.png" alt="class counts per split">

<h2>Boxes per image</h2>
<img src="boxes_per_image.png" alt="boxes per image">

<h2>Box size and aspect ratio</h2>
<table>
<tr><th>quantity</th><th>p5</th><th>median</th><th>p95</th></tr>
{% for key, name in [("width_rel", "width / image width"), ("height_rel", "height / image height"),
  ("aspect", "width / height")] %}<tr><td>{{ name }}</td>{% for q in ["p5", "median", "p95"]
  %}<td>{{ n.box_size[key].get(q, "") }}</td>{% endfor %}</tr>
{% endfor %}</table>
<img src="box_sizes.png" alt="box width and height histograms">
<img src="box_aspect.png" alt="box aspect ratio histogram">

<h2>Reader agreement (before fusion)</h2>
{% if n.reader_agreement.available and n.reader_agreement.pairs %}
<p>For every reader's box and every other reader of the same image: the best IoU with that reader's
boxes of the same class (0 when they drew none there). Mean {{ n.reader_agreement.mean_iou }} over
{{ n.reader_agreement.pairs }} pairs; {{ "%.1f"|format(100 * n.reader_agreement.missed_share) }} % with no
matching box.</p>
<table>
<tr><th>class</th><th>pairs</th><th>mean IoU</th><th>no matching box</th></tr>
{% for name, a in n.reader_agreement.per_class.items() %}<tr><td>{{ name }}</td><td>{{ a.pairs }}</td>
<td>{{ a.mean_iou }}</td><td>{{ "%.1f"|format(100 * a.missed_share) }} %</td></tr>
{% endfor %}</table>
<img src="reader_agreement.png" alt="reader agreement">
{% elif n.reader_agreement.available %}
<p>No image has boxes from two readers.</p>
{% else %}
<p>Not available: this version does not carry the readers' boxes ({{ readers_csv }}); rebuild the report
with <code>cxr data report VERSION --annotations CSV --out DIR</code>.</p>
{% endif %}

<h2>Sample images with their fused boxes</h2>
<img src="samples.png" alt="sample images with fused boxes">
</body></html>
"""


def _write_page(numbers: dict[str, Any], path: Path) -> None:
    """``index.html``: self-contained (no script, no external URL: hospital networks are closed)."""
    from jinja2 import Environment

    env = Environment(autoescape=True, keep_trailing_newline=True)
    page = env.from_string(_PAGE).render(
        n=numbers,
        splits=SPLITS,
        labels=list(ALL_LABELS.values()),
        total_images=sum(numbers["images"].values()),
        readers_csv=READERS_CSV,
    )
    path.write_text(page)


# ---------------------------------------------------------------------------------- entry point


def build_report(
    inputs: ReportInputs | Path,
    out_dir: Path,
    *,
    console: Console | None = None,
    samples: int = SAMPLES,
) -> ReportSummary:
    """Write the figures, ``report.json`` and ``index.html`` of one version into ``out_dir``.

    ``inputs``: a version folder, or the inputs ingest already holds in memory. A rich progress
    bar when ``console`` is given, like the rest of ``cxr data``.
    """
    started = time.perf_counter()
    if not isinstance(inputs, ReportInputs):
        inputs = load_version(inputs)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    boxes = _boxes(inputs)
    per_image = _per_image(inputs, boxes)
    agreement = reader_agreement(inputs.readers) if inputs.readers is not None else None
    chosen = pick_samples(inputs, samples)
    counts = _counts(inputs)
    steps: list[tuple[str, Callable[[Path], None]]] = [
        ("class_counts.png", lambda p: _plot_class_counts(counts, p)),
        ("boxes_per_image.png", lambda p: _plot_boxes_per_image(per_image, p)),
        ("box_sizes.png", lambda p: _plot_box_sizes(boxes, p)),
        ("box_aspect.png", lambda p: _plot_aspect(boxes, p)),
        ("samples.png", lambda p: _plot_samples(inputs, chosen, p)),
    ]
    if agreement is not None and len(agreement.ious):
        steps.insert(4, ("reader_agreement.png", lambda p: _plot_agreement(agreement, p)))
    with progress_bar(console) as progress:
        task = progress.add_task("dataset report", total=len(steps) + 1)
        for name, draw in steps:
            draw(out_dir / name)
            progress.advance(task)
        figures = [name for name, _ in steps]
        numbers = _numbers(inputs, counts, boxes, per_image, agreement, chosen, figures)
        (out_dir / REPORT_JSON).write_text(json.dumps(numbers, indent=1, sort_keys=True))
        _write_page(numbers, out_dir / INDEX)
        progress.advance(task)
    summary = ReportSummary(
        version=inputs.version,
        out_dir=out_dir,
        files=[*figures, REPORT_JSON, INDEX],
        images=len(inputs.images),
        boxes=len(boxes),
        reader_agreement=agreement.mean if agreement is not None else None,
        seconds=time.perf_counter() - started,
    )
    log.info(
        "event=dataset_report version=%s images=%d boxes=%d reader_iou=%s seconds=%.2f out=%s",
        summary.version,
        summary.images,
        summary.boxes,
        "n/a" if summary.reader_agreement is None else f"{summary.reader_agreement:.3f}",
        summary.seconds,
        out_dir,
    )
    return summary


def readers_frame(frame: pd.DataFrame, image_ids: list[str]) -> pd.DataFrame:
    """The checked readers' rows of ``image_ids`` in VinDr columns, sorted: the manifest hashes the file."""
    rows = frame[frame["image_id"].isin(set(image_ids))][list(COLUMNS)]
    return rows.sort_values(["image_id", "rad_id", "class_id", *COORDS], kind="stable").reset_index(drop=True)
