"""De-identification of feedback DICOMs: PS3.15 Annex E basic profile as written, per-install secret.

The main test writes a recognisable value into every attribute of the action
table the gateway applies, at the top level and again inside a sequence item,
adds private tags, curves and overlays, and then looks for each value in the
bytes that would leave for the training store.
"""

from __future__ import annotations

import io
import json
import os
import struct
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
from fastapi.testclient import TestClient
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.sequence import Sequence
from pydicom.uid import UID

from core.install_secret import resolve_install_secret
from data_pipeline.config import DataSettings
from data_pipeline.dicom_io import decode_bytes, hash_patient_id
from serving.config import ServingSettings
from serving.dicom.deid import (
    BASIC_PROFILE_CODE,
    DEIDENTIFICATION_METHOD,
    DeidentificationFailed,
    PixelsMayIdentify,
    action_table,
    deidentify_dataset,
    deidentify_dicom,
    patient_pseudonym,
)
from serving.errors import InvalidImage
from serving.feedback.service import FeedbackIn, FeedbackService, FeedbackSpool
from serving.results import ResultRecord
from tests.unit.serving.serving_support import make_dicom

pytestmark = pytest.mark.unit

CONTAINER = 0x00540220  # View Code Sequence: not in the table, so its items are walked, not dropped
REF_SOP_CLASS = 0x00081150
REF_SOP_INSTANCE = 0x00081155
CODE_MEANING = 0x00080104
MASKED_SAMPLES = {0x50003000: "OB", 0x50020010: "US", 0x60003000: "OW", 0x60024000: "LT"}
NUMERIC_VRS = {"US", "SS", "UL", "SL", "UV", "SV", "FL", "FD", "AT", "IS"}
BINARY_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "UN"}
TEMPORAL = {
    "DA": lambda i: f"18{i % 100:02d}0{1 + i % 9}{10 + i % 18}",
    "TM": lambda i: f"{i % 24:02d}{i % 60:02d}{(7 * i) % 60:02d}.{i:04d}",
    "DT": lambda i: f"18{i % 100:02d}0{1 + i % 9}{10 + i % 18}{i % 24:02d}{i % 60:02d}11",
    "AS": lambda i: f"{i % 1000:03d}Y",
}


@dataclass
class Planted:
    tag: int
    vr: str
    marker: str  # text that must not appear anywhere in the output ("" for numbers, dates, times, ages)
    nested: bool
    value: object = None  # without a marker: the value that must not be at its place in the output


def _vr(tag: int) -> str:
    try:
        return str(dictionary_VR(tag)).split(" or ")[0]
    except KeyError:
        return "LO"  # attributes newer than pydicom's dictionary: written as LO (explicit VR)


def _element(tag: int, prefix: str, index: int, planted: list[Planted]) -> DataElement:
    vr = _vr(tag)
    nested = prefix == "N"
    marker = f"{prefix}{index:04d}XQ"  # unique, and nothing else in a DICOM looks like it
    if vr == "SQ":
        item = Dataset()
        if action_table().action(tag) == "U":  # walked: only its UIDs are the patient's
            uid = f"1.2.840.9999{1 if nested else 2}.{index}.77"
            item.add(DataElement(REF_SOP_CLASS, "UI", "1.2.840.10008.5.1.4.1.1.1.1"))
            item.add(DataElement(REF_SOP_INSTANCE, "UI", uid))
            planted.append(Planted(tag, vr, uid, nested))
        else:  # dropped or emptied: even a harmless attribute inside must not survive
            item.add(DataElement(CODE_MEANING, "LO", f"SQ{marker}"))
            planted.append(Planted(tag, vr, f"SQ{marker}", nested))
        return DataElement(tag, vr, Sequence([item]))
    if vr == "UI":
        uid = f"1.2.840.9999{3 if nested else 4}.{index}.77"
        planted.append(Planted(tag, vr, uid, nested))
        return DataElement(tag, vr, uid)
    if vr in NUMERIC_VRS:
        number = 4242 + index if vr != "AT" else 0x00100010
        planted.append(Planted(tag, vr, "", nested, number))
        return DataElement(tag, vr, number)
    if vr in TEMPORAL:  # valid values (another tool must not merely choke on them), checked in place
        text = TEMPORAL[vr](index)
        planted.append(Planted(tag, vr, "", nested, text))
        return DataElement(tag, vr, text)
    if vr == "DS":  # pydicom refuses a DS it cannot parse, even when told to warn
        planted.append(Planted(tag, vr, f"{index}.987654", nested))
        return DataElement(tag, vr, f"{index}.987654")
    if vr in BINARY_VRS:
        planted.append(Planted(tag, vr, f"BIN{marker}", nested))
        return DataElement(tag, vr, f"BIN{marker}".encode())
    planted.append(Planted(tag, vr, marker, nested))
    return DataElement(tag, vr, marker)


def _private(ds: Dataset, prefix: str, planted: list[Planted]) -> None:
    block = ds.private_block(0x0009, f"ACME {prefix}PRIVXQ", create=True)
    block.add_new(0x01, "LO", f"{prefix}PRIVVALUEXQ")
    block.add_new(0x02, "SQ", Sequence([Dataset()]))
    block[0x02].value[0].PatientComments = f"{prefix}PRIVNESTEDXQ"
    for text in (f"ACME {prefix}PRIVXQ", f"{prefix}PRIVVALUEXQ", f"{prefix}PRIVNESTEDXQ"):
        planted.append(Planted(0x00090010, "LO", text, prefix == "N"))


def _every_attribute(ds: Dataset, prefix: str, planted: list[Planted]) -> None:
    table = action_table()
    for index, tag in enumerate(sorted(table.exact)):
        if tag >> 16 == 0x0000:
            continue  # command group (Requested SOP Instance UID): pydicom refuses to write it in a file
        if tag >> 16 == 0x0002:
            continue  # file meta: planted below, in the file meta itself
        ds.add(_element(tag, prefix, index, planted))
    for offset, (tag, vr) in enumerate(MASKED_SAMPLES.items()):
        index = 9000 + offset
        marker = f"{prefix}{index:04d}XQ"
        value: object = 4242 if vr == "US" else marker if vr == "LT" else f"BIN{marker}".encode()
        ds.add(DataElement(tag, vr, value))
        planted.append(Planted(tag, vr, "" if vr == "US" else marker, prefix == "N", 4242))
    _private(ds, prefix, planted)


def _everything() -> tuple[bytes, list[Planted]]:
    planted: list[Planted] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the planted values are deliberately invalid for their VR
        ds = pydicom.dcmread(io.BytesIO(make_dicom(seed=5)))
        _every_attribute(ds, "T", planted)
        item = Dataset()
        _every_attribute(item, "N", planted)
        ds.add(DataElement(CONTAINER, "SQ", Sequence([item])))
        meta_uid = "1.2.840.99995.1.77"
        ds.file_meta.MediaStorageSOPInstanceUID = meta_uid
        planted.append(Planted(0x00020003, "UI", meta_uid, False))
        earlier = Dataset()  # a label from an earlier tool, with an option this profile does not apply
        earlier.CodeValue, earlier.CodingSchemeDesignator, earlier.CodeMeaning = (
            "113107",
            "DCM",
            "Retain Longitudinal Temporal Information Modified Dates Option",
        )
        ds.DeidentificationMethodCodeSequence = Sequence([earlier])
        ds.LongitudinalTemporalInformationModified = "MODIFIED"
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=False)
    return buf.getvalue(), planted


def _read(data: bytes) -> Dataset:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(io.BytesIO(data))
        ds.decode()
    return ds


def _walk(ds: Dataset, depth: int = 0) -> list[tuple[int, DataElement, int]]:
    found = []
    for elem in ds:
        found.append((int(elem.tag), elem, depth))
        if elem.VR == "SQ":
            for item in elem.value:
                found += _walk(item, depth + 1)
    return found


def test_no_value_of_any_table_attribute_survives_at_any_level() -> None:
    source, planted = _everything()
    assert len({p.tag for p in planted}) > 600 and all(p.marker.encode() in source for p in planted)
    out, new_uid = deidentify_dicom(source, "install-one")
    leaked = sorted({p.marker for p in planted if p.marker and p.marker.encode() in out})
    assert not leaked, leaked
    ds = _read(out)
    assert ds.SOPInstanceUID == new_uid == ds.file_meta.MediaStorageSOPInstanceUID
    assert new_uid.startswith("2.25.")
    table = action_table()
    for tag, elem, depth in _walk(ds):
        assert (tag >> 16) % 2 == 0, f"private {tag:08X} at depth {depth}"
        action = table.action(tag)
        if action == "X":
            pytest.fail(f"{tag:08X} should have been removed (depth {depth})")
        if action == "Z" and tag not in (0x00100010, 0x00100020):
            assert elem.is_empty, f"{tag:08X} should be empty (depth {depth})"
        if action == "U" and elem.VR == "UI":
            assert all(str(v).startswith("2.25.") for v in (elem.value if elem.VM > 1 else [elem.value]))
    in_place = {(tag, depth >= 1): elem.value for tag, elem, depth in _walk(ds) if elem.VR != "SQ"}
    for p in planted:
        if not p.marker:  # nothing distinctive to search for: compare with what is at its place
            assert in_place.get((p.tag, p.nested)) != p.value, f"{p.tag:08X} kept its value"
    container = ds[CONTAINER].value[0]  # the nested copy got the same treatment
    assert container.PatientName == container.PatientID != ds.PatientID and len(container.PatientID) == 16


def test_labels_name_the_basic_profile_and_nothing_else() -> None:
    source, _ = _everything()
    ds = _read(deidentify_dicom(source, "install-one")[0])
    assert ds.PatientIdentityRemoved == "YES"
    codes = [
        (c.CodeValue, c.CodingSchemeDesignator, c.CodeMeaning) for c in ds.DeidentificationMethodCodeSequence
    ]
    assert codes == [BASIC_PROFILE_CODE] == [("113100", "DCM", "Basic Application Confidentiality Profile")]
    assert ds.DeidentificationMethod == DEIDENTIFICATION_METHOD
    assert "Basic Application Level Confidentiality Profile" in ds.DeidentificationMethod
    # no Retain Longitudinal option applied: REMOVED, whatever an earlier tool (MODIFIED) said
    assert ds.LongitudinalTemporalInformationModified == "REMOVED"


def test_longitudinal_temporal_information_modified_is_added_as_removed() -> None:
    """PS3.15 E.2: added with the value REMOVED when no Retain Longitudinal option is applied."""
    ds = _read(deidentify_dicom(make_dicom(seed=8), "install-one")[0])
    assert ds.LongitudinalTemporalInformationModified == "REMOVED"
    assert ds[0x00280303].VR == "CS"


@pytest.mark.parametrize(
    "transfer_syntax", ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"], ids=["explicit", "implicit"]
)
def test_the_deidentified_file_has_the_file_meta_group_length_and_version(transfer_syntax: str) -> None:
    """PS3.10 7.1: (0002,0000) and (0002,0001) are Type 1; dciodvfy reported both missing."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        source = pydicom.dcmread(io.BytesIO(make_dicom(seed=9)))
    source.file_meta.TransferSyntaxUID = UID(transfer_syntax)
    buf = io.BytesIO()
    source.save_as(buf, enforce_file_format=True)
    out = deidentify_dicom(buf.getvalue(), "install-one")[0]
    meta = _read(out).file_meta
    assert meta.FileMetaInformationVersion == b"\x00\x01"
    assert meta.FileMetaInformationGroupLength == _meta_group_end(out) - 144  # after DICM and (0002,0000)
    assert meta.TransferSyntaxUID == transfer_syntax


def _meta_group_end(data: bytes) -> int:
    """Where the file meta group (explicit VR little endian, after preamble and DICM) ends, counted here."""
    offset = 132
    while struct.unpack_from("<H", data, offset)[0] == 0x0002:
        vr = data[offset + 4 : offset + 6]
        if vr in (b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN"):
            offset += 12 + struct.unpack_from("<I", data, offset + 8)[0]
        else:
            offset += 8 + struct.unpack_from("<H", data, offset + 6)[0]
    return offset


def test_dates_get_their_basic_action_not_a_shift() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(io.BytesIO(make_dicom(seed=6)))
    ds.ContentDate, ds.SeriesDate, ds.AcquisitionDateTime = "20240105", "20240105", "20240105101010"
    item = Dataset()
    item.Date = "20240105"  # D in the table: a dummy, not a shifted date
    ds.ContentSequence = Sequence([item])
    deidentify_dataset(ds, "install-one")
    assert ds.StudyDate == "" and ds.ContentDate == "" and ds.PatientBirthDate == ""
    assert "SeriesDate" not in ds and "AcquisitionDateTime" not in ds
    assert len(ds.ContentSequence) == 1 and len(ds.ContentSequence[0]) == 0


def test_pseudonyms_and_uids_are_stable_in_an_install_and_differ_between_installs() -> None:
    study = "1.2.840.99996.1"
    first, second = (make_dicom(seed=s, study_uid=study) for s in (1, 2))
    run_a1, run_a2 = deidentify_dicom(first, "install-one"), deidentify_dicom(first, "install-one")
    assert run_a1 == run_a2  # byte for byte
    a1, a_other = _read(run_a1[0]), _read(deidentify_dicom(second, "install-one")[0])
    b1 = _read(deidentify_dicom(first, "install-two")[0])
    assert a1.StudyInstanceUID == a_other.StudyInstanceUID != study  # two images, still one study
    assert a1.SOPInstanceUID != a_other.SOPInstanceUID
    assert a1.PatientID == a1.PatientName == patient_pseudonym("MRN-0042", "install-one")
    assert a1.PatientID == hash_patient_id("MRN-0042", "install-one")  # the pipeline's patient key
    assert a1.PatientID == a_other.PatientID  # one patient stays one patient
    assert len(a1.PatientID) == 16 and "MRN" not in a1.PatientID
    for keyword in ("PatientID", "PatientName", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
        assert str(b1.get(keyword)) != str(a1.get(keyword)), keyword


def test_a_failure_is_a_422_without_element_values() -> None:
    unknown_syntax = b"\x00" * 128 + b"DICM" + b"\x02\x00\x10\x00UI\x08\x00MRN-0042"
    with pytest.raises(DeidentificationFailed) as caught:
        deidentify_dicom(unknown_syntax, "install-one")
    assert isinstance(caught.value, InvalidImage) and caught.value.status == 422
    assert "MRN-0042" not in caught.value.message
    deep = Dataset()
    cursor = deep
    for _ in range(40):
        inner = Dataset()
        cursor.ContentTemplateSequence = Sequence([inner])
        cursor = inner
    with pytest.raises(DeidentificationFailed):
        deidentify_dataset(deep, "install-one")


def test_the_table_is_the_librarys_latest_with_every_code_resolved() -> None:
    table = action_table()
    assert len(table.exact) > 600 and len(table.masked) == 3
    assert table.action(0x00081030) == "X"  # Study Description
    assert table.action(0x0008103E) == "X"  # Series Description
    assert table.action(0x00101010) == "X"  # Patient's Age
    assert table.action(0x00181000) == "X"  # Device Serial Number (X/Z/D)
    assert table.action(0x00321060) == "X"  # Requested Procedure Description (X/Z)
    assert table.action(0x00100020) == "Z"  # Patient ID (Z/D)
    assert table.action(0x00081140) == "X"  # Referenced Image Sequence (X/Z/U*): not required here
    assert table.action(0x60024000) == table.action(0x50103000) == "X"  # overlays, curves
    assert table.action(CONTAINER) is None


def _bytes_of(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=False)
    return buf.getvalue()


def _dicom_with(seed: int = 9, **attributes: object) -> bytes:
    """make_dicom's DX image with some attributes set (None: removed)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(io.BytesIO(make_dicom(seed=seed)))
        for keyword, value in attributes.items():
            if value is None:
                delattr(ds, keyword)
            else:
                setattr(ds, keyword, value)
        return _bytes_of(ds)


def _item_bytes(item: Dataset) -> bytes:
    """One sequence item (explicit VR little endian, defined length), as a sequence's value holds it."""
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_dataset(fp, item)
    return b"\xfe\xff\x00\xe0" + len(fp.getvalue()).to_bytes(4, "little") + fp.getvalue()


@pytest.mark.parametrize("vr", ["OB", "UT", "UN"])
def test_a_standard_sequence_sent_under_another_vr_does_not_carry_its_items_out(vr: str) -> None:
    """Annex E protects a listed attribute also inside an item: a sequence's items hide behind a wrong VR.

    Source Patient Group Identification Sequence is not in the table, so its items are walked
    (K: cleaned); sent as UN it is read as the sequence it is, sent as OB or UT its items are
    bytes pydicom does not parse, and the other patient's PatientID and name inside must not
    leave with them.
    """
    other = Dataset()
    other.PatientID, other.PatientName = "GROUPMRN-77", "Roe^GROUPXQ"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(io.BytesIO(make_dicom(seed=13)))
        ds.add(DataElement(0x00100026, "OB", _item_bytes(other)))
        source = _bytes_of(ds).replace(b"\x10\x00\x26\x00OB", b"\x10\x00\x26\x00" + vr.encode())
    assert b"GROUPMRN-77" in source and b"\x10\x00\x26\x00" + vr.encode() in source
    out = deidentify_dicom(source, "install-one")[0]
    assert b"GROUPMRN-77" not in out and b"GROUPXQ" not in out
    group = _read(out).get(0x00100026)  # the element (a keyword would give its value)
    if vr == "UN":  # read as the sequence it is: walked, the other patient pseudonymised
        assert group.VR == "SQ"
        assert group.value[0].PatientID == patient_pseudonym("GROUPMRN-77", "install-one")
    else:
        assert group is None


@pytest.mark.parametrize("empty", ["", "   "])
def test_an_empty_patient_id_stays_empty_and_is_no_pseudonym_shared_by_every_anonymous_patient(
    empty: str,
) -> None:
    first = _read(deidentify_dicom(_dicom_with(PatientID=empty, seed=11), "install-one")[0])
    second = _read(deidentify_dicom(_dicom_with(PatientID=empty, seed=12), "install-one")[0])
    for ds in (first, second):
        assert ds.PatientID == "" and ds.PatientName == ""  # Doe^Jane emptied, not given a pseudonym
        assert decode_bytes(_bytes_of(ds), salt="install-one").patient_hash is None  # no patient group
    assert patient_pseudonym(empty, "install-one") == ""


def test_without_a_patient_id_the_patient_name_is_emptied_not_pseudonymised() -> None:
    ds = _read(deidentify_dicom(_dicom_with(PatientID=None), "install-one")[0])
    assert "PatientID" not in ds and ds.PatientName == ""


@pytest.mark.parametrize(
    "attributes",
    [
        {"BurnedInAnnotation": "YES"},
        {"RecognizableVisualFeatures": "YES"},
        {"SOPClassUID": "1.2.840.10008.5.1.4.1.1.7"},  # Secondary Capture: a screen capture
        {"SOPClassUID": "1.2.840.10008.5.1.4.1.1.7.4"},  # Multi-frame True Color Secondary Capture
    ],
    ids=["burned-in", "recognizable-features", "secondary-capture", "multiframe-secondary-capture"],
)
def test_a_source_whose_pixels_may_identify_is_refused_with_a_422_naming_no_value(
    attributes: dict[str, str],
) -> None:
    source = _dicom_with(9, **attributes)
    with pytest.raises(PixelsMayIdentify) as caught:
        deidentify_dicom(source, "install-one")
    assert isinstance(caught.value, DeidentificationFailed) and caught.value.status == 422
    assert caught.value.code == "pixels_may_identify"
    assert "CXR_FEEDBACK_ALLOW_BURNED_IN" in caught.value.message
    for value in ("MRN-0042", "Doe", "1.2.840.10008", "YES"):
        assert value not in caught.value.message


def test_an_image_of_another_visible_light_class_is_no_secondary_capture() -> None:
    source = _dicom_with(SOPClassUID="1.2.840.10008.5.1.4.1.1.77.1.4")  # VL Photographic: not 1.1.7*
    assert _read(deidentify_dicom(source, "install-one")[0]).PatientIdentityRemoved == "YES"


def test_burned_in_pixels_kept_by_the_operator_say_the_identity_was_not_removed() -> None:
    source = _dicom_with(BurnedInAnnotation="YES")
    ds = _read(deidentify_dicom(source, "install-one", allow_burned_in=True)[0])
    assert ds.PatientIdentityRemoved == "NO" and ds.BurnedInAnnotation == "YES"
    assert ds.PatientID == patient_pseudonym("MRN-0042", "install-one")
    assert ServingSettings.model_fields["feedback_allow_burned_in"].default is False


def _source_record(source: bytes) -> ResultRecord:
    response = {
        "request_id": "r1",
        "model": {"name": "cxr-detector", "version": "3", "stage": "production"},
        "image": {"width": 96, "height": 80},
        "detections": [],
        "timings_ms": {},
    }
    return ResultRecord("r1", response, "dicom", source)


def test_feedback_on_a_burned_in_source_is_refused_and_nothing_is_kept(tmp_path: Path) -> None:
    source, fb = _dicom_with(BurnedInAnnotation="YES"), FeedbackIn(request_id="r1", no_finding=True)
    refusing = FeedbackService(None, FeedbackSpool(tmp_path / "a"), "install-one")
    with pytest.raises(PixelsMayIdentify):
        refusing.submit(fb, _source_record(source), "rad")
    assert refusing.spool.pending() == []
    allowing = FeedbackService(None, FeedbackSpool(tmp_path / "b"), "install-one", allow_burned_in=True)
    assert allowing.submit(fb, _source_record(source), "rad").status == "spooled"


# --- the per-install secret -------------------------------------------------------------------


def test_the_secret_is_generated_once_per_install_and_never_a_default(tmp_path: Path) -> None:
    first = resolve_install_secret("", tmp_path / "a")
    assert resolve_install_secret("", tmp_path / "a") == first
    assert os.stat(tmp_path / "a" / "install_secret").st_mode & 0o777 == 0o600
    other = resolve_install_secret("", tmp_path / "b")
    assert other != first and len(first) == 64 and int(first, 16) >= 0
    assert first not in {"", "cxr-feedback", "cxr-detect-default-salt"}
    assert resolve_install_secret("site-managed", tmp_path / "a") == "site-managed"
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "credentials.json").write_text(json.dumps({"deid_secret": "from-credentials"}))
    assert resolve_install_secret("", tmp_path / "c") == "from-credentials"
    assert not (tmp_path / "c" / "install_secret").exists()
    assert ServingSettings.model_fields["deid_secret"].default == ""
    assert DataSettings.model_fields["patient_salt"].default == ""
    explicit = DataSettings(patient_salt="site-a", stack_dir=tmp_path / "d")
    assert explicit.resolved_patient_salt() == "site-a"
    generated = DataSettings(patient_salt="", stack_dir=tmp_path / "a")
    assert generated.resolved_patient_salt() == first
    assert (
        generated.version_config() == DataSettings(patient_salt="", stack_dir=tmp_path / "a").version_config()
    )


def test_stack_credentials_hold_the_secret_and_keep_an_earlier_generated_one(tmp_path: Path) -> None:
    from stack.credentials import load_or_create

    earlier = resolve_install_secret("", tmp_path)  # a gateway ran before the stack wrote the key
    creds = load_or_create(tmp_path / "credentials.json", tmp_path / "api_keys.json")
    assert creds.deid_secret == earlier
    assert load_or_create(tmp_path / "credentials.json", tmp_path / "api_keys.json") == creds
    assert json.loads((tmp_path / "credentials.json").read_text())["deid_secret"] == earlier
    fresh = load_or_create(tmp_path / "new" / "credentials.json", tmp_path / "new" / "api_keys.json")
    assert len(fresh.deid_secret) == 64 and fresh.deid_secret != earlier
    assert resolve_install_secret("", tmp_path / "new") == fresh.deid_secret


def test_the_gateway_resolves_the_secret_once_from_its_stack(onnx_client: TestClient) -> None:
    state = onnx_client.app.state.cxr  # type: ignore[attr-defined]
    assert state.secret == resolve_install_secret("", state.settings.stack_dir)
    assert state.feedback.seed == state.secret
    assert state.feedback.allow_burned_in is state.settings.feedback_allow_burned_in is False


# --- through the gateway ------------------------------------------------------------------------


def test_feedback_for_a_dicom_with_an_invalid_study_date_is_accepted(
    onnx_client: TestClient, keys: dict[str, str]
) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(io.BytesIO(make_dicom(seed=77)))
        ds.StudyDate = "20231399"
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=False)
    made = onnx_client.post(
        "/v1/detect",
        content=buf.getvalue(),
        headers={"Authorization": f"Bearer {keys['pacs']}", "Content-Type": "application/dicom"},
    )
    assert made.status_code == 200, made.text
    reply = onnx_client.post(
        "/v1/feedback",
        json={"request_id": made.json()["request_id"], "feedback_id": uuid.uuid4().hex, "no_finding": True},
        headers={"Authorization": f"Bearer {keys['radiologist']}"},
    )
    assert reply.status_code in (200, 202), reply.text  # 202: spooled (this app has no store)
    spool = onnx_client.app.state.cxr.feedback.spool  # type: ignore[attr-defined]
    feedback_id = reply.json()["feedback_id"]
    objects = spool.load(feedback_id)
    meta = json.loads(objects[f"feedback/{feedback_id}/feedback.json"])
    assert "request_id" not in meta and made.json()["request_id"] not in json.dumps(meta)
    image = next(data for key, data in objects.items() if key.endswith(".dcm"))
    assert b"20231399" not in image and b"MRN-0042" not in image


def test_the_gateway_answers_feedback_on_a_burned_in_source_with_a_422(
    onnx_client: TestClient, keys: dict[str, str]
) -> None:
    made = onnx_client.post(
        "/v1/detect",
        content=_dicom_with(BurnedInAnnotation="YES", seed=78),
        headers={"Authorization": f"Bearer {keys['pacs']}", "Content-Type": "application/dicom"},
    )
    assert made.status_code == 200, made.text
    reply = onnx_client.post(
        "/v1/feedback",
        json={"request_id": made.json()["request_id"], "feedback_id": uuid.uuid4().hex, "no_finding": True},
        headers={"Authorization": f"Bearer {keys['radiologist']}"},
    )
    assert reply.status_code == 422, reply.text
    assert reply.json()["error"]["code"] == "pixels_may_identify"
    assert "MRN-0042" not in reply.text
