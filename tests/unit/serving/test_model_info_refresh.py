"""A stage whose server loads a promoted model after its stage file changed is re-read.

The gap it closes: a promotion writes the stage file first, the stage's Triton reloads
seconds later. A request in between caches the old model's info; without a re-check the
gateway labelled the new model's answers with the old version until the next promotion.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from core.stages import Stage
from data_pipeline.classes import CLASS_NAMES
from serving.contract import ModelContract
from serving.gateway.state import build_state
from serving.inference.backend import ServedModel
from serving.inference.detector import DetectionService
from tests.unit.serving.serving_support import onnx_settings, write_keys, write_stage_files

pytestmark = pytest.mark.unit

CONTRACT = ModelContract(imgsz=(128, 128), class_names=tuple(CLASS_NAMES))


class LaggingServer:
    """Caches model info per stage like TritonBackend; ``loaded`` is what the server really serves."""

    def __init__(self, loaded: str) -> None:
        self.loaded = loaded
        self.fetches = 0
        self._cache: dict[Stage, ServedModel] = {}

    async def model(self, stage: Stage) -> ServedModel:
        if stage not in self._cache:
            self.fetches += 1
            self._cache[stage] = ServedModel(name="cxr-detector", version=self.loaded, contract=CONTRACT)
        return self._cache[stage]

    async def infer(self, stage: Stage, batch: np.ndarray, model: ServedModel | None = None) -> np.ndarray:
        raise NotImplementedError

    async def ready(self, stage: Stage) -> bool:
        return True

    def forget(self, stage: Stage) -> None:
        self._cache.pop(stage, None)

    async def close(self) -> None:
        return None


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _service(tmp_path: Path, server: LaggingServer) -> tuple[DetectionService, Clock]:
    keys = tmp_path / "keys.json"
    write_keys(keys)
    settings = onnx_settings(tmp_path / "unused.onnx", keys, tmp_path, routing_poll_s=0.0)
    write_stage_files(settings.gitops_dir, production="1")
    state = build_state(settings, backend=server, use_store=False)
    clock = Clock()
    state.detector.clock = clock
    return state.detector, clock


def test_the_new_version_is_named_once_the_server_has_loaded_it(tmp_path: Path) -> None:
    server = LaggingServer(loaded="1")
    detector, clock = _service(tmp_path, server)

    async def scenario() -> list[str]:
        seen = [(await detector.served_model("production")).version]
        write_stage_files(detector.router.gitops_dir, production="2")  # the promotion commit
        seen.append((await detector.served_model("production")).version)  # server not reloaded yet
        server.loaded = "2"  # the stage's Triton finishes its reload
        clock.now += DetectionService.MODEL_RECHECK_S
        seen.append((await detector.served_model("production")).version)
        return seen

    assert asyncio.run(scenario()) == ["1", "1", "2"]


def test_a_lagging_server_is_asked_at_most_once_per_interval(tmp_path: Path) -> None:
    server = LaggingServer(loaded="1")
    detector, clock = _service(tmp_path, server)
    write_stage_files(detector.router.gitops_dir, production="2")

    async def scenario() -> None:
        for _ in range(20):
            assert (await detector.served_model("production")).version == "1"

    asyncio.run(scenario())
    fetched = server.fetches
    assert fetched <= 2  # the stage-file change and at most one re-check, not one per request
    clock.now += DetectionService.MODEL_RECHECK_S
    asyncio.run(scenario())
    assert server.fetches == fetched + 1
