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
General module's flags as ``_SR`` sets them, the evidence grouped by highdicom's
``collect_evidence``, and the content tree's root as is.
What it leaves out are the checks that cannot fail for the trees ``serving.dicom.sr`` builds:
every image item references one of the ``evidence`` datasets (the tree is made from them), and
no SCOORD3D item exists (none is made). ``tests/unit/serving/test_sr_document.py`` holds the
two outputs equal, byte for byte but the creation times, so a highdicom upgrade that changes
the document shows there.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import highdicom as hd
from highdicom.sr.utils import collect_evidence
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
    # highdicom's own grouping of the evidence (study, series, instance; this study's apart).
    # It also checks that every image the tree references is in the evidence, by searching the
    # tree; given an empty tree it skips that search (two of the constructor's three), which
    # cannot fail for trees built from the evidence (serving.dicom.sr)
    no_tree = Dataset()
    no_tree.ContentSequence = []
    same_study, other_studies = collect_evidence(
        evidence, no_tree, study_instance_uid=document.StudyInstanceUID
    )
    if same_study:
        document.CurrentRequestedProcedureEvidenceSequence = same_study
    if other_studies:
        document.PertinentOtherEvidenceSequence = other_studies
    document.PerformedProcedureCodeSequence = []
    document.ReferencedPerformedProcedureStepSequence = []
    document.copy_patient_and_study_information(first)
    document.ContributingEquipmentSequence = _contributing_equipment(first)
    return document


def _contributing_equipment(source: Dataset) -> list[hd.ContributingEquipment]:
    """The source's acquisition equipment when it names one, then highdicom as the maker."""
    equipment = []
    # highdicom's own rule (SOPClass._add_contributing_equipment): a source it cannot read
    # acquisition equipment from adds none, whatever the reason
    with contextlib.suppress(Exception):
        equipment.append(hd.ContributingEquipment.for_image_acquisition(source))
    equipment.append(hd.ContributingEquipment.for_highdicom())
    return equipment
