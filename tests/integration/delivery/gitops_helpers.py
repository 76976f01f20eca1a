"""Helpers of the delivery integration tests: tiny contract-true ONNX models and registry entries.

The models are real ONNX graphs with the serving contract (input "images", output "output0"
[N, 4+14, A], cxr_contract metadata), small enough to build in milliseconds: an average pool
and a 1x1 convolution whose bias decides the boxes and scores. ``score=0`` gives a model that
never detects anything -- the "bad canary" of the issue.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
from mlflow.tracking import MlflowClient
from onnx import TensorProto, helper, numpy_helper

from core.stage_file import StageFile, write_stage_file
from data_pipeline.classes import CLASS_NAMES
from stack.components import gateway_component
from tests.fixtures.servers import HOST, RunningProcess, free_port

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


def start_gateway(
    gitops: Path, stack: Path, model_name: str, tritons: dict[str, str], mlflow_uri: str, log: Path
) -> tuple[RunningProcess, str]:
    """The real gateway process following ``gitops``' stage files, each stage on its Triton in
    ``tritons`` (a stage without one points at a closed port); the caller stops it."""
    port = free_port()
    env = {
        "CXR_GITOPS_DIR": str(gitops),
        "CXR_STACK_DIR": str(stack),
        "CXR_AUTH_ENABLED": "false",
        "CXR_MODEL_NAME": model_name,
        "CXR_ROUTING_POLL_S": "0.2",
        "CXR_STORE_RESULTS": "false",
        "CXR_MLFLOW_URI": mlflow_uri,
    }
    for stage in ("staging", "canary", "production"):
        env[f"CXR_TRITON_{stage.upper()}_URL"] = tritons.get(stage) or f"{HOST}:{free_port()}"
    gateway = RunningProcess(gateway_component(HOST, port, Path(sys.executable), {**os.environ, **env}), log)
    gateway.start()
    return gateway, f"http://{HOST}:{port}"


def init_gitops_repo(root: Path, model_name: str, policy_yaml: str | None = None) -> Path:
    """A GitOps repository at ``root``: empty stage files for ``model_name``, the policy, one commit."""
    root.mkdir(parents=True)
    git(root, "init", "-q", "-b", "main")
    git(root, "config", "user.name", "Delivery Test")
    git(root, "config", "user.email", "delivery@example.org")
    for stage in ("staging", "canary", "production"):
        write_stage_file(root, StageFile(stage=stage, model_name=model_name))  # type: ignore[arg-type]
    if policy_yaml is not None:
        (root / "k8s" / "delivery-policy.yaml").write_text(policy_yaml)
    git(root, "add", ".")
    git(root, "commit", "-q", "-m", "initial stage files")
    return root
