"""The DICOM objects a PACS gets back for one analysed study: study SR, GSPS per image, burned-in capture.

Each object is written to a Part 10 file and read back (pydicom, and highdicom
where it has a reader), because what matters is what the PACS receives, not the
in-memory dataset.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any, cast

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import UID, GrayscaleSoftcopyPresentationStateStorage, ImplicitVRLittleEndian

from serving.dicom.capture import build_burned_capture
from serving.dicom.gsps import NO_FINDING_TEXT, build_gsps
from serving.dicom.sr import build_sr, build_study_sr, source_header
from serving.dicom.study_objects import dataset_bytes, study_objects
from serving.dicom.uids import derived_uid
from serving.errors import Conflict
from tests.unit.serving.serving_support import make_dicom

pytestmark = pytest.mark.unit

STUDY = "1.2.826.0.1.3680043.8.498.1001"
BOX = [10.0, 12.0, 40.0, 50.0]
TRIAGE = {"score": 0.83, "priority": True, "threshold": 0.5}


def response(detections: list[dict[str, Any]], version: str = "7") -> dict[str, Any]:
    """``version`` "7" or "7 int8": a serving variant after a space, as the gateway's model block says it."""
    number, _, variant = version.partition(" ")
    return {
        "request_id": "r-1",
        "model": {"name": "cxr-yolo", "version": number, "stage": "production", "variant": variant or "fp32"},
        "image": {"width": 96, "height": 80},
        "detections": detections,
    }


def detection(box: list[float] = BOX, class_id: int = 0, name: str = "Aortic enlargement") -> dict[str, Any]:
    return {"class_id": class_id, "class_name": name, "confidence": 0.91, "box": box}


@pytest.fixture
def sources() -> list[Dataset]:
    """Headers (no pixel data) of two images of one study, as the service reads them."""
    return [source_header(make_dicom(seed=s, study_uid=STUDY)) for s in (1, 2)]


def roundtrip(ds: Dataset) -> pydicom.FileDataset:
    return pydicom.dcmread(io.BytesIO(dataset_bytes(ds)))


def report(sr_file: bytes) -> hd.sr.MeasurementReport:
    """The TID 1500 content of an SR file, read back by highdicom."""
    return cast(hd.sr.MeasurementReport, hd.sr.srread(io.BytesIO(sr_file)).content)


def coded_meaning(evaluation: hd.sr.QualitativeEvaluation) -> str:
    """The meaning of a qualitative evaluation's coded value (highdicom types ``value`` as a number)."""
    return cast(hd.sr.CodedConcept, evaluation.value).meaning


def displayed(seed: int) -> np.ndarray:
    """A mid-grey 8-bit rendering of the source, so a white or black outline changes the pixels."""
    pixels = pydicom.dcmread(io.BytesIO(make_dicom(seed=seed, study_uid=STUDY))).pixel_array
    return np.full(pixels.shape, 128, dtype=np.uint8)


def edited_source(edit: Callable[[pydicom.FileDataset], None]) -> Dataset:
    """The header of a source DICOM changed by ``edit`` before it is written, read as the service reads it."""
    ds = pydicom.dcmread(io.BytesIO(make_dicom(seed=1, study_uid=STUDY)))
    edit(ds)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return source_header(buf.getvalue())


def voi_lut(bits: int = 12) -> Dataset:
    """A VOI LUT Sequence item: 4096 entries of ``bits`` bits each, as CR images carry it."""
    item = Dataset()
    item.LUTDescriptor = [4096, 0, bits]
    item.LUTExplanation = "NORMAL"
    item.LUTData = np.linspace(0, 2**bits - 1, 4096).astype("<u2").tobytes()
    return item


def test_uids_are_valid_deterministic_and_keep_part_boundaries() -> None:
    uid = derived_uid("1.2.3", "7", "gsps")
    assert UID(uid).is_valid and len(uid) <= 64
    assert uid == derived_uid("1.2.3", "7", "gsps")
    assert uid != derived_uid("1.2.3", "8", "gsps")
    assert derived_uid("ab", "c") != derived_uid("a", "bc")


def test_objects_of_two_patients_whose_sources_share_a_sop_uid_get_their_own_uids() -> None:
    """A reused SOP Instance UID must not give patient B's objects the UIDs of patient A's.

    Else the outbox takes B's object for A's, already queued, and drops it, or the PACS replaces
    A's object with B's. The same source analysed again keeps its UIDs (a retry is idempotent).
    """
    alice = source_header(make_dicom(seed=1, study_uid=STUDY, patient_id="ALICE"))
    bob = pydicom.dcmread(io.BytesIO(make_dicom(seed=2, study_uid=STUDY, patient_id="BOB")))
    bob.SOPInstanceUID = alice.SOPInstanceUID
    buf = io.BytesIO()
    bob.save_as(buf, enforce_file_format=True)
    bob = source_header(buf.getvalue())
    answer = response([detection()])
    for build in (build_gsps, build_sr):
        a, b = build(alice, answer), build(bob, answer)
        assert a.SOPInstanceUID != b.SOPInstanceUID
        assert build(alice, answer).SOPInstanceUID == a.SOPInstanceUID
    capture = np.zeros((80, 96), dtype=np.uint8)
    assert (
        build_burned_capture(alice, capture, answer).SOPInstanceUID
        != build_burned_capture(bob, capture, answer).SOPInstanceUID
    )


def test_gsps_references_its_source_and_outlines_each_box_in_pixel_units(sources: list[Dataset]) -> None:
    second = detection([50.0, 5.0, 90.0, 30.0], class_id=3, name="Cardiomegaly")
    ds = roundtrip(build_gsps(sources[0], response([detection(), second])))
    assert ds.SOPClassUID == GrayscaleSoftcopyPresentationStateStorage
    assert ds.Modality == "PR" and ds.StudyInstanceUID == STUDY
    referenced = ds.ReferencedSeriesSequence[0].ReferencedImageSequence[0]
    assert referenced.ReferencedSOPInstanceUID == sources[0].SOPInstanceUID
    annotation = ds.GraphicAnnotationSequence[0]
    assert annotation.ReferencedImageSequence[0].ReferencedSOPInstanceUID == sources[0].SOPInstanceUID
    graphics, texts = annotation.GraphicObjectSequence, annotation.TextObjectSequence
    assert len(graphics) == 2 and len(texts) == 2
    outline = np.array(graphics[0].GraphicData).reshape(-1, 2)
    assert graphics[0].GraphicAnnotationUnits == "PIXEL" and graphics[0].GraphicType == "POLYLINE"
    assert np.array_equal(outline[0], outline[-1]), "the outline is closed"
    assert (outline[:, 0].min(), outline[:, 1].min(), outline[:, 0].max(), outline[:, 1].max()) == tuple(BOX)
    assert texts[0].UnformattedTextValue == "Aortic enlargement 0.91"
    assert texts[0].AnchorPointAnnotationUnits == "PIXEL"
    assert list(texts[0].AnchorPoint) == BOX[:2]
    assert texts[1].UnformattedTextValue == "Cardiomegaly 0.91"
    assert ds.SoftcopyVOILUTSequence[0].WindowCenter == 2000, "the source's window, so contrast is unchanged"


def test_gsps_of_an_image_without_findings_says_the_model_looked(sources: list[Dataset]) -> None:
    ds = roundtrip(build_gsps(sources[0], response([])))
    annotation = ds.GraphicAnnotationSequence[0]
    assert "GraphicObjectSequence" not in annotation
    assert [t.UnformattedTextValue for t in annotation.TextObjectSequence] == [NO_FINDING_TEXT]


def test_gsps_of_a_monochrome1_image_inverts_the_presentation_lut_so_the_image_keeps_its_polarity(
    sources: list[Dataset],
) -> None:
    """A viewer applying a presentation state ignores the image's Photometric Interpretation (PS3.4 N.2.1.4).

    With IDENTITY, a MONOCHROME1 radiograph (most CR) showed with bone dark once our boxes were on.
    """

    def monochrome1(ds: pydicom.FileDataset) -> None:
        ds.PhotometricInterpretation = "MONOCHROME1"

    inverted = roundtrip(build_gsps(edited_source(monochrome1), response([detection()])))
    assert inverted.PresentationLUTShape == "INVERSE"
    assert roundtrip(build_gsps(sources[0], response([detection()]))).PresentationLUTShape == "IDENTITY"


def test_an_image_with_both_a_window_and_a_voi_lut_gets_its_objects_with_its_window() -> None:
    """DICOM allows both (many CR and DX carry both); highdicom's copy refused them, and the study."""

    def both(ds: pydicom.FileDataset) -> None:
        ds.VOILUTSequence = [voi_lut()]
        ds.WindowCenterWidthExplanation = "NORMAL"
        ds.VOILUTFunction = "SIGMOID"

    source = edited_source(both)
    sr, gsps = study_objects([(source, response([detection()]))], TRIAGE)
    (voi,) = roundtrip(gsps).SoftcopyVOILUTSequence
    assert (voi.WindowCenter, voi.WindowWidth, voi.VOILUTFunction) == (2000, 3000, "SIGMOID")
    assert voi.WindowCenterWidthExplanation == "NORMAL", "one explanation, not one per character"
    assert roundtrip(sr).SOPClassUID.name == "Comprehensive SR Storage"


def test_gsps_keeps_the_sources_window_explanation_whole() -> None:
    """highdicom's copy split one explanation into one value per character ("N\\O\\R\\M\\A\\L")."""

    def explained(ds: pydicom.FileDataset) -> None:
        ds.WindowCenter, ds.WindowWidth, ds.WindowCenterWidthExplanation = 2000, 3000, "NORMAL"

    (voi,) = roundtrip(build_gsps(edited_source(explained), response([]))).SoftcopyVOILUTSequence
    assert voi.WindowCenterWidthExplanation == "NORMAL"
    assert voi.WindowCenter == 2000 and voi.WindowWidth == 3000


def test_gsps_of_an_image_with_several_windows_applies_one_the_first_with_its_explanation() -> None:
    """PS3.3 C.11.8: no more than one window pair (or one VOI LUT item) per image in a presentation state.

    The source's several windows are alternatives a viewer offers; a presentation state applies one,
    and the first is the one viewers apply by default. dcmpschk refused the GSPS that copied all of them.
    """

    def two_windows(ds: pydicom.FileDataset) -> None:
        ds.WindowCenter, ds.WindowWidth = [2000, 1500], [3000, 1000]
        ds.WindowCenterWidthExplanation = ["NORMAL", "HARD"]

    (voi,) = roundtrip(build_gsps(edited_source(two_windows), response([]))).SoftcopyVOILUTSequence
    assert voi["WindowCenter"].VM == voi["WindowWidth"].VM == voi["WindowCenterWidthExplanation"].VM == 1
    assert (voi.WindowCenter, voi.WindowWidth, voi.WindowCenterWidthExplanation) == (2000, 3000, "NORMAL")


def test_gsps_of_an_image_with_several_voi_luts_applies_one_the_first() -> None:
    """PS3.3 C.11.8: a VOI LUT Sequence of a single item per image (the source may offer several)."""

    def two_luts(ds: pydicom.FileDataset) -> None:
        del ds.WindowCenter, ds.WindowWidth
        harder = voi_lut()
        harder.LUTExplanation = "HARDER"
        ds.VOILUTSequence = [voi_lut(), harder]

    (voi,) = roundtrip(build_gsps(edited_source(two_luts), response([]))).SoftcopyVOILUTSequence
    assert [lut.LUTExplanation for lut in voi.VOILUTSequence] == ["NORMAL"]


@pytest.mark.parametrize("implicit_vr", [False, True], ids=["explicit-vr", "implicit-vr"])
def test_gsps_of_an_image_with_a_voi_lut_only_copies_the_lut_as_the_source_has_it(implicit_vr: bool) -> None:
    """A 12-bit LUT keeps 12 bits in its descriptor: read as 16, its output is on a 16x scale (black)."""

    def lut_only(ds: pydicom.FileDataset) -> None:
        del ds.WindowCenter, ds.WindowWidth
        ds.VOILUTSequence = [voi_lut()]
        if implicit_vr:
            ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian

    source = edited_source(lut_only)
    (voi,) = roundtrip(build_gsps(source, response([detection()]))).SoftcopyVOILUTSequence
    (lut,) = voi.VOILUTSequence
    assert "WindowCenter" not in voi
    assert list(lut.LUTDescriptor) == [4096, 0, 12] and lut.LUTExplanation == "NORMAL"
    expected = np.frombuffer(voi_lut().LUTData, "<u2")
    data = lut.LUTData
    assert np.array_equal(np.frombuffer(data, "<u2") if isinstance(data, bytes) else np.array(data), expected)


def test_same_inputs_give_the_same_uids_and_another_model_version_or_variant_new_ones(
    sources: list[Dataset],
) -> None:
    def uids(ds: Dataset) -> tuple[str, str]:
        return str(ds.SOPInstanceUID), str(ds.SeriesInstanceUID)

    pixels = displayed(1)
    for build in (
        lambda v: build_gsps(sources[0], response([detection()], v)),
        lambda v: build_burned_capture(sources[0], pixels, response([detection()], v)),
        lambda v: build_study_sr(sources, [response([detection()], v), response([], v)], TRIAGE),
        lambda v: build_sr(sources[0], response([detection()], v)),
    ):
        assert uids(build("7")) == uids(build("7"))
        assert uids(build("7"))[0] != uids(build("8"))[0] and uids(build("7"))[1] != uids(build("8"))[1]
        # INT8 of the same version finds other things: its objects must not replace fp32's at the PACS
        assert uids(build("7"))[0] != uids(build("7 int8"))[0] and uids(build("7 int8")) == uids(
            build("7 int8")
        )
    gsps = [build_gsps(s, response([detection()])) for s in sources]
    assert gsps[0].SOPInstanceUID != gsps[1].SOPInstanceUID, "one GSPS per image"
    assert gsps[0].SeriesInstanceUID == gsps[1].SeriesInstanceUID, "in one series per study and model"


def test_study_sr_references_every_image_and_carries_the_triage(sources: list[Dataset]) -> None:
    box_b = [20.0, 20.0, 60.0, 70.0]
    responses = [response([detection()]), response([detection(box_b, 3, "Cardiomegaly")])]
    sr_file = dataset_bytes(build_study_sr(sources, responses, TRIAGE))
    sr = pydicom.dcmread(io.BytesIO(sr_file))
    evidence = {
        item.ReferencedSOPInstanceUID
        for study in sr.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for item in series.ReferencedSOPSequence
    }
    assert evidence == {s.SOPInstanceUID for s in sources}
    content = report(sr_file)
    groups = content.get_planar_roi_measurement_groups()
    assert len(groups) == 2
    for group, source, box in zip(groups, sources, (BOX, box_b), strict=True):
        region = group.roi
        assert region is not None
        assert region.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == (
            source.SOPInstanceUID
        )
        points = region.value
        assert (points[:, 0].min(), points[:, 1].min(), points[:, 0].max(), points[:, 1].max()) == tuple(box)
    (triage,) = content.get_image_measurement_groups()
    (score,) = [m for m in triage.get_measurements() if m.name.value == "ABN"]
    assert score.value == pytest.approx(0.83) and score.name.scheme_designator == "99CXR"
    (priority,) = triage.get_qualitative_evaluations()
    assert priority.name.meaning == "Triage priority" and coded_meaning(priority) == "Priority"


def test_study_sr_gives_an_image_without_boxes_its_no_finding_group(sources: list[Dataset]) -> None:
    sr = build_study_sr(sources, [response([detection()]), response([])], {**TRIAGE, "priority": False})
    content = report(dataset_bytes(sr))
    assert len(content.get_planar_roi_measurement_groups()) == 1
    image_groups = content.get_image_measurement_groups()
    no_finding = [g for g in image_groups if g.source_images]
    assert len(no_finding) == 1
    assert no_finding[0].source_images[0].referenced_sop_instance_uid == sources[1].SOPInstanceUID
    (triage,) = [g for g in image_groups if not g.source_images]
    assert coded_meaning(triage.get_qualitative_evaluations()[0]) == "Routine"


def test_capture_is_marked_derived_and_has_the_boxes_burned_in(sources: list[Dataset]) -> None:
    pixels = displayed(1)
    ds = roundtrip(build_burned_capture(sources[0], pixels, response([detection()])))
    assert ds.BurnedInAnnotation == "YES" and list(ds.ImageType)[:2] == ["DERIVED", "SECONDARY"]
    assert ds.StudyInstanceUID == STUDY and ds.PatientID == sources[0].PatientID
    assert "NOT FOR PRIMARY DIAGNOSIS" in ds.SeriesDescription.upper()
    assert "NOT FOR PRIMARY DIAGNOSIS" in ds.DerivationDescription.upper()
    assert ds.SourceImageSequence[0].ReferencedSOPInstanceUID == sources[0].SOPInstanceUID
    assert ds.PhotometricInterpretation == "MONOCHROME2" and ds.BitsAllocated == 8
    image = hd.imread(io.BytesIO(dataset_bytes(ds))).get_frame(1)
    x0, y0, x1, y1 = (int(v) for v in BOX)
    assert image.shape == pixels.shape
    assert (image[y0 + 5 : y1 - 5, x0] != 128).all(), "the left edge of the box is drawn"
    assert (image[y1, x0 + 5 : x1 - 5] != 128).all(), "the bottom edge of the box is drawn"
    assert (image[y0 + 8 : y1 - 8, x0 + 8 : x1 - 8] == 128).all(), "the inside stays the image"


def test_every_object_carries_the_sources_patient_and_study_identity_exactly(sources: list[Dataset]) -> None:
    """A PACS files an object by the patient's ID and issuer and by the study: the capture lacked the issuer.

    A PACS serving several issuers (hospitals of a group) then filed it under another patient,
    or refused it as not matching its study.
    """

    def identity(ds: pydicom.FileDataset) -> None:
        ds.IssuerOfPatientID = "HOSP-A"
        other = Dataset()
        other.PatientID, other.IssuerOfPatientID, other.TypeOfPatientID = "X-7", "HOSP-B", "TEXT"
        ds.OtherPatientIDsSequence = [other]
        ds.StudyDescription = "XR CHEST PA AND LATERAL"

    source = edited_source(identity)
    items = [(source, response([detection()]))]
    keywords = (
        "PatientID",
        "IssuerOfPatientID",
        "PatientName",
        "PatientBirthDate",
        "PatientSex",
        "StudyInstanceUID",
        "AccessionNumber",
        "StudyID",
        "StudyDate",
        "StudyTime",
        "ReferringPhysicianName",
        "StudyDescription",
    )
    for ds in map(roundtrip, study_objects(items, TRIAGE, capture_pixels=[displayed(1)])):
        assert {k: ds.get(k) for k in keywords} == {k: source.get(k) for k in keywords}, ds.Modality
        assert ds.OtherPatientIDsSequence[0].IssuerOfPatientID == "HOSP-B", ds.Modality
        assert ds.SeriesInstanceUID != source.SeriesInstanceUID and ds.Modality in ("SR", "PR", "OT")


def test_capture_is_downscaled_to_1024_with_its_boxes() -> None:
    big = source_header(make_dicom(width=2048, height=1600, study_uid=STUDY, with_pixels=False))
    box = [400.0, 400.0, 1200.0, 1000.0]
    ds = roundtrip(
        build_burned_capture(big, np.full((1600, 2048), 128, np.uint8), response([detection(box)]))
    )
    assert (ds.Columns, ds.Rows) == (1024, 800)
    assert (ds.pixel_array[250:450, 200] != 128).all(), "the box, halved with the image"


def test_study_objects_bundle_sr_then_gsps_then_captures_and_survive_a_write(
    sources: list[Dataset],
) -> None:
    items = [(sources[0], response([detection()])), (sources[1], response([]))]
    objects = study_objects(items, TRIAGE, capture_pixels=[displayed(1), displayed(2)])
    classes = [roundtrip(o).SOPClassUID.name for o in objects]
    assert classes == [
        "Comprehensive SR Storage",
        *["Grayscale Softcopy Presentation State Storage"] * 2,
        *["Secondary Capture Image Storage"] * 2,
    ]
    assert len({o.SOPInstanceUID for o in objects}) == 5
    assert all(o.StudyInstanceUID == STUDY for o in objects)
    assert len(study_objects(items, None)) == 3, "no captures without pixels"


def test_a_source_without_uids_or_a_mismatched_response_is_a_conflict(sources: list[Dataset]) -> None:
    broken = Dataset()
    broken.update(sources[0])
    del broken.SOPInstanceUID
    with pytest.raises(Conflict, match="SOPInstanceUID"):
        study_objects([(broken, response([detection()]))], None)
    mismatched = response([detection()])
    mismatched["image"]["sop_instance_uid"] = sources[1].SOPInstanceUID
    with pytest.raises(Conflict, match="another SOP Instance UID"):
        study_objects([(sources[0], mismatched)], None)


def test_a_vendors_own_voi_lut_function_is_applied_as_linear_not_a_refused_study() -> None:
    """A VOILUTFunction DICOM does not define (a vendor's term) made highdicom refuse the GSPS, and
    with it every object of the study; the decoder already applies such a term as LINEAR."""

    def vendor_function(ds: pydicom.FileDataset) -> None:
        ds.VOILUTFunction = "VENDOR_CURVE"

    ds = roundtrip(build_gsps(edited_source(vendor_function), response([detection()])))
    [voi] = ds.SoftcopyVOILUTSequence
    assert voi.get("VOILUTFunction", "LINEAR") == "LINEAR" and "WindowCenter" in voi
