"""DICOM Structured Report (TID 1500 Measurement Report) of the detection results of a study.

A PACS files an SR with the study it references and shows its ROIs over the
images. One report per study: one Planar ROI group per box, each a closed SCOORD
polyline on ITS source image, the finding as a coded concept, the model's
confidence as a numeric measurement, and the algorithm's name and version; an
image-level "No finding" group for an image without boxes (an image missing from
the report would be ambiguous); and, when triage ran, a study-level group with
the abnormality score and the priority it led to. The content is built with
highdicom's templates; the document around it by ``serving.dicom.sr_document``
(highdicom's own document, without its re-checks of that content).

The UIDs are derived from the model version and the source images, so sending
the same result again replaces the report at the PACS instead of duplicating it.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import math
import re
from collections.abc import Iterator, Sequence
from typing import Any

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from core.variants import served_label
from serving.dicom.iod_lookups import memoize_highdicom_lookups
from serving.dicom.sr_document import comprehensive_sr
from serving.dicom.uids import derived_uid, source_parts
from serving.errors import Conflict, ServingError

log = logging.getLogger(__name__)

memoize_highdicom_lookups()  # the SR's and presentation states' builders ask them per object

# Private coding scheme for the 14 VinDr findings: no single standard code
# system covers all of them (e.g. "Other lesion"), so each keeps its VinDr id.
_SCHEME = "99CXR"
_CONFIDENCE = hd.sr.CodedConcept(value="CONF", scheme_designator=_SCHEME, meaning="Detection confidence")
_ABNORMALITY = hd.sr.CodedConcept(value="ABN", scheme_designator=_SCHEME, meaning="Abnormality score")
_TRIAGE_THRESHOLD = hd.sr.CodedConcept(value="ABNTHR", scheme_designator=_SCHEME, meaning="Triage threshold")
_TRIAGE = hd.sr.CodedConcept(value="TRIAGE", scheme_designator=_SCHEME, meaning="Triage priority")
_PRIORITY = hd.sr.CodedConcept(value="PRIO", scheme_designator=_SCHEME, meaning="Priority")
_ROUTINE = hd.sr.CodedConcept(value="ROUT", scheme_designator=_SCHEME, meaning="Routine")
_NO_FINDING = hd.sr.CodedConcept(value="14", scheme_designator=_SCHEME, meaning="No finding")
_PROCEDURE = hd.sr.CodedConcept(value="36643-5", scheme_designator="LN", meaning="XR Chest 2 Views")
#: Series number of the SR: fixed so a PACS lists the reports in one place of every study.
SR_SERIES_NUMBER = 990
#: Attributes without which an object cannot reference its source image.
_REFERENCE_UIDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID")
#: Type 2 attributes of the Patient and General Study modules the SR copies from its evidence.
#: DICOM requires them present (maybe empty), but de-identified exports such as VinDr-CXR
#: drop them; the SR then carries them empty, as the standard allows, instead of failing.
#: the copied date and time attributes highdicom parses: DICOM's own format (PS3.5 6.2), and a real date
_DATE_TIME = {
    "PatientBirthDate": (r"\d{8}", "DA"),
    "StudyDate": (r"\d{8}", "DA"),
    "StudyTime": (r"\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?", "TM"),
}
_TYPE2_COPIED = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
)


def check_referencable(ds: Dataset) -> None:
    """Raise :class:`Conflict` when ``ds`` lacks a UID every derived object must reference it by."""
    missing = [k for k in _REFERENCE_UIDS if not ds.get(k)]
    if missing:
        raise Conflict(f"the source DICOM lacks {', '.join(missing)}, so a result object cannot reference it")


def with_study_attributes(ds: Dataset) -> Dataset:
    """``ds`` with its missing Type 2 patient/study attributes present and empty (a copy only if needed).

    highdicom copies these from the source into every derived object and reads
    them as attributes, so a de-identified source would otherwise fail there.
    """
    missing = [k for k in _TYPE2_COPIED if k not in ds]
    if not missing:
        return ds
    completed = copy.deepcopy(ds)
    for keyword in missing:
        setattr(completed, keyword, "")
    return completed


def source_header(data: bytes) -> Dataset:
    """Header of the source DICOM (no pixel data), as evidence for the SR (through the guarded reader)."""
    from data_pipeline.dicom_io import read_header
    from data_pipeline.errors import ImageDecodeError

    try:
        ds = read_header(data)
    except ImageDecodeError as exc:
        raise Conflict(f"the source DICOM cannot be read for an SR: {exc}") from exc
    with refusing_unbuildable("an SR of this source DICOM"):  # values pydicom converts only now
        check_referencable(ds)
        for keyword in _TYPE2_COPIED:
            if keyword not in ds:
                setattr(ds, keyword, "")
        blank_unusable_values(ds)
    return ds


def _usable(keyword: str, value: str) -> bool:
    """Whether highdicom can copy ``value`` of ``keyword`` into a derived object (empty always can)."""
    from pydicom.valuerep import DA, TM

    if not value:
        return True
    if keyword == "PatientSex":
        return value in ("M", "F", "O")
    pattern, parse = _DATE_TIME[keyword]
    if not re.fullmatch(pattern, value):
        return False
    try:
        (DA if parse == "DA" else TM)(value)
    except ValueError:
        return False
    return True


def blank_unusable_values(ds: Dataset) -> list[str]:
    """Empty the copied Type 2 values that are not valid for their VR; returns their keywords.

    A modality that writes ``PatientSex`` "Male" or ``StudyDate`` "2020-01-01" made highdicom refuse
    every object of the study, so the PACS got no result at all. Type 2 allows the value empty:
    the derived objects carry it so (the patient is still named by PatientID and PatientName) and
    the source keeps its own. The log line names the attributes, never their values.
    """
    blanked = [k for k in (*_DATE_TIME, "PatientSex") if not _usable(k, str(ds.get(k, "") or ""))]
    for keyword in blanked:
        setattr(ds, keyword, "")
    if blanked:
        log.info("sr_source_values_blanked attributes=%s", ",".join(blanked))
    return blanked


def check_pairing(source: Dataset, response: dict[str, Any]) -> None:
    """A response naming an image other than its source is a pairing bug: boxes would go astray."""
    named = (response.get("image") or {}).get("sop_instance_uid")
    if named and str(named) != str(source.SOPInstanceUID):
        # a Conflict, not a ValueError: the builders' callers quote no ValueError's text (library
        # messages quote values), and this one must reach the caller as it is
        raise Conflict("a detection response is paired with a source DICOM of another SOP Instance UID")


def model_version(response: dict[str, Any]) -> str:
    """The model version as the objects name it ("unknown" when the response has none).

    A serving variant other than fp32 is part of it ("3 int8"): two precisions of one version
    find different things, so their objects must not share UIDs (the PACS would replace one
    report with the other) and the SR's algorithm version must say which one found them. fp32
    keeps the bare number, so objects made before variants keep their UIDs.
    """
    return served_label(str(response["model"].get("version") or "unknown"), response["model"].get("variant"))


def finding_tracking_uid(source: Dataset, response: dict[str, Any], index: int) -> str:
    """The tracking UID of the ``index``-th box: the SR's ROI and the GSPS outline of that box share it."""
    return derived_uid(*source_parts(source), model_version(response), "finding", str(index))


def closed_box(box: Sequence[float]) -> np.ndarray:
    """The (column, row) corners of a box, first point repeated: a closed polyline."""
    x0, y0, x1, y1 = (float(v) for v in box)
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]], dtype=np.float32)


def build_sr(source: Dataset, response: dict[str, Any], *, manufacturer: str = "CXR Detect") -> Dataset:
    """The SR dataset for one detection response against its source header (a study SR of one image)."""
    return build_study_sr([source], [response], manufacturer=manufacturer)


def build_study_sr(
    sources: list[Dataset],
    responses: list[dict[str, Any]],
    triage: dict[str, Any] | None = None,
    *,
    manufacturer: str = "CXR Detect",
) -> Dataset:
    """ONE TID 1500 report for all images of a study, each image's boxes referencing that image.

    ``triage`` (``{"score", "priority", "threshold"}``) adds a study-level group;
    without it the report holds the per-image findings only.
    """
    return comprehensive_sr(**study_sr_arguments(sources, responses, triage, manufacturer=manufacturer))


def study_sr_arguments(
    sources: list[Dataset],
    responses: list[dict[str, Any]],
    triage: dict[str, Any] | None = None,
    *,
    manufacturer: str = "CXR Detect",
) -> dict[str, Any]:
    """The arguments of the study's SR document: ``hd.sr.ComprehensiveSR`` takes the same ones.

    The content is a fresh tree from highdicom's TID 1500 templates on every call.
    """
    if not sources or len(sources) != len(responses):
        raise ValueError("a study SR needs one detection response per source image, and at least one")
    sources = [with_study_attributes(s) for s in sources]
    for source, response in zip(sources, responses, strict=True):
        check_referencable(source)
        check_pairing(source, response)
    model = responses[0]["model"]
    versions = sorted({model_version(r) for r in responses})
    algorithm = hd.sr.AlgorithmIdentification(name=str(model["name"]), version=", ".join(versions))
    source_uids = sorted(str(s.SOPInstanceUID) for s in sources)
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=derived_uid(str(model["name"]), *versions, "device"), name=str(model["name"])
    )
    observation = hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.DCM.Device, observer_identifying_attributes=device
        )
    )
    groups: list[Any] = []
    for source, response in zip(sources, responses, strict=True):
        groups.extend(_image_groups(source, response, algorithm))
    if triage is not None:
        groups.append(_triage_group(triage, algorithm, [*versions, *source_uids]))
    report = hd.sr.MeasurementReport(
        observation_context=observation,
        procedure_reported=_PROCEDURE,
        imaging_measurements=groups,
        title=codes.DCM.ImagingMeasurementReport,
    )
    return {
        "evidence": sources,
        "content": report,
        "series_number": SR_SERIES_NUMBER,
        "series_instance_uid": derived_uid(*source_parts(sources[0])[:2], *versions, "sr-series"),
        "sop_instance_uid": derived_uid(*versions, *source_parts(sources[0])[:2], *source_uids, "sr"),
        "instance_number": 1,
        "manufacturer": manufacturer,
        "series_description": f"CXR Detect {model['name']} v{', '.join(versions)}"[:64],
        "is_complete": True,
        "is_final": False,
    }


def _image_groups(
    source: Dataset, response: dict[str, Any], algorithm: hd.sr.AlgorithmIdentification
) -> list[Any]:
    """The planar ROI groups of one image's boxes, or its "No finding" group when it has none."""
    groups: list[Any] = []
    for i, det in enumerate(response.get("detections", []), start=1):
        region = hd.sr.ImageRegion(
            graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
            graphic_data=closed_box(det["box"]),
            source_image=hd.sr.SourceImageForRegion.from_source_image(source),
        )
        finding = hd.sr.CodedConcept(
            value=str(det["class_id"]), scheme_designator=_SCHEME, meaning=str(det["class_name"])[:64]
        )
        groups.append(
            hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(
                    uid=finding_tracking_uid(source, response, i), identifier=f"finding {i}"
                ),
                referenced_region=region,
                finding_type=finding,
                algorithm_id=algorithm,
                measurements=[
                    hd.sr.Measurement(
                        name=_CONFIDENCE,
                        value=float(det["confidence"]),
                        unit=codes.UCUM.NoUnits,
                        algorithm_id=algorithm,
                    )
                ],
            )
        )
    if not groups:
        groups.append(_no_finding_group(source, response, algorithm))
    return groups


def _no_finding_group(
    source: Dataset, response: dict[str, Any], algorithm: hd.sr.AlgorithmIdentification
) -> Any:
    """An image-level group saying the model found nothing: an empty report would be ambiguous."""
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=finding_tracking_uid(source, response, 0), identifier="image"
        ),
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(source)],
        algorithm_id=algorithm,
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(name=codes.DCM.Finding, value=_NO_FINDING)],
    )


def _triage_group(
    triage: dict[str, Any], algorithm: hd.sr.AlgorithmIdentification, uid_parts: list[str]
) -> Any:
    """A study-level group (no source image): the abnormality score, its threshold and the priority."""
    score = float(triage["score"])
    if not (math.isfinite(score) and 0.0 <= score <= 1.0):
        raise ValueError(f"the triage score must lie in [0, 1], got {score}")
    measurements = [
        hd.sr.Measurement(name=_ABNORMALITY, value=score, unit=codes.UCUM.NoUnits, algorithm_id=algorithm)
    ]
    if triage.get("threshold") is not None:
        measurements.append(
            hd.sr.Measurement(
                name=_TRIAGE_THRESHOLD,
                value=float(triage["threshold"]),
                unit=codes.UCUM.NoUnits,
                algorithm_id=algorithm,
            )
        )
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=derived_uid(*uid_parts, "triage"), identifier="study triage"
        ),
        algorithm_id=algorithm,
        measurements=measurements,
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(
                name=_TRIAGE, value=_PRIORITY if bool(triage["priority"]) else _ROUTINE
            )
        ],
    )


@contextlib.contextmanager
def refusing_unbuildable(what: str) -> Iterator[None]:
    """Turn what highdicom or pydicom raise on a value they cannot take into a :class:`Conflict`.

    They raise many types (ValueError, TypeError, KeyError, pydicom's own), and their messages
    quote the offending value (a birth date): the Conflict names the type only.
    """
    try:
        yield
    except ServingError:
        raise
    except Exception as exc:
        raise Conflict(
            f"{what} cannot be built ({type(exc).__name__}): one of its patient or study attributes "
            "is not valid for its value representation; correct the source in the PACS"
        ) from exc


def sr_bytes(source_dicom: bytes, response: dict[str, Any]) -> bytes:
    source = source_header(source_dicom)
    with refusing_unbuildable("an SR for this source DICOM"):
        sr = build_sr(source, response)
    buf = io.BytesIO()
    sr.save_as(buf, enforce_file_format=True)
    return buf.getvalue()
