"""Latency of a candidate ONNX, measured where the gate runs: batch 1 through ONNX Runtime.

The canary gate needs a number it can trust for exactly this file, whatever training wrote;
timing the model costs a second and cannot be forged by a tag.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class LatencyMeasurement:
    p50_ms: float
    p95_ms: float
    runs: int
    input_shape: tuple[int, ...]


def _input_hw(session: object, default: int = 640) -> tuple[int, int]:
    """Model input size from the ONNX contract metadata, else from the graph, else ``default``."""
    meta = session.get_modelmeta().custom_metadata_map  # type: ignore[attr-defined]
    if "cxr_contract" in meta:
        h, w = json.loads(meta["cxr_contract"])["imgsz"]
        return int(h), int(w)
    shape = session.get_inputs()[0].shape  # type: ignore[attr-defined]
    dims = [d if isinstance(d, int) else default for d in shape[2:4]]
    return (dims[0], dims[1]) if len(dims) == 2 else (default, default)


def measure_onnx_latency(onnx_path: Path, runs: int = 20, warmup: int = 3) -> LatencyMeasurement:
    """p50/p95 wall time of single-image inference on CPU (one thread pool, like a Triton instance)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    h, w = _input_hw(session)
    name = session.get_inputs()[0].name
    batch = np.full((1, 3, h, w), 114 / 255, dtype=np.float32)
    for _ in range(warmup):
        session.run(None, {name: batch})
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, {name: batch})
        times.append((time.perf_counter() - start) * 1000)
    p50, p95 = np.percentile(times, [50, 95])
    return LatencyMeasurement(float(p50), float(p95), runs, batch.shape)
