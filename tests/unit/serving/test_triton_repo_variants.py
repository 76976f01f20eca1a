"""The two Triton repository variants, parsed as Triton parses them (protobuf text format).

Cluster: ONNX Runtime on the GPU with TensorRT FP16 (CUDA behind it). One machine: the Python
backend hosting ONNX Runtime on the CPU, exactly as the local stack has always run it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from serving.inference.triton_repo import CLUSTER, ONE_MACHINE, RepositoryOptions, build_repository

pytestmark = pytest.mark.unit


def parse(model_dir: Path) -> mc.ModelConfig:
    return text_format.Parse((model_dir / "config.pbtxt").read_text(), mc.ModelConfig())


def params(config: mc.ModelConfig) -> dict[str, str]:
    return {k: v.string_value for k, v in config.parameters.items()}


def test_cluster_variant_runs_onnxruntime_on_the_gpu_with_tensorrt_fp16(
    onnx_model: Path, tmp_path: Path
) -> None:
    model_dir = build_repository(
        onnx_model, tmp_path, variant=CLUSTER, version=4, model_version="4", precision="fp16-trt"
    )
    config = parse(model_dir)
    assert config.platform == "onnxruntime_onnx" and config.backend in ("", "onnxruntime")
    assert [(g.kind, g.count) for g in config.instance_group] == [(mc.ModelInstanceGroup.KIND_GPU, 1)]
    accelerators = config.optimization.execution_accelerators
    assert not accelerators.cpu_execution_accelerator
    [trt] = accelerators.gpu_execution_accelerator  # CUDA is ORT's own fallback behind it
    assert trt.name == "tensorrt"
    assert trt.parameters["precision_mode"] == "FP16"
    assert int(trt.parameters["max_workspace_size_bytes"]) == 1 << 30
    # the same batching, queue policy and contract as the one-machine variant
    assert config.max_batch_size == 8
    assert list(config.dynamic_batching.preferred_batch_size) == [8]
    assert config.dynamic_batching.default_queue_policy.timeout_action == mc.ModelQueuePolicy.REJECT
    contract = json.loads(params(config)["cxr_contract"])
    assert contract["imgsz"] == [128, 128] and len(contract["class_names"]) == 14
    assert params(config)["cxr_model_version"] == "4"
    assert params(config)["cxr_variant"] == "fp16-trt"
    # TensorRT engines are built while the version loads, for batch 1 and the largest batch
    assert sorted(w.batch_size for w in config.model_warmup) == [1, 8]
    assert all(list(w.inputs["images"].dims) == [3, 128, 128] for w in config.model_warmup)
    assert sorted(p.name for p in model_dir.rglob("*") if p.is_file()) == ["config.pbtxt", "model.onnx"]


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_cluster_serves_fp32_and_int8_as_measured_without_tensorrt_fp16(
    onnx_model: Path, tmp_path: Path, precision: str
) -> None:
    """TensorRT FP16 changes the numbers: only a stage file naming fp16-trt (gated) gets it."""
    config = parse(build_repository(onnx_model, tmp_path, variant=CLUSTER, precision=precision))  # type: ignore[arg-type]
    assert [(g.kind, g.count) for g in config.instance_group] == [(mc.ModelInstanceGroup.KIND_GPU, 1)]
    assert not config.HasField("optimization") and not config.model_warmup
    assert params(config)["cxr_variant"] == precision


def test_one_machine_variant_stays_the_python_backend_on_the_cpu(onnx_model: Path, tmp_path: Path) -> None:
    model_dir = build_repository(onnx_model, tmp_path, variant=ONE_MACHINE, version=4, model_version="4")
    config = parse(model_dir)
    assert config.backend == "python" and config.platform == ""
    assert [(g.kind, g.count) for g in config.instance_group] == [(mc.ModelInstanceGroup.KIND_CPU, 1)]
    assert not config.HasField("optimization") and not config.model_warmup
    assert config.max_batch_size == 8 and list(config.dynamic_batching.preferred_batch_size) == [8]
    assert (model_dir / "4" / "model.py").exists()
    assert params(config)["cxr_model_version"] == "4"


def test_both_variants_differ_only_where_the_machine_does(onnx_model: Path, tmp_path: Path) -> None:
    cluster = parse(build_repository(onnx_model, tmp_path / "c", variant=CLUSTER, max_batch_size=4))
    local = parse(build_repository(onnx_model, tmp_path / "l", variant=ONE_MACHINE, max_batch_size=4))
    for field in ("name", "max_batch_size", "input", "output", "dynamic_batching", "version_policy"):
        assert getattr(cluster, field) == getattr(local, field), field
    assert params(cluster) == params(local)


def test_explicit_options_still_win_over_the_variant_defaults(onnx_model: Path, tmp_path: Path) -> None:
    cpu = RepositoryOptions(max_batch_size=2)
    config = parse(build_repository(onnx_model, tmp_path, variant=CLUSTER, options=cpu))
    assert config.instance_group[0].kind == mc.ModelInstanceGroup.KIND_CPU
    assert not config.HasField("optimization") and config.max_batch_size == 2


def test_the_one_machine_triton_says_fp32_when_asked_for_fp16_trt(onnx_model: Path, tmp_path: Path) -> None:
    """No TensorRT on the CPU: the response must name what computed it, not what the file asked."""
    config = parse(build_repository(onnx_model, tmp_path, variant=ONE_MACHINE, precision="fp16-trt"))
    assert params(config)["cxr_variant"] == "fp32"
    assert (
        params(parse(build_repository(onnx_model, tmp_path, variant=ONE_MACHINE, precision="int8")))[
            "cxr_variant"
        ]
        == "int8"
    )
