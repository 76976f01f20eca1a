"""Triton backend: KServe v2 over gRPC with tritonclient's asyncio client.

A small pool of clients per stage (each its own HTTP/2 channel) spreads
concurrent requests; Triton's dynamic batcher merges them server-side. The
model contract, version and operating points come from the model config's
``parameters``, written by :mod:`serving.inference.triton_repo`, so a re-load picks up
a new model (and its per-class thresholds) without a gateway restart.
"""

from __future__ import annotations

import itertools
import logging
from typing import Any

import grpc
import numpy as np
from tritonclient.utils import InferenceServerException

from core.stages import Stage
from core.variants import DEFAULT_VARIANT, VARIANT_METADATA_KEY
from serving.config import ServingSettings
from serving.contract import ModelContract
from serving.errors import BackendError, GatewayTimeout, ModelNotReady, Overloaded, ServingError
from serving.inference.backend import ServedModel
from serving.inference.operating_points import from_parameters as operating_points_from

log = logging.getLogger(__name__)


#: grpc.StatusCode by the name tritonclient reports (``InferenceServerException.status()`` is ``str(code)``)
_STATUS_CODES = {str(code): code for code in grpc.StatusCode}

#: Triton's scheduler refuses a request past ``max_queue_size`` with UNAVAILABLE and this message
#: (core ``PriorityQueue::PolicyQueue::Enqueue``); UNAVAILABLE alone also means "cannot connect"
TRITON_QUEUE_FULL = "Exceeds maximum queue size"


def grpc_status(exc: Exception) -> tuple[grpc.StatusCode | None, str]:
    """The gRPC status and server message of a tritonclient error; (None, text) for any other error."""
    if isinstance(exc, InferenceServerException):
        return _STATUS_CODES.get(str(exc.status())), str(exc.message())
    return None, str(exc)


def _map_error(stage: Stage, exc: Exception, retry_after_s: int) -> ServingError:
    """A failed Triton call as the gateway's error, by its gRPC status.

    DEADLINE_EXCEEDED: the call outlived CXR_TRITON_TIMEOUT_S. NOT_FOUND: no such model
    loaded. UNAVAILABLE: the server cannot be reached, the model version is not ready, or its
    queue is full; Triton has no status of its own for the last, only its fixed message.
    """
    text = str(exc)
    code, message = grpc_status(exc)
    if code is grpc.StatusCode.UNAVAILABLE and message.endswith(TRITON_QUEUE_FULL):
        return Overloaded(
            f"stage '{stage}' inference queue is full; retry later", retry_after_s=retry_after_s
        )
    if code is grpc.StatusCode.DEADLINE_EXCEEDED:
        return GatewayTimeout(f"stage '{stage}' inference timed out")
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.NOT_FOUND):
        return ModelNotReady(f"stage '{stage}' has no model ready: {text}", retry_after_s=retry_after_s)
    return BackendError(f"stage '{stage}' inference failed: {text}")


def _max_batch_size(config: dict[str, Any]) -> int:
    """The model config's ``max_batch_size`` (0 when absent or unreadable: no limit known)."""
    try:
        return max(0, int(config.get("max_batch_size", 0) or 0))
    except (TypeError, ValueError):
        return 0


class TritonBackend:
    def __init__(self, settings: ServingSettings, *, pool_size: int = 2) -> None:
        self._settings = settings
        self._pool_size = pool_size
        self._clients: dict[Stage, list[Any]] = {}
        self._cycle: dict[Stage, itertools.cycle[Any]] = {}
        self._models: dict[Stage, ServedModel] = {}

    def _client(self, stage: Stage) -> Any:
        if stage not in self._clients:
            from tritonclient.grpc.aio import InferenceServerClient

            url = self._settings.triton_grpc_url(stage)
            # never through a proxy, whatever the environment names (the closed network): Triton is
            # this stack's or this cluster's own server, and the channel carries the images
            args = [("grpc.enable_http_proxy", 0)]
            self._clients[stage] = [
                InferenceServerClient(url, channel_args=args) for _ in range(self._pool_size)
            ]
            self._cycle[stage] = itertools.cycle(self._clients[stage])
        return next(self._cycle[stage])

    async def model(self, stage: Stage) -> ServedModel:
        if stage in self._models:
            return self._models[stage]
        name = self._settings.model_name
        # the loaded version BEFORE the config: a swap in between pins the old version with the new
        # config, which Triton then refuses (no longer loaded), rather than answering from a model
        # the response does not name; the other order could pin the new version to the old config
        try:
            client = self._client(stage)
            timeout = self._settings.triton_timeout_s
            meta = await client.get_model_metadata(name, as_json=True, client_timeout=timeout)
            cfg = await client.get_model_config(name, as_json=True, client_timeout=timeout)
        except Exception as exc:
            raise _map_error(stage, exc, self._settings.overload_retry_after_s) from exc
        loaded = [v for v in meta.get("versions", []) if str(v).isdigit()]
        params = {
            k: v.get("string_value", "") for k, v in cfg.get("config", {}).get("parameters", {}).items()
        }
        contract = (
            ModelContract.from_json(params["cxr_contract"], extra=params)
            if "cxr_contract" in params
            else ModelContract()
        )
        served = ServedModel(
            name=name,
            version=params.get("cxr_model_version", ""),
            contract=contract,
            operating_points=operating_points_from(params),
            variant=params.get(VARIANT_METADATA_KEY) or DEFAULT_VARIANT,
            server_version=str(max(loaded, key=int)) if loaded else "",
            max_batch_size=_max_batch_size(cfg.get("config", {})),
        )
        self._models[stage] = served
        log.info(
            "triton_model stage=%s name=%s version=%s imgsz=%s", stage, name, served.version, contract.imgsz
        )
        return served

    async def infer(self, stage: Stage, batch: np.ndarray, model: ServedModel | None = None) -> np.ndarray:
        """Infer on ``model``'s very version (its config was read with it), not on whatever Triton
        loaded since: a promotion swaps the version under a request that read the old config, and
        the answer was then named, thresholded and calibrated as the old version's."""
        from tritonclient.grpc import InferInput, InferRequestedOutput

        served = model or await self.model(stage)
        c = served.contract
        inp = InferInput(c.input_name, list(batch.shape), "FP32")
        inp.set_data_from_numpy(batch)
        try:
            result = await self._client(stage).infer(
                served.name,
                [inp],
                model_version=served.server_version,
                outputs=[InferRequestedOutput(c.output_name)],
                client_timeout=self._settings.triton_timeout_s,
            )
        except Exception as exc:
            error = _map_error(stage, exc, self._settings.overload_retry_after_s)
            # a version gone or a model that refused the input: its config is read again. A full
            # queue or a deadline says nothing about the model, and dropping it there made every
            # refused request cost the overloaded server two more calls (metadata and config).
            if isinstance(error, ModelNotReady | BackendError):
                self._models.pop(stage, None)
            raise error from exc
        out = result.as_numpy(c.output_name)
        if out is None or out.shape[0] != batch.shape[0]:
            raise BackendError(f"stage '{stage}' returned no '{c.output_name}' output for the batch")
        return np.asarray(out, dtype=np.float32)

    async def ready(self, stage: Stage) -> bool:
        try:
            return bool(
                await self._client(stage).is_model_ready(self._settings.model_name, client_timeout=2.0)
            )
        except Exception:
            return False

    def forget(self, stage: Stage) -> None:
        self._models.pop(stage, None)

    async def close(self) -> None:
        for clients in self._clients.values():
            for client in clients:
                await client.close()
        self._clients.clear()
