"""What must never stay in the SCP's spool for ever: a study that never settles, an instance the gateway
can never take, a study that grows without end, and what a failed write leaves behind."""

from __future__ import annotations

import errno
import hashlib
import io
import json
import logging
import os
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pydicom
import pytest
from fastapi.testclient import TestClient
from pydicom.uid import generate_uid

from core import durable
from serving.config import ServingSettings
from serving.dimse.forwarder import Forwarder, related_body
from serving.dimse.scp import ScpConfig, StorageScp
from serving.dimse.service import build
from serving.dimse.spool import InstanceSpool
from tests.unit.serving.dimse_support import GSPS_CLASS, SR_CLASS, down_pacs_gateway, sent_back
from tests.unit.serving.serving_support import make_dicom

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def gateway(
    onnx_model: Path, gitops_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[TestClient, ServingSettings]]:
    """An in-process gateway whose one PACS is down: what it sends back stays in its outbox to be read."""
    with down_pacs_gateway(onnx_model, gitops_dir, tmp_path_factory.mktemp("limits")) as pair:
        yield pair


def _instance(study: str, seed: int) -> tuple[str, bytes]:
    data = make_dicom(seed=seed, study_uid=study)
    return str(pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True).SOPInstanceUID), data


def _began_long_ago(spool: InstanceSpool, seconds: float) -> None:
    """Every file of the spool written ``seconds`` ago (before any analysis: markers name the mtime)."""
    then = time.time() - seconds
    for f in spool.studies_dir.glob("*/*"):
        os.utime(f, (then, then))


# --- 1. a study that never settles ---------------------------------------------------------------


def test_a_study_that_never_settles_is_sent_back_once_its_first_arrival_is_old_enough(
    gateway: tuple[TestClient, ServingSettings], tmp_path: Path
) -> None:
    """The sender resends an instance within the settle time for ever: the study's results go back all
    the same, what arrived so far analysed and sent back in one step (a resend would otherwise keep an
    instance pending at every look), and the spool does not keep the study."""
    client, settings = gateway
    spool = InstanceSpool(tmp_path)
    forwarder = Forwarder(spool, gateway_url="", api_key="", settle_s=5.0)  # the default maximum wait: 300 s
    study = generate_uid()
    instances = [_instance(study, seed) for seed in (71, 72)]
    for sop, data in instances:
        spool.write(study, sop, data)
    sops = [sop for sop, _ in instances]
    _began_long_ago(spool, 600)
    spool.write(study, *instances[0])  # sent again just now (a new copy), as every few seconds
    [waiting] = spool.studies()
    assert time.time() - waiting.last_arrival < 5.0  # never settled
    assert forwarder.forward(client, waiting)
    assert spool.studies() == []
    assert sent_back(settings, sops) == {SR_CLASS: 1, GSPS_CLASS: 2}


def test_instances_arriving_while_an_overdue_study_is_sent_back_form_its_next_round(
    gateway: tuple[TestClient, ServingSettings], tmp_path: Path
) -> None:
    client, settings = gateway
    spool = InstanceSpool(tmp_path)
    forwarder = Forwarder(spool, gateway_url="", api_key="", settle_s=5.0)  # the default maximum wait: 300 s
    study = generate_uid()
    sop, data = _instance(study, 74)
    spool.write(study, sop, data)
    _began_long_ago(spool, 600)
    [overdue] = forwarder.due(time.time())
    resent_at = time.time()
    spool.write(study, sop, data)  # sent again (a new copy) while the study is handed over
    assert forwarder.forward(client, overdue)
    assert sent_back(settings, [sop]) == {SR_CLASS: 1, GSPS_CLASS: 1}
    # the new copy stays: the study's next round, which began with it (not 600 s ago: not overdue)
    [later] = spool.studies()
    assert len(later.pending) == 1 and later.first_arrival >= resent_at - 1
    now = time.time()
    assert forwarder.forward(client, later)  # analysed at once, its results wait for it to settle
    [analysed] = spool.studies()
    assert analysed.pending == () and forwarder.due(now) == []
    [settled] = forwarder.due(now + 10)
    assert forwarder.forward(client, settled) and spool.studies() == []


def test_a_study_beyond_the_instance_cap_is_refused_with_out_of_resources_and_counts_only(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from serving.dimse.spool import StudyFull

    scp = StorageScp(ScpConfig("CXR", "127.0.0.1", 11112), InstanceSpool(tmp_path, max_study_instances=2))
    study = generate_uid()
    first, second, third = (_instance(study, seed) for seed in (81, 82, 83))
    with caplog.at_level(logging.INFO, logger="cxr.dimse"):
        assert [scp.handle_store(_event(data)) for _, data in (first, second)] == [0x0000, 0x0000]
        assert scp.handle_store(_event(third[1])) == 0xA700
        assert scp.handle_store(_event(first[1])) == 0x0000  # sent again: replaces its copy
        assert scp.handle_store(_event(make_dicom(seed=85))) == 0x0000  # another study
    assert "dimse_store_refused reason=study_full instances=2 limit=2" in caplog.text
    assert study not in caplog.text and third[0] not in caplog.text
    assert sorted(len(s.files) for s in scp.spool.studies()) == [1, 2]
    with pytest.raises(StudyFull):
        scp.spool.write(study, third[0], third[1])


def test_the_dimse_service_takes_the_new_limits_from_the_settings(tmp_path: Path) -> None:
    settings = ServingSettings(
        stack_dir=tmp_path, dimse_api_key="k", study_max_wait_seconds=42, dimse_max_study_instances=7
    )
    scp, forwarder = build(settings)
    assert forwarder.max_wait_s == 42 and scp.spool.max_study_instances == 7
    assert ServingSettings(stack_dir=tmp_path).study_max_wait_seconds == 300


# --- 2. an instance the forwarder can never post -------------------------------------------------


def _event(data: bytes) -> Any:
    """What pynetdicom hands the C-STORE handler, for one received instance."""
    ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
    request = SimpleNamespace(
        AffectedSOPClassUID=ds.SOPClassUID,
        AffectedSOPInstanceUID=ds.SOPInstanceUID,
        DataSet=io.BytesIO(data[132:]),  # pynetdicom's: the dataset as received (here with its file meta)
    )
    return SimpleNamespace(
        request=request,
        encoded_dataset=lambda include_meta: data,
        assoc=SimpleNamespace(requestor=SimpleNamespace(ae_title="MODALITY")),
    )


def test_the_scp_refuses_an_instance_the_forwarder_could_not_post_in_one_body(tmp_path: Path) -> None:
    """Under CXR_MAX_BODY_BYTES, yet over it with the multipart framing: the gateway would answer 413
    to every request carrying it, so it must never be acknowledged."""
    data = make_dicom(seed=91)
    settings = ServingSettings(stack_dir=tmp_path / "a", dimse_api_key="k", max_body_bytes=len(data) + 50)
    scp, _ = build(settings)
    assert scp.handle_store(_event(data)) == 0xA700
    assert scp.spool.studies() == []
    # at the limit exactly: acknowledged, and the request the forwarder builds for it fits
    exact = len(related_body([data])[0])
    scp, _ = build(ServingSettings(stack_dir=tmp_path / "b", dimse_api_key="k", max_body_bytes=exact))
    assert scp.handle_store(_event(data)) == 0x0000
    assert len(scp.spool.studies()) == 1


@pytest.fixture
def strict_gateway() -> Iterator[tuple[str, list[int], list[int]]]:
    """A local gateway with a body limit (set by the test): 413 past it, else every instance stored."""
    limit: list[int] = [0]
    posted: list[int] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            n = int(self.headers.get("Content-Length") or 0)
            self.rfile.read(n)
            if self.path.startswith("/dicomweb/"):
                posted.append(n)
            body: dict[str, Any]
            if n > limit[0]:
                status, body = 413, {"error": {"code": "payload_too_large", "message": "too large"}}
            elif self.path.startswith("/dicomweb/"):
                status, body = 200, {"00081199": {"vr": "SQ", "Value": [{}]}}
            else:
                status, body = 200, {"images": 1, "objects_queued": 2}
            raw = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", limit, posted
    finally:
        server.shutdown()
        server.server_close()


def test_a_413_for_one_instance_fails_that_instance_once_and_is_never_retried(
    strict_gateway: tuple[str, list[int], list[int]], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An instance spooled under a larger limit (or by an older SCP): the study still settles."""
    url, limit, posted = strict_gateway
    spool = InstanceSpool(tmp_path)
    study = generate_uid()
    sop, data = _instance(study, 92)
    spool.write(study, sop, data)
    limit[0] = len(data) + 50  # the instance fits, its request does not
    forwarder = Forwarder(spool, gateway_url=url, api_key="", settle_s=5.0, max_body_bytes=limit[0])
    with (
        httpx.Client(base_url=url, trust_env=False) as client,
        caplog.at_level(logging.INFO, logger="cxr.dimse"),
    ):
        [arrived] = spool.studies()
        assert forwarder.forward(client, arrived)  # answered for: refused for good
        [refused] = spool.studies()
        assert refused.pending == () and len(refused.files) == 1
        now = time.time()
        assert forwarder.due(now) == []  # not posted again
        [settled] = forwarder.due(now + 10)
        assert forwarder.forward(client, settled) and spool.studies() == []
    assert posted == [len(related_body([data])[0])]
    assert "dimse_instances_refused reason=too_large status=413 instances=1" in caplog.text
    assert "dimse_instances_analysed instances=1 stored=0 failed=1" in caplog.text
    assert study not in caplog.text and sop not in caplog.text


# --- 3. what a failed write leaves ---------------------------------------------------------------


def _full_disk_for(monkeypatch: pytest.MonkeyPatch, victim: bytes) -> None:
    """The disk fills up while ``victim`` is written: part of it lands in its temp file, then ENOSPC."""
    real = durable.write_synced

    def write(path: Path, data: bytes, mode: int = 0o666) -> None:
        if data != victim:
            return real(path, data, mode)
        with open(path, "wb") as fh:
            fh.write(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(durable, "write_synced", write)


def test_a_failed_first_write_leaves_no_temp_file_and_no_study_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool = InstanceSpool(tmp_path)
    _full_disk_for(monkeypatch, b"one")
    for _ in range(3):  # a sender retrying on a full disk: nothing piles up
        with pytest.raises(OSError, match="No space"):
            spool.write("1.2.3", "1.2.3.1", b"one")
    assert list(spool.studies_dir.iterdir()) == []
    monkeypatch.undo()
    spool.write("1.2.3", "1.2.3.1", b"one")
    [study] = spool.studies()
    assert study.study_uid == "1.2.3" and [f.read_bytes() for f in study.files] == [b"one"]


def test_a_failed_later_write_keeps_the_study_and_leaves_no_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool = InstanceSpool(tmp_path)
    spool.write("1.2.3", "1.2.3.1", b"one")
    _full_disk_for(monkeypatch, b"two")
    with pytest.raises(OSError, match="No space"):
        spool.write("1.2.3", "1.2.3.2", b"two")
    [study] = spool.studies()
    assert [f.read_bytes() for f in study.files] == [b"one"]
    assert sorted(p.name for p in study.folder.iterdir()) == sorted([study.files[0].name, "study_uid"])


def test_the_folder_of_a_studys_first_instance_is_made_durable_whoever_wrote_its_uid(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A UID file left without an instance (a first try that failed after writing it): the write
    that finally stores an instance must still make the folder's name durable before Success."""
    from serving.dimse import spool as spool_module

    spool = InstanceSpool(tmp_path)
    folder = spool.studies_dir / hashlib.sha256(b"1.2.3").hexdigest()[:32]
    folder.mkdir()
    (folder / "study_uid").write_text("1.2.3")
    synced: list[Path] = []
    real_fsync_dir = spool_module.fsync_dir

    def fsync_dir(path: Path) -> None:
        synced.append(path)
        real_fsync_dir(path)

    monkeypatch.setattr(spool_module, "fsync_dir", fsync_dir)
    spool.write("1.2.3", "1.2.3.1", b"one")
    assert spool.studies_dir in synced
    [study] = spool.studies()
    assert study.folder == folder


def test_a_study_folder_without_an_instance_is_removed_at_start(tmp_path: Path) -> None:
    spool = InstanceSpool(tmp_path)
    spool.write("1.2.3", "1.2.3.1", b"one")
    stray = spool.studies_dir / ("f" * 32)  # a crash between a study's UID file and its first instance
    stray.mkdir()
    (stray / "study_uid").write_text("1.2.4")
    again = InstanceSpool(tmp_path)
    assert not stray.exists() and [s.study_uid for s in again.studies()] == ["1.2.3"]


# --- 4. a spool of many tiny instances -----------------------------------------------------------
# Bytes were its only bound: a sender of many small instances (each one-instance study a folder, a UID
# file, the instance and its marker) ran the file system out of inodes with bytes to spare, and made
# the forwarder's listing of every folder, on every store, ever longer.


def _statvfs_with(monkeypatch: pytest.MonkeyPatch, files: int, favail: int) -> None:
    """The spool's file system reports ``favail`` free inodes of ``files`` (0: it counts none)."""
    real = os.statvfs

    class Reported:
        def __init__(self, st: os.statvfs_result) -> None:
            self._st = st
            self.f_files, self.f_favail, self.f_ffree = files, favail, favail

        def __getattr__(self, name: str) -> Any:
            return getattr(self._st, name)

    monkeypatch.setattr(os, "statvfs", lambda path: Reported(real(path)))


def test_the_spool_counts_what_it_holds_as_it_goes_and_from_the_disk_at_start(tmp_path: Path) -> None:
    spool = InstanceSpool(tmp_path)
    spool.write("1.2.3", "1.2.3.1", b"one")
    spool.write("1.2.3", "1.2.3.2", b"two")
    spool.write("1.2.3", "1.2.3.1", b"one again")  # replaces its copy: nothing more held
    spool.write("1.2.4", "1.2.4.1", b"three")
    assert spool.held == spool.depth() == (2, 3)
    [first, second] = sorted(spool.studies(), key=lambda s: s.study_uid)
    spool.write("1.2.3", "1.2.3.3", b"late")  # arrives during the hand-over: stays
    spool.remove(first)
    spool.remove(second)
    assert spool.held == spool.depth() == (1, 1)
    spool.write("1.2.5", "1.2.5.1", b"four")
    assert InstanceSpool(tmp_path).held == spool.held == (2, 2)  # a restarted SCP counts the disk


def test_a_full_spool_refuses_new_instances_and_studies_with_out_of_resources_logged_once_a_spell(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = ServingSettings(
        stack_dir=tmp_path, dimse_api_key="k", dimse_max_spool_instances=3, dimse_max_spool_studies=2
    )
    scp, _ = build(settings)
    spool = scp.spool
    study = generate_uid()
    first, second = (_instance(study, seed) for seed in (101, 102))
    other = make_dicom(seed=103)
    with caplog.at_level(logging.INFO, logger="cxr.dimse"):
        assert [scp.handle_store(_event(d)) for d in (first[1], second[1], other)] == [0x0000] * 3
        # three instances held: anything new is refused, however many times it is tried
        refused = [make_dicom(seed=104 + i) for i in range(5)] + [make_dicom(seed=110, study_uid=study)]
        assert [scp.handle_store(_event(d)) for d in refused] == [0xA700] * 6
        assert scp.handle_store(_event(first[1])) == 0x0000  # sent again: replaces its copy
        assert scp.handle_store(_event(make_dicom(seed=111))) == 0xA700
    assert caplog.text.count("dimse_spool_full") == 1
    assert "dimse_spool_full reason=instances held=3 limit=3" in caplog.text
    assert "dimse_spool_has_room" not in caplog.text  # the resend stored, the spool still full
    assert study not in caplog.text and first[0] not in caplog.text
    assert spool.held == spool.depth() == (2, 3)
    # the forwarder hands a study over: room for one instance, which the waiting study takes
    [done] = [s for s in spool.studies() if s.study_uid != study]
    spool.remove(done)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="cxr.dimse"):
        assert scp.handle_store(_event(make_dicom(seed=112, study_uid=study))) == 0x0000
        assert [scp.handle_store(_event(make_dicom(seed=113 + i))) for i in range(2)] == [0xA700] * 2
    assert "dimse_spool_full" not in caplog.text  # full again at once: the same spell goes on
    assert "dimse_spool_has_room" not in caplog.text
    [done] = spool.studies()
    spool.remove(done)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="cxr.dimse"):
        assert scp.handle_store(_event(make_dicom(seed=115))) == 0x0000
        assert scp.handle_store(_event(make_dicom(seed=116))) == 0x0000
    assert caplog.text.count("dimse_spool_has_room refused=9") == 1  # the spell's refusals, once
    assert "dimse_spool_full" not in caplog.text
    assert spool.held == spool.depth() == (2, 2)


def test_the_spool_refuses_a_new_study_beyond_its_study_cap(tmp_path: Path) -> None:
    from serving.dimse.spool import SpoolFull

    spool = InstanceSpool(tmp_path, max_studies=1)
    spool.write("1.2.3", "1.2.3.1", b"one")
    with pytest.raises(SpoolFull) as refused:
        spool.write("1.2.4", "1.2.4.1", b"two")
    assert (refused.value.reason, refused.value.held, refused.value.limit) == ("studies", 1, 1)
    spool.write("1.2.3", "1.2.3.2", b"three")  # another instance of the study waiting: room
    assert spool.held == (1, 2)
    assert [p.name for p in spool.studies_dir.iterdir()] == [spool.studies()[0].folder.name]


def test_the_spool_leaves_an_inode_reserve_where_its_file_system_counts_inodes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Plenty of bytes, few inodes left: refused with 0xA700 and nothing written, not even a folder."""
    scp, _ = build(ServingSettings(stack_dir=tmp_path, dimse_api_key="k", dimse_min_free_inodes=1000))
    _statvfs_with(monkeypatch, files=1_000_000, favail=1003)  # a new study needs 4
    with caplog.at_level(logging.INFO, logger="cxr.dimse"):
        assert [scp.handle_store(_event(make_dicom(seed=120 + i))) for i in range(3)] == [0xA700] * 3
    assert list(scp.spool.studies_dir.iterdir()) == [] and scp.spool.held == (0, 0)
    assert caplog.text.count("dimse_spool_full reason=inodes held=1003 limit=1000") == 1
    _statvfs_with(monkeypatch, files=0, favail=0)  # a file system that counts no inodes: not checked
    assert scp.handle_store(_event(make_dicom(seed=123))) == 0x0000
    _statvfs_with(monkeypatch, files=1_000_000, favail=500_000)
    assert scp.handle_store(_event(make_dicom(seed=124))) == 0x0000
    assert scp.spool.held == (2, 2)


def test_the_dimse_service_takes_the_spool_bounds_from_the_settings(tmp_path: Path) -> None:
    settings = ServingSettings(
        stack_dir=tmp_path,
        dimse_api_key="k",
        dimse_max_spool_instances=11,
        dimse_max_spool_studies=5,
        dimse_min_free_inodes=77,
    )
    scp, _ = build(settings)
    assert (scp.spool.max_instances, scp.spool.max_studies, scp.spool.min_free_inodes) == (11, 5, 77)
    defaults = ServingSettings(stack_dir=tmp_path)
    assert defaults.dimse_max_spool_instances >= defaults.dimse_max_study_instances
    assert defaults.dimse_min_free_inodes > 0


def test_the_scp_refuses_over_the_network_when_the_spool_is_full_and_serves_again_once_it_has_room(
    tmp_path: Path,
) -> None:
    """On loopback, through pynetdicom: the sender gets 0xA700 in an association that stays up, C-ECHO
    still answers, and once the forwarder handed a study over the same association stores again."""
    import socket

    from pynetdicom import AE
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    settings = ServingSettings(
        stack_dir=tmp_path, dimse_api_key="k", dimse_port=port, dimse_max_spool_studies=2
    )
    scp, _ = build(settings)
    spool = scp.spool
    modality = AE(ae_title="MODALITY")
    modality.add_requested_context("1.2.840.10008.5.1.4.1.1.1.1")  # DX for presentation
    modality.add_requested_context(Verification)
    scp.start()
    try:
        assoc = modality.associate("127.0.0.1", port, ae_title="CXR")
        assert assoc.is_established
        try:

            def store(seed: int) -> int:
                return int(assoc.send_c_store(pydicom.dcmread(io.BytesIO(make_dicom(seed=seed)))).Status)

            assert [store(seed) for seed in (131, 132)] == [0x0000, 0x0000]
            assert [store(seed) for seed in (133, 134, 135)] == [0xA700] * 3
            assert assoc.is_established
            assert int(assoc.send_c_echo().Status) == 0x0000
            spool.remove(spool.studies()[0])  # handed over: room for one study
            assert store(136) == 0x0000
            assert store(137) == 0xA700
        finally:
            assoc.release()
        again = modality.associate("127.0.0.1", port, ae_title="CXR")  # a new association is served
        assert again.is_established
        try:
            assert int(again.send_c_echo().Status) == 0x0000
        finally:
            again.release()
    finally:
        scp.stop()
        scp.end_associations(1.0)
    assert spool.held == spool.depth() == (2, 2)
