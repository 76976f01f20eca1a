"""Radiologists' corrections from the gateway, stored in S3, merged into the next dataset version.

Layout (written by the gateway, ``serving/feedback/service.py``; :func:`put_feedback` writes the same):

- ``feedback/<feedback_id>/annotations.csv``: VinDr-schema rows, ``rad_id`` = the user;
- ``feedback/<feedback_id>/<image_id>.<dcm|dicom|png|jpg>``: the (de-identified) image;
- ``feedback/<feedback_id>/feedback.json``: written last; only items that have it are complete
  and get merged, so a half-uploaded correction never enters a dataset.

What the store holds came from outside, so each item is judged on its own, whole: its rows must all
be valid and all name the image the item itself holds (a correction is a reading of that image, and
may not relabel an image of the DICOM folder or of another item). An item that fails, or cannot be
read, is left out and logged by its id (no values), without counting against the annotations CSV's
bad-row limit: one hostile item must not stop every build. An image with more than
:data:`MAX_IMAGE_ROWS` rows, all its items together, is left out with all its items (fusion time).
"""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Collection
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd

from core.hashing import file_sha256
from data_pipeline.annotations import (
    COLUMNS,
    AnnotationTable,
    check_inside_images,
    combine_tables,
    parse_frame,
)
from data_pipeline.dicom_guard import DicomLimits
from data_pipeline.dicom_io import max_file_bytes
from data_pipeline.errors import AnnotationError, ImageDecodeError
from data_pipeline.export import IMAGE_SUFFIXES
from data_pipeline.store import ObjectInfo, ObjectStore

log = logging.getLogger(__name__)

FEEDBACK_PREFIX = "feedback/"
FEEDBACK_MARKER = "feedback.json"
FEEDBACK_CSV = "annotations.csv"
#: An item's id and its image's name (file stem): the gateway's ``fb-<hex>`` and 32 hex digits.
#: Never a path (``..``), a spreadsheet formula or rich markup.
SAFE_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,127}")  # never "." or "..": no leading dot
#: Largest feedback CSV read (the gateway's come from a body of at most CXR_MAX_FEEDBACK_BYTES, 1 MiB).
MAX_CSV_BYTES = 16 * 1024 * 1024


@dataclass
class FeedbackBatch:
    """Feedback rows (validated), the images that came with them, the CSV keys merged, and the
    items left out (feedback id -> why)."""

    table: AnnotationTable
    images: dict[str, Path]
    objects: list[str]
    skipped: dict[str, str] = field(default_factory=dict)


class _Refused(Exception):
    """One feedback item is left out; the message is a fixed text (no values from the item)."""


def put_feedback(
    store: ObjectStore,
    feedback_id: str,
    rows: pd.DataFrame,
    image: bytes | None = None,
    image_ext: str = "dcm",
    received: str = "",
) -> str:
    """Store one correction in the gateway's layout (marker last); returns the CSV key.

    ``received``: when it was submitted (ISO 8601 UTC, as the gateway writes it); default now.
    """
    missing = [c for c in COLUMNS if c not in rows.columns]
    if missing:
        raise AnnotationError(f"feedback rows lack columns {missing}")
    prefix = f"{FEEDBACK_PREFIX}{feedback_id}/"
    key = prefix + FEEDBACK_CSV
    store.put_bytes(key, rows[list(COLUMNS)].to_csv(index=False).encode(), content_type="text/csv")
    image_ids = sorted(set(rows["image_id"].astype(str)))
    if image is not None:
        for image_id in image_ids:
            store.put_bytes(f"{prefix}{image_id}.{image_ext.lstrip('.')}", image)
    marker = {
        "feedback_id": feedback_id,
        "image_ids": image_ids,
        "rows": len(rows),
        "received": received or datetime.now(UTC).isoformat(),
    }
    store.put_bytes(prefix + FEEDBACK_MARKER, json.dumps(marker).encode(), content_type="application/json")
    return key


def complete_items(names: list[str]) -> list[str]:
    """Feedback ids whose marker exists (``feedback/<id>/feedback.json``)."""
    ids = set()
    for name in names:
        parts = name[len(FEEDBACK_PREFIX) :].split("/")
        if len(parts) == 2 and parts[1] == FEEDBACK_MARKER:
            ids.add(parts[0])
    return sorted(ids)


def collect_feedback(
    store: ObjectStore,
    work_dir: Path,
    *,
    reserved: Collection[str] = (),
    limits: DicomLimits | None = None,
) -> FeedbackBatch | None:
    """Download and check every complete feedback item; None when there is none.

    ``reserved``: image ids an item may not use (the DICOM folder's: their labels are the readers').
    ``limits``: the DICOM limits; an item's image larger than :func:`max_file_bytes` is not fetched.
    """
    listing = {o.name: o for o in store.list_objects(FEEDBACK_PREFIX)}
    by_item: dict[str, dict[str, ObjectInfo]] = {}  # each item's objects: one pass, not one per item
    for name, info in listing.items():
        by_item.setdefault(name[len(FEEDBACK_PREFIX) :].split("/", 1)[0], {})[name] = info
    image_dir = Path(work_dir) / "feedback-images"
    max_image = max_file_bytes(limits or DicomLimits())
    tables: dict[str, AnnotationTable] = {}  # feedback id -> its rows, in id order
    images: dict[str, Path] = {}
    skipped: dict[str, str] = {}
    for feedback_id in complete_items(list(listing)):
        if not SAFE_NAME.fullmatch(feedback_id):
            # listed as skipped (the manifest is JSON: any string is data there), so the retrain
            # trigger counts it as judged instead of new for ever
            skipped[feedback_id] = "unusable item id"
            log.warning("event=feedback_item_skipped id=%r reason=unusable item id", feedback_id[:64])
            continue
        try:
            table, item_images = _collect_item(
                store, feedback_id, by_item[feedback_id], image_dir, set(reserved), images, max_image, limits
            )
        except _Refused as exc:
            skipped[feedback_id] = str(exc)
            log.warning("event=feedback_item_skipped id=%s reason=%s", feedback_id, exc)
            continue
        tables[feedback_id] = table
        images.update(item_images)
    for feedback_id in _superseded(store, tables, by_item):
        del tables[feedback_id]
        skipped[feedback_id] = SUPERSEDED
        log.info("event=feedback_item_superseded id=%s", feedback_id)
    for image_id, crowded in _crowded(tables).items():
        for feedback_id in crowded:
            del tables[feedback_id]
            skipped[feedback_id] = CROWDED
            log.warning("event=feedback_item_skipped id=%s reason=%s", feedback_id, CROWDED)
        images.pop(image_id, None)
    csv_keys = [f"{FEEDBACK_PREFIX}{feedback_id}/{FEEDBACK_CSV}" for feedback_id in tables]
    if not tables and not skipped:
        return None
    table = combine_tables(list(tables.values()), source="s3:feedback")
    log.info(
        "event=feedback_collected items=%d skipped=%d rows=%d images=%d",
        len(csv_keys),
        len(skipped),
        table.total_rows,
        len(images),
    )
    return FeedbackBatch(table=table, images=images, objects=csv_keys, skipped=skipped)


#: why an older item of an image and reader is left out (:func:`_superseded`)
SUPERSEDED = "superseded by a later correction of its image by its reader"
#: largest feedback.json read for its submission time (the gateway's are a few kB)
MAX_MARKER_BYTES = 256 * 1024


def _superseded(
    store: ObjectStore, tables: dict[str, AnnotationTable], by_item: dict[str, dict[str, ObjectInfo]]
) -> list[str]:
    """Items whose image a later item of the same reader corrected again; sorted ids.

    An item is one reader's complete reading of its image, and the gateway names the image by its
    source: a radiologist correcting an image twice makes two items of one image id. Merged, both
    readings counted as that reader's boxes, so a box the second correction moved or removed
    stayed in the labels. The item submitted last (``received`` in its ``feedback.json``, then the
    larger id) is that reader's reading; other readers' items of the image stay (fused as readers).
    """
    owners: dict[tuple[str, str], list[str]] = {}
    for feedback_id, table in tables.items():
        for pair in set(zip(table.frame["image_id"], table.frame["rad_id"], strict=True)):
            owners.setdefault((str(pair[0]), str(pair[1])), []).append(feedback_id)
    contested = [ids for ids in owners.values() if len(ids) > 1]
    received = {i: _received(store, by_item[i].get(_marker_key(i))) for ids in contested for i in ids}
    latest = [max(ids, key=lambda i: (received[i], i)) for ids in contested]
    return sorted({i for ids in contested for i in ids} - set(latest))


#: Most feedback rows one image may have, all its items together. The build fuses an image's boxes
#: (WBF), which grows faster than the count: ``fusion.fuse_image`` of 5,000 / 10,000 / 20,000 boxes of
#: one class on one image took 0.5 / 1.4 / 3.4 s here (2026-12-08, random boxes, one-off script), and a
#: 16 MiB CSV holds ~300,000 rows; the gateway writes at most a result's detections
#: (CXR_MAX_DETECTIONS, 300) and 300 new boxes per item.
MAX_IMAGE_ROWS = 10_000
#: why the items of an image with more rows are left out
CROWDED = f"its image has more than {MAX_IMAGE_ROWS} feedback rows"


def _crowded(tables: dict[str, AnnotationTable]) -> dict[str, list[str]]:
    """Images with more than :data:`MAX_IMAGE_ROWS` rows, each with all its items (sorted ids)."""
    rows: dict[str, int] = {}
    items: dict[str, list[str]] = {}
    for feedback_id, table in tables.items():
        for image_id, n in table.frame["image_id"].astype(str).value_counts().items():
            rows[image_id] = rows.get(image_id, 0) + int(n)
            items.setdefault(image_id, []).append(feedback_id)
    return {i: sorted(items[i]) for i in sorted(rows) if rows[i] > MAX_IMAGE_ROWS}


def _marker_key(feedback_id: str) -> str:
    return f"{FEEDBACK_PREFIX}{feedback_id}/{FEEDBACK_MARKER}"


def _received(store: ObjectStore, info: ObjectInfo | None) -> str:
    """An item's submission time as its marker says (ISO 8601 UTC text), "" when it says none."""
    if info is None or info.size > MAX_MARKER_BYTES:
        return ""
    try:
        meta = json.loads(store.get_bytes(info.name))
    except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: "[[[[..." nested too deep
        return ""
    value = meta.get("received") if isinstance(meta, dict) else None
    return value if isinstance(value, str) else ""


def _collect_item(
    store: ObjectStore,
    feedback_id: str,
    objects: dict[str, ObjectInfo],
    image_dir: Path,
    reserved: set[str],
    taken: dict[str, Path],
    max_image: int,
    limits: DicomLimits | None,
) -> tuple[AnnotationTable, dict[str, Path]]:
    """One item's checked rows and its image(s) (``objects``: the item's, by key); raises
    :class:`_Refused` when it must be left out."""
    prefix = f"{FEEDBACK_PREFIX}{feedback_id}/"
    frame = _item_rows(store, objects.get(prefix + FEEDBACK_CSV))
    table = parse_frame(frame, source=f"s3:{prefix}{FEEDBACK_CSV}")
    if len(table.quarantine):
        raise _Refused(f"{len(table.quarantine)} of {table.total_rows} rows invalid")
    stored = _item_images(objects, prefix)
    if set(table.frame["image_id"]) != set(stored):
        raise _Refused("rows and the item's image differ (a row names another image)")
    if set(stored) & reserved:
        raise _Refused("its image id is an image of the DICOM folder")
    paths: dict[str, Path] = {}
    for image_id, info in stored.items():
        if info.size > max_image:
            raise _Refused(f"image of {info.size} bytes exceeds the {max_image}-byte limit")
        target = image_dir / feedback_id / Path(info.name).name
        # a store or disk failing (StoreError, OSError) fails the build, to be retried: taken for a
        # bad item it would be listed as skipped, and the retrain trigger would never count it again
        if not target.exists():
            store.get_file(info.name, target)
        size = target.stat().st_size
        if size > max_image:  # the object changed since the listing
            raise _Refused(f"image exceeds the {max_image}-byte limit")
        if image_id in taken and file_sha256(taken[image_id]) != file_sha256(target):
            raise _Refused("its image id is another item's image with other pixels")
        paths[image_id] = target
    table = _inside_own_image(table, paths, limits)
    return table, paths


def _item_rows(store: ObjectStore, info: ObjectInfo | None) -> pd.DataFrame:
    if info is None:
        raise _Refused("no annotations.csv")
    if info.size > MAX_CSV_BYTES:
        raise _Refused(f"annotations.csv of {info.size} bytes exceeds {MAX_CSV_BYTES}")
    try:
        data = store.get_bytes(info.name)
        if len(data) > MAX_CSV_BYTES:  # the object changed since the listing
            raise _Refused(f"annotations.csv exceeds {MAX_CSV_BYTES} bytes")
        frame = pd.read_csv(io.BytesIO(data), dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError, ValueError) as exc:
        raise _Refused(f"annotations.csv is not a readable CSV ({type(exc).__name__})") from exc
    if not all(c in frame.columns for c in COLUMNS):
        raise _Refused("annotations.csv lacks VinDr columns")
    if frame.empty:
        raise _Refused("annotations.csv has no rows")
    return frame[list(COLUMNS)]


def _item_images(objects: dict[str, ObjectInfo], prefix: str) -> dict[str, ObjectInfo]:
    """The item's own image files (directly under its prefix), by image id; ambiguous names refused."""
    found: dict[str, ObjectInfo] = {}
    for name, info in objects.items():
        rel = name[len(prefix) :] if name.startswith(prefix) else ""
        if not rel or "/" in rel or Path(rel).suffix.lower() not in IMAGE_SUFFIXES:
            continue
        stem = Path(rel).stem
        if not SAFE_NAME.fullmatch(stem) or stem in found:
            raise _Refused("image name unusable or ambiguous")
        found[stem] = info
    if not found:
        raise _Refused("no image")
    return found


def _inside_own_image(
    table: AnnotationTable, paths: dict[str, Path], limits: DicomLimits | None
) -> AnnotationTable:
    """Every box inside the item's image (header sizes; no pixels decoded here)."""
    from data_pipeline.dicom_io import read_size

    sizes: dict[str, tuple[int, int]] = {}
    for image_id, path in paths.items():
        try:
            sizes[image_id] = read_size(path, limits)
        except ImageDecodeError as exc:
            raise _Refused(f"image unreadable ({type(exc).__name__})") from exc
    checked = check_inside_images(table, sizes)
    if len(checked.quarantine):
        raise _Refused(f"{len(checked.quarantine)} of {table.total_rows} rows outside the image")
    return checked
