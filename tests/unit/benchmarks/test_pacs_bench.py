"""``make bench``'s PACS suite: the study-SR figures it measures without servers."""

from __future__ import annotations

import pytest

from benchmarks.pacs_bench import as_studies, sr_document_ratio
from tests.unit.serving.serving_support import make_dicom

pytestmark = pytest.mark.unit


def test_the_sr_figures_come_from_one_study_built_both_ways() -> None:
    [study] = as_studies([make_dicom(seed=1), make_dicom(seed=2)])  # one study, fresh UIDs
    figures = sr_document_ratio(study, repeats=2)
    assert 0.0 < figures["sr_document_vs_highdicom"] < 10.0
    bundle = figures["send_back_bundle_ms"]
    assert bundle["no_box"] > 0.0
    assert bundle["three_boxes_an_image"] > 0.0
