"""Feedback -> VinDr rows, de-identification, idempotency and the disk spool (no store)."""

from __future__ import annotations

import csv
import io
import json
import threading
import uuid
from pathlib import Path
from typing import Any

import pydicom
import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from serving.errors import FeedbackIdReused, InvalidRequest, NotFound, Overloaded
from serving.feedback.service import (
    MAX_NEW_BOXES,
    FeedbackIn,
    FeedbackService,
    FeedbackSpool,
    NewBox,
    build_objects,
    feedback_id_for,
    rows_for,
)
from serving.results import ResultRecord
from tests.unit.serving.serving_support import MemoryStore, make_dicom, make_png

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
        # two verdicts on one detection: both were stored, the training rows kept the last
        {"request_id": "r1", "reviews": [{"index": 0, "action": "reject"}, {"index": 0, "action": "accept"}]},
    ],
    ids=[
        "inverted-box",
        "class-14-box",
        "no-finding-plus-box",
        "adjust-without-change",
        "path-in-id",
        "one-detection-twice",
    ],
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


def _with_sop_instance_uid(source: bytes, uid: str, patient_id: str) -> bytes:
    ds = pydicom.dcmread(io.BytesIO(source))
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid
    ds.PatientID = patient_id
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def test_two_images_under_one_sop_instance_uid_are_two_feedback_images_and_the_pipeline_keeps_both(
    tmp_path: Path,
) -> None:
    """The image id was a hash of the (remapped) SOP Instance UID alone. Another tenant's upload that
    bears this tenant's UID, or a re-send with a changed header, made another image under the same id,
    and the data pipeline refused whichever item sorted second ("another item's image with other
    pixels"): one radiologist's kept (202) feedback knocked out by another's. Now an image is named by
    its de-identified bytes; the same source still makes the same id (a later correction replaces)."""
    from data_pipeline.feedback import collect_feedback
    from tests.unit.data_pipeline.test_feedback_items import MemoryStore as PipelineStore

    uid = pydicom.uid.generate_uid()
    mine = _with_sop_instance_uid(make_dicom(seed=1), uid, "MRN-1")
    theirs = _with_sop_instance_uid(make_dicom(seed=2), uid, "MRN-2")
    fb = FeedbackIn(request_id="r1", no_finding=True)
    store = PipelineStore()
    names: dict[str, str] = {}
    for rad_id, source, feedback_id in (
        ("rad-a", mine, "fb-a"),
        ("rad-b", theirs, "fb-b"),
        ("rad-a", mine, ""),
    ):
        objects = build_objects(fb, _record(source), rad_id=rad_id, seed="salt", feedback_id=feedback_id)
        names[feedback_id] = next(k for k in objects if k.endswith(".dcm")).rsplit("/", 1)[1]
        if feedback_id:
            store.objects.update(objects)
    assert names["fb-a"] != names["fb-b"] and names["fb-a"] == names[""]  # the same source: the same id
    batch = collect_feedback(store, tmp_path)  # type: ignore[arg-type]
    assert batch is not None and batch.skipped == {}
    assert batch.objects == ["feedback/fb-a/annotations.csv", "feedback/fb-b/annotations.csv"]
    assert len(batch.images) == 2


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
    another_result = FeedbackIn(request_id="r2", feedback_id="fb1")
    assert mine != feedback_id_for(another_result, "rad-a", "k")


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


def test_a_stored_feedback_takes_the_same_body_as_a_duplicate_and_refuses_another(tmp_path: Path) -> None:
    store = MemoryStore()
    service = FeedbackService(store, FeedbackSpool(tmp_path / "spool"), "salt")
    fb = FeedbackIn(request_id="r1", feedback_id="fb1", new_boxes=[NewBox(class_id=8, box=[1, 2, 20, 30])])
    source = make_dicom()
    first = service.submit(fb, _record(source), "rad")
    assert first.status == "stored"
    kept = dict(store.objects)
    assert service.submit(fb, _record(source), "rad").status == "duplicate"
    with pytest.raises(FeedbackIdReused):
        service.submit(
            FeedbackIn(request_id="r1", feedback_id="fb1", no_finding=True), _record(source), "rad"
        )
    assert store.objects == kept  # the first body is what stays
    marker = f"feedback/{first.feedback_id}/feedback.json"
    meta = json.loads(store.objects[marker])
    del meta["submission"]  # as kept before the body's digest was recorded: a retry stays a duplicate
    store.objects[marker] = json.dumps(meta).encode()
    again = FeedbackIn(request_id="r1", feedback_id="fb1", no_finding=True)
    assert service.submit(again, _record(source), "rad").status == "duplicate"


# --- through the gateway ------------------------------------------------------------------------


def _detect(client: TestClient, keys: dict[str, str], seed: int) -> dict[str, Any]:
    made = client.post(
        "/v1/detect",
        content=make_dicom(seed=seed),
        headers={"Authorization": f"Bearer {keys['pacs']}", "Content-Type": "application/dicom"},
    )
    assert made.status_code == 200, made.text
    result: dict[str, Any] = made.json()
    return result


def _post_feedback(client: TestClient, keys: dict[str, str], body: dict[str, Any] | bytes) -> Any:
    headers = {"Authorization": f"Bearer {keys['radiologist']}"}
    if isinstance(body, bytes):
        return client.post(
            "/v1/feedback", content=body, headers={**headers, "Content-Type": "application/json"}
        )
    return client.post("/v1/feedback", json=body, headers=headers)


def _spooled(client: TestClient) -> list[str]:
    return client.app.state.cxr.feedback.spool.pending()  # type: ignore[attr-defined]


def test_one_feedback_id_sent_for_two_results_keeps_both(
    onnx_client: TestClient, keys: dict[str, str]
) -> None:
    first, second = _detect(onnx_client, keys, 301), _detect(onnx_client, keys, 302)
    feedback_id = uuid.uuid4().hex
    replies = [
        _post_feedback(
            onnx_client,
            keys,
            {
                "request_id": result["request_id"],
                "feedback_id": feedback_id,
                "new_boxes": [{"class_id": 3, "box": [10, 10, 40, 30]}],
            },
        )
        for result in (first, second)
    ]
    assert [r.status_code for r in replies] == [202, 202], [r.text for r in replies]  # spooled: no store
    assert [r.json()["status"] for r in replies] == ["spooled", "spooled"]
    ids = [r.json()["feedback_id"] for r in replies]
    assert ids[0] != ids[1] and set(ids) <= set(_spooled(onnx_client))


def test_the_same_feedback_id_and_body_again_is_a_duplicate(
    onnx_client: TestClient, keys: dict[str, str]
) -> None:
    result = _detect(onnx_client, keys, 303)
    body = {"request_id": result["request_id"], "feedback_id": uuid.uuid4().hex, "no_finding": True}
    first = _post_feedback(onnx_client, keys, body)
    assert first.status_code == 202 and first.json()["status"] == "spooled", first.text
    spooled = _spooled(onnx_client)
    again = _post_feedback(onnx_client, keys, body)
    assert again.status_code == 200 and again.json()["status"] == "duplicate", again.text
    assert again.json()["feedback_id"] == first.json()["feedback_id"] and _spooled(onnx_client) == spooled


def test_the_same_feedback_id_with_another_body_is_a_409_and_the_first_is_kept(
    onnx_client: TestClient, keys: dict[str, str]
) -> None:
    result = _detect(onnx_client, keys, 304)
    body = {"request_id": result["request_id"], "feedback_id": uuid.uuid4().hex, "no_finding": True}
    first = _post_feedback(onnx_client, keys, body)
    assert first.status_code == 202, first.text
    spool = onnx_client.app.state.cxr.feedback.spool  # type: ignore[attr-defined]
    kept = spool.load(first.json()["feedback_id"])
    spooled = _spooled(onnx_client)
    changed = {**body, "no_finding": False, "new_boxes": [{"class_id": 3, "box": [10, 10, 40, 30]}]}
    reply = _post_feedback(onnx_client, keys, changed)
    assert reply.status_code == 409, reply.text
    error = reply.json()["error"]
    assert error["code"] == "feedback_id_reused" and "new feedback_id" in error["message"]
    assert result["request_id"] not in error["message"] and body["feedback_id"] not in error["message"]
    assert _spooled(onnx_client) == spooled and spool.load(first.json()["feedback_id"]) == kept


@pytest.mark.parametrize(
    ("kind", "where"),
    [
        ("new-box-off-the-image", "new_boxes"),
        ("new-box-past-the-bottom", "new_boxes"),
        ("new-box-infinite", "new_boxes"),
        ("new-box-no-width", "new_boxes"),
        ("new-box-on-the-far-edge-only", "new_boxes"),
        ("adjusted-box-off-the-image", "reviews"),
        ("adjusted-box-infinite", "reviews"),
        ("adjusted-box-no-height", "reviews"),
    ],
)
def test_a_box_off_the_image_not_finite_or_without_area_is_a_400_and_nothing_is_kept(
    onnx_client: TestClient, keys: dict[str, str], kind: str, where: str
) -> None:
    result = _detect(onnx_client, keys, 305)
    assert result["detections"], "the test image needs a detection to adjust"
    w, h = result["image"]["width"], result["image"]["height"]
    box = {
        "off-the-image": f"[{w + 50}, {h + 50}, {w + 100}, {h + 100}]",
        "past-the-bottom": f"[1, 1, 10, {h + 5}]",
        "infinite": "[0, 0, 1e309, 1e309]",
        "no-width": "[10, 10, 10, 20]",
        "on-the-far-edge-only": f"[{w}, 1, {w + 0.5}, 10]",
        "no-height": "[10, 10, 20, 10]",
    }[kind.split("-", 2)[2]]
    if where == "new_boxes":
        part = f'"new_boxes": [{{"class_id": 3, "box": {box}}}]'
    else:
        part = f'"reviews": [{{"index": 0, "action": "adjust", "box": {box}}}]'
    raw = f'{{"request_id": "{result["request_id"]}", "feedback_id": "{uuid.uuid4().hex}", {part}}}'
    spooled = _spooled(onnx_client)
    reply = _post_feedback(onnx_client, keys, raw.encode())
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["code"] == "invalid_request" and where in error["message"] and "box" in error["message"]
    assert _spooled(onnx_client) == spooled


def test_more_new_boxes_than_a_feedback_may_add_is_a_400_naming_the_limit_and_nothing_is_kept(
    onnx_client: TestClient, keys: dict[str, str]
) -> None:
    """A 1 MiB body holds 20,000 new boxes: all were kept (202), and the data pipeline's fusion of an
    image's boxes grows with their square (~10 s for 20,000, ~45 s for 40,000 on one image)."""
    result = _detect(onnx_client, keys, 306)
    many = {"class_id": 3, "box": [10, 10, 40, 30]}
    spooled = _spooled(onnx_client)
    for n in (MAX_NEW_BOXES + 1, 20_000):
        reply = _post_feedback(
            onnx_client, keys, {"request_id": result["request_id"], "new_boxes": [many] * n}
        )
        assert reply.status_code == 400, reply.text
        message = reply.json()["error"]["message"]
        assert "new_boxes" in message and f"at most {MAX_NEW_BOXES} items" in message
    assert _spooled(onnx_client) == spooled
    at_limit = _post_feedback(
        onnx_client, keys, {"request_id": result["request_id"], "new_boxes": [many] * MAX_NEW_BOXES}
    )
    assert at_limit.status_code in (200, 202), at_limit.text


def test_a_box_of_many_numbers_is_a_short_400_that_does_not_echo_them(
    onnx_client: TestClient, keys: dict[str, str]
) -> None:
    """The 400 quoted the whole list: a "box" of 100,000 numbers came back as a 0.6 MB message."""
    result = _detect(onnx_client, keys, 307)
    body = {"request_id": result["request_id"], "new_boxes": [{"class_id": 3, "box": [1.5] * 100_000}]}
    reply = _post_feedback(onnx_client, keys, body)
    assert reply.status_code == 400
    message = reply.json()["error"]["message"]
    assert "new_boxes.0.box" in message and "100000 numbers" in message and len(message) < 300


def test_a_damaged_spooled_feedback_is_set_aside_and_the_others_are_delivered(tmp_path: Path) -> None:
    """Stopping at the damaged item held every later feedback back for ever."""
    root = tmp_path / "spool"
    spool = FeedbackSpool(root)
    spool.put("fb1", {"feedback/fb1/annotations.csv": b"rows1"})
    spool.put("fb2", {"feedback/fb2/annotations.csv": b"rows2"})
    spool.put("fb3", {"feedback/fb3/annotations.csv": b"rows3"})
    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"not feedback")
    (root / "fb1" / "objects.json").write_text(json.dumps({"feedback/fb1/x.csv": str(secret)}))  # elsewhere
    (root / "fb2" / "objects.json").write_text("{not json")
    store = MemoryStore()
    service = FeedbackService(store, spool, "salt")
    assert service.deliver_spooled() == 1
    assert store.objects == {"feedback/fb3/annotations.csv": b"rows3"}  # the named file was never read
    assert spool.pending() == []
    assert sorted(p.name for p in (root / ".unreadable").iterdir()) == ["fb1", "fb2"]


def test_feedback_on_a_result_whose_source_was_purged_is_a_404_naming_the_setting_and_keeps_nothing(
    tmp_path: Path,
) -> None:
    """docs/security.md "Retention": after a source is gone its SR and feedback answer 404 naming the
    setting; feedback answered 400 "no longer available", which names nothing to change."""
    store = MemoryStore()
    spool = FeedbackSpool(tmp_path / "spool")
    record = _record(make_dicom())
    record.source = None  # purged after CXR_SOURCE_RETENTION_HOURS
    with pytest.raises(NotFound, match="CXR_SOURCE_RETENTION_HOURS") as refused:
        FeedbackService(store, spool, "salt").submit(
            FeedbackIn(request_id="r1", no_finding=True), record, "rad"
        )
    assert refused.value.status == 404
    assert store.objects == {} and spool.pending() == []


def test_a_store_down_long_fills_the_spool_only_to_its_disk_reserve(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The spool grew by an image a feedback while the store was down, until the disk (the results
    journal's and the PACS outbox's too) was full. Below the reserve it answers 503 and keeps nothing."""
    from core import durable

    class Down(MemoryStore):
        def put_bytes(self, key: str, data: bytes, content_type: str = "") -> None:
            raise OSError("store down")

    spool = FeedbackSpool(tmp_path / "spool", min_free_bytes=1024)
    service = FeedbackService(Down(), spool, "salt")
    source = make_dicom()
    assert (
        service.submit(FeedbackIn(request_id="r1", feedback_id="a"), _record(source), "rad").status
        == "spooled"
    )
    real = durable.shutil.disk_usage
    monkeypatch.setattr(durable.shutil, "disk_usage", lambda p: real(p)._replace(free=len(source) + 1024))
    with pytest.raises(Overloaded) as refused:
        service.submit(FeedbackIn(request_id="r1", feedback_id="b"), _record(source), "rad")
    assert refused.value.status == 503 and refused.value.retry_after_s
    assert len(spool.pending()) == 1 and [p.name for p in spool.root.iterdir()] == spool.pending()
    # a retry of what the spool holds is still the duplicate it is
    assert (
        service.submit(FeedbackIn(request_id="r1", feedback_id="a"), _record(source), "rad").status
        == "duplicate"
    )


class _FlakyStore(MemoryStore):
    """The store, unreachable for puts and look-ups while ``down``."""

    down = False

    def _check(self) -> None:
        if self.down:
            raise OSError("store down")

    def put_bytes(self, key: str, data: bytes, content_type: str = "") -> None:
        self._check()
        super().put_bytes(key, data, content_type)

    def exists(self, key: str) -> bool:
        self._check()
        return super().exists(key)


def test_a_spooled_retry_of_a_feedback_the_store_holds_never_replaces_it(tmp_path: Path) -> None:
    """A retry whose look-up found the store unreachable is spooled; its delivery put its objects over
    the kept feedback's: another body under the same feedback_id (a 409 when the store answers)
    replaced the kept rows. The same body is not sent again; another is set aside for an operator."""

    store = _FlakyStore()
    spool = FeedbackSpool(tmp_path / "spool")
    service = FeedbackService(store, spool, "salt")
    source = make_dicom()
    first = FeedbackIn(request_id="r1", feedback_id="fb1", new_boxes=[NewBox(class_id=8, box=[1, 2, 20, 30])])
    assert service.submit(first, _record(source), "rad").status == "stored"  # its answer lost
    kept = dict(store.objects)
    store.down = True
    assert service.submit(first, _record(source), "rad").status == "spooled"  # the retry
    other = FeedbackIn(request_id="r1", feedback_id="fb2", no_finding=True)
    assert service.submit(other, _record(source), "rad").status == "spooled"
    store.down = False
    assert service.deliver_spooled() == 2 and spool.pending() == []
    assert {k: v for k, v in store.objects.items() if k in kept} == kept  # the retry sent nothing

    store.down = True  # the same feedback_id with another body, while the store cannot say 409
    reused = FeedbackIn(request_id="r1", feedback_id="fb1", no_finding=True)
    assert service.submit(reused, _record(source), "rad").status == "spooled"
    store.down = False
    service.deliver_spooled()
    assert {k: v for k, v in store.objects.items() if k in kept} == kept  # the first body stays
    assert spool.pending() == [] and [p.name for p in (spool.root / ".unreadable").iterdir()] == [
        feedback_id_for(reused, "rad", "salt")
    ]


class _SlowStore(MemoryStore):
    """A store whose first ``annotations.csv`` put waits until the test lets it go (a slow upload)."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = threading.Event()
        self.release = threading.Event()

    def put_bytes(self, key: str, data: bytes, content_type: str = "") -> None:
        if key.endswith("annotations.csv") and not self.entered.is_set():
            self.entered.set()
            assert self.release.wait(10)
        super().put_bytes(key, data, content_type)


def test_two_bodies_sent_at_once_under_one_feedback_id_keep_one_and_refuse_the_other(tmp_path: Path) -> None:
    """The look-up and the upload were not one step: a second body under the same feedback_id sent
    while the first was being uploaded found nothing kept, was uploaded too and answered "stored",
    and the store kept whichever object came last of each (the rows of one body, the feedback.json of
    the other). The second now waits for the first and is the 409 a retry after it would get."""
    store = _SlowStore()
    service = FeedbackService(store, FeedbackSpool(tmp_path / "spool"), "salt")
    source = make_dicom()
    first = FeedbackIn(request_id="r1", feedback_id="fb1", new_boxes=[NewBox(class_id=8, box=[1, 2, 20, 30])])
    second = FeedbackIn(request_id="r1", feedback_id="fb1", no_finding=True)
    outcome: dict[str, object] = {}

    def send(name: str, fb: FeedbackIn) -> None:
        try:
            outcome[name] = service.submit(fb, _record(source), "rad").status
        except FeedbackIdReused as exc:
            outcome[name] = exc

    a = threading.Thread(target=send, args=("first", first))
    a.start()
    assert store.entered.wait(10)
    b = threading.Thread(target=send, args=("second", second))
    b.start()
    b.join(1.0)  # returns at once where nothing orders the two; else waits for the first
    store.release.set()
    a.join(10)
    b.join(10)
    assert outcome["first"] == "stored"
    assert isinstance(outcome["second"], FeedbackIdReused)
    fid = feedback_id_for(first, "rad", "salt")
    rows = list(csv.DictReader(io.StringIO(store.objects[f"feedback/{fid}/annotations.csv"].decode())))
    meta = json.loads(store.objects[f"feedback/{fid}/feedback.json"])
    assert meta["no_finding"] is False and {r["class_id"] for r in rows} >= {"8"}


def test_a_feedback_json_nested_too_deep_in_the_store_does_not_stall_the_spool(tmp_path: Path) -> None:
    """json raises RecursionError for ``[[[...``: the delivery took it for a store that cannot be
    asked, stopped there, and every feedback spooled after it waited for ever."""

    store = _FlakyStore()
    spool = FeedbackSpool(tmp_path / "spool")
    service = FeedbackService(store, spool, "salt")
    source = make_dicom()
    store.down = True
    crafted = FeedbackIn(request_id="r1", feedback_id="fb1", no_finding=True)
    later = FeedbackIn(request_id="r1", feedback_id="fb2", no_finding=True)
    assert service.submit(crafted, _record(source), "rad").status == "spooled"
    assert service.submit(later, _record(source), "rad").status == "spooled"
    # meanwhile an object nested too deep to parse appears under the first one's id in the bucket
    store.objects[f"feedback/{feedback_id_for(crafted, 'rad', 'salt')}/feedback.json"] = b"[" * 200_000
    store.down = False
    service.deliver_spooled()
    assert spool.pending() == [], "the spool stopped at the unreadable object"
    assert f"feedback/{feedback_id_for(later, 'rad', 'salt')}/feedback.json" in store.objects
