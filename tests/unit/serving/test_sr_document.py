"""The study SR's document is highdicom's ComprehensiveSR, attribute for attribute.

``serving.dicom.sr_document`` builds the document around highdicom's content tree
without the constructor's re-checks (see its docstring for why). These tests build
the same arguments twice, once through highdicom's constructor and once through
ours, and compare the Part 10 files byte for byte after setting the four creation
times (the only values taken from the clock) equal. A highdicom upgrade that changes
its document fails here.
"""

from __future__ import annotations

import io
from typing import Any

import highdicom as hd
import pydicom
import pytest
from pydicom.dataset import Dataset

from serving.dicom.sr import source_header, study_sr_arguments
from serving.dicom.sr_document import comprehensive_sr
from serving.dicom.study_objects import dataset_bytes
from tests.unit.serving.serving_support import make_dicom
from tests.unit.serving.test_pacs_objects import STUDY, TRIAGE, detection, response

pytestmark = pytest.mark.unit

_CLOCK = {"InstanceCreationDate": "20261206", "InstanceCreationTime": "080000", "ContentDate": "20261206"}


def _fixed_clock(ds: Dataset) -> bytes:
    for keyword, value in _CLOCK.items():
        setattr(ds, keyword, value)
    ds.ContentTime = "080000"
    for item in ds.ContributingEquipmentSequence:
        if "ContributionDateTime" in item:
            item.ContributionDateTime = "20261206080000"
    return dataset_bytes(ds)


def _both(
    sources: list[Dataset], responses: list[dict[str, Any]], triage: dict[str, Any] | None
) -> tuple[bytes, bytes]:
    theirs = hd.sr.ComprehensiveSR(**study_sr_arguments(sources, responses, triage))
    ours = comprehensive_sr(**study_sr_arguments(sources, responses, triage))
    return _fixed_clock(theirs), _fixed_clock(ours)


def _header(seed: int, study: str = STUDY, **attributes: Any) -> Dataset:
    ds = source_header(make_dicom(seed=seed, study_uid=study))
    for keyword, value in attributes.items():
        if value is None:
            ds.pop(keyword, None)
        else:
            setattr(ds, keyword, value)
    return ds


@pytest.mark.parametrize("boxes", [0, 3])
@pytest.mark.parametrize("triage", [TRIAGE, None])
def test_the_study_sr_is_highdicoms_document_byte_for_byte(boxes: int, triage: dict[str, Any] | None) -> None:
    sources = [_header(1, Manufacturer="Acme", ManufacturerModelName="DX-1"), _header(2)]
    responses = [
        response([detection([10.0 + i, 12.0, 40.0, 50.0], class_id=i) for i in range(boxes)]) for _ in sources
    ]
    theirs, ours = _both(sources, responses, triage)
    assert ours == theirs
    read = pydicom.dcmread(io.BytesIO(ours))
    assert len(read.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence) == 2
    assert read.ContributingEquipmentSequence[0].Manufacturer == "Acme"  # the source's, then highdicom's
    assert isinstance(hd.sr.srread(io.BytesIO(ours)), hd.sr.ComprehensiveSR)  # highdicom's reader takes it


def test_a_de_identified_source_and_one_of_another_study_give_highdicoms_document_too() -> None:
    """Empty Type 2 attributes, no equipment, a character set, and evidence filed apart by study."""
    sources = [
        _header(
            3, PatientName=None, PatientBirthDate=None, Manufacturer=None, SpecificCharacterSet="ISO_IR 100"
        ),
        _header(4, study="1.2.826.0.1.3680043.8.498.1002"),
    ]
    responses = [response([detection()]), response([])]
    theirs, ours = _both(sources, responses, None)
    assert ours == theirs
    read = pydicom.dcmread(io.BytesIO(ours))
    assert read.PatientName == "" and read.SpecificCharacterSet == "ISO_IR 100"
    assert "PertinentOtherEvidenceSequence" in read


def test_a_document_needs_evidence_and_one_root() -> None:
    arguments = study_sr_arguments([_header(5)], [response([])])
    with pytest.raises(ValueError, match="evidence"):
        comprehensive_sr(**{**arguments, "evidence": []})
    with pytest.raises(ValueError, match="one root"):
        comprehensive_sr(**{**arguments, "content": hd.sr.ContentSequence([])})
