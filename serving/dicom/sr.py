"""DICOM Structured Report (TID 1500 Measurement Report) of one detection result.

A PACS files an SR with the study it references and shows its ROIs over the
image. One Planar ROI group per box: a closed SCOORD polyline on the source
image, the finding as a coded concept, the model's confidence as a numeric
measurement, and the algorithm's name and version. Built with highdicom.
"""

from __future__ import annotations

import io
from typing import Any

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from serving.errors import Conflict

# Private coding scheme for the 14 VinDr findings: no single standard code
# system covers all of them (e.g. "Other lesion"), so each keeps its VinDr id.
_SCHEME = "99CXR"
_CONFIDENCE = hd.sr.CodedConcept(value="CONF", scheme_designator=_SCHEME, meaning="Detection confidence")
_PROCEDURE = hd.sr.CodedConcept(value="36643-5", scheme_designator="LN", meaning="XR Chest 2 Views")
#: Type 2 attributes of the Patient and General Study modules the SR copies from its evidence.
#: DICOM requires them present (maybe empty), but de-identified exports such as VinDr-CXR
#: drop them; the SR then carries them empty, as the standard allows, instead of failing.
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


def source_header(data: bytes) -> Dataset:
    """Header of the source DICOM (no pixel data), as evidence for the SR (through the guarded reader)."""
    from data_pipeline.dicom_io import read_header
    from data_pipeline.errors import ImageDecodeError

    try:
        ds = read_header(data)
    except ImageDecodeError as exc:
        raise Conflict(f"the source DICOM cannot be read for an SR: {exc}") from exc
    missing = [
        k for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID") if k not in ds
    ]
    if missing:
        raise Conflict(f"the source DICOM lacks {', '.join(missing)}, so an SR cannot reference it")
    for keyword in _TYPE2_COPIED:
        if keyword not in ds:
            setattr(ds, keyword, "")
    return ds


def build_sr(source: Dataset, response: dict[str, Any], *, manufacturer: str = "CXR Detect") -> Dataset:
    """The SR dataset for one detection response against its source header."""
    model = response["model"]
    algorithm = hd.sr.AlgorithmIdentification(
        name=str(model["name"]), version=str(model["version"] or "unknown")
    )
    device = hd.sr.DeviceObserverIdentifyingAttributes(uid=hd.UID(), name=str(model["name"]))
    observation = hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.DCM.Device, observer_identifying_attributes=device
        )
    )
    groups = []
    for i, det in enumerate(response.get("detections", []), start=1):
        x0, y0, x1, y1 = (float(v) for v in det["box"])
        polyline = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]], dtype=np.float32)
        region = hd.sr.ImageRegion(
            graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
            graphic_data=polyline,
            source_image=hd.sr.SourceImageForRegion.from_source_image(source),
        )
        finding = hd.sr.CodedConcept(
            value=str(det["class_id"]), scheme_designator=_SCHEME, meaning=str(det["class_name"])[:64]
        )
        groups.append(
            hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier=f"finding {i}"),
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
        groups.append(_no_finding_group(source, algorithm))
    report = hd.sr.MeasurementReport(
        observation_context=observation,
        procedure_reported=_PROCEDURE,
        imaging_measurements=groups,
        title=codes.DCM.ImagingMeasurementReport,
    )
    return hd.sr.ComprehensiveSR(
        evidence=[source],
        content=report,
        series_number=990,
        series_instance_uid=hd.UID(),
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer=manufacturer,
        series_description=f"CXR Detect {model['name']} v{model['version']}",
        is_complete=True,
        is_final=False,
    )


def _no_finding_group(source: Dataset, algorithm: hd.sr.AlgorithmIdentification) -> Any:
    """An image-level group saying the model found nothing: an empty report would be ambiguous."""
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier="image"),
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(source)],
        algorithm_id=algorithm,
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(
                name=codes.DCM.Finding,
                value=hd.sr.CodedConcept(value="14", scheme_designator=_SCHEME, meaning="No finding"),
            )
        ],
    )


def sr_bytes(source_dicom: bytes, response: dict[str, Any]) -> bytes:
    source = source_header(source_dicom)
    try:
        sr = build_sr(source, response)
    except (ValueError, TypeError, AttributeError) as exc:
        raise Conflict(f"an SR cannot be built for this source DICOM: {exc}") from exc
    buf = io.BytesIO()
    sr.save_as(buf, enforce_file_format=True)
    return buf.getvalue()
