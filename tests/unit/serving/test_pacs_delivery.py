"""Delivery from the outbox, per object: what a PACS stored goes, what it refuses for good is set aside.

A PACS that does not store one SOP class (an older one without Comprehensive SR) used to wedge
its destination: pynetdicom raised for the SR's rejected presentation context, the whole batch
was marked failed (the objects already stored included), the destination was held, and the same
first batch failed on every pass. Here against a real pynetdicom storage SCP and a real HTTP
STOW-RS server on 127.0.0.1.
"""

from __future__ import annotations

import io
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pydicom
import pytest

from serving.pacs.outbox import Outbox
from serving.pacs.sendback import SendBack

pytestmark = pytest.mark.unit

CR = "1.2.840.10008.5.1.4.1.1.1"
GSPS = "1.2.840.10008.5.1.4.1.1.11.1"
COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"


def _sendback(tmp_path: Path, destination: dict[str, Any]) -> SendBack:
    from serving.config import ServingSettings
    from serving.inference.cpu_pool import CpuPool
    from serving.metrics import GatewayMetrics

    settings = ServingSettings(
        stack_dir=tmp_path,
        outbox_retry_s=2.0,
        outbox_max_backoff_s=8.0,
        pacs_destinations=[{"name": "pacs", "callers": ["*"], "timeout_s": 10.0} | destination],
    )
    return SendBack(settings, GatewayMetrics(), CpuPool(1))


def _queue_study(back: SendBack, images: int = 2) -> list[Any]:
    """A real study's objects (one SR, one GSPS per image) queued for the destination ``pacs``."""
    from pydicom.uid import generate_uid

    from serving.results import ResultRecord
    from tests.unit.serving.serving_support import make_dicom

    study = generate_uid()
    response = {
        "request_id": "r",
        "model": {"name": "m", "version": "1", "stage": "production", "variant": "fp32"},
        "image": {"width": 96, "height": 80},
        "detections": [
            {"class_id": 0, "class_name": "Nodule/Mass", "confidence": 0.8, "box": [4, 4, 30, 30]}
        ],
    }
    records = [
        ResultRecord(f"r{i}", response, "dicom", make_dicom(seed=i, study_uid=study)) for i in range(images)
    ]
    objects = back.build(records, None)
    assert sorted(str(o.SOPClassUID) for o in objects) == [GSPS] * images + [COMPREHENSIVE_SR]
    assert back._queue(objects, list(back.destinations.values())) == len(objects)
    return objects


def _sample(back: SendBack, name: str, **labels: str) -> float:
    return back.metrics.registry.get_sample_value(name, {"destination": "pacs", **labels}) or 0.0


# ----------------------------------------------------------------------------- DIMSE


class _Scp:
    """A pynetdicom storage SCP on 127.0.0.1 taking CR and GSPS, not Comprehensive SR."""

    def __init__(
        self,
        on_store: Callable[[Any, int], int] | None = None,
        sop_classes: tuple = (CR, GSPS),
        transfer_syntaxes: list[str] | None = None,
    ):
        from pynetdicom import AE, DEFAULT_TRANSFER_SYNTAXES, evt

        self.stored: list[str] = []  # SOP classes of the objects it stored
        self.associations = 0
        self._on_store = on_store or (lambda event, n: 0x0000)
        ae = AE(ae_title="PACS")
        for uid in sop_classes:
            ae.add_supported_context(uid, transfer_syntaxes or DEFAULT_TRANSFER_SYNTAXES)
        handlers = [(evt.EVT_C_STORE, self._store), (evt.EVT_ESTABLISHED, self._established)]
        self.server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=handlers)
        self.port = self.server.server_address[1]

    def _established(self, event: Any) -> None:
        self.associations += 1

    def _store(self, event: Any) -> int:
        status = self._on_store(event, len(self.stored))
        if status == 0x0000:
            self.stored.append(str(event.request.AffectedSOPClassUID))
        return status

    def destination(self) -> dict[str, Any]:
        return {"kind": "dimse", "ae_title": "PACS", "host": "127.0.0.1", "port": self.port, "callers": ["*"]}

    def close(self) -> None:
        self.server.shutdown()


@contextmanager
def _scp(**kwargs: Any) -> Iterator[_Scp]:
    scp = _Scp(**kwargs)
    try:
        yield scp
    finally:
        scp.close()


def test_a_dimse_pacs_without_comprehensive_sr_takes_the_presentation_states_and_the_sr_is_set_aside(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with _scp() as scp:
        back = _sendback(tmp_path, scp.destination())
        objects = _queue_study(back, images=2)
        now = time.time()
        with caplog.at_level(logging.INFO, logger="serving.pacs"):
            assert back.deliver_due(now) == 2, "the PACS stored both presentation states"
        assert sorted(scp.stored) == [GSPS, GSPS]
        assert back.outbox.items() == [], "nothing left to retry: the SR is not offered again"
        [dead] = back.outbox.dead_letters()
        assert dead.sop_class_uid == COMPREHENSIVE_SR and dead.destination == "pacs"
        meta = json.loads((dead.folder / "meta.json").read_text())
        assert meta["refused"]["reason"] == "no_presentation_context"
        assert (dead.folder / "object.dcm").read_bytes(), "kept on disk for an operator"
        assert not back._held("pacs", now), "a SOP class the PACS does not store does not hold it"
        assert _sample(back, "cxr_pacs_outbox_sent_total", outcome="delivered") == 2
        assert _sample(back, "cxr_pacs_outbox_sent_total", outcome="refused") == 1
        assert _sample(back, "cxr_pacs_outbox_sent_total", outcome="retry") == 0
        back._set_depth(*back._listing())
        assert _sample(back, "cxr_pacs_outbox_dead_letters") == 1
        assert _sample(back, "cxr_pacs_outbox_depth") == 0
        # the log names the destination and the SOP class, never an instance UID (patient data's key)
        ours = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("serving.pacs"))
        assert f"pacs_outbox_dead_letter destination=pacs sop_class={COMPREHENSIVE_SR}" in ours
        for ds in objects:
            assert str(ds.SOPInstanceUID) not in ours and str(ds.StudyInstanceUID) not in ours
        associations = scp.associations
        assert back.deliver_due(now + 1000.0) == 0, "a second pass offers nothing again"
        assert scp.associations == associations and sorted(scp.stored) == [GSPS, GSPS]


def test_a_dimse_association_aborted_mid_batch_keeps_what_was_stored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """pynetdicom raises RuntimeError for a C-STORE after an abort: the earlier objects still count."""
    from pynetdicom.association import Association

    real_send = Association.send_c_store

    def send_c_store(self: Association, *args: Any, **kwargs: Any) -> Any:
        status = real_send(self, *args, **kwargs)
        deadline = time.monotonic() + 5.0
        while not status and self.is_established and time.monotonic() < deadline:
            time.sleep(0.01)  # no answer: let the abort land before the next call, as it does on a slow link
        return status

    monkeypatch.setattr(Association, "send_c_store", send_c_store)
    aborting = True

    def on_store(event: Any, stored: int) -> int:
        if aborting and stored == 1:  # the second object: the PACS goes away before it answers
            event.assoc.abort()
            return 0xA700
        return 0x0000

    with _scp(on_store=on_store, sop_classes=(CR, GSPS, COMPREHENSIVE_SR)) as scp:
        back = _sendback(tmp_path, scp.destination())
        _queue_study(back, images=3)
        now = time.time()
        assert back.deliver_due(now) == 1, "the object stored before the abort is delivered"
        left = back.outbox.items()
        assert len(left) == 3 and all(i.attempts == 1 for i in left), "the rest is retried"
        assert back.outbox.dead_letters() == [], "an abort is not a refusal"
        assert not back._held("pacs", now), "the PACS took something: not held"
        aborting = False
        assert back.deliver_due(now + 2.5) == 3 and back.outbox.items() == []
        assert len(scp.stored) == 4


def test_a_dimse_status_retrying_cannot_change_is_set_aside_and_out_of_resources_is_retried(
    tmp_path: Path,
) -> None:
    full = True

    def on_store(event: Any, stored: int) -> int:
        if str(event.request.AffectedSOPClassUID) == COMPREHENSIVE_SR:
            return 0xC000  # cannot understand: the same answer every time
        return 0xA700 if full else 0x0000  # out of resources: worth another try

    with _scp(on_store=on_store, sop_classes=(CR, GSPS, COMPREHENSIVE_SR)) as scp:
        back = _sendback(tmp_path, scp.destination())
        _queue_study(back, images=2)
        now = time.time()
        assert back.deliver_due(now) == 0
        assert [i.sop_class_uid for i in back.outbox.items()] == [GSPS, GSPS], "the SR is not retried"
        [dead] = back.outbox.dead_letters()
        assert dead.sop_class_uid == COMPREHENSIVE_SR
        assert json.loads((dead.folder / "meta.json").read_text())["refused"]["reason"] == "status=0xC000"
        assert not back._held("pacs", now), "the PACS answered: its items back off one by one"
        full = False
        assert back.deliver_due(now + 2.5) == 2 and back.outbox.items() == []
        assert len(back.outbox.dead_letters()) == 1


def test_a_pacs_that_already_holds_an_instance_and_says_so_has_it_delivered(tmp_path: Path) -> None:
    """0x0111 "duplicate SOP instance", the answer of some PACS to an object sent twice (an answer
    lost, or a hand-off between replicas): ours are the same object under the same UID, so the
    PACS holds it. Before, DIMSE retried it for ever and STOW-RS too; neither is a dead letter."""

    def on_store(event: Any, stored: int) -> int:
        return 0x0111 if str(event.request.AffectedSOPClassUID) == COMPREHENSIVE_SR else 0x0000

    with _scp(on_store=on_store, sop_classes=(CR, GSPS, COMPREHENSIVE_SR)) as scp:
        back = _sendback(tmp_path / "dimse", scp.destination())
        _queue_study(back, images=2)
        assert back.deliver_due(time.time()) == 3
        assert back.outbox.items() == [] and back.outbox.dead_letters() == []
    with _stow_pacs(_refusing({COMPREHENSIVE_SR: 0x0111})) as seen:
        back = _sendback(tmp_path / "stow", _stow(seen.pop(0)))
        _queue_study(back, images=2)
        assert back.deliver_due(time.time()) == 3 and seen == [3]
        assert back.outbox.items() == [] and back.outbox.dead_letters() == []


def test_a_dimse_pacs_that_is_down_is_held_and_nothing_is_set_aside(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    back = _sendback(
        tmp_path, {"kind": "dimse", "ae_title": "PACS", "host": "127.0.0.1", "port": port, "callers": ["*"]}
    )
    _queue_study(back, images=1)
    now = time.time()
    assert back.deliver_due(now) == 0
    assert back.outbox.dead_letters() == [] and len(back.outbox.items()) == 2
    assert back._held("pacs", now + 1.0)


def test_a_dimse_pacs_taking_only_implicit_vr_little_endian_stores_everything(tmp_path: Path) -> None:
    """Implicit VR Little Endian is the one transfer syntax every DICOM SCP must take (PS3.5 10.1).
    Only Explicit VR Little Endian was proposed: such a PACS accepted no context, the association
    never carried anything, and the destination was held for ever."""
    from pydicom.uid import ImplicitVRLittleEndian

    with _scp(sop_classes=(CR, GSPS, COMPREHENSIVE_SR), transfer_syntaxes=[ImplicitVRLittleEndian]) as scp:
        back = _sendback(tmp_path, scp.destination())
        _queue_study(back, images=2)
        assert back.deliver_due(time.time()) == 3
        assert sorted(scp.stored) == sorted([COMPREHENSIVE_SR, GSPS, GSPS])
        assert back.outbox.items() == [] and back.outbox.dead_letters() == []


# ----------------------------------------------------------------------------- STOW-RS


@contextmanager
def _stow_pacs(answer: Callable[[list[tuple[str, str]]], tuple[int, bytes, str]]) -> Iterator[list[int]]:
    """A STOW-RS server on 127.0.0.1: ``answer`` gets (SOP class, SOP instance) per part received."""
    from serving.dicom.stow import split_related

    batches: list[int] = []

    class Pacs(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            parts = split_related(self.headers["Content-Type"], body)
            received = []
            for part in parts:
                ds = pydicom.dcmread(io.BytesIO(part), stop_before_pixels=True)
                received.append((str(ds.SOPClassUID), str(ds.SOPInstanceUID)))
            batches.append(len(received))
            status, payload, content_type = answer(received)
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Pacs)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        batches.append(server.server_address[1])  # the port first; the batch sizes after it
        yield batches
    finally:
        server.shutdown()
        server.server_close()


def _refusing(reasons: dict[str, int]) -> Callable[[list[tuple[str, str]]], tuple[int, bytes, str]]:
    """A PACS answering each instance by its SOP class: a failure reason, else stored (200/202/409)."""
    from serving.dicom.stow import StowOutcome, stow_response, stow_status

    def answer(received: list[tuple[str, str]]) -> tuple[int, bytes, str]:
        outcomes = [StowOutcome(cls, uid, failure_reason=reasons.get(cls)) for cls, uid in received]
        body = json.dumps(stow_response(outcomes, None)).encode()
        return stow_status(outcomes), body, "application/dicom+json"

    return answer


def _stow(port: int) -> dict[str, Any]:
    return {"kind": "stow", "url": f"http://127.0.0.1:{port}/dicom-web", "callers": ["*"]}


def test_a_stow_pacs_answering_a_redirect_has_nothing_sent_on_and_its_objects_wait(tmp_path: Path) -> None:
    """Before, requests followed a 307 to the host it named, sending the study's objects (the
    patient's identity) and the destination's auth header there."""
    with _stow_pacs(_refusing({})) as elsewhere:
        other = elsewhere.pop(0)

        class Redirecting(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                self.send_response(307)
                self.send_header("Location", f"http://127.0.0.1:{other}/dicom-web/studies")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Redirecting)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            back = _sendback(tmp_path, _stow(server.server_address[1]))
            _queue_study(back, images=1)
            assert back.deliver_due(time.time()) == 0
        finally:
            server.shutdown()
            server.server_close()
        assert elsewhere == [], "the objects went to the host the redirect named"
        assert len(back.outbox.items()) == 2 and back.outbox.dead_letters() == []


def test_a_stow_pacs_that_fails_the_sr_in_a_202_delivers_the_rest_and_sets_the_sr_aside(
    tmp_path: Path,
) -> None:
    with _stow_pacs(_refusing({COMPREHENSIVE_SR: 0x0122})) as seen:
        back = _sendback(tmp_path, _stow(seen.pop(0)))
        _queue_study(back, images=2)
        now = time.time()
        assert back.deliver_due(now) == 2 and seen == [3]
        assert back.outbox.items() == [] and not back._held("pacs", now), "the SR is not retried"
        [dead] = back.outbox.dead_letters()
        assert dead.sop_class_uid == COMPREHENSIVE_SR
        assert json.loads((dead.folder / "meta.json").read_text())["refused"]["reason"] == (
            "failure_reason=0x0122"
        )
        assert back.deliver_due(now + 1000.0) == 0 and seen == [3], "a second pass offers nothing again"


def test_a_stow_409_says_per_instance_what_is_set_aside_and_what_is_retried(tmp_path: Path) -> None:
    """409: nothing stored. The SR's SOP class is not stored there (for good), the PACS is out of
    resources for the presentation states (worth another try)."""
    with _stow_pacs(_refusing({COMPREHENSIVE_SR: 0xA900, GSPS: 0xA700})) as seen:
        back = _sendback(tmp_path, _stow(seen.pop(0)))
        _queue_study(back, images=2)
        now = time.time()
        assert back.deliver_due(now) == 0 and seen == [3]
        assert not back._held("pacs", now), "the PACS answered: its items back off one by one"
        left = back.outbox.items()
        assert [i.sop_class_uid for i in left] == [GSPS, GSPS] and all(i.attempts == 1 for i in left)
        assert [i.sop_class_uid for i in back.outbox.dead_letters()] == [COMPREHENSIVE_SR]


def test_a_stow_pacs_out_of_resources_for_everything_is_held_and_nothing_is_set_aside(tmp_path: Path) -> None:
    with _stow_pacs(_refusing({COMPREHENSIVE_SR: 0xA700, GSPS: 0xA700})) as seen:
        back = _sendback(tmp_path, _stow(seen.pop(0)))
        _queue_study(back, images=1)
        now = time.time()
        assert back.deliver_due(now) == 0
        assert back.outbox.dead_letters() == [] and len(back.outbox.items()) == 2
        assert back._held("pacs", now + 1.0)


def test_a_stow_pacs_answering_5xx_is_held_whatever_its_body_says(tmp_path: Path) -> None:
    def down(received: list[tuple[str, str]]) -> tuple[int, bytes, str]:
        _, body, ctype = _refusing({COMPREHENSIVE_SR: 0xC000, GSPS: 0xC000})(received)
        return 503, body, ctype

    with _stow_pacs(down) as seen:
        back = _sendback(tmp_path, _stow(seen.pop(0)))
        _queue_study(back, images=1)
        now = time.time()
        assert back.deliver_due(now) == 0
        assert back.outbox.dead_letters() == [] and len(back.outbox.items()) == 2
        assert back._held("pacs", now + 1.0)


# ----------------------------------------------------------------------------- the dead letters on disk


def test_a_dead_letter_is_kept_across_restarts_and_an_operator_requeues_it_by_moving_it_back(
    tmp_path: Path,
) -> None:
    box = Outbox(tmp_path)
    box.put("pacs", COMPREHENSIVE_SR, "1.2.9", b"sr")
    box.put("pacs", GSPS, "1.2.10", b"pr")
    [sr] = [i for i in box.items() if i.sop_instance_uid == "1.2.9"]
    box.refused(sr, "no_presentation_context")
    assert [i.sop_instance_uid for i in box.items()] == ["1.2.10"]
    assert box.depth() == {"pacs": 1}
    [dead] = Outbox(tmp_path).dead_letters()  # a restarted gateway
    assert dead.item_id == sr.item_id and dead.data() == b"sr"
    assert dead.folder == tmp_path / "dead-letter" / sr.item_id
    # analysed again meanwhile: queued again, refused again: one dead letter, the newer one
    assert box.put("pacs", COMPREHENSIVE_SR, "1.2.9", b"sr2")
    [again] = [i for i in box.items() if i.sop_instance_uid == "1.2.9"]
    box.refused(again, "no_presentation_context")
    [dead] = box.dead_letters()
    assert dead.data() == b"sr2"
    # the operator's retry: the folder moved back into the outbox is due at once
    dead.folder.rename(tmp_path / dead.item_id)
    assert box.dead_letters() == []
    [back] = [i for i in box.due() if i.sop_instance_uid == "1.2.9"]
    assert back.data() == b"sr2"
    assert not list(tmp_path.rglob(".tmp-*"))


def test_dead_letters_older_than_the_retention_are_deleted_and_waiting_items_never_are(
    tmp_path: Path,
) -> None:
    box = Outbox(tmp_path)
    for uid in ("1.2.9", "1.2.10", "1.2.11"):
        box.put("pacs", COMPREHENSIVE_SR, uid, b"sr with the patient's name")
    old, new, waiting = sorted(box.items(), key=lambda i: i.sop_instance_uid)
    box.refused(old, "no_presentation_context")
    box.refused(new, "no_presentation_context")
    month = 30 * 86400.0
    aged = box.dead_letter / old.item_id / "meta.json"
    aged.write_text(json.dumps({**json.loads(aged.read_text()), "created": time.time() - month - 60}))
    damaged = box.dead_letter / new.item_id / "meta.json"
    damaged.write_text("")  # dated by its folder's mtime instead: now
    assert box.purge_dead_letters(month) == 1
    assert [d.item_id for d in box.dead_letters()] == [] and (box.dead_letter / new.item_id).is_dir()
    assert [i.item_id for i in box.items()] == [waiting.item_id], "what a PACS may still take stays"
    assert box.purge_dead_letters(month, now=time.time() + month + 1) == 1
    assert not (box.dead_letter / new.item_id).exists()
    assert [i.item_id for i in box.items()] == [waiting.item_id]


def test_a_stow_pacs_whose_body_limit_a_batch_exceeds_takes_the_objects_that_fit(tmp_path: Path) -> None:
    """A proxy in front of the PACS with a body limit (nginx: 1 MiB) answers 413 to a batch however small
    each object is: the destination was held, and the same batch offered again, for ever. The batch is
    split until each object goes alone; an object the PACS refuses even alone is set aside."""

    def limited(received: list[tuple[str, str]]) -> tuple[int, bytes, str]:
        if len(received) > 1 or received[0][0] == COMPREHENSIVE_SR:  # the SR is "too large" even alone
            return 413, b"<html>413 Request Entity Too Large</html>", "text/html"
        return _refusing({})(received)

    with _stow_pacs(limited) as seen:
        back = _sendback(tmp_path, _stow(seen.pop(0)))
        _queue_study(back, images=2)
        now = time.time()
        assert back.deliver_due(now) == 2
        assert back.outbox.items() == [] and not back._held("pacs", now)
        [dead] = back.outbox.dead_letters()
        assert dead.sop_class_uid == COMPREHENSIVE_SR
        assert json.loads((dead.folder / "meta.json").read_text())["refused"]["reason"] == "http_status=413"


# ----------------------------------------------------------------------------- what no retry can change


def test_a_bare_stow_400_sets_aside_the_object_the_pacs_cannot_read_and_the_rest_goes(tmp_path: Path) -> None:
    """A PACS that cannot parse one object answers 400 to its whole request, without a Store
    Instances Response. Before, that was a PACS that is down: the destination was held and the same
    batch offered again, for ever, so no other study's results reached that PACS either."""

    def picky(received: list[tuple[str, str]]) -> tuple[int, bytes, str]:
        if any(cls == COMPREHENSIVE_SR for cls, _ in received):
            return 400, b"<html>400 Bad Request</html>", "text/html"
        return _refusing({})(received)

    with _stow_pacs(picky) as seen:
        back = _sendback(tmp_path, _stow(seen.pop(0)))
        _queue_study(back, images=2)
        now = time.time()
        assert back.deliver_due(now) == 2, "both presentation states reached the PACS"
        assert back.outbox.items() == [] and not back._held("pacs", now)
        [dead] = back.outbox.dead_letters()
        assert dead.sop_class_uid == COMPREHENSIVE_SR
        assert json.loads((dead.folder / "meta.json").read_text())["refused"]["reason"] == "http_status=400"


def test_a_stow_404_is_a_setting_to_fix_so_everything_waits_and_nothing_is_set_aside(tmp_path: Path) -> None:
    """A wrong URL answers 404 to every object alike: splitting or setting aside would empty the
    outbox into dead letters for an admin's typo."""
    with _stow_pacs(lambda received: (404, b"not found", "text/plain")) as seen:
        back = _sendback(tmp_path, _stow(seen.pop(0)))
        _queue_study(back, images=2)
        now = time.time()
        assert back.deliver_due(now) == 0 and seen == [3], "one request, not split"
        assert back.outbox.dead_letters() == [] and len(back.outbox.items()) == 3
        assert back._held("pacs", now + 1.0)


def _spoil(back: SendBack, sop_class: str) -> None:
    """Overwrite the queued object of ``sop_class`` (one only) with bytes that are not DICOM."""
    [item] = [i for i in back.outbox.items() if i.sop_class_uid == sop_class]
    (item.folder / "object.dcm").write_bytes(b"not a DICOM file at all")


@pytest.mark.parametrize("kind", ["stow", "dimse"])
def test_an_object_unreadable_on_disk_is_set_aside_and_never_holds_its_destination(
    tmp_path: Path, kind: str
) -> None:
    """Before, it was retried for ever (reading it again gives the same), and once it was due alone
    (its own backoff) STOW-RS sent nothing, which held the whole destination as if its PACS were down."""
    with _stow_pacs(_refusing({})) as seen, _scp(sop_classes=(CR, GSPS, COMPREHENSIVE_SR)) as scp:
        port = seen.pop(0)
        back = _sendback(tmp_path, _stow(port) if kind == "stow" else scp.destination())
        _queue_study(back, images=1)
        _spoil(back, COMPREHENSIVE_SR)
        now = time.time()
        assert back.deliver_due(now) == 1, "the presentation state went"
        assert back.outbox.items() == [] and not back._held("pacs", now)
        [dead] = back.outbox.dead_letters()
        reason = json.loads((dead.folder / "meta.json").read_text())["refused"]["reason"]
        assert dead.sop_class_uid == COMPREHENSIVE_SR and reason.split("=")[0] in {
            "object_unreadable",
            "send_error",
        }
        # alone in its batch, as when it is due after its backoff: set aside, and nothing is held
        _queue_study(back, images=1)
        for item in back.outbox.items():
            if item.sop_class_uid == GSPS:
                back.outbox.delivered(item)
        _spoil(back, COMPREHENSIVE_SR)
        later = time.time()
        assert back.deliver_due(later) == 0
        assert back.outbox.items() == [] and len(back.outbox.dead_letters()) == 2
        assert not back._held("pacs", later)


def test_an_item_whose_meta_cannot_be_read_is_gauged_as_a_dead_letter_and_logged_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Before, it was skipped without a word or a metric: never delivered, never seen."""
    with _stow_pacs(_refusing({})) as seen:
        back = _sendback(tmp_path, _stow(seen.pop(0)))
        _queue_study(back, images=1)
        [waiting, _] = back.outbox.items()
        (waiting.folder / "meta.json").write_text("{")
        with caplog.at_level(logging.WARNING, logger="serving.pacs"):
            for _ in range(3):  # three passes of the delivery loop
                back._set_depth(*back._listing())
        lines = [r.getMessage() for r in caplog.records if "pacs_outbox_unreadable" in r.getMessage()]
        assert lines == [
            f"pacs_outbox_unreadable folder=outbox item={waiting.item_id} error_type=JSONDecodeError"
        ]
        assert _sample(back, "cxr_pacs_outbox_depth") == 1
        assert (
            back.metrics.registry.get_sample_value(
                "cxr_pacs_outbox_dead_letters", {"destination": "(unreadable)"}
            )
            == 1
        )
        # an operator deletes it: the gauge falls back to 0 instead of firing its alert for ever
        discard = waiting.folder
        for f in discard.iterdir():
            f.unlink()
        discard.rmdir()
        back._set_depth(*back._listing())
        assert (
            back.metrics.registry.get_sample_value(
                "cxr_pacs_outbox_dead_letters", {"destination": "(unreadable)"}
            )
            == 0
        )
