"""What a hostile or broken DICOM peer (or a gateway that forgot a study) can make the storage SCP do
with what it already acknowledged, and what it can make it hold: refused or kept apart, never lost."""

from __future__ import annotations

import io
import tracemalloc
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pydicom
import pytest
from pydicom.uid import generate_uid

from serving.dimse.scp import ScpConfig, StorageScp
from serving.dimse.spool import InstanceSpool
from tests.unit.serving.serving_support import make_dicom

pytestmark = pytest.mark.unit


def _event(data: bytes) -> Any:
    """What pynetdicom hands the C-STORE handler: the request (its dataset as received), the association."""
    ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
    request = SimpleNamespace(
        AffectedSOPClassUID=ds.SOPClassUID,
        AffectedSOPInstanceUID=ds.SOPInstanceUID,
        DataSet=io.BytesIO(data[132:]),  # pynetdicom's: the dataset as received, without the file meta
    )
    return SimpleNamespace(
        request=request,
        encoded_dataset=lambda include_meta=True: data,
        assoc=SimpleNamespace(requestor=SimpleNamespace(ae_title="MODALITY")),
    )


def _with_sop(data: bytes, sop_uid: str) -> bytes:
    ds = pydicom.dcmread(io.BytesIO(data))
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def _spooled_patients(spool: InstanceSpool) -> list[str]:
    return sorted(
        str(pydicom.dcmread(f, stop_before_pixels=True).PatientID) for s in spool.studies() for f in s.files
    )


@pytest.fixture
def scp(tmp_path: Path) -> StorageScp:
    return StorageScp(ScpConfig("CXR", "127.0.0.1", 11112), InstanceSpool(tmp_path))


def test_another_patients_instance_reusing_a_sop_uid_never_replaces_an_acknowledged_one(
    scp: StorageScp,
) -> None:
    """Patient A's image is acknowledged (Success: "it cannot be lost"); then a colliding sender stores
    patient B's image under the same study and SOP Instance UIDs. It overwrote A's copy in the spool: A's
    image was never analysed, and B's took its place in A's study. Both are kept; the gateway refuses
    whichever names the other patient's study."""
    study, sop = generate_uid(), generate_uid()
    a = _with_sop(make_dicom(seed=1, study_uid=study, patient_id="A-1"), sop)
    b = _with_sop(make_dicom(seed=2, study_uid=study, patient_id="B-2"), sop)
    assert scp.handle_store(_event(a)) == 0x0000
    assert scp.handle_store(_event(b)) == 0x0000
    assert _spooled_patients(scp.spool) == ["A-1", "B-2"]
    # the same patient's instance sent again (a corrected copy) still replaces its own copy
    assert (
        scp.handle_store(_event(_with_sop(make_dicom(seed=3, study_uid=study, patient_id="A-1"), sop))) == 0
    )
    [waiting] = scp.spool.studies()
    assert len(waiting.files) == 2


def test_an_issuer_of_patient_id_tells_two_patients_of_one_id_apart(scp: StorageScp) -> None:
    """PatientID "1" of hospital X and of hospital Y are two patients (IssuerOfPatientID)."""
    study, sop = generate_uid(), generate_uid()
    copies = []
    for seed, issuer in ((4, "HOSP-X"), (5, "HOSP-Y")):
        ds = pydicom.dcmread(io.BytesIO(make_dicom(seed=seed, study_uid=study, patient_id="1")))
        ds.IssuerOfPatientID = issuer
        out = io.BytesIO()
        ds.save_as(out, enforce_file_format=True)
        copies.append(_with_sop(out.getvalue(), sop))
    assert [scp.handle_store(_event(c)) for c in copies] == [0x0000, 0x0000]
    [waiting] = scp.spool.studies()
    assert len(waiting.files) == 2


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
def test_two_non_ascii_sop_uids_are_two_instances(scp: StorageScp) -> None:
    """Invalid UIDs are spooled as read (STOW-RS takes them too); the spool's keys encoded them as ASCII
    with "?" for every other character, so "1.2.3.\u00e9" and "1.2.3.\u00fc" were one file: the second
    replaced the first, acknowledged."""
    study = generate_uid()
    first = _with_sop(make_dicom(seed=6, study_uid=study), "1.2.3.\u00e9")
    second = _with_sop(make_dicom(seed=7, study_uid=study), "1.2.3.\u00fc")
    assert [scp.handle_store(_event(d)) for d in (first, second)] == [0x0000, 0x0000]
    [waiting] = scp.spool.studies()
    assert sorted(f.read_bytes() for f in waiting.files) == sorted([first, second])


def test_an_instance_over_the_limit_is_refused_without_copying_it(tmp_path: Path) -> None:
    """The transport lets a dataset of up to twice the instance limit in, to answer it with a status.
    Refusing it encoded it first (the file meta joined to the dataset): one more copy of up to twice the
    limit (20 MB here) per association, in each of CXR_DIMSE_MAX_ASSOCIATIONS at once."""
    scp = StorageScp(
        ScpConfig("CXR", "127.0.0.1", 11112, max_instance_bytes=1_000_000), InstanceSpool(tmp_path)
    )
    received = io.BytesIO(bytes(20_000_000))  # as pynetdicom holds it once the last fragment is in
    request = SimpleNamespace(
        AffectedSOPClassUID="1.2.840.10008.5.1.4.1.1.1.1", AffectedSOPInstanceUID="1.2.3.4", DataSet=received
    )

    def encoded_dataset(include_meta: bool = True) -> bytes:  # what pynetdicom's Event does
        return b"".join((b"\0" * 128, b"DICM", b"meta", request.DataSet.getvalue()))

    event = SimpleNamespace(request=request, encoded_dataset=encoded_dataset, assoc=None)
    tracemalloc.start()
    try:
        assert scp.handle_store(event) == 0xA700
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1_000_000
    assert scp.spool.studies() == []


def test_the_next_round_of_a_study_gets_its_own_retry_when_the_gateway_forgot_it(tmp_path: Path) -> None:
    """A round the gateway said it forgot (study_not_analysed) was sent again once (``forget_analysed``),
    then sent back; an instance that arrived meanwhile stays as the study's next round. That round kept
    the first round's flag: at the gateway's first "forgot" answer it left the spool, its image unsent."""
    spool = InstanceSpool(tmp_path)
    study = generate_uid()
    spool.write(study, "1.2.3.1", make_dicom(seed=8, study_uid=study))
    [first] = spool.studies()
    assert spool.forget_analysed(first)  # the first round's one retry
    spool.write(study, "1.2.3.2", make_dicom(seed=9, study_uid=study))  # arrives during the hand-over
    spool.remove(first)
    [late] = spool.studies()
    assert len(late.files) == 1
    assert spool.forget_analysed(late)  # its own retry: analysed again, not dropped
    assert not spool.forget_analysed(late)  # once


def test_the_spool_leaves_its_disk_reserve_to_the_gateway(
    scp: StorageScp, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The spool is on the stack's disk, beside the outbox of results the gateway answered for: a sender
    of many studies must get 0xA700 while some space is left, not fill the disk to its last byte."""
    import shutil

    free = [10 * 1024**3]
    real = shutil.disk_usage

    def disk_usage(path: Any) -> Any:
        return real(path)._replace(free=free[0])

    monkeypatch.setattr(shutil, "disk_usage", disk_usage)
    assert scp.handle_store(_event(make_dicom(seed=10))) == 0x0000
    free[0] = 64 * 1024**2  # 64 MiB left: under the reserve
    assert scp.handle_store(_event(make_dicom(seed=11))) == 0xA700
    assert len(scp.spool.studies()) == 1
    assert len(list(scp.spool.studies_dir.iterdir())) == 1  # nothing of the refused one, not even its folder


def _association_request(port: int, calling_ae: bytes) -> bytes:
    """A real A-ASSOCIATE-RQ for the SCP on ``port``, its calling AE title replaced by raw bytes."""
    from pynetdicom.pdu import A_ASSOCIATE_RQ

    pdu = A_ASSOCIATE_RQ()
    pdu.called_ae_title, pdu.calling_ae_title = "CXR", "GOOD"
    request = bytearray(pdu.encode())
    request[26:42] = calling_ae.ljust(16)[:16]  # PS3.8 9.3.2: bytes 27-42 are the calling AE title
    return bytes(request)


def test_a_calling_ae_title_with_control_characters_cannot_forge_lines_in_the_scps_log(
    tmp_path: Path,
) -> None:
    """pynetdicom refuses such a title while decoding the request, and logs it raw at ERROR, in its
    message and its traceback: a newline forged log lines ("INJECT ..." as a line of its own), an escape
    sequence reached the operator's terminal, from any peer that can connect, allowed AE or not."""
    import logging
    import socket
    import time

    from serving.dimse.service import configure_logging

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    scp = StorageScp(ScpConfig("CXR", "127.0.0.1", port, allowed_aes=("PACS",)), InstanceSpool(tmp_path))
    lines: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.extend(self.format(record).split("\n"))

    handler = Collect()
    handler.setFormatter(logging.Formatter("%(name)s %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        configure_logging()
        scp.start()
        with socket.create_connection(("127.0.0.1", port), timeout=5) as peer:
            peer.sendall(_association_request(port, b"EVIL\nINJECT\x1b[31m"))
            peer.recv(1)  # the SCP's answer: an abort
        deadline = time.monotonic() + 5.0
        while not any("Calling AE Title" in line for line in lines) and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        scp.stop()
        root.removeHandler(handler)
    assert any("Calling AE Title" in line for line in lines), "pynetdicom's refusal is still logged"
    assert not [line for line in lines if line.startswith("INJECT") or "\x1b" in line]


def test_a_record_whose_format_does_not_fit_its_args_never_raises_into_the_logging_call() -> None:
    """``logging`` reports such a record itself (handleError) and the caller goes on; the filter that
    escapes control characters formats the message first, and raised from inside ``log.error``."""
    import io
    import logging

    from serving.logsafe import OneLine

    handler = logging.StreamHandler(io.StringIO())
    handler.addFilter(OneLine())
    logger = logging.Logger("cxr.test.one-line")
    logger.addHandler(handler)
    raise_exceptions, logging.raiseExceptions = logging.raiseExceptions, False  # no stderr traceback
    try:
        logger.error("peer %d", "not a number")  # raised TypeError here
        logger.error("peer %s", "EVIL\nINJECT")
    finally:
        logging.raiseExceptions = raise_exceptions
    assert handler.stream.getvalue() == "peer EVIL\\x0aINJECT\n"
