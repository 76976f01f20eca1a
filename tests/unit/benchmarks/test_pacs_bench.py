"""``make bench``'s PACS suite: the study-SR figures it measures without servers."""

from __future__ import annotations

import pytest

from benchmarks.pacs_bench import as_studies, roundtrip_ceiling, scp_alone, sr_document_ratio
from tests.unit.serving.serving_support import make_dicom

pytestmark = pytest.mark.unit


def test_the_sr_figures_come_from_one_study_built_both_ways() -> None:
    [study] = as_studies([make_dicom(seed=1), make_dicom(seed=2)])  # one study, fresh UIDs
    figures = sr_document_ratio(study, repeats=2)
    assert 0.0 < figures["sr_document_vs_highdicom"] < 10.0
    bundle = figures["send_back_bundle_ms"]
    assert bundle["no_box"] > 0.0
    assert bundle["three_boxes_an_image"] > 0.0


def test_the_ceiling_is_detect_cpu_over_detect_plus_what_the_scp_and_the_pacs_add() -> None:
    cpu_ms = {
        "detect": {"gateway": 120.0, "scp": 0.2, "orthanc": 0.6},
        "roundtrip": {"gateway": 150.0, "scp": 19.0, "orthanc": 8.0},
    }
    # the gateway's own round-trip cost (150) does not enter: the ceiling assumes it equal to detect's
    assert roundtrip_ceiling(cpu_ms) == round(120.8 / (120.0 + 19.0 + 8.0), 3)
    assert roundtrip_ceiling({"detect": {"gateway": 0.0}, "roundtrip": {"gateway": 1.0}}) is None


def test_the_scp_alone_receives_real_c_stores_and_counts_its_own_cpu() -> None:
    figures = scp_alone(n_images=2, repeats=1, idle_s=0.2)
    # a real SCP process spooled both images, and the do-nothing handler none (scp_alone raises on a
    # refused store); the CPU figures themselves are /proc's 10 ms ticks, too coarse for two images
    assert figures["scp_spool_spooled"] == 2
    assert figures["scp_noop_spooled"] == 0
    assert {
        "scp_spool_cpu_ms_per_image",
        "scp_noop_cpu_ms_per_image",
        "scp_idle_association_cpu_ms_per_s",
    } <= set(figures)
