"""What the pipeline needs from an inference backend, whichever it is.

The Triton client and the in-process ONNX Runtime session both satisfy this
protocol, so routes, metrics and tests are the same for both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from core.operating_points import OperatingPoints
from core.stages import Stage
from core.variants import DEFAULT_VARIANT
from serving.contract import ModelContract


@dataclass(frozen=True)
class ServedModel:
    """The model a stage serves right now: its contract, registry identity and operating points.

    ``operating_points`` None: a version trained before them (global threshold, raw scores).
    ``server_version``: the server's own id of the version described (Triton's numeric version
    directory; "" where the backend has none), so an inference can ask for that very version.
    ``max_batch_size``: the most images the server takes in one call (Triton's model config;
    0: no limit of its own, as in-process ONNX Runtime).
    """

    name: str
    version: str
    contract: ModelContract
    operating_points: OperatingPoints | None = None
    variant: str = DEFAULT_VARIANT  # serving precision (core/variants.py): fp32, int8, fp16-trt
    server_version: str = ""
    max_batch_size: int = 0

    def batch_size(self, configured: int) -> int:
        """Images per inference call: ``CXR_MAX_BACKEND_BATCH``, never above what the server takes.

        Triton refuses a request of more images than the config's ``max_batch_size`` (INVALID_ARG):
        a repository built with a smaller one than the gateway's setting failed every larger batch.
        """
        size = max(1, configured)
        return min(size, self.max_batch_size) if self.max_batch_size > 0 else size


class InferenceBackend(Protocol):
    async def model(self, stage: Stage) -> ServedModel:
        """The stage's model; raises ModelNotReady when none is loaded or reachable."""
        ...

    async def infer(self, stage: Stage, batch: np.ndarray, model: ServedModel | None = None) -> np.ndarray:
        """(N, 3, S, S) float32 -> (N, 4 + classes, anchors) float32.

        ``model``: the model the caller prepared ``batch`` for and will name in its answer; the
        backend runs that very version or fails (ModelNotReady), never another one it has since
        loaded. None: whatever the stage serves now.

        Failures are typed :mod:`serving.errors`: Overloaded, GatewayTimeout, ModelNotReady
        or BackendError; callers never read their messages to tell them apart.
        """
        ...

    async def ready(self, stage: Stage) -> bool: ...

    def forget(self, stage: Stage) -> None:
        """Drop cached model info (after a promotion changed what the stage serves)."""
        ...

    async def close(self) -> None: ...
