"""Radiologists' corrections from the gateway, stored in S3, merged into the next dataset version.

Layout (written by the gateway, ``serving/feedback/service.py``; :func:`put_feedback` writes the same):

- ``feedback/<feedback_id>/annotations.csv``: VinDr-schema rows, ``rad_id`` = the user;
- ``feedback/<feedback_id>/<image_id>.<dcm|dicom|png|jpg>``: the (de-identified) image;
- ``feedback/<feedback_id>/feedback.json``: written last; only items that have it are complete
  and get merged, so a half-uploaded correction never enters a dataset.
"""

from __future__ import annotations

import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from data_pipeline.annotations import COLUMNS, AnnotationTable, parse_frame
from data_pipeline.errors import AnnotationError
from data_pipeline.export import IMAGE_SUFFIXES, find_images
from data_pipeline.store import ObjectStore

log = logging.getLogger(__name__)

FEEDBACK_PREFIX = "feedback/"
FEEDBACK_MARKER = "feedback.json"
FEEDBACK_CSV = "annotations.csv"


@dataclass
class FeedbackBatch:
    """Feedback rows (validated), the images that came with them, and the CSV keys merged."""

    table: AnnotationTable
    images: dict[str, Path]
    objects: list[str]


def put_feedback(
    store: ObjectStore,
    feedback_id: str,
    rows: pd.DataFrame,
    image: bytes | None = None,
    image_ext: str = "dcm",
) -> str:
    """Store one correction in the gateway's layout (marker last); returns the CSV key."""
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
    marker = {"feedback_id": feedback_id, "image_ids": image_ids, "rows": len(rows)}
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


def collect_feedback(store: ObjectStore, work_dir: Path) -> FeedbackBatch | None:
    """Download and validate every complete feedback item; None when there is none."""
    names = store.list_prefix(FEEDBACK_PREFIX)
    frames: list[pd.DataFrame] = []
    csv_keys: list[str] = []
    image_dir = Path(work_dir) / "feedback-images"
    for feedback_id in complete_items(names):
        prefix = f"{FEEDBACK_PREFIX}{feedback_id}/"
        key = prefix + FEEDBACK_CSV
        if key not in names:
            log.warning("event=feedback_without_rows id=%s", feedback_id)
            continue
        try:
            frame = pd.read_csv(io.BytesIO(store.get_bytes(key)), dtype=str, keep_default_na=False)
        except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as exc:
            log.warning("event=feedback_unreadable key=%s error=%s", key, exc)
            continue
        if not all(c in frame.columns for c in COLUMNS):
            log.warning("event=feedback_bad_header key=%s columns=%s", key, list(frame.columns))
            continue
        frames.append(frame[list(COLUMNS)])
        csv_keys.append(key)
        for name in names:
            if name.startswith(prefix) and Path(name).suffix.lower() in IMAGE_SUFFIXES:
                target = image_dir / feedback_id / Path(name).name
                if not target.exists():
                    store.get_file(name, target)
    if not frames:
        return None
    table = parse_frame(pd.concat(frames, ignore_index=True), source="s3:feedback")
    images = find_images(image_dir) if image_dir.exists() else {}
    log.info(
        "event=feedback_collected items=%d rows=%d images=%d", len(csv_keys), table.total_rows, len(images)
    )
    return FeedbackBatch(table=table, images=images, objects=csv_keys)
