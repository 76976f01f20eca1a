"""``make bench-gpu``'s CPU dry run: every part is planned, the environment checked, the serving code runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import gpu_bench

pytestmark = pytest.mark.unit


def test_dry_run_plans_every_part_and_names_what_is_missing(tmp_path: Path) -> None:
    out = tmp_path / "gpu.json"
    assert gpu_bench.main(["--dry-run", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["dry_run"] is True and result["environment"]["torch"]
    modes = {(r["model"], r["batch"], r["mode"]) for r in result["model_only"]}
    assert ("yolo11l", 32, "torch_compile") in modes and ("yolo11n", 1, "cuda_graphs") in modes
    assert len(modes) == len(gpu_bench.MODELS) * (len(gpu_bench.BATCHES) * 2 + 1)
    assert result["serving_path"]["batch"] == 32 and result["training_step"]["backend"] == "nccl"
    assert result["optional_backends"]["tensorrt_fp16_int8"].startswith(("skipped", "present"))


def test_the_serving_part_runs_the_gateways_own_decode_and_letterbox() -> None:
    boxed = gpu_bench.decode_and_letterbox(gpu_bench.make_dicom_2048())
    assert boxed.shape == (gpu_bench.SERVING_IMGSZ, gpu_bench.SERVING_IMGSZ) and boxed.dtype.name == "uint8"
    assert 0 < boxed.mean() < 255
