"""In-process ONNX Runtime backend: ``cxr serve --backend onnx --model model.onnx``.

For a laptop or a site without Triton: the same ONNX file and the same
pre/post-processing, run in this process. Every stage serves the one model, with
the ``operating_points.json`` training wrote beside it when it is there.
Inference runs in a worker thread (ORT releases the GIL), never on the event loop.
"""

from __future__ import annotations

import asyncio
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from core.hashing import file_sha256
from core.stages import Stage
from core.variants import DEFAULT_VARIANT, VARIANT_METADATA_KEY, cpu_precision, parse_variant
from serving.contract import contract_from_metadata
from serving.errors import ModelNotReady
from serving.inference.backend import ServedModel
from serving.inference.operating_points import beside as operating_points_beside

if TYPE_CHECKING:
    import onnxruntime as ort


def ort_session(model_path: Path, *, threads: int, spin: bool) -> ort.InferenceSession:
    """A CPU session with ``threads`` intra-op threads (0: ORT's default, all cores), spin-waiting or not."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    return ort.InferenceSession(str(model_path), sess_options=options, providers=["CPUExecutionProvider"])


class OnnxBackend:
    def __init__(
        self, model_path: Path, *, name: str = "cxr-detector", threads: int = 0, workers: int = 0
    ) -> None:
        if not model_path.is_file():
            raise FileNotFoundError(f"ONNX model {model_path} does not exist (pass --model PATH)")

        # Two sessions over the same file. A run that starts alone uses every core and lets
        # ORT's idle threads spin-wait: the lowest latency (measured on 2 cores: 52 vs 79 ms
        # for a 640 px run with spinning off). Runs that overlap use a session with ONE
        # non-spinning thread each, so concurrent requests run side by side, one per core:
        # on 2 cores that computed 22.2 img/s against 14.4 for one 2-thread session running
        # them in turn (`ort_parallelism` in benchmarks/serve_bench.py), and no spinning
        # thread steals the CPU that decoding the next upload needs.
        try:
            self._session = ort_session(model_path, threads=threads or 1, spin=False)
            self._solo_session = ort_session(model_path, threads=threads, spin=True)
            meta = dict(self._session.get_modelmeta().custom_metadata_map)
            contract = contract_from_metadata(meta)
        except Exception as exc:  # ORT's own exceptions share no base: not ONNX, a broken graph, bad metadata
            raise ModelNotReady(
                f"ONNX model {model_path} cannot be loaded ({type(exc).__name__}: {exc}); "
                "pass --model the model.onnx a training run exported"
            ) from exc
        self._inflight = 0
        digest = file_sha256(model_path)
        version = meta.get("cxr_model_version") or f"local-{digest[:12]}"
        # the thresholds and calibrator training chose for this very file, when they are beside it
        ops = operating_points_beside(model_path, digest)
        # an INT8 file says so in its metadata (training/quantize.py); older ones are the fp32 export
        # (an fp16-trt file is the fp32 graph: this CPU session computes it in fp32)
        variant = cpu_precision(parse_variant(meta.get(VARIANT_METADATA_KEY) or DEFAULT_VARIANT))
        self._model = ServedModel(
            name=name, version=version, contract=contract, operating_points=ops, variant=variant
        )
        # InferenceSession.run is thread-safe: each worker runs one request at a time.
        self._pool = ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1, thread_name_prefix="ort")

    async def model(self, stage: Stage) -> ServedModel:
        return self._model

    def _run(self, batch: np.ndarray, alone: bool) -> np.ndarray:
        c = self._model.contract
        session = self._solo_session if alone else self._session
        return np.asarray(session.run([c.output_name], {c.input_name: batch})[0], dtype=np.float32)

    async def infer(self, stage: Stage, batch: np.ndarray, model: ServedModel | None = None) -> np.ndarray:
        # one model for every stage, never swapped: ``model`` is always this one
        # "alone" counts runs submitted, queued ones included: under load the next run is
        # usually already waiting, and a spinning all-core run would then compete with it.
        self._inflight += 1  # only the event loop's thread touches it
        alone = self._inflight == 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, self._run, batch, alone)
        except Exception as exc:  # ORT raises its own untyped errors
            raise ModelNotReady(f"onnxruntime failed: {exc}") from exc
        finally:
            self._inflight -= 1

    async def ready(self, stage: Stage) -> bool:
        return True

    def forget(self, stage: Stage) -> None:
        return None

    async def close(self) -> None:
        self._pool.shutdown(wait=False)
