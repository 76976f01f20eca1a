"""One bad file is one quarantined image, never the end of an ingest.

A file above the size limit is refused before it is read; any exception while processing an image
becomes that image's error (with its type); a worker process that dies (a codec's segfault, the OOM
killer) costs the job it was running, and the other jobs finish in a fresh pool.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import cv2
import numpy as np
import pytest

import data_pipeline.executors as executors
import data_pipeline.export as export
from data_pipeline.config import get_settings
from data_pipeline.export import ImageJob, process_image
from data_pipeline.quality import ImageStats

pytestmark = pytest.mark.unit


def _png(path: Path, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    cv2.imwrite(str(path), rng.integers(20, 235, (48, 64), dtype=np.uint8))
    return path


def _jobs(tmp_path: Path, names: list[str]) -> list[ImageJob]:
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    out.mkdir()
    return [
        ImageJob(name, str(_png(src / f"{name}.png", i)), str(out / f"{name}.png"), 32, 1, "salt")
        for i, name in enumerate(names)
    ]


@pytest.fixture
def small_file_limit(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """CXR_DICOM_MAX_PIXEL_BYTES at its smallest: files over ~17 MiB are refused."""
    monkeypatch.setenv("CXR_DICOM_MAX_PIXEL_BYTES", "1024")
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


def test_a_file_over_the_size_limit_is_refused_before_it_is_read(
    tmp_path: Path, small_file_limit: None
) -> None:
    [job] = _jobs(tmp_path, ["big"])
    with open(job.source, "r+b") as handle:
        handle.truncate(64 * 1024 * 1024)  # sparse: costs no disk
    result = process_image(job)
    assert result.error is not None and "exceeds" in result.error, result.error
    assert "decode" not in result.timings


def test_an_exception_while_processing_an_image_is_its_error_not_the_runs_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    jobs = _jobs(tmp_path, ["a", "b", "c"])
    real = export.image_stats

    def stats(image_id: str, pixels: np.ndarray, width: int, height: int) -> ImageStats:
        if image_id == "b":
            raise MemoryError
        return real(image_id, pixels, width, height)

    monkeypatch.setattr(export, "image_stats", stats)
    results = executors.run_images(jobs, 1, None)
    by_id = {r.image_id: r for r in results}
    assert by_id["a"].error is None and by_id["c"].error is None
    assert by_id["b"].error is not None and by_id["b"].error.startswith("MemoryError")


def test_a_job_whose_output_cannot_be_written_is_its_error(tmp_path: Path) -> None:
    [job] = _jobs(tmp_path, ["a"])
    gone = ImageJob(job.image_id, job.source, str(tmp_path / "missing" / "a.png"), 32, 1, "salt")
    result = process_image(gone)
    assert result.error is not None and result.error.startswith("FileNotFoundError")


# Run in a fresh interpreter: its workers are forked (so they see the patched stage; the real pool's
# forkserver would not), and forking this test process, with whatever threads earlier tests left, could
# deadlock a child. The patched stage kills the worker as a codec's segfault or the OOM killer would.
_CRASH_SCRIPT = """
import json, multiprocessing, os, signal, sys
import data_pipeline.executors as executors
import data_pipeline.export as export
from data_pipeline.export import ImageJob

real = export.image_stats
crash = set(sys.argv[2].split(","))

def stats(image_id, pixels, width, height):
    if image_id in crash:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(image_id, pixels, width, height)

export.image_stats = stats
executors.pool_context = lambda: multiprocessing.get_context("fork")
jobs = [ImageJob(**job) for job in json.loads(sys.argv[1])]
results = executors.run_images(jobs, 3, None)
print(json.dumps({r.image_id: [r.error, r.width] for r in results}))
"""


def run_crash_script(
    script: str, jobs: list[ImageJob], crash: list[str], tmp_path: Path, timeout: float
) -> dict[str, list[object]]:
    """Run ``script`` (which kills the worker of each image in ``crash``) over ``jobs`` in a fresh
    interpreter; image id -> [error, width] of every result it printed."""
    root = Path(__file__).resolve().parents[3]
    run = subprocess.run(
        [sys.executable, "-c", script, json.dumps([asdict(j) for j in jobs]), ",".join(crash)],
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root), "CXR_STACK_DIR": str(tmp_path / "stack")},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    by_id: dict[str, list[object]] = json.loads(run.stdout.strip().splitlines()[-1])
    assert sorted(by_id) == sorted(j.image_id for j in jobs)
    return by_id


def test_a_worker_that_dies_costs_its_own_image_and_the_others_finish(tmp_path: Path) -> None:
    names = [f"img{i:02d}" for i in range(12)]
    jobs = _jobs(tmp_path, names)
    by_id = run_crash_script(_CRASH_SCRIPT, jobs, ["img03", "img09"], tmp_path, timeout=180)
    assert by_id["img03"][0] == by_id["img09"][0] == "decoder crashed (the worker process died)"
    assert all(by_id[n] == [None, 64] for n in names if n not in {"img03", "img09"})
    assert all(Path(j.dest).exists() for j in jobs if j.image_id not in {"img03", "img09"})


def test_the_ray_path_restores_ray_datas_errored_block_limit_when_it_cannot_start(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """max_errored_blocks is Ray Data's process-wide setting: left at -1 (drop failed blocks
    silently) after a failure here, every later Ray Data job of the process dropped its blocks."""
    ray = pytest.importorskip("ray")
    from ray.data import DataContext

    from data_pipeline.executors import run_images_ray

    def refuse(*args: object, **kwargs: object) -> None:
        raise RuntimeError("no Ray Data today")

    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray.data, "from_items", refuse)
    context = DataContext.get_current()
    before = context.max_errored_blocks
    monkeypatch.setattr(context, "max_errored_blocks", before)  # put back whatever this test finds
    with pytest.raises(RuntimeError, match="no Ray Data"):
        run_images_ray([ImageJob("a", "a.dcm", "a.png", 64, 1, "salt")], 1, None)
    assert context.max_errored_blocks == before
