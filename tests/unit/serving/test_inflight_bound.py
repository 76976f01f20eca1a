"""A stage's in-flight slots are given back only once none of the request's inferences still run.

A batch larger than ``CXR_MAX_BACKEND_BATCH`` goes to the backend as concurrent chunks. When one
chunk failed, ``asyncio.gather`` raised at once while the others were still at the backend: the
request's slots went back to the gate with inferences running, so the per-stage bound no longer
held. The same must hold for a request that is cancelled (a client gone, the request timeout).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from core.stages import Stage
from data_pipeline.classes import CLASS_NAMES
from serving.contract import ModelContract
from serving.errors import BackendError, Overloaded
from serving.gateway.state import build_state
from serving.inference.backend import ServedModel
from serving.inference.detector import DetectionService
from tests.unit.serving.serving_support import make_png, onnx_settings, write_keys, write_stage_files

pytestmark = pytest.mark.unit

CONTRACT = ModelContract(imgsz=(128, 128), class_names=tuple(CLASS_NAMES))


class SlowServer:
    """Counts the inferences it is running; the first fails at once when ``fail_first``, the rest wait."""

    def __init__(self, *, fail_first: bool) -> None:
        self.fail_first = fail_first
        self.running = 0
        self.calls = 0
        self.started = asyncio.Event()
        self.release = asyncio.Event()

    async def model(self, stage: Stage) -> ServedModel:
        return ServedModel(name="cxr-detector", version="7", contract=CONTRACT)

    async def infer(self, stage: Stage, batch: np.ndarray, model: ServedModel | None = None) -> np.ndarray:
        self.calls += 1
        first = self.calls == 1
        self.running += 1
        try:
            await asyncio.sleep(0)
            if first and self.fail_first:
                raise BackendError(f"stage '{stage}' inference failed: broken chunk")
            self.started.set()
            await self.release.wait()
            return np.zeros((batch.shape[0], 4 + len(CLASS_NAMES), 336), np.float32)
        finally:
            self.running -= 1

    async def ready(self, stage: Stage) -> bool:
        return True

    def forget(self, stage: Stage) -> None:
        return None

    async def close(self) -> None:
        return None


def _detector(tmp_path: Path, server: SlowServer) -> DetectionService:
    keys = tmp_path / "keys.json"
    write_keys(keys)
    settings = onnx_settings(tmp_path / "unused.onnx", keys, tmp_path, max_backend_batch=1)
    write_stage_files(settings.gitops_dir, production="7")
    return build_state(settings, backend=server, use_store=False).detector


def test_a_failed_chunk_keeps_the_slots_until_the_other_chunks_have_stopped(tmp_path: Path) -> None:
    async def scenario() -> tuple[int, int]:
        server = SlowServer(fail_first=True)
        detector = _detector(tmp_path, server)
        try:
            with pytest.raises(BackendError):
                await detector.detect([make_png(seed=1), make_png(seed=2), make_png(seed=3)])
            # the moment the caller hears of the failure: slots free AND nothing left at the backend
            return detector.gate.current.get("production", 0), server.running
        finally:
            server.release.set()
            detector.cpu.close()

    slots, running = asyncio.run(scenario())
    assert (slots, running) == (0, 0)


def test_a_cancelled_request_gives_its_slots_back(tmp_path: Path) -> None:
    async def scenario() -> tuple[int, int]:
        server = SlowServer(fail_first=False)
        detector = _detector(tmp_path, server)
        try:
            task = asyncio.create_task(detector.detect([make_png(seed=1), make_png(seed=2)]))
            await asyncio.wait_for(server.started.wait(), timeout=30)
            assert detector.gate.current["production"] == 2
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            return detector.gate.current.get("production", 0), server.running
        finally:
            server.release.set()
            detector.cpu.close()

    assert asyncio.run(scenario()) == (0, 0)


def test_a_batch_larger_than_the_stage_bound_runs_on_an_idle_stage_instead_of_retry_later(
    tmp_path: Path,
) -> None:
    """Weighed by its image count, a batch above CXR_MAX_INFLIGHT_PER_STAGE was refused with a 503
    "retry later" even by an idle stage, on every retry; it takes the whole bound instead."""

    async def scenario() -> tuple[int, int, int]:
        server = SlowServer(fail_first=False)
        server.release.set()
        keys = tmp_path / "keys.json"
        write_keys(keys)
        settings = onnx_settings(tmp_path / "unused.onnx", keys, tmp_path, max_inflight_per_stage=2)
        write_stage_files(settings.gitops_dir, production="7")
        detector = build_state(settings, backend=server, use_store=False).detector
        try:
            replies = await detector.detect([make_png(seed=i) for i in range(3)])
            # and it still needs the whole bound: one slot taken, it is refused
            with detector.gate.enter("production"), pytest.raises(Overloaded):
                await detector.detect([make_png(seed=i) for i in range(3)])
            return len(replies), detector.gate.current.get("production", 0), server.running
        finally:
            detector.cpu.close()

    assert asyncio.run(scenario()) == (3, 0, 0)
