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
