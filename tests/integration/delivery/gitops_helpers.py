"""Helpers of the delivery integration tests: tiny contract-true ONNX models and registry entries.

The models are real ONNX graphs with the serving contract (input "images", output "output0"
[N, 4+14, A], cxr_contract metadata), small enough to build in milliseconds: an average pool
and a 1x1 convolution whose bias decides the boxes and scores. ``score=0`` gives a model that
never detects anything -- the "bad canary" of the issue.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import onnx
from mlflow.tracking import MlflowClient
from onnx import TensorProto, helper, numpy_helper

from data_pipeline.classes import CLASS_NAMES

IMGSZ = 64


def tiny_detector(path: Path, *, score: float, imgsz: int = IMGSZ, class_id: int = 0) -> Path:
    """Every anchor predicts one centred box (a quarter of the input) of ``class_id`` with ``score``."""
    channels = 4 + len(CLASS_NAMES)
    bias = np.zeros(channels, dtype=np.float32)
    bias[:4] = [imgsz / 2, imgsz / 2, imgsz / 4, imgsz / 4]
    bias[4 + class_id] = score
    nodes = [
        helper.make_node("AveragePool", ["images"], ["pooled"], kernel_shape=[8, 8], strides=[8, 8]),
        helper.make_node("Conv", ["pooled", "w", "b"], ["maps"]),
        helper.make_node("Reshape", ["maps", "shape"], ["output0"]),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny-cxr",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, imgsz, imgsz])],
        [helper.make_tensor_value_info("output0", TensorProto.FLOAT, ["batch", channels, "anchors"])],
        initializer=[
            numpy_helper.from_array(np.zeros((channels, 3, 1, 1), dtype=np.float32), "w"),
            numpy_helper.from_array(bias, "b"),
            numpy_helper.from_array(np.array([0, channels, -1], dtype=np.int64), "shape"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    contract = {
        "input": "images",
        "output": "output0",
        "layout": "xywh+cls",
        "imgsz": [imgsz, imgsz],
        "pad_value": 114,
        "normalize": "div255",
        "nms": "gateway",
        "class_names": list(CLASS_NAMES),
    }
    names = {i: n for i, n in enumerate(CLASS_NAMES)}
    for key, value in {
        "cxr_contract": json.dumps(contract),
        "imgsz": str([imgsz, imgsz]),
        "names": str(names),
        "stride": "8",
    }.items():
        model.metadata_props.append(onnx.StringStringEntryProto(key=key, value=value))
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def register_version(uri: str, model_name: str, onnx_path: Path, **tags: object) -> str:
    """Log the ONNX as ``onnx/model.onnx`` of a run and register it with lineage tags (the contract)."""
    assert onnx_path.name == "model.onnx", "the contract names the artifact onnx/model.onnx"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    experiment = client.get_experiment_by_name(model_name)
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(model_name)
    run = client.create_run(experiment_id)
    client.log_artifact(run.info.run_id, str(onnx_path), artifact_path="onnx")
    client.set_terminated(run.info.run_id)
    if not client.search_registered_models(filter_string=f"name='{model_name}'"):
        client.create_registered_model(model_name)
    base = {
        "parity_max_abs_diff": "5e-05",
        "map50": "0.40",
        "map40": "0.35",
        "dataset_version": "test",
        "imgsz": str(IMGSZ),
    }
    base.update({k: str(v) for k, v in tags.items()})
    version = client.create_model_version(
        model_name, source=f"runs:/{run.info.run_id}/onnx", run_id=run.info.run_id, tags=base
    )
    return str(version.version)


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, text=True).stdout
