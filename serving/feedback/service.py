"""Radiologists' corrections -> VinDr CSV rows + de-identified image in S3 ``feedback/``.

Feedback is what the next dataset version is built from, so losing it is
worse than delaying it: when the store is down, each submission is written to
a local spool directory (a temp dir, fsync'd and renamed into place: ``core.durable``) and a
background loop delivers it once the store answers again. The feedback id
makes every submission idempotent, whether it is retried by the browser or
redelivered from the spool; the same feedback id with another body is refused (409), never
taken for a retry. Every box is checked against the result's image before anything is kept: a
box the data pipeline would quarantine is feedback lost after the radiologist was told it was kept.
"""

from __future__ import annotations

import csv
import hashlib
import hmac
import io
import json
import logging
import math
import os
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator, model_validator

from core.durable import (
    DISK_RESERVE_BYTES,
    discard_dir,
    discard_leftovers,
    fsync_dir,
    leaves_reserve,
    make_dirs,
    publish_files,
)
from data_pipeline.classes import CLASS_NAMES, NO_FINDING, NO_FINDING_ID
from serving.dicom.deid import deidentify_dicom, reencode_png
from serving.errors import FeedbackIdReused, InvalidRequest, NotFound, Overloaded
from serving.results import BlobStore, ResultRecord

log = logging.getLogger(__name__)

VINDR_COLUMNS = ("image_id", "class_name", "class_id", "rad_id", "x_min", "y_min", "x_max", "y_max")
# how far past the image's right/bottom edge a box may reach (client rounding); it is clamped to the
# edge in the rows. Within data_pipeline.annotations.EDGE_TOLERANCE_PX, so no kept box is quarantined.
EDGE_TOLERANCE_PX = 1.0
# most boxes one feedback may add (the model's default CXR_MAX_DETECTIONS): the data pipeline fuses an
# image's boxes (WBF, faster-growing than the count: data_pipeline/feedback.py MAX_IMAGE_ROWS has the
# times), and a 1 MiB body holds 20,000 of them
MAX_NEW_BOXES = 300


class BoxReview(BaseModel):
    """The radiologist's verdict on one returned detection (by its index in the response)."""

    index: int = Field(ge=0)
    action: Literal["accept", "reject", "adjust"]
    box: list[float] | None = Field(default=None, description="new [x_min, y_min, x_max, y_max] for 'adjust'")
    class_id: int | None = Field(default=None, ge=0, lt=NO_FINDING_ID)

    @field_validator("box")
    @classmethod
    def _box_valid(cls, box: list[float] | None) -> list[float] | None:
        return None if box is None else _check_box(box)

    @model_validator(mode="after")
    def _adjust_has_box(self) -> BoxReview:
        if self.action == "adjust" and self.box is None and self.class_id is None:
            raise ValueError("an 'adjust' needs a new box and/or class_id")
        return self


class NewBox(BaseModel):
    class_id: int = Field(ge=0, lt=NO_FINDING_ID)
    box: list[float]

    @field_validator("box")
    @classmethod
    def _box_valid(cls, box: list[float]) -> list[float]:
        return _check_box(box)


class FeedbackIn(BaseModel):
    """Body of ``POST /v1/feedback``."""

    request_id: str = Field(min_length=1, max_length=64)
    feedback_id: str | None = Field(default=None, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    reviews: list[BoxReview] = Field(default_factory=list)
    new_boxes: list[NewBox] = Field(default_factory=list, max_length=MAX_NEW_BOXES)
    no_finding: bool = False
    comment: str = Field(default="", max_length=4000)

    @model_validator(mode="after")
    def _consistent(self) -> FeedbackIn:
        if self.no_finding and (self.new_boxes or any(r.action != "reject" for r in self.reviews)):
            raise ValueError("'no_finding' cannot be combined with accepted, adjusted or new boxes")
        # one verdict per detection: two (reject, then accept) were both stored, and the training
        # rows kept whichever came last
        twice = sorted(i for i, n in Counter(r.index for r in self.reviews).items() if n > 1)
        if twice:
            raise ValueError(
                f"detection {twice[0]} is reviewed more than once; send one review per detection"
            )
        return self


def _check_box(box: list[float]) -> list[float]:
    """The shape of one box, alone (``check_against_result`` places it on the image)."""
    if len(box) != 4:  # not echoed: a "box" of 100,000 numbers made a 0.6 MB error message
        raise ValueError(f"a box has {len(box)} numbers; it must be [x_min, y_min, x_max, y_max]")
    if not all(math.isfinite(v) for v in box):
        # 1e309 parses as inf: it would be clamped to a zero-area box, and inf is not JSON
        raise ValueError(f"box {box} has a value that is not a finite number")
    if not (box[0] < box[2] and box[1] < box[3]) or min(box) < 0:
        raise ValueError(
            f"box {box} must be [x_min, y_min, x_max, y_max] with x_min < x_max, y_min < y_max, >= 0"
        )
    return box


def _clamped(box: list[float], width: float, height: float) -> tuple[float, float, float, float]:
    """The box as its CSV row holds it: clamped to the image, rounded to 0.1 px."""
    x0, y0, x1, y1 = (min(v, limit) for v, limit in zip(box, (width, height, width, height), strict=True))
    return round(x0, 1), round(y0, 1), round(x1, 1), round(y1, 1)


def _image_size(record: ResultRecord) -> tuple[float, float]:
    return float(record.response["image"]["width"]), float(record.response["image"]["height"])


def check_against_result(fb: FeedbackIn, record: ResultRecord) -> None:
    """400 for what the result cannot hold: a review of a detection it lacks, a box off its image.

    Each kept box must lie in [0, width] x [0, height] (``EDGE_TOLERANCE_PX`` past the far edges)
    and keep an area once clamped and rounded: a box the data pipeline quarantines is lost feedback.
    """
    dets = record.detections
    for r in fb.reviews:
        if r.index >= len(dets):
            raise InvalidRequest(
                f"review index {r.index} is out of range: the result has {len(dets)} detections"
            )
    width, height = _image_size(record)
    boxes = [(f"reviews[{i}] (detection {r.index})", r.box) for i, r in enumerate(fb.reviews)]
    boxes += [(f"new_boxes[{i}]", nb.box) for i, nb in enumerate(fb.new_boxes)]
    for where, box in boxes:
        if box is not None:
            _check_box_on_image(where, box, width, height)


def _check_box_on_image(where: str, box: list[float], width: float, height: float) -> None:
    """``box`` (its shape already checked when the body was parsed: ``_check_box``) on the image."""
    size = f"{width:g}x{height:g}"
    if box[2] > width + EDGE_TOLERANCE_PX or box[3] > height + EDGE_TOLERANCE_PX:
        raise InvalidRequest(
            f"{where}: box {box} reaches outside the {size} image; boxes are in the original image's "
            f"pixels, x within 0..{width:g} and y within 0..{height:g}"
        )
    x0, y0, x1, y1 = _clamped(box, width, height)
    if not (x0 < x1 and y0 < y1):
        raise InvalidRequest(
            f"{where}: box {box} has no area inside the {size} image (clamped to it and rounded to 0.1 px)"
        )


@dataclass(frozen=True)
class FeedbackReceipt:
    feedback_id: str
    status: Literal["stored", "spooled", "duplicate"]
    rows: int


def rows_for(fb: FeedbackIn, record: ResultRecord, image_id: str, rad_id: str) -> list[dict[str, Any]]:
    """VinDr rows: accepted + adjusted + new boxes; a single 'No finding' row when none remain."""
    check_against_result(fb, record)
    dets = record.detections
    by_index = {r.index: r for r in fb.reviews}
    rows: list[dict[str, Any]] = []
    width, height = _image_size(record)

    def add(class_id: int, box: list[float]) -> None:
        x0, y0, x1, y1 = _clamped(box, width, height)
        rows.append(
            {
                "image_id": image_id,
                "class_name": CLASS_NAMES[class_id],
                "class_id": class_id,
                "rad_id": rad_id,
                "x_min": x0,
                "y_min": y0,
                "x_max": x1,
                "y_max": y1,
            }
        )

    if not fb.no_finding:
        for i, det in enumerate(dets):
            review = by_index.get(i)
            if review is None or review.action == "accept":
                # unreviewed boxes count as accepted: the radiologist saw them and did not object
                add(int(det["class_id"]), [float(v) for v in det["box"]])
            elif review.action == "adjust":
                cid = review.class_id if review.class_id is not None else int(det["class_id"])
                add(cid, review.box if review.box is not None else [float(v) for v in det["box"]])
        for nb in fb.new_boxes:
            add(nb.class_id, nb.box)
    if not rows:
        rows.append(
            {
                "image_id": image_id,
                "class_name": NO_FINDING,
                "class_id": NO_FINDING_ID,
                "rad_id": rad_id,
                "x_min": "",
                "y_min": "",
                "x_max": "",
                "y_max": "",
            }
        )
    return rows


def to_csv(rows: list[dict[str, Any]]) -> bytes:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=VINDR_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue().encode()


def feedback_id_for(fb: FeedbackIn, rad_id: str, secret: str) -> str:
    """The stored item's id, made here: an HMAC of the caller's key id, the result and its idempotency key.

    The client's ``feedback_id`` (else the submission's content) only makes a
    retry idempotent for the same key and the same result (``request_id``): the
    same feedback_id sent for another result is another feedback, never its
    duplicate. It is never a storage name, so another key reusing it cannot
    shadow or overwrite anyone's feedback. Keyed with the install secret because
    the body names the result: an unkeyed hash could be recomputed from the
    results store to link a de-identified feedback back to its identified source.

    Upgrade: ids of a client feedback_id were once made without the result
    (token ``id``). What was stored or spooled under them stays where it is and
    is read and delivered as before (an id is only the item's folder name); a
    retry that crosses the upgrade, of a submission sent before it, gets the new
    id and is kept a second time (the same rows under two ids; nothing lost).
    Ids made from the content (no feedback_id) are unchanged.
    """
    if fb.feedback_id:  # a feedback_id has no NUL (its pattern), so the token reads one way only
        token = f"result-id\x00{fb.request_id}\x00{fb.feedback_id}"
    else:
        token = f"body\x00{fb.model_dump_json()}"
    digest = hmac.new(secret.encode(), f"{rad_id}\x00{token}".encode(), hashlib.sha256).hexdigest()
    return f"fb-{digest[:32]}"


def submission_digest(fb: FeedbackIn, secret: str) -> str:
    """Keyed hash of the whole body, kept in ``feedback.json``: a retry must send the same body.

    Keyed for the reason the id is; it tells nothing the id does not.
    """
    token = f"submission\x00{fb.model_dump_json()}"
    return hmac.new(secret.encode(), token.encode(), hashlib.sha256).hexdigest()[:32]


def _submission_in(marker: bytes) -> str:
    """The body digest a ``feedback.json`` holds; "" for items kept before it was recorded.

    :class:`ValueError` for one that is no JSON, nested too deep included: json raises
    RecursionError for ``[[[...``, which the spool's delivery took for a store that cannot be asked
    and retried, behind it, every later feedback for ever.
    """
    try:
        meta = json.loads(marker)
    except RecursionError as exc:
        raise ValueError("feedback.json is nested too deep to read") from exc
    value = meta.get("submission", "") if isinstance(meta, dict) else ""
    return value if isinstance(value, str) else ""


def build_objects(
    fb: FeedbackIn,
    record: ResultRecord,
    *,
    rad_id: str,
    seed: str,
    feedback_id: str,
    allow_burned_in: bool = False,
) -> dict[str, bytes]:
    """Every object of one feedback, keyed by its S3 name (CSV, de-identified image, metadata).

    A DICOM whose pixels may identify the patient (burned-in annotation, Secondary Capture) is
    refused with 422 before anything is kept, unless ``allow_burned_in`` (CXR_FEEDBACK_ALLOW_BURNED_IN).
    """
    if record.source is None:  # docs/security.md "Retention": a 404 naming the setting, as the SR's
        raise NotFound(
            f"the source image of '{record.request_id}' is no longer kept (CXR_SOURCE_RETENTION_HOURS); "
            "detect again"
        )
    prefix = f"feedback/{feedback_id}"
    if record.source_format == "dicom":
        image, _ = deidentify_dicom(record.source, seed, allow_burned_in=allow_burned_in)
        # named by its bytes, not by its SOP Instance UID alone: an upload bearing another's UID (another
        # tenant's, a re-send with a changed header) is another image, and the data pipeline refuses a
        # second item that names an image id with other bytes. The same source makes the same bytes.
        # (Items kept before were named by the UID: a correction crossing the upgrade is a second image.)
        image_id = hashlib.sha256(image).hexdigest()[:32]
        image_name = f"{image_id}.dcm"
    else:
        from data_pipeline.dicom_io import decode_bytes

        image = reencode_png(decode_bytes(record.source).to_uint8())
        image_id = hashlib.sha256(seed.encode() + record.source).hexdigest()[:32]
        image_name = f"{image_id}.png"
    rows = rows_for(fb, record, image_id, rad_id)
    # nothing that leads back to the identified source: no request id, no source UIDs, no free text
    # (the submission digest is keyed with the install secret, like the id)
    meta = {
        "feedback_id": feedback_id,
        "submission": submission_digest(fb, seed),
        "rad_id": rad_id,
        "model": record.response.get("model"),
        "image_id": image_id,
        "image": image_name,
        "no_finding": fb.no_finding,
        "reviews": [r.model_dump() for r in fb.reviews],
        "new_boxes": [b.model_dump() for b in fb.new_boxes],
        "received": datetime.now(UTC).isoformat(),
    }
    # feedback.json last: its presence marks a complete, delivered feedback
    return {
        f"{prefix}/{image_name}": image,
        f"{prefix}/annotations.csv": to_csv(rows),
        f"{prefix}/feedback.json": json.dumps(meta, indent=2).encode(),
    }


class FeedbackSpool:
    """Local directory of feedback the store did not take yet; one folder per feedback id.

    One gateway process owns the folder: a start removes the ``.tmp-`` folders in it (puts a
    crash cut short, removals a crash interrupted), which would race another process's put.
    """

    def __init__(self, root: Path, min_free_bytes: int = DISK_RESERVE_BYTES) -> None:
        self.root = root
        self.min_free_bytes = min_free_bytes
        discard_leftovers(root, ".tmp-*")

    def _dir(self, feedback_id: str) -> Path:
        return self.root / feedback_id

    def contains(self, feedback_id: str) -> bool:
        if not (self._dir(feedback_id) / "objects.json").exists():
            return False
        fsync_dir(self.root)  # the caller answers "duplicate": the first put's rename durable before that
        return True

    def put(self, feedback_id: str, objects: dict[str, bytes]) -> None:
        """Keep the objects until the store takes them (blocking); durable when it returns, since
        the radiologist is then told the feedback is kept.

        :class:`Overloaded` (503, nothing kept) when the put would leave less than ``min_free_bytes``
        free on the spool's disk: the radiologist sends it again later, and the disk stays usable."""
        make_dirs(self.root)
        size = sum(len(data) for data in objects.values())
        if not leaves_reserve(self.root, size, self.min_free_bytes):
            log.warning("feedback_spool_disk_low pending=%d bytes=%d", self.depth(), size)
            raise Overloaded(
                "the object store is unreachable and the feedback spool's disk is nearly full: the "
                "feedback was not kept; send it again later",
                retry_after_s=60,
            )
        names = {key: f"{i:03d}.bin" for i, key in enumerate(objects)}
        files = {names[key]: data for key, data in objects.items()}
        files["objects.json"] = json.dumps(names).encode()
        publish_files(self._dir(feedback_id), files)  # False: spooled before, the same feedback id

    def pending(self) -> list[str]:
        if not self.root.exists():
            return []
        return sorted(
            p.name
            for p in self.root.iterdir()
            if not p.name.startswith(".tmp-") and p.is_dir() and (p / "objects.json").exists()
        )

    def _index(self, feedback_id: str) -> tuple[Path, dict[str, str]]:
        """A spooled feedback's folder and index (object key -> file name); ``ValueError``/``OSError``.

        The index names files of its own folder only: a damaged one naming another path is refused,
        never followed (it would upload whatever file it named to the store).
        """
        folder = self._dir(feedback_id)
        index = json.loads((folder / "objects.json").read_text())
        if not isinstance(index, dict) or not all(
            isinstance(k, str) and isinstance(n, str) and Path(n).name == n and n not in ("", ".", "..")
            for k, n in index.items()
        ):
            raise ValueError("the spooled feedback's index is damaged")
        return folder, index

    def read(self, feedback_id: str, key: str) -> bytes:
        """One object of a spooled feedback (``KeyError``/``OSError`` when it is not, or no longer, there)."""
        folder, index = self._index(feedback_id)
        return (folder / index[key]).read_bytes()

    def load(self, feedback_id: str) -> dict[str, bytes]:
        """A spooled feedback's objects; ``ValueError``/``OSError`` when its folder cannot be read as one."""
        folder, index = self._index(feedback_id)
        return {key: (folder / name).read_bytes() for key, name in index.items()}

    def set_aside(self, feedback_id: str) -> bool:
        """Move an unreadable item out of the queue into ``.unreadable/`` (kept for an operator).

        False when the item is no longer there (another pass delivered and removed it).
        """
        if not self._dir(feedback_id).is_dir():
            return False
        aside = self.root / ".unreadable"
        make_dirs(aside)
        target = aside / feedback_id
        if target.exists():
            discard_dir(target)
        try:
            os.replace(self._dir(feedback_id), target)
        except FileNotFoundError:
            return False
        fsync_dir(self.root)
        return True

    def remove(self, feedback_id: str) -> None:
        discard_dir(self._dir(feedback_id))

    def depth(self) -> int:
        return len(self.pending())


def upload(store: BlobStore, objects: dict[str, bytes]) -> None:
    for key, data in objects.items():
        ctype = (
            "text/csv"
            if key.endswith(".csv")
            else "application/json"
            if key.endswith(".json")
            else ("application/dicom" if key.endswith(".dcm") else "image/png")
        )
        store.put_bytes(key, data, ctype)


class FeedbackService:
    """Store-or-spool, and the redelivery pass the app runs periodically."""

    def __init__(
        self, store: BlobStore | None, spool: FeedbackSpool, seed: str, *, allow_burned_in: bool = False
    ) -> None:
        self.store = store
        self.spool = spool
        self.seed = seed
        self.allow_burned_in = allow_burned_in  # CXR_FEEDBACK_ALLOW_BURNED_IN
        # feedback ids being submitted, each with its lock and how many submissions hold or wait on it
        self._busy: dict[str, tuple[threading.Lock, int]] = {}
        self._busy_lock = threading.Lock()

    @contextmanager
    def _one_at_a_time(self, feedback_id: str) -> Iterator[None]:
        """Hold ``feedback_id``'s lock: its look-up and its upload (or spool) are one step.

        Two bodies sent at once under one feedback_id both found nothing kept and were both uploaded
        (each answered "stored"), and the store kept the last object of each: one body's rows beside
        the other's ``feedback.json``. The second now waits and finds the first (a duplicate or the
        409). Per gateway process: replicas sharing a store can still race (no conditional put).
        """
        with self._busy_lock:
            lock, users = self._busy.get(feedback_id, (threading.Lock(), 0))
            self._busy[feedback_id] = (lock, users + 1)
        try:
            with lock:
                yield
        finally:
            with self._busy_lock:
                lock, users = self._busy[feedback_id]
                if users == 1:
                    del self._busy[feedback_id]
                else:
                    self._busy[feedback_id] = (lock, users - 1)

    def submit(self, fb: FeedbackIn, record: ResultRecord, rad_id: str) -> FeedbackReceipt:
        """Blocking (run it in a worker thread)."""
        check_against_result(fb, record)  # a 400 before anything is looked up, spooled or stored
        feedback_id = feedback_id_for(fb, rad_id, self.seed)
        with self._one_at_a_time(feedback_id):
            return self._submit(fb, record, rad_id, feedback_id)

    def _submit(self, fb: FeedbackIn, record: ResultRecord, rad_id: str, feedback_id: str) -> FeedbackReceipt:
        """What :meth:`submit` does once it holds the feedback id's lock."""
        held = self._held_submission(feedback_id)
        if held is not None:
            if held and held != submission_digest(fb, self.seed):
                raise FeedbackIdReused(
                    "this feedback_id was already sent for this result with a different body; a retry "
                    "must send the same body, and new or changed corrections need a new feedback_id"
                )
            return FeedbackReceipt(feedback_id, "duplicate", 0)
        objects = build_objects(
            fb,
            record,
            rad_id=rad_id,
            seed=self.seed,
            feedback_id=feedback_id,
            allow_burned_in=self.allow_burned_in,
        )
        rows = to_csv_rows_count(objects)
        if self.store is not None:
            try:
                upload(self.store, objects)
                log.info("feedback_stored feedback_id=%s rows=%d", feedback_id, rows)
                return FeedbackReceipt(feedback_id, "stored", rows)
            except Exception as exc:
                log.warning("feedback_spooled feedback_id=%s reason=%s", feedback_id, exc)
        self.spool.put(feedback_id, objects)
        return FeedbackReceipt(feedback_id, "spooled", rows)

    def _held_submission(self, feedback_id: str) -> str | None:
        """None when no feedback is kept under the id, else its body digest ("" when unknown:
        kept before digests were recorded, or a store that listed it but did not return it)."""
        marker = f"feedback/{feedback_id}/feedback.json"
        if self.spool.contains(feedback_id):
            try:
                return _submission_in(self.spool.read(feedback_id, marker))
            except (OSError, KeyError, ValueError):
                if self.spool.contains(feedback_id):
                    return ""  # held, its marker unreadable: answered as before, a duplicate
                # else delivered and removed meanwhile: the store holds it now
        if self.store is None:
            return None
        try:
            if not self.store.exists(marker):
                return None
        except Exception as exc:
            log.warning("feedback_store_unreachable feedback_id=%s error=%s", feedback_id, exc)
            return None
        try:
            return _submission_in(self.store.get_bytes(marker))
        except Exception as exc:
            log.warning("feedback_marker_unreadable feedback_id=%s error=%s", feedback_id, exc)
            return ""

    def deliver_spooled(self) -> int:
        """Upload what the spool holds; stops at the first upload failure (the store is still down).

        An item that cannot be read (a damaged index, a lost file) is set aside instead: stopping
        there would hold every later feedback back for ever.
        """
        if self.store is None:
            return 0
        delivered = 0
        for feedback_id in self.spool.pending():
            try:
                objects = self.spool.load(feedback_id)
            except (ValueError, FileNotFoundError, IsADirectoryError) as exc:
                # this item is damaged (not the disk or the store failing for now): the others go
                if not self.spool.set_aside(feedback_id):
                    continue  # gone meanwhile (delivered by another pass): nothing to set aside
                log.warning(
                    "feedback_spool_item_set_aside feedback_id=%s error_type=%s dir=.unreadable",
                    feedback_id,
                    type(exc).__name__,
                )
                continue
            except OSError as exc:  # the disk failing for now (EIO, EMFILE...): the next pass tries again
                log.info(
                    "feedback_spool_retry_later pending=%d error_type=%s",
                    self.spool.depth(),
                    type(exc).__name__,
                )
                break
            # a spooled retry whose look-up found the store unreachable may be of a feedback the store took
            # before (its answer lost): the same body is a duplicate, never sent again; another body (the
            # feedback_id reused) is the 409 that look-up could not give. Sent, it replaced the kept rows.
            try:
                held = self._held_in_store(feedback_id)
                if held is None:
                    upload(self.store, objects)
            except Exception as exc:
                log.info("feedback_spool_retry_later pending=%d error=%s", self.spool.depth(), exc)
                break
            try:
                spooled = _submission_in(objects.get(f"feedback/{feedback_id}/feedback.json", b"{}"))
            except ValueError:
                spooled = ""
            if held and spooled and held != spooled:
                if self.spool.set_aside(feedback_id):
                    log.warning(
                        "feedback_spool_item_set_aside feedback_id=%s reason=%s dir=.unreadable",
                        feedback_id,
                        "feedback_id_reused",
                    )
                continue
            self.spool.remove(feedback_id)
            delivered += 1
            log.info("feedback_delivered_from_spool feedback_id=%s", feedback_id)
        return delivered

    def _held_in_store(self, feedback_id: str) -> str | None:
        """The body digest of a feedback the store holds under ``feedback_id`` ("" when unknown), None
        when it holds none; raises when the store cannot be asked."""
        assert self.store is not None
        marker = f"feedback/{feedback_id}/feedback.json"
        if not self.store.exists(marker):
            return None
        try:
            return _submission_in(self.store.get_bytes(marker))
        except ValueError:
            return ""


def to_csv_rows_count(objects: dict[str, bytes]) -> int:
    for key, data in objects.items():
        if key.endswith("annotations.csv"):
            return max(0, data.decode().count("\n") - 1)
    return 0
