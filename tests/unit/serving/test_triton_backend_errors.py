"""What a failed Triton inference does to the backend's cached model config.

A version no longer loaded (or a model that refused the input) is read again at the next request.
A full queue or a deadline says nothing about the model: dropping the cache there made every
refused request cost the already overloaded server a metadata and a config call more.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from tritonclient.utils import InferenceServerException

from serving.errors import GatewayTimeout, ModelNotReady, Overloaded, ServingError
from serving.inference.backend_triton import TRITON_QUEUE_FULL
from tests.unit.serving.test_triton_version_swap import SwappingTriton, _backend, _settings

pytestmark = pytest.mark.unit


class FailingTriton(SwappingTriton):
    """Counts config reads; every inference fails with ``status`` and ``message``."""

    def __init__(self, status: str, message: str) -> None:
        super().__init__()
        self.status, self.message = status, message
        self.config_reads = 0

    async def get_model_config(self, name: str, **kwargs: Any) -> dict[str, Any]:
        self.config_reads += 1
        return await super().get_model_config(name, **kwargs)

    async def infer(self, name: str, inputs: list[Any], model_version: str = "", **_: Any) -> Any:
        raise InferenceServerException(self.message, status=self.status)


def _config_reads(tmp_path: Path, server: FailingTriton, error: type[ServingError], requests: int) -> int:
    backend = _backend(_settings(tmp_path), server)
    batch = np.zeros((1, 3, 128, 128), np.float32)

    async def scenario() -> None:
        for _ in range(requests):
            served = await backend.model("production")
            with pytest.raises(error):
                await backend.infer("production", batch, served)

    asyncio.run(scenario())
    return server.config_reads


@pytest.mark.parametrize(
    ("status", "message", "error"),
    [
        ("StatusCode.UNAVAILABLE", f"[request id: <id_unknown>] {TRITON_QUEUE_FULL}", Overloaded),
        ("StatusCode.DEADLINE_EXCEEDED", "Deadline Exceeded", GatewayTimeout),
    ],
)
def test_an_overloaded_or_slow_server_is_not_asked_for_its_config_again_per_request(
    tmp_path: Path, status: str, message: str, error: type[ServingError]
) -> None:
    assert _config_reads(tmp_path, FailingTriton(status, message), error, requests=5) == 1


def test_a_version_that_is_gone_is_read_again_at_the_next_request(tmp_path: Path) -> None:
    server = FailingTriton("StatusCode.NOT_FOUND", "Request for unknown model: version 1 is not found")
    assert _config_reads(tmp_path, server, ModelNotReady, requests=3) == 3


class SmallBatchTriton(SwappingTriton):
    """A model config of ``max_batch_size: 2``; like Triton, a larger request is refused (INVALID_ARG)."""

    def __init__(self) -> None:
        super().__init__()
        self.batches: list[int] = []

    async def get_model_config(self, name: str, **kwargs: Any) -> dict[str, Any]:
        cfg = await super().get_model_config(name, **kwargs)
        cfg["config"]["max_batch_size"] = 2
        return cfg

    async def infer(self, name: str, inputs: list[Any], model_version: str = "", **kwargs: Any) -> Any:
        batch = inputs[0].shape()[0]
        if batch > 2:
            raise InferenceServerException(
                f"[request id: <id_unknown>] inference request batch-size must be <= 2 for '{name}'",
                status="StatusCode.INVALID_ARGUMENT",
            )
        self.batches.append(batch)
        return await super().infer(name, inputs, model_version, **kwargs)


def test_a_batch_is_sent_in_chunks_the_models_max_batch_size_takes(tmp_path: Path) -> None:
    """CXR_MAX_BACKEND_BATCH (8) above the repository's max_batch_size (2): every batch request of
    3..8 images was refused by Triton and answered 502; the gateway now sends what the config takes."""
    from serving.gateway.state import build_state
    from tests.unit.serving.serving_support import make_png

    settings = _settings(tmp_path)
    assert settings.max_backend_batch == 8
    server = SmallBatchTriton()
    detector = build_state(settings, backend=_backend(settings, server), use_store=False).detector
    try:
        replies = asyncio.run(detector.detect([make_png(seed=i) for i in range(5)]))
    finally:
        detector.cpu.close()
    assert len(replies) == 5
    assert sorted(server.batches) == [1, 2, 2]
