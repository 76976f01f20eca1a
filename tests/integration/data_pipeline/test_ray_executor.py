"""The per-image work on Ray Data gives the same dataset version as the local process pool."""

from __future__ import annotations

from pathlib import Path

import pytest

from data_pipeline.config import DataSettings
from data_pipeline.ingest import build_dataset
from data_pipeline.synth import SynthConfig, generate

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_ray_data_executor_builds_the_same_version_as_the_process_pool(tmp_path: Path) -> None:
    ray = pytest.importorskip("ray")
    synth = generate(SynthConfig(n_images=6, seed=21, size=256, workers=1), tmp_path / "s")
    local = build_dataset(
        synth.dicom_dir,
        synth.annotations_csv,
        tmp_path / "a",
        settings=DataSettings(max_side=128, workers=2, executor="process"),
    )
    started_here = not ray.is_initialized()
    try:
        distributed = build_dataset(
            synth.dicom_dir,
            synth.annotations_csv,
            tmp_path / "b",
            settings=DataSettings(max_side=128, workers=2, executor="ray"),
        )
    finally:
        if started_here:
            ray.shutdown()
    assert distributed.version == local.version
