"""Feedback -> VinDr rows, de-identification, idempotency and the disk spool (no store)."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import pydicom
import pytest
from pydantic import ValidationError

from serving.errors import InvalidRequest
from serving.feedback.service import (
    FeedbackIn,
    FeedbackService,
    FeedbackSpool,
    build_objects,
    feedback_id_for,
    rows_for,
)
from serving.results import ResultRecord
from tests.unit.serving.serving_support import make_dicom, make_png

pytestmark = pytest.mark.unit


def _record(source: bytes, fmt: str = "dicom") -> ResultRecord:
    response = {
        "request_id": "r1",
        "model": {"name": "cxr-detector", "version": "3", "stage": "production"},
        "image": {"width": 96, "height": 80},
        "detections": [
            {"class_id": 3, "class_name": "Cardiomegaly", "confidence": 0.9, "box": [10, 10, 50, 40]},
            {"class_id": 10, "class_name": "Pleural effusion", "confidence": 0.7, "box": [60, 40, 90, 79]},
        ],
        "timings_ms": {},
    }
    return ResultRecord("r1", response, fmt, source)


def test_rows_keep_accepted_adjusted_and_new_boxes_and_drop_rejected() -> None:
    fb = FeedbackIn(
        request_id="r1",
        reviews=[
            {"index": 0, "action": "adjust", "box": [12, 11, 52, 44], "class_id": 4},
            {"index": 1, "action": "reject"},
        ],
        new_boxes=[{"class_id": 8, "box": [1, 2, 20, 30]}],
    )
    rows = rows_for(fb, _record(make_dicom()), "img", "rad-7")
    assert [(r["class_id"], r["x_min"], r["y_max"]) for r in rows] == [(4, 12.0, 44.0), (8, 1.0, 30.0)]
    assert {r["rad_id"] for r in rows} == {"rad-7"}
    assert rows[0]["class_name"] == "Consolidation"


def test_all_rejected_or_no_finding_gives_one_no_finding_row() -> None:
    for fb in (
        FeedbackIn(request_id="r1", no_finding=True),
        FeedbackIn(
            request_id="r1", reviews=[{"index": 0, "action": "reject"}, {"index": 1, "action": "reject"}]
        ),
    ):
        rows = rows_for(fb, _record(make_dicom()), "img", "rad")
        assert len(rows) == 1
        assert rows[0]["class_id"] == 14 and rows[0]["class_name"] == "No finding" and rows[0]["x_min"] == ""


@pytest.mark.parametrize(
    "body",
    [
        {"request_id": "r1", "new_boxes": [{"class_id": 3, "box": [10, 10, 5, 20]}]},
        {"request_id": "r1", "new_boxes": [{"class_id": 14, "box": [1, 1, 5, 5]}]},
        {"request_id": "r1", "no_finding": True, "new_boxes": [{"class_id": 1, "box": [1, 1, 5, 5]}]},
        {"request_id": "r1", "reviews": [{"index": 0, "action": "adjust"}]},
        {"request_id": "r1", "feedback_id": "../../etc"},
    ],
    ids=["inverted-box", "class-14-box", "no-finding-plus-box", "adjust-without-change", "path-in-id"],
)
def test_inconsistent_feedback_is_refused(body: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        FeedbackIn.model_validate(body)


def test_review_index_beyond_the_detections_is_a_400() -> None:
    fb = FeedbackIn(request_id="r1", reviews=[{"index": 5, "action": "reject"}])
    with pytest.raises(InvalidRequest):
        rows_for(fb, _record(make_dicom()), "img", "rad")


def test_dicom_image_is_deidentified_with_remapped_uids_and_csv_uses_its_id() -> None:
    source = make_dicom()
    fb = FeedbackIn(request_id="r1")
    objects = build_objects(fb, _record(source), rad_id="rad", seed="salt", feedback_id="f1")
    dcm_key = next(k for k in objects if k.endswith(".dcm"))
    deid = pydicom.dcmread(io.BytesIO(objects[dcm_key]))
    original = pydicom.dcmread(io.BytesIO(source))
    for keyword in (
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "AccessionNumber",
        "ReferringPhysicianName",
    ):
        assert str(deid.get(keyword, "")) != str(original.get(keyword)), keyword
    assert deid.StudyInstanceUID != original.StudyInstanceUID
    assert deid.PatientIdentityRemoved == "YES"
    again = build_objects(fb, _record(source), rad_id="rad", seed="salt", feedback_id="f1")
    assert pydicom.dcmread(io.BytesIO(again[dcm_key])).StudyInstanceUID == deid.StudyInstanceUID  # consistent
    rows = list(csv.DictReader(io.StringIO(objects["feedback/f1/annotations.csv"].decode())))
    assert {r["image_id"] for r in rows} == {Path(dcm_key).stem}


def test_png_feedback_is_reencoded_from_pixels() -> None:
    objects = build_objects(
        FeedbackIn(request_id="r1"), _record(make_png(), "png"), rad_id="r", seed="s", feedback_id="f2"
    )
    png_key = next(k for k in objects if k.endswith(".png"))
    assert objects[png_key][:8] == b"\x89PNG\r\n\x1a\n"


def test_same_submission_gets_the_same_feedback_id() -> None:
    fb = FeedbackIn(request_id="r1", comment="x")
    assert feedback_id_for(fb, "rad", "k") == feedback_id_for(
        FeedbackIn(request_id="r1", comment="x"), "rad", "k"
    )
    assert feedback_id_for(fb, "rad", "k") != feedback_id_for(fb, "other-rad", "k")
    assert feedback_id_for(fb, "rad", "k") != feedback_id_for(fb, "rad", "another-install")


def test_a_client_feedback_id_is_an_idempotency_key_per_caller_never_a_storage_name() -> None:
    fb = FeedbackIn(request_id="r1", feedback_id="fb1")
    mine, theirs = feedback_id_for(fb, "rad-a", "k"), feedback_id_for(fb, "rad-b", "k")
    assert mine == feedback_id_for(FeedbackIn(request_id="r1", feedback_id="fb1"), "rad-a", "k")
    assert mine != theirs and "fb1" not in mine


def test_without_a_store_feedback_is_spooled_once_and_survives_a_new_service(tmp_path: Path) -> None:
    spool = FeedbackSpool(tmp_path / "spool")
    service = FeedbackService(None, spool, "salt")
    fb = FeedbackIn(request_id="r1", feedback_id="fb1")
    source = make_dicom()
    assert service.submit(fb, _record(source), "rad").status == "spooled"
    assert service.submit(fb, _record(source), "rad").status == "duplicate"
    reopened = FeedbackSpool(tmp_path / "spool")
    stored_id = feedback_id_for(fb, "rad", "salt")
    assert reopened.pending() == [stored_id]
    expected = build_objects(fb, _record(source), rad_id="rad", seed="salt", feedback_id=stored_id)
    loaded = reopened.load(stored_id)
    assert set(loaded) == set(expected)
    key = f"feedback/{stored_id}/annotations.csv"
    assert loaded[key] == expected[key]


def test_spooled_feedback_is_on_disk_when_put_returns_and_a_cut_short_put_is_dropped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.unit.core.durable_support import Steps

    root = tmp_path / "spool"
    spool = FeedbackSpool(root)
    recorder = Steps(tmp_path, monkeypatch)
    spool.put("fb1", {"feedback/fb1/annotations.csv": b"rows", "feedback/fb1/image.png": b"png"})
    assert recorder.steps == [
        "fsync .",  # the spool folder itself, made by the first put
        "fsync spool/tmp/000.bin", "fsync spool/tmp/001.bin", "fsync spool/tmp/objects.json",
        "fsync spool/tmp", "rename spool/tmp -> spool/fb1", "fsync spool",
    ]  # fmt: skip
    cut_short = root / ".tmp-fb2-0000"  # a crash between the index and the rename: never answered
    cut_short.mkdir()
    (cut_short / "objects.json").write_text("{}")
    assert spool.pending() == ["fb1"]
    assert FeedbackSpool(root).pending() == ["fb1"] and not cut_short.exists()


def test_a_removal_a_crash_cut_short_leaves_nothing_listed_and_is_cleared_at_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from core import durable

    root = tmp_path / "spool"
    spool = FeedbackSpool(root)
    spool.put("fb1", {"feedback/fb1/annotations.csv": b"rows", "feedback/fb1/image.png": b"png"})
    spool.put("fb2", {"feedback/fb2/annotations.csv": b"rows"})
    with monkeypatch.context() as crash:  # the crash: renamed, nothing deleted yet
        crash.setattr(durable.shutil, "rmtree", lambda *a, **k: None)
        spool.remove("fb1")
    # listed whole or not at all: an index without its files would stop every delivery pass
    assert spool.pending() == ["fb2"] and spool.load("fb2")
    assert FeedbackSpool(root).pending() == ["fb2"] and [p.name for p in root.iterdir()] == ["fb2"]
