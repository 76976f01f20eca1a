"""The Comprehensive SR document around a TID 1500 content tree built with highdicom's templates.

Why not ``highdicom.sr.ComprehensiveSR`` itself: its constructor re-checks a content tree
that highdicom's own templates have just built and checked. It deep-copies the tree and parses
the copy back into content-item objects, then searches the whole tree three times (image and
composite references for the evidence, SCOORD3D items the IOD forbids), building a
``ContentItem`` and a ``CodedConcept`` for every node on every search, for every study sent
back to a PACS. Built and written, the SR of a two-image study with three boxes an image takes
0.47 of highdicom's time this way (``python -m benchmarks.pacs_bench sr``,
``sr_document_vs_highdicom``; docs/benchmarks.md).

This module makes the same dataset, attribute for attribute, from highdicom's public pieces:
``highdicom.SOPClass`` for the Patient, Study, Series, Equipment and SOP Common modules (and
its ``copy_patient_and_study_information``, meant for writers of SOP classes), the SR Document
General module's flags and evidence as ``_SR`` sets them, and the content tree's root as is.
What it leaves out are the checks that cannot fail for the trees ``serving.dicom.sr`` builds:
every image item references one of the ``evidence`` datasets (the tree is made from them), and
no SCOORD3D item exists (none is made). ``tests/unit/serving/test_sr_document.py`` holds the
two outputs equal, byte for byte but the creation times, so a highdicom upgrade that changes
the document shows there.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Sequence

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.uid import ComprehensiveSRStorage, ExplicitVRLittleEndian


def comprehensive_sr(
    evidence: Sequence[Dataset],
    content: hd.sr.ContentSequence,
    *,
    series_instance_uid: str,
    series_number: int,
    sop_instance_uid: str,
    instance_number: int,
    manufacturer: str,
    series_description: str,
    is_complete: bool,
    is_final: bool,
) -> hd.SOPClass:
    """The document ``hd.sr.ComprehensiveSR(evidence, content, ...)`` makes with these arguments.

    ``content`` is a template's content sequence of one root item (e.g. a
    ``hd.sr.MeasurementReport``); its elements are shared with the document, as
    highdicom shares them, so build a fresh tree for each document.
    """
    if not evidence:
        raise ValueError("No evidence was provided.")
    if len(content) != 1:
        raise ValueError("The content of an SR document has one root item.")
    first = evidence[0]
    document = hd.SOPClass(
        study_instance_uid=first.StudyInstanceUID,
        series_instance_uid=series_instance_uid,
        series_number=series_number,
        sop_instance_uid=sop_instance_uid,
        sop_class_uid=ComprehensiveSRStorage,
        instance_number=instance_number,
        manufacturer=manufacturer,
        modality="SR",
        transfer_syntax_uid=ExplicitVRLittleEndian,
        patient_id=first.PatientID,
        patient_name=first.PatientName,
        patient_birth_date=first.PatientBirthDate,
        patient_sex=first.PatientSex,
        accession_number=first.AccessionNumber,
        study_id=first.StudyID,
        study_date=first.StudyDate,
        study_time=first.StudyTime,
        referring_physician_name=getattr(first, "ReferringPhysicianName", None),
        specific_character_set=first.get("SpecificCharacterSet"),
        series_description=series_description,
    )
    document.CompletionFlag = "COMPLETE" if is_complete else "PARTIAL"
    document.VerificationFlag = "UNVERIFIED"
    document.PreliminaryFlag = "FINAL" if is_final else "PRELIMINARY"
    for tag, value in content[0].items():
        document[tag] = value
    same_study, other_studies = _evidence(evidence, str(document.StudyInstanceUID))
    if same_study:
        document.CurrentRequestedProcedureEvidenceSequence = same_study
    if other_studies:
        document.PertinentOtherEvidenceSequence = other_studies
    document.PerformedProcedureCodeSequence = []
    document.ReferencedPerformedProcedureStepSequence = []
    document.copy_patient_and_study_information(first)
    document.ContributingEquipmentSequence = _contributing_equipment(first)
    return document


def _evidence(evidence: Sequence[Dataset], study_uid: str) -> tuple[list[Dataset], list[Dataset]]:
    """Hierarchical references (study, series, instance) of the evidence, this study's apart.

    The grouping and order of ``highdicom.sr.utils.collect_evidence``: first
    appearance of each study and series, duplicates of an instance skipped.
    """
    groups: dict[bool, dict[tuple[str, str], list[Dataset]]] = {
        True: defaultdict(list),
        False: defaultdict(list),
    }
    seen: set[str] = set()
    for ds in evidence:
        if ds.SOPInstanceUID in seen:
            continue
        seen.add(ds.SOPInstanceUID)
        item = Dataset()
        item.ReferencedSOPClassUID = ds.SOPClassUID
        item.ReferencedSOPInstanceUID = ds.SOPInstanceUID
        groups[ds.StudyInstanceUID == study_uid][(ds.StudyInstanceUID, ds.SeriesInstanceUID)].append(item)
    return _references(groups[True]), _references(groups[False])


def _references(collection: dict[tuple[str, str], list[Dataset]]) -> list[Dataset]:
    studies: dict[str, list[Dataset]] = defaultdict(list)
    for (study_uid, series_uid), instances in collection.items():
        series = Dataset()
        series.SeriesInstanceUID = series_uid
        series.ReferencedSOPSequence = instances
        studies[study_uid].append(series)
    items = []
    for study_uid, series_items in studies.items():
        study = Dataset()
        study.StudyInstanceUID = study_uid
        study.ReferencedSeriesSequence = series_items
        items.append(study)
    return items


def _contributing_equipment(source: Dataset) -> list[hd.ContributingEquipment]:
    """The source's acquisition equipment when it names one, then highdicom as the maker."""
    equipment = []
    # highdicom's own rule (SOPClass._add_contributing_equipment): a source it cannot read
    # acquisition equipment from adds none, whatever the reason
    with contextlib.suppress(Exception):
        equipment.append(hd.ContributingEquipment.for_image_acquisition(source))
    equipment.append(hd.ContributingEquipment.for_highdicom())
    return equipment
