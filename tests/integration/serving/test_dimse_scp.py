"""The storage SCP against a real pynetdicom SCU: what it accepts, refuses, and that it keeps serving."""

from __future__ import annotations

import contextlib
import io
import logging
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE

from serving.dimse.echo import c_echo
from serving.dimse.scp import ScpConfig, StorageScp
from serving.dimse.spool import InstanceSpool
from tests.fixtures.servers import free_port
from tests.unit.serving.serving_support import make_dicom

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def scp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StorageScp]:
    spool = InstanceSpool(tmp_path_factory.mktemp("dimse-spool"))
    server = StorageScp(
        ScpConfig(
            "CXR", "127.0.0.1", free_port(), allowed_aes=("MODALITY", "PACS"), max_instance_bytes=2_000_000
        ),
        spool,
    )
    server.start()
    yield server
    server.stop()


def _store(scp: StorageScp, ds: Dataset, *, calling: str = "MODALITY", called: str = "CXR") -> int | None:
    """C-STORE one dataset; the status code, or None when the association was refused."""
    ae = AE(ae_title=calling)
    ae.add_requested_context(str(ds.SOPClassUID), [ExplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", scp.config.port, ae_title=called)
    if not assoc.is_established:
        return None
    try:
        status = assoc.send_c_store(ds)
        return int(status.Status)
    finally:
        assoc.release()


def _radiograph(study: str | None = None) -> Dataset:
    return pydicom.dcmread(io.BytesIO(make_dicom(64, 64, study_uid=study)))


def test_c_echo_answers(scp: StorageScp) -> None:
    assert c_echo("127.0.0.1", scp.config.port, "CXR", calling_ae="PACS")
    assert not c_echo(
        "127.0.0.1", scp.config.port, "NOT-CXR", calling_ae="PACS"
    )  # the called AE must be ours


def test_a_radiograph_is_spooled_before_success(scp: StorageScp) -> None:
    study = generate_uid()
    ds = _radiograph(study)
    assert _store(scp, ds) == 0x0000
    [spooled] = [s for s in scp.spool.studies() if s.study_uid == study]
    stored = pydicom.dcmread(spooled.files[0])
    assert stored.SOPInstanceUID == ds.SOPInstanceUID
    assert stored.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    scp.spool.remove(spooled)


def test_calling_aes_not_listed_are_rejected_at_association(scp: StorageScp) -> None:
    assert _store(scp, _radiograph(), calling="STRANGER") is None


def test_non_image_and_malformed_datasets_get_failure_statuses_and_the_scp_keeps_serving(
    scp: StorageScp, tmp_path: Path
) -> None:
    before = scp.spool.depth()
    report = _radiograph()
    report.SOPClassUID = report.file_meta.MediaStorageSOPClassUID = (
        "1.2.840.10008.5.1.4.1.1.88.11"  # Basic SR
    )
    assert _store(scp, report) == 0x0122  # SOP class not supported

    deep = _radiograph()  # nesting far beyond the guarded reader's limit
    inner = Dataset()
    inner.CodeValue = "x"
    for _ in range(200):
        outer = Dataset()
        outer.ContentSequence = Sequence([inner])
        inner = outer
    deep.ContentSequence = Sequence([inner])
    status = _store(scp, deep)
    assert status is not None and status >= 0xA700, hex(status or 0)

    big = _radiograph()
    big.PixelData = b"\0" * 2_500_000
    big.Rows = big.Columns = 1118
    assert _store(scp, big) == 0xA700  # over the per-instance byte limit

    assert scp.spool.depth()[1] == before[1]  # nothing refused was spooled
    assert c_echo("127.0.0.1", scp.config.port, "CXR", calling_ae="PACS")
    assert _store(scp, _radiograph()) == 0x0000
    assert scp.spool.depth()[1] == before[1] + 1


def test_a_pdu_claiming_more_than_the_limit_closes_that_connection_only(scp: StorageScp) -> None:
    """A 4 GiB PDU length must not be read (pynetdicom alone would read until memory runs out)."""
    with socket.create_connection(("127.0.0.1", scp.config.port), timeout=10) as raw:
        raw.sendall(
            struct.pack(">BBL", 0x01, 0, 0xFFFF_FFF0) + b"\0" * 4096
        )  # an A-ASSOCIATE-RQ that never ends
        raw.settimeout(10)
        try:
            closed = raw.recv(65536) == b""
        except ConnectionResetError:
            closed = True
    assert closed
    assert c_echo("127.0.0.1", scp.config.port, "CXR", calling_ae="PACS")


def test_peers_that_stall_mid_pdu_lose_their_association_slots_within_the_timeout(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Stalled peers filling every slot must not lock modalities out past the ACSE/network timeout.

    Without a timeout on the accepted socket, pynetdicom's DUL thread waits in ``recv`` for the
    rest of a PDU forever, and its own timeouts cannot end an association whose DUL is stuck.
    """
    caplog.set_level(logging.ERROR, logger="pynetdicom")  # c_echo mutes it; a traceback must show
    caplog.set_level(logging.WARNING, logger="cxr.dimse")
    timeout = 1.0
    scp = StorageScp(ScpConfig("CXR", "127.0.0.1", free_port(), max_associations=2), InstanceSpool(tmp_path))
    scp.ae.acse_timeout = scp.ae.network_timeout = timeout
    scp.start()
    port = scp.config.port
    stalled = [
        struct.pack(">BBL", 0x01, 0, 100)[:3],  # half of an A-ASSOCIATE-RQ's header
        struct.pack(">BBL", 0x01, 0, 100) + b"\0" * 10,  # the header, then 10 of its 100 bytes
        b"",  # connects and never sends (one more than the slots: pynetdicom counts it too)
    ]
    peers = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in stalled]
    try:
        for peer, data in zip(peers, stalled, strict=True):
            peer.sendall(data)
        started = time.monotonic()
        while len(scp.ae.active_associations) < len(peers) and time.monotonic() < started + timeout:
            time.sleep(0.01)
        assert len(scp.ae.active_associations) == len(peers)  # every slot is taken (and one more)
        deadline = started + 3 * timeout  # ~1 timeout expected; the rest is room for a busy machine
        while scp.ae.active_associations and time.monotonic() < deadline:
            time.sleep(0.05)
        freed_after = time.monotonic() - started
        assert not scp.ae.active_associations, f"slots still held after {freed_after:.1f} s"
        for peer in peers:  # each connection was closed by the SCP, not left half-open
            with contextlib.suppress(ConnectionResetError):
                assert peer.recv(1) == b""
        assert c_echo("127.0.0.1", port, "CXR", calling_ae="MODALITY")
    finally:
        for peer in peers:
            peer.close()
        scp.stop()
    assert caplog.text.count("reason=stalled_mid_pdu") == 2
    assert not [r for r in caplog.records if r.exc_info], "a stalled peer is a clean close, not a traceback"


def test_a_dataset_far_over_the_limit_ends_its_association_and_nothing_is_spooled(scp: StorageScp) -> None:
    before = scp.spool.depth()
    huge = _radiograph()
    huge.PixelData = b"\0" * (
        3 * scp.config.max_instance_bytes
    )  # in 1 MiB PDUs: each one is under the PDU limit
    huge.Rows = huge.Columns = 2449
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(str(huge.SOPClassUID), [ExplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", scp.config.port, ae_title="CXR")
    assert assoc.is_established
    try:
        status = assoc.send_c_store(huge)
    finally:
        assoc.release()
    assert "Status" not in status  # no answer: the SCP closed the connection mid-dataset
    assert scp.spool.depth() == before
    assert _store(scp, _radiograph()) == 0x0000  # the SCP goes on serving
    assert scp.spool.depth()[1] == before[1] + 1


def test_many_instances_in_one_association_are_each_measured_on_their_own(scp: StorageScp) -> None:
    """The message limit counts one command or dataset at a time, not the association's total."""
    before = scp.spool.depth()
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(str(_radiograph().SOPClassUID), [ExplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", scp.config.port, ae_title="CXR")
    assert assoc.is_established
    statuses = []
    try:
        for _ in range(4):  # 4 x ~1.9 MB: over the connection-level limit (2 x 2 MB + 1 MiB) together
            ds = _radiograph()
            ds.PixelData = b"\0" * (1376 * 1376)
            ds.Rows = ds.Columns = 1376
            ds.BitsAllocated = ds.BitsStored = 8
            ds.HighBit = 7
            statuses.append(int(assoc.send_c_store(ds).Status))
    finally:
        assoc.release()
    assert statuses == [0x0000] * 4
    assert scp.spool.depth()[1] == before[1] + 4


def test_two_patients_under_one_sop_instance_uid_are_both_kept_over_the_wire(scp: StorageScp) -> None:
    """A colliding sender stores another patient's image under an acknowledged image's study and SOP
    Instance UIDs: the acknowledged one stays in the spool (it was written over, never analysed)."""
    study, sop = generate_uid(), generate_uid()
    for patient in ("A-1", "B-2"):
        ds = pydicom.dcmread(io.BytesIO(make_dicom(64, 64, study_uid=study, patient_id=patient)))
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = sop
        assert _store(scp, ds, calling="PACS" if patient == "A-1" else "MODALITY") == 0x0000
    [spooled] = [s for s in scp.spool.studies() if s.study_uid == study]
    patients = sorted(str(pydicom.dcmread(f, stop_before_pixels=True).PatientID) for f in spooled.files)
    assert patients == ["A-1", "B-2"]
    scp.spool.remove(spooled)
