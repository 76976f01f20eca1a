"""An answer comes from the very model version it names, even when Triton swaps versions meanwhile.

The Triton backend reads a stage's model config once (version, contract, operating points) and
caches it. A promotion loads the next version into the stage's Triton; a request that read the
old config and inferred after the swap was answered by the new model, yet named, thresholded and
calibrated as the old one. The backend now asks Triton for the version whose config it read, and
a version no longer loaded is refused (ModelNotReady), never answered by another.
"""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from tritonclient.utils import InferenceServerException

from core.stages import Stage
from data_pipeline.classes import CLASS_NAMES
from serving.config import ServingSettings
from serving.contract import ModelContract
from serving.errors import ModelNotReady
from serving.gateway.state import build_state
from serving.inference.backend_triton import TritonBackend
from tests.unit.serving.serving_support import make_png, onnx_settings, write_keys, write_stage_files

pytestmark = pytest.mark.unit

CONTRACT = ModelContract(imgsz=(128, 128), class_names=tuple(CLASS_NAMES))
ANCHORS = 336  # a 128 px YOLO head: 16² + 8² + 4²


class _Result:
    def __init__(self, out: np.ndarray) -> None:
        self.out = out

    def as_numpy(self, name: str) -> np.ndarray:
        return self.out


class SwappingTriton:
    """One stage's Triton as tritonclient's asyncio client sees it; :meth:`swap` is a promotion."""

    def __init__(self) -> None:
        self.triton_version = "1"  # the numeric version folder loaded (version_policy latest 1)
        self.cxr_version = "7"  # the registry version its config names
        self.answered_by: list[str] = []

    def swap(self, triton_version: str, cxr_version: str) -> None:
        self.triton_version, self.cxr_version = triton_version, cxr_version

    async def get_model_metadata(self, name: str, model_version: str = "", **_: Any) -> dict[str, Any]:
        return {"name": name, "versions": [self.triton_version], "platform": "python"}

    async def get_model_config(self, name: str, **_: Any) -> dict[str, Any]:
        params = {"cxr_model_version": self.cxr_version, "cxr_contract": CONTRACT.to_json()}
        return {"config": {"name": name, "parameters": {k: {"string_value": v} for k, v in params.items()}}}

    async def infer(self, name: str, inputs: list[Any], model_version: str = "", **_: Any) -> _Result:
        if model_version and model_version != self.triton_version:
            raise InferenceServerException(
                f"Request for unknown model: '{name}' version {model_version} is not found",
                status="StatusCode.NOT_FOUND",
            )
        self.answered_by.append(self.cxr_version)
        batch = inputs[0].shape()[0]
        return _Result(np.zeros((batch, 4 + len(CLASS_NAMES), ANCHORS), np.float32))

    async def close(self) -> None:
        return None


def _backend(settings: ServingSettings, server: SwappingTriton, stage: Stage = "production") -> TritonBackend:
    backend = TritonBackend(settings)
    backend._clients[stage] = [server]
    backend._cycle[stage] = itertools.cycle([server])
    return backend


def _settings(tmp_path: Path) -> ServingSettings:
    keys = tmp_path / "keys.json"
    write_keys(keys)
    settings = onnx_settings(tmp_path / "unused.onnx", keys, tmp_path, routing_poll_s=0.0)
    write_stage_files(settings.gitops_dir, production="7")
    return settings


def test_an_inference_after_a_swap_is_refused_not_answered_by_the_new_version(tmp_path: Path) -> None:
    server = SwappingTriton()
    backend = _backend(_settings(tmp_path), server)
    batch = np.zeros((1, 3, 128, 128), np.float32)

    async def scenario() -> None:
        served = await backend.model("production")
        assert served.version == "7"
        server.swap("2", "8")  # the promotion: version 2 (registry 8) loaded, 1 unloaded
        with pytest.raises(ModelNotReady):
            await backend.infer("production", batch)  # the cached config still describes 7
        # the failure dropped the cache: the next read describes what Triton serves now
        served = await backend.model("production")
        assert served.version == "8"
        await backend.infer("production", batch, served)

    asyncio.run(scenario())
    assert server.answered_by == ["8"]  # only the request that named 8 was answered, by 8


def test_a_detection_is_never_named_after_a_version_that_did_not_answer_it(tmp_path: Path) -> None:
    """The pipeline prepared and will name one model; another request re-read the config in between."""
    settings = _settings(tmp_path)
    server = SwappingTriton()
    backend = _backend(settings, server)
    detector = build_state(settings, backend=backend, use_store=False).detector

    async def scenario() -> None:
        model = await backend.model("production")  # this request's model: version 7
        uploads = await detector.pipeline.decode([make_png()], model, "production")
        server.swap("2", "8")
        backend.forget("production")  # e.g. a routing reload, for another request
        assert (await backend.model("production")).version == "8"
        try:
            outcomes = await detector.pipeline.infer("production", model, uploads, None)
        except ModelNotReady:
            return  # refused: the caller retries and is answered by 8, named 8
        assert server.answered_by[-1] == outcomes[0].model.version, "answered by one, named another"

    asyncio.run(scenario())
    detector.cpu.close()


def test_a_promotion_between_a_requests_config_read_and_its_inference_costs_it_no_503(
    tmp_path: Path,
) -> None:
    """The detector prepares the request again for the stage's new version and answers with it,
    named after it (the version that answered), instead of refusing it with ModelNotReady."""
    settings = _settings(tmp_path)
    server = SwappingTriton()
    backend = _backend(settings, server)
    detector = build_state(settings, backend=backend, use_store=False).detector

    async def scenario() -> list[str]:
        model = await detector._model("production")  # this request read version 7's config
        uploads = await detector.pipeline.decode([make_png()], model, "production")
        server.swap("2", "8")  # then the promotion loads 8 (Triton's 2) and unloads 7
        write_stage_files(settings.gitops_dir, production="8")
        outcomes = await detector._infer_bounded("production", model, uploads, None)
        return [o.model.version for o in outcomes]

    assert asyncio.run(scenario()) == ["8"]
    assert server.answered_by == ["8"]
    detector.cpu.close()
