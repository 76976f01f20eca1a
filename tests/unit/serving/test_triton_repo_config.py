"""Both Triton repository variants: same tensors, batching and queue policy; contract in parameters."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from serving.inference.triton_repo import RepositoryOptions, build_repository

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("variant", ["python", "onnxruntime"])
def test_repository_layout_and_config(onnx_model: Path, tmp_path: Path, variant: str) -> None:
    model_dir = build_repository(onnx_model, tmp_path, variant=variant, version=2, model_version="12")  # type: ignore[arg-type]
    assert (model_dir / "2" / "model.onnx").read_bytes() == onnx_model.read_bytes()
    assert (model_dir / "2" / "model.py").exists() == (variant == "python")
    config = (model_dir / "config.pbtxt").read_text()
    assert ('backend: "python"' in config) == (variant == "python")
    assert ('platform: "onnxruntime_onnx"' in config) == (variant == "onnxruntime")
    assert "max_batch_size: 8" in config
    assert "timeout_action: REJECT" in config and "max_queue_size: 64" in config
    assert 'name: "images" data_type: TYPE_FP32 dims: [ 3, -1, -1 ]' in config
    assert 'name: "output0" data_type: TYPE_FP32 dims: [ 18, -1 ]' in config
    match = re.search(r'key: "cxr_contract" value: \{ string_value: ("(?:[^"\\]|\\.)*") \}', config)
    assert match is not None
    contract = json.loads(json.loads(match.group(1)))
    assert contract["imgsz"] == [128, 128] and len(contract["class_names"]) == 14
    assert 'key: "cxr_model_version" value: { string_value: "12" }' in config


def test_tensorrt_fp16_block_only_for_gpu_onnxruntime(onnx_model: Path, tmp_path: Path) -> None:
    options = RepositoryOptions(gpu=True, tensorrt_fp16=True, max_batch_size=16)
    config = (
        build_repository(
            onnx_model, tmp_path / "a", variant="onnxruntime", max_batch_size=16, options=options
        )
        / "config.pbtxt"
    ).read_text()
    assert "KIND_GPU" in config and '"tensorrt"' in config and "max_batch_size: 16" in config
    config_py = (
        build_repository(onnx_model, tmp_path / "b", variant="python", options=options, max_batch_size=16)
        / "config.pbtxt"
    ).read_text()
    assert '"tensorrt"' not in config_py


def test_missing_onnx_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_repository(tmp_path / "nope.onnx", tmp_path / "repo")
