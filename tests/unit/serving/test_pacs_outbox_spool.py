"""The SCP's spool and the results outbox: durable, idempotent, retried with backoff."""

from __future__ import annotations

import io
import os
import time
from pathlib import Path
from typing import Any

import pydicom
import pytest

from serving.dicom.stow import split_related
from serving.dimse.forwarder import batches, related_body
from serving.dimse.spool import InstanceSpool
from serving.pacs.outbox import Outbox, OutboxItem
from serving.pacs.sendback import SendBack
from serving.pacs.senders import Sender, Sent
from serving.pacs_destinations import PacsDestination

pytestmark = pytest.mark.unit


def test_spool_keeps_instances_per_study_and_settles_by_newest_arrival(tmp_path: Path) -> None:
    spool = InstanceSpool(tmp_path)
    a1 = spool.write("1.2.3", "1.2.3.1", b"one")
    spool.write("1.2.3", "1.2.3.2", b"two")
    b1 = spool.write("1.2.4", "1.2.4.1", b"three")
    old = time.time() - 60
    os.utime(a1, (old, old))
    os.utime(b1, (old - 60, old - 60))  # 1.2.4 began first, although its UID sorts second
    [study_a, _] = sorted(spool.studies(), key=lambda s: s.study_uid)
    assert study_a.study_uid == "1.2.3" and len(study_a.files) == 2
    assert spool.depth() == (2, 3)
    # the settle clock is the newest arrival: the second instance of 1.2.3 just arrived
    assert time.time() - study_a.last_arrival < 5.0 and study_a.first_arrival <= old + 1
    assert [s.study_uid for s in spool.studies()] == ["1.2.4", "1.2.3"]  # the first to arrive first
    # a hostile UID never becomes a path
    assert all(len(f.stem) == 32 for f in study_a.files)


def test_spool_survives_a_restart_and_drops_unacknowledged_partial_writes(tmp_path: Path) -> None:
    spool = InstanceSpool(tmp_path)
    spool.write("1.2.3", "1.2.3.1", b"one")
    partial = next(spool.studies_dir.iterdir()) / ".tmp-interrupted"
    partial.write_bytes(b"half")
    again = InstanceSpool(tmp_path)  # the restarted SCP
    assert [s.study_uid for s in again.studies()] == ["1.2.3"]
    assert not partial.exists()


def test_spool_remove_keeps_an_instance_that_arrived_during_the_handover(tmp_path: Path) -> None:
    spool = InstanceSpool(tmp_path)
    spool.write("1.2.3", "1.2.3.1", b"one")
    [snapshot] = spool.studies()
    spool.write("1.2.3", "1.2.3.2", b"late")
    spool.remove(snapshot)
    [left] = spool.studies()
    assert [f.read_bytes() for f in left.files] == [b"late"]
    spool.remove(left)
    assert spool.studies() == [] and spool.depth() == (0, 0)


def test_related_body_round_trips_through_the_gateways_stow_parser(tmp_path: Path) -> None:
    body, content_type = related_body([b"DICM-one", b"DICM-two\r\n--not-a-boundary"])
    assert split_related(content_type, body) == [b"DICM-one", b"DICM-two\r\n--not-a-boundary"]


def test_batches_respect_part_and_byte_limits(tmp_path: Path) -> None:
    files = []
    for i in range(5):
        f = tmp_path / f"{i}.dcm"
        f.write_bytes(b"x" * 3000)
        files.append(f)
    assert [len(b) for b in batches(tuple(files), max_bytes=1_000_000, max_parts=2)] == [2, 2, 1]
    assert [len(b) for b in batches(tuple(files), max_bytes=4096 + 6500)] == [2, 2, 1]
    assert [len(b) for b in batches(tuple(files), max_bytes=10)] == [1, 1, 1, 1, 1]  # never zero


def test_outbox_is_idempotent_per_destination_and_object(tmp_path: Path) -> None:
    box = Outbox(tmp_path)
    assert box.put("orthanc", "1.2.840.10008.5.1.4.1.1.88.33", "1.2.9", b"sr")
    assert not box.put("orthanc", "1.2.840.10008.5.1.4.1.1.88.33", "1.2.9", b"sr")  # a retry: no copy
    assert box.put("other", "1.2.840.10008.5.1.4.1.1.88.33", "1.2.9", b"sr")
    assert box.depth() == {"orthanc": 1, "other": 1}
    [item] = [i for i in box.due() if i.destination == "orthanc"]
    assert item.data() == b"sr"
    box.delivered(item)
    assert box.depth() == {"other": 1}


def test_outbox_backs_off_exponentially_and_keeps_items_across_restarts(tmp_path: Path) -> None:
    box = Outbox(tmp_path, retry_s=2.0, max_backoff_s=5.0)
    box.put("orthanc", "1.2.840.10008.5.1.4.1.1.11.1", "1.2.10", b"pr")
    now = time.time()
    [item] = box.due(now)
    assert box.failed(item, now) == 2.0
    assert box.due(now + 1) == []
    [item] = box.due(now + 2.5)
    assert box.failed(item, now) == 4.0
    [item] = Outbox(tmp_path, retry_s=2.0, max_backoff_s=5.0).due(now + 10)  # restarted gateway
    assert item.attempts == 2
    assert box.failed(item, now) == 5.0  # capped


def test_destinations_validate_and_choose_callers() -> None:
    stow = PacsDestination(name="pacs", kind="stow", url="http://127.0.0.1:8042/dicom-web", callers=["west"])
    assert stow.serves("west") and not stow.serves("east")
    assert PacsDestination(name="all", kind="stow", url="https://p/dw", callers=["*"]).serves("east")
    with pytest.raises(ValueError, match="needs an http"):
        PacsDestination(name="x", kind="stow", url="ftp://p", callers=["*"])
    with pytest.raises(ValueError, match="needs ae_title"):
        PacsDestination(name="x", kind="dimse", host="127.0.0.1", callers=["*"])
    with pytest.raises(ValueError, match="not a valid AE"):
        PacsDestination(name="x", kind="dimse", ae_title="A" * 17, host="h", port=104, callers=["*"])
    with pytest.raises(ValueError, match="callers is empty"):  # it once meant "when asked"; now "never"
        PacsDestination(name="x", kind="stow", url="https://p/dw")
    with pytest.raises(ValueError, match="callers is empty"):
        PacsDestination(name="x", kind="stow", url="https://p/dw", callers=[" "])


def test_send_back_never_chooses_a_pacs_of_another_tenant(tmp_path: Path) -> None:
    """The objects carry the patient's identity: asking (send_back=true) reaches only the caller's PACS."""
    from serving.config import ServingSettings
    from serving.inference.cpu_pool import CpuPool
    from serving.metrics import GatewayMetrics

    destinations = [
        {"name": "west", "kind": "stow", "url": "http://127.0.0.1:9/w", "callers": ["west"]},
        {"name": "east", "kind": "stow", "url": "http://127.0.0.1:9/e", "callers": ["east"]},
        {"name": "east-asked", "kind": "stow", "url": "http://127.0.0.1:9/a", "callers": ["east"]}
        | {"auto": False},
        {"name": "shared", "kind": "stow", "url": "http://127.0.0.1:9/s", "callers": ["*"]},
    ]
    settings = ServingSettings(stack_dir=tmp_path, pacs_destinations=destinations)
    back = SendBack(settings, GatewayMetrics(), CpuPool(1))
    names = lambda tenant, asked: sorted(d.name for d in back.choose(tenant, asked))  # noqa: E731
    assert names("west", True) == ["shared", "west"]
    assert names("west", None) == ["shared", "west"]
    assert names("east", True) == ["east", "east-asked", "shared"]
    assert names("east", None) == ["east", "shared"]
    assert names("east", False) == []
    assert names("north", True) == ["shared"]


def test_a_stow_destination_that_fails_is_tried_once_per_delivery_pass(tmp_path: Path) -> None:
    """The outbox owns the retries: dicomweb-client's own (5 attempts, ~15 s) would hold the loop."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from serving.pacs.senders import Sent, StowSender
    from tests.unit.serving.serving_support import make_dicom

    hits: list[str] = []

    class Unavailable(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            hits.append(self.path)
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self.send_response(503)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Unavailable)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/dicom-web"
        sender = StowSender(PacsDestination(name="pacs", kind="stow", url=url, callers=["*"]))
        box = Outbox(tmp_path)
        box.put("pacs", "1.2.840.10008.5.1.4.1.1.1.1", "1.2.11", make_dicom(32, 32, seed=1))
        assert sender.send(box.due()) == Sent(), "a PACS that is down: nothing stored, nothing refused"
        assert len(hits) == 1
    finally:
        server.shutdown()
        server.server_close()


def test_a_study_listed_before_its_uid_is_written_is_skipped_not_remembered_empty(tmp_path: Path) -> None:
    """A listing that found the UID file empty (another writer's moment between creating and filling
    it) once cached the empty UID: the study then went to the gateway as ``/dicomweb/studies/``, was
    redirected, and was retried for ever."""
    spool = InstanceSpool(tmp_path)
    folder = spool.studies_dir / "a-study"
    folder.mkdir()
    (folder / "study_uid").write_text("")
    (folder / "0.dcm").write_bytes(b"first")
    assert spool.studies() == []  # not a study yet: its UID is not there
    (folder / "study_uid").write_text("1.2.3")
    [study] = spool.studies()
    assert study.study_uid == "1.2.3"


def test_the_uid_file_is_written_whole_and_made_durable_before_the_first_instance(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from serving.dimse import spool as spool_module

    spool = InstanceSpool(tmp_path)
    steps: list[str] = []
    real_replace, real_fsync_dir = os.replace, spool_module.fsync_dir

    def replace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        if Path(dst).is_relative_to(tmp_path):  # os.replace is the process's: others may call it meanwhile
            steps.append(Path(dst).name if Path(dst).name == "study_uid" else "instance")
            uid_file = Path(dst).with_name("study_uid")
            assert not uid_file.exists() or uid_file.read_text() == "1.2.3"  # never there half-written
        real_replace(src, dst)

    def fsync_dir(path: Path) -> None:
        steps.append("fsync " + ("studies" if path == spool.studies_dir else "study"))
        real_fsync_dir(path)

    monkeypatch.setattr("serving.dimse.spool.os.replace", replace)
    monkeypatch.setattr(spool_module, "fsync_dir", fsync_dir)
    spool.write("1.2.3", "1.2.3.1", b"one")
    spool.write("1.2.3", "1.2.3.2", b"two")
    assert steps == [
        "study_uid", "fsync study",  # the UID's name durable before any instance's
        "instance", "fsync study", "fsync studies",  # the first instance, then the study folder's name
        "instance", "fsync study",
    ]  # fmt: skip
    assert not list(spool.studies_dir.glob("*/.tmp-*"))


def _instance(study: str, seed: int) -> tuple[str, bytes]:
    from tests.unit.serving.serving_support import make_dicom

    data = make_dicom(32, 32, study_uid=study, seed=seed)
    return pydicom.dcmread(io.BytesIO(data)).SOPInstanceUID, data


def test_a_uid_file_an_older_scp_left_empty_is_repaired_at_start_and_by_the_next_write(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    spool = InstanceSpool(tmp_path)
    for study, seed in (("1.2.826.0.1.7", 1), ("1.2.826.0.1.8", 2)):
        sop, data = _instance(study, seed)
        spool.write(study, sop, data)
    first, second = sorted(spool.studies_dir.iterdir(), key=lambda f: (f / "study_uid").read_text())
    (first / "study_uid").write_text("")  # written in place, lost in a crash
    (second / "study_uid").unlink()
    broken = spool.studies_dir / ("0" * 32)  # instances whose header names another study, or none
    broken.mkdir()
    (broken / "x.dcm").write_bytes(b"not dicom")
    with caplog.at_level("WARNING", logger="cxr.dimse"):
        again = InstanceSpool(tmp_path)
    assert sorted(s.study_uid for s in again.studies()) == ["1.2.826.0.1.7", "1.2.826.0.1.8"]
    assert "dimse_spool_uid_repaired studies=2 unreadable=1" in caplog.text
    (first / "study_uid").write_text("")  # the next instance of the study, without a restart
    sop, data = _instance("1.2.826.0.1.7", 3)
    again.write("1.2.826.0.1.7", sop, data)
    assert (first / "study_uid").read_text() == "1.2.826.0.1.7"


def test_an_object_is_durable_in_the_outbox_when_put_returns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from serving.pacs.outbox import item_id
    from tests.unit.core.durable_support import Steps

    box = Outbox(tmp_path)
    recorder = Steps(tmp_path, monkeypatch)
    assert box.put("orthanc", "1.2.840.10008.5.1.4.1.1.88.33", "1.2.9", b"sr")
    iid = item_id("orthanc", "1.2.9")
    # the object and its meta on disk, their names in the folder, then the folder's own name: a
    # rename not yet on disk would leave a ".tmp-" folder that the next start deletes
    assert recorder.steps == [
        "fsync tmp/object.dcm", "fsync tmp/meta.json", "fsync tmp", f"rename tmp -> {iid}", "fsync .",
    ]  # fmt: skip
    recorder.steps.clear()
    assert not box.put("orthanc", "1.2.840.10008.5.1.4.1.1.88.33", "1.2.9", b"sr")
    assert recorder.steps == ["fsync ."], "'already queued' only once the first put's rename is on disk"
    assert not list(tmp_path.glob(".tmp-*"))


def test_an_object_queued_by_another_request_meanwhile_is_kept_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from core import durable  # where the outbox's files are written
    from serving.pacs.outbox import item_id

    box = Outbox(tmp_path)
    real_write = durable.write_synced

    def write_then_race(path: Path, data: bytes) -> None:
        real_write(path, data)
        if path.name == "meta.json":  # the other request's rename lands between our check and ours
            other = tmp_path / item_id("orthanc", "1.2.9")
            other.mkdir(exist_ok=True)
            (other / "object.dcm").write_bytes(b"theirs")

    monkeypatch.setattr(durable, "write_synced", write_then_race)
    assert not box.put("orthanc", "1.2.840.10008.5.1.4.1.1.88.33", "1.2.9", b"ours")
    assert [p.name for p in tmp_path.iterdir()] == [item_id("orthanc", "1.2.9")], "no .tmp- folder left"
    assert (tmp_path / item_id("orthanc", "1.2.9") / "object.dcm").read_bytes() == b"theirs"


def test_a_put_that_fails_leaves_no_temp_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from core import durable  # where the outbox's files are written

    box = Outbox(tmp_path)

    def full_disk(path: Path, data: bytes) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(durable, "write_synced", full_disk)
    with pytest.raises(OSError, match="No space"):
        box.put("orthanc", "1.2.840.10008.5.1.4.1.1.88.33", "1.2.9", b"sr")
    assert list(tmp_path.iterdir()) == []


def test_a_delivery_a_crash_cut_short_is_not_listed_and_is_cleared_at_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from core import durable

    box = Outbox(tmp_path)
    box.put("orthanc", "1.2.840.10008.5.1.4.1.1.88.33", "1.2.9", b"sr")
    box.put("orthanc", "1.2.840.10008.5.1.4.1.1.11.1", "1.2.10", b"pr")
    [first] = [i for i in box.items() if i.sop_instance_uid == "1.2.9"]
    (first.folder / ".tmp-meta").write_text("{}")  # a retry's meta a crash left half-way
    with monkeypatch.context() as crash:  # the crash: renamed, nothing deleted yet
        crash.setattr(durable.shutil, "rmtree", lambda *a, **k: None)
        box.delivered(first)
    # an item is listed whole or not at all: its meta without its object failed every pass
    assert [i.sop_instance_uid for i in box.items()] == ["1.2.10"]
    [second] = Outbox(tmp_path).items()
    assert second.sop_instance_uid == "1.2.10" and [p.name for p in tmp_path.iterdir()] == [second.item_id]
    assert sorted(p.name for p in second.folder.iterdir()) == ["meta.json", "object.dcm"]


def _sendback(tmp_path: Path, sender: Sender) -> SendBack:
    from serving.config import ServingSettings
    from serving.inference.cpu_pool import CpuPool
    from serving.metrics import GatewayMetrics

    settings = ServingSettings(
        stack_dir=tmp_path,
        outbox_retry_s=2.0,
        outbox_max_backoff_s=8.0,
        pacs_destinations=[
            {"name": "pacs", "kind": "stow", "url": "http://127.0.0.1:9/dicom-web", "callers": ["*"]}
        ],
    )
    return SendBack(settings, GatewayMetrics(), CpuPool(1), sender_factory=lambda d: sender)


class _Pacs:
    """A PACS that takes everything when up and nothing when down, counting the batches offered."""

    def __init__(self) -> None:
        self.up = False
        self.batches: list[int] = []

    def send(self, items: list[OutboxItem]) -> Sent:
        self.batches.append(len(items))
        return Sent(accepted={i.item_id for i in items} if self.up else set())


def test_a_pacs_that_takes_nothing_is_held_whole_not_offered_every_object_each_pass(tmp_path: Path) -> None:
    pacs = _Pacs()
    sendback = _sendback(tmp_path, pacs)
    for i in range(100):  # four batches of up to 32
        sendback.outbox.put("pacs", "1.2.840.10008.5.1.4.1.1.88.33", f"1.2.{i}", b"sr")
    now = time.time()
    assert sendback.deliver_due(now) == 0
    assert pacs.batches == [32], (
        "one batch refused: the other 68 objects are not offered to a PACS that is down"
    )
    untouched = [i for i in sendback.outbox.items() if i.attempts == 0]
    assert len(untouched) == 68, "and their items are not rewritten"
    assert sendback.next_pass_in(sendback.outbox.items(), now) == pytest.approx(2.0)
    assert sendback.deliver_due(now + 1.0) == 0 and pacs.batches == [32], "held: nothing offered"
    assert sendback.deliver_due(now + 2.5) == 0 and pacs.batches == [32, 32]
    assert sendback.next_pass_in(sendback.outbox.items(), now + 2.5) == pytest.approx(4.0), "the hold doubles"
    pacs.up = True
    assert sendback.deliver_due(now + 7.0) == 100 and pacs.batches == [32, 32, 32, 32, 32, 4]
    assert sendback.outbox.items() == [] and sendback.next_pass_in([], now + 7.0) is None


def test_a_pacs_that_refuses_one_object_is_not_held(tmp_path: Path) -> None:
    class RefusesOne(_Pacs):
        def send(self, items: list[OutboxItem]) -> Sent:
            self.batches.append(len(items))
            return Sent(accepted={i.item_id for i in items if i.sop_instance_uid != "1.2.0"})

    pacs = RefusesOne()
    sendback = _sendback(tmp_path, pacs)
    for i in range(40):
        sendback.outbox.put("pacs", "1.2.840.10008.5.1.4.1.1.88.33", f"1.2.{i}", b"sr")
    now = time.time()
    assert sendback.deliver_due(now) == 39 and pacs.batches == [32, 8]
    [left] = sendback.outbox.items()
    assert left.attempts == 1 and sendback.next_pass_in([left], now) == pytest.approx(2.0)
    sendback.outbox.put("pacs", "1.2.840.10008.5.1.4.1.1.88.33", "1.2.99", b"sr")
    # the new item is due from when it was put (a loaded machine may put it > 0.1 s after ``now``)
    [queued] = [i for i in sendback.outbox.items() if i.sop_instance_uid == "1.2.99"]
    assert queued.next_attempt < now + 2.0
    assert sendback.deliver_due(queued.next_attempt) == 1, "not held: a new object is offered at once"


def _answer(width: int = 96, height: int = 80, *boxes: list[float]) -> dict[str, Any]:
    """A detection response of the contract's shape, for a source of ``width`` x ``height``."""
    return {
        "request_id": "r",
        "model": {"name": "m", "version": "1", "stage": "production", "variant": "fp32"},
        "image": {"width": width, "height": height},
        "detections": [{"class_id": 0, "class_name": "x", "confidence": 0.5, "box": b} for b in boxes],
    }


def test_one_sr_is_never_built_from_two_patients_images(tmp_path: Path) -> None:
    """A worklist row of an older gateway may hold two patients' results under one study UID."""
    from pydicom.uid import generate_uid

    from serving.errors import StudyPatientMismatch
    from serving.results import ResultRecord
    from tests.unit.serving.serving_support import make_dicom

    back = _sendback(tmp_path, _Pacs())
    study = generate_uid()
    response = _answer()
    alice = ResultRecord("a", response, "dicom", make_dicom(seed=1, study_uid=study, patient_id="ALICE-1"))
    bob = ResultRecord("b", response, "dicom", make_dicom(seed=2, study_uid=study, patient_id="BOB-2"))
    assert back.build([alice], None)  # one patient: its SR and presentation state
    with pytest.raises(StudyPatientMismatch):
        back.build([alice, bob], None)


def test_an_image_no_object_can_reference_is_left_out_and_the_others_go(tmp_path: Path) -> None:
    """A source without SeriesInstanceUID used to fail the whole study's objects."""
    from pydicom.uid import generate_uid

    from serving.results import ResultRecord
    from tests.unit.serving.serving_support import make_dicom

    back = _sendback(tmp_path, _Pacs())
    study = generate_uid()
    response = _answer()
    ds = pydicom.dcmread(io.BytesIO(make_dicom(seed=3, study_uid=study)))
    del ds.SeriesInstanceUID
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    good = ResultRecord("a", response, "dicom", make_dicom(seed=4, study_uid=study))
    bad = ResultRecord("b", response, "dicom", buf.getvalue())
    objects = back.build([bad, good], None)
    assert [str(o.Modality) for o in objects] == ["SR", "PR"]  # the good image's SR and presentation state


def test_a_send_back_holds_a_stored_results_header_not_its_pixels(tmp_path: Path) -> None:
    """The study's earlier results are read back header-only: the objects are the same, the bytes few."""
    from datetime import timedelta

    from pydicom.uid import generate_uid

    from serving.results import ResultRecord, ResultStore, Retention
    from tests.unit.serving.serving_support import make_dicom

    back = _sendback(tmp_path, _Pacs())
    store = ResultStore(
        None, local_dir=tmp_path / "results", retention=Retention(timedelta(days=1), timedelta(days=1))
    )
    study = generate_uid()
    source = make_dicom(512, 512, seed=5, study_uid=study)
    response = _answer(512, 512, [1.0, 1.0, 40.0, 40.0])
    store.journal(ResultRecord("r1", response, "dicom", source, tenant="t"))
    light, header = back._fetch_header_only(store, "r1", "t")
    assert light.source is None and header is not None and "PixelData" not in header
    full, header_only = back.build([store.get("r1", "t")], None), back.build([light], None, {"r1": header})
    assert [str(o.SOPInstanceUID) for o in full] == [str(o.SOPInstanceUID) for o in header_only]
    assert [o.ContentSequence for o in full[:1]] == [o.ContentSequence for o in header_only[:1]]


def test_a_pacs_down_for_days_keeps_its_backoff_capped_instead_of_overflowing(tmp_path: Path) -> None:
    """``retry_s * 2**attempts`` is a float: past ~1024 failures (3.5 days at the 5-minute cap) it raised
    OverflowError, so the item's next try was never written, the pass died, and the loop offered the
    same batch again every second, for ever, to a PACS still down."""
    import dataclasses

    pacs = _Pacs()
    sendback = _sendback(tmp_path, pacs)
    sendback.outbox.put("pacs", "1.2.840.10008.5.1.4.1.1.88.33", "1.2.1", b"sr")
    now = time.time()
    [item] = sendback.outbox.items()
    assert sendback.outbox.failed(dataclasses.replace(item, attempts=5000), now) == 8.0
    [item] = sendback.outbox.items()
    assert item.attempts == 5001 and item.next_attempt == pytest.approx(now + 8.0)
    sendback._hold["pacs"] = (0.0, 5000)  # held that many passes in a row
    assert sendback.deliver_due(now + 10.0) == 0 and pacs.batches == [1]
    assert sendback._hold["pacs"][0] == pytest.approx(now + 18.0), "held for the capped backoff"


def test_one_item_with_a_broken_meta_does_not_stop_delivery_of_every_other(tmp_path: Path) -> None:
    """A meta.json that is JSON but not an item's (``null``, a field missing: a disk error, an operator's
    edit) raised KeyError/TypeError from the listing: every pass failed, for every destination."""
    pacs = _Pacs()
    pacs.up = True
    sendback = _sendback(tmp_path, pacs)
    for i in range(3):
        sendback.outbox.put("pacs", "1.2.840.10008.5.1.4.1.1.88.33", f"1.2.{i}", b"sr")
    broken, missing, good = sendback.outbox.items()
    (broken.folder / "meta.json").write_text("null")
    (missing.folder / "meta.json").write_text('{"destination": "pacs"}')
    assert [i.item_id for i in sendback.outbox.items()] == [good.item_id]
    assert sendback.deliver_due(time.time()) == 1 and pacs.batches == [1]


def test_a_retry_time_a_clock_stepped_back_left_far_ahead_is_not_waited_for(tmp_path: Path) -> None:
    """Retry times are wall-clock (they outlive a restart). A clock set ahead (a bad RTC at boot), then
    stepped back by NTP, left items due days or years ahead: no retry is ever further off than the
    maximum backoff, so one further off is due within that."""
    import json

    box = Outbox(tmp_path, retry_s=2.0, max_backoff_s=300.0)
    box.put("pacs", "1.2.840.10008.5.1.4.1.1.88.33", "1.2.1", b"sr")
    [item] = box.items()
    meta = json.loads((item.folder / "meta.json").read_text())
    meta["next_attempt"] = time.time() + 365 * 86400.0  # scheduled while the clock was a year ahead
    (item.folder / "meta.json").write_text(json.dumps(meta))
    now = time.time()
    [item] = box.items()
    assert item.next_attempt <= now + 300.0 + 1.0
    assert [i.item_id for i in box.due(now + 301.0)] == [item.item_id]


def test_a_removed_destinations_gauges_fall_to_zero_once_its_objects_are_gone(tmp_path: Path) -> None:
    """The gauges were set only for configured destinations and those with items: a removed destination's
    stayed at its last value once an operator deleted its objects, its backlog alert firing for ever."""
    pacs = _Pacs()
    sendback = _sendback(tmp_path, pacs)
    sendback.outbox.put("old-pacs", "1.2.840.10008.5.1.4.1.1.88.33", "1.2.1", b"sr")
    sendback._set_depth(*sendback._listing())

    def depth() -> float | None:
        return sendback.metrics.registry.get_sample_value(
            "cxr_pacs_outbox_depth", {"destination": "old-pacs"}
        )

    assert depth() == 1.0
    [item] = sendback.outbox.items()
    sendback.outbox.delivered(item)  # the operator gave them up
    sendback._set_depth(*sendback._listing())
    assert depth() == 0.0


def test_a_destination_held_before_the_clock_stepped_back_is_not_held_for_the_step(tmp_path: Path) -> None:
    pacs = _Pacs()
    pacs.up = True
    sendback = _sendback(tmp_path, pacs)
    sendback.outbox.put("pacs", "1.2.840.10008.5.1.4.1.1.88.33", "1.2.1", b"sr")
    now = time.time()
    sendback._hold["pacs"] = (now + 86400.0, 3)  # set while the clock was a day ahead
    assert not sendback._held("pacs", now)
    assert sendback.deliver_due(now) == 1 and pacs.batches == [1]
    sendback._hold["pacs"] = (now + 5.0, 1)
    assert sendback._held("pacs", now), "a hold within the maximum backoff stands"
