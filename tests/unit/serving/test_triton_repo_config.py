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


def _graph(path: Path, *, input_name: str = "images", batch: int | str = "batch", elem: int = 1) -> Path:
    """A tiny ONNX whose tensors look like the detector's (only its interface matters to the builder)."""
    import onnx
    from onnx import TensorProto, helper

    from serving.contract import ModelContract

    image = helper.make_tensor_value_info(input_name, elem, [batch, 3, "height", "width"])
    out = helper.make_tensor_value_info("output0", TensorProto.FLOAT, [batch, 18, "anchors"])
    node = helper.make_node("ReduceMean", [input_name], ["output0"], keepdims=1)
    model = helper.make_model(helper.make_graph([node], "g", [image], [out]))
    entry = model.metadata_props.add()
    entry.key, entry.value = "cxr_contract", ModelContract(imgsz=(128, 128)).to_json()
    onnx.save(model, str(path))
    return path


def test_a_graph_that_matches_its_contract_builds(tmp_path: Path) -> None:
    assert (build_repository(_graph(tmp_path / "m.onnx"), tmp_path / "repo") / "config.pbtxt").is_file()


@pytest.mark.parametrize(
    ("kwargs", "says"),
    [
        ({"batch": 1}, "fixed batch of 1"),  # dynamic=False: fails once the batcher merges requests
        ({"input_name": "input"}, "no input 'images'"),  # the config would name a tensor it lacks
        ({"elem": 10}, "FLOAT16, not FLOAT"),  # a half-precision graph under a TYPE_FP32 config
    ],
)
def test_a_graph_unlike_the_config_written_for_it_is_refused(
    tmp_path: Path, kwargs: dict[str, object], says: str
) -> None:
    from serving.inference.triton_repo import ModelGraphMismatch

    onnx_path = _graph(tmp_path / "m.onnx", **kwargs)  # type: ignore[arg-type]
    with pytest.raises(ModelGraphMismatch, match=says):
        build_repository(onnx_path, tmp_path / "repo")
    assert not (tmp_path / "repo" / "cxr-detector").exists()
