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


# A fresh interpreter: the patched work kills its worker as a codec's segfault or the OOM killer
# would; Ray pickles it by value (it is __main__'s), and the local pools that finish the dropped
# blocks fork (the real forkserver could not import __main__'s function).
_CRASH_SCRIPT = """
import json, multiprocessing, os, signal, sys
import ray
import data_pipeline.executors as executors
from data_pipeline.export import ImageJob, process_image

crash = set(sys.argv[2].split(","))

def work(job):
    if job.image_id in crash:
        os.kill(os.getpid(), signal.SIGKILL)
    return process_image(job)

executors.pool_context = lambda: multiprocessing.get_context("fork")
executors.RAY_BLOCK_JOBS = 4
jobs = [ImageJob(**job) for job in json.loads(sys.argv[1])]
try:
    results = executors.run_images(jobs, 2, None, executor="ray", work=work)
finally:
    ray.shutdown()
print(json.dumps({r.image_id: [r.error, r.width] for r in results}))
"""


def test_a_ray_worker_that_dies_costs_its_own_image_and_the_others_finish(tmp_path: Path) -> None:
    """Ray Data retried a task whose worker died for ever: one such file hung the ingest."""
    from tests.unit.data_pipeline.test_image_pool_failures import _jobs, run_crash_script

    pytest.importorskip("ray")
    names = [f"img{i:02d}" for i in range(12)]
    by_id = run_crash_script(_CRASH_SCRIPT, _jobs(tmp_path, names), ["img05"], tmp_path, timeout=300)
    assert by_id["img05"][0] == "decoder crashed (the worker process died)"
    assert all(by_id[n] == [None, 64] for n in names if n != "img05")
