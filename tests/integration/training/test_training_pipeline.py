"""`train_and_register` end to end on real S3 + MLflow: Ray data parallelism, lineage, artifacts."""

from __future__ import annotations

import io
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from mlflow.tracking import MlflowClient
from rich.console import Console
from typer.testing import CliRunner

from core.hashing import file_sha256
from core.operating_points import OPERATING_POINTS_FILE, OperatingPoints
from core.progress import reporting
from training.cli import app
from training.config import TrainConfig, TrainSettings
from training.registry import LineageTags, ModelRegistry, download_onnx
from training.run import train_and_register

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_two_workers_train_in_sync_on_disjoint_shards_and_register_a_traceable_version(
    tiny_dataset_dir: Path,
    tiny_recipe: Callable[..., TrainConfig],
    train_settings: Callable[..., TrainSettings],
    mlflow_server: Any,
    s3_store: Any,
    ray_session: None,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = train_settings(mlflow_server.uri)
    progress = io.StringIO()
    with reporting(Console(file=progress), live=False):  # as `cxr train run` writes to a log
        # checkpoints every 2nd epoch: epoch 1 reports its metrics without one, epoch 2 (the last) has one
        recipe = tiny_recipe(checkpoint={"every_epochs": 2})
        outcome = train_and_register(recipe, tiny_dataset_dir, workers=2, settings=settings)

    # [0] progress: one line per epoch from rank 0 through Ray's queue, then each stage after it
    lines = progress.getvalue().splitlines()
    epochs = [line for line in lines if line.startswith("event=train_epoch ")]
    assert [re.search(r" epoch=(\d+) epochs=2 ", line)[1] for line in epochs] == ["1", "2"], lines  # type: ignore[index]
    assert all(" loss=" in line and " map50=" in line and " workers=2 " in line for line in epochs)
    assert any(
        line.startswith("event=train_stage_done stage=register") and " state=ok " in line for line in lines
    )

    # [1] data parallelism, read back from the checkpoint Ray wrote to S3
    prefix = outcome.checkpoint_uri.removeprefix(f"s3://{s3_store.bucket}/")
    ckpt = tmp_path / "ckpt"
    s3_store.store().download_prefix(prefix, ckpt)
    audits = [json.loads(p.read_text()) for p in sorted(ckpt.rglob("rank_*.json"))]
    assert [a["rank"] for a in audits] == [0, 1]
    assert audits[0]["parameters_sha256"] == audits[1]["parameters_sha256"]
    shard0, shard1 = (set(a["samples"]) for a in audits)
    assert shard0 and shard1 and not shard0 & shard1
    train_images = {p.name for p in (tiny_dataset_dir / "images" / "train").iterdir()}
    assert {Path(s).name for s in shard0 | shard1} == train_images
    assert any(ckpt.rglob("last.pt"))
    run_ckpts = tmp_path / "run_ckpts"
    s3_store.store().download_prefix(prefix.rsplit("/", 1)[0] + "/", run_ckpts)
    assert {p.name for p in run_ckpts.rglob("epoch_*") if p.is_dir()} == {"epoch_0001"}

    # [2] the MLflow run: per-epoch metrics from rank 0, lineage, artifacts
    client = MlflowClient(tracking_uri=mlflow_server.uri)
    run = client.get_run(outcome.run_id)
    assert run.info.run_name == outcome.run_name and run.info.status == "FINISHED"
    history = client.get_metric_history(outcome.run_id, "train/box_loss")
    assert sorted(m.step for m in history) == [0, 1]
    assert run.data.params["batch_per_worker"] == "4" and run.data.params["global_batch"] == "8"
    artifacts = {a.path for a in client.list_artifacts(outcome.run_id)}
    assert {"onnx", "weights", "eval", "plots", "model_card.md"} <= artifacts
    plots = {Path(a.path).name for a in client.list_artifacts(outcome.run_id, "plots")}
    assert {"PR_curve.png", "confusion_matrix_normalized.png", "results.png"} <= plots

    # [3] the registered version: every lineage tag, the card, the ONNX that passed parity, no alias
    version = client.get_model_version("cxr-detector", outcome.model_version)
    for tag in LineageTags.model_fields:
        assert version.tags.get(tag), f"missing lineage tag {tag}"
    assert version.tags["dataset_version"] == outcome.dataset_version
    assert version.tags["imgsz"] == "64" and version.tags["classes"] == "14"
    assert float(version.tags["parity_max_abs_diff"]) <= 1e-3
    assert "not a medical device" in version.description and "SYNTHETIC" in version.description
    onnx_file = download_onnx(outcome.model_version, tmp_path / "dl", settings)
    assert file_sha256(onnx_file) == version.tags["onnx_sha256"]
    assert client.get_registered_model("cxr-detector").aliases == {}

    # [3b] operating points: chosen on val, beside the ONNX in the version's source, tagged, carded
    ops_file = ModelRegistry.from_settings(settings).download_operating_points(
        outcome.model_version, tmp_path / "ops"
    )
    assert ops_file is not None and ops_file.name == OPERATING_POINTS_FILE
    ops = OperatingPoints.from_json(ops_file.read_text())
    assert ops.split == "val" and ops.onnx_sha256 == version.tags["onnx_sha256"]
    assert version.tags["operating_points_sha256"] == ops.sha256()
    assert "## Operating points and calibration" in version.description
    assert "val/threshold/cardiomegaly" in run.data.metrics

    # [4] `cxr train evaluate` reads the registered ONNX back and scores it like training did
    for key, value in {
        **s3_store.env,
        "CXR_MLFLOW_URI": mlflow_server.uri,
        "CXR_STACK_DIR": str(tmp_path),
    }.items():
        monkeypatch.setenv(key, value)
    report = tmp_path / "eval.json"
    result = CliRunner().invoke(
        app,
        [
            "evaluate",
            "--model-version",
            outcome.model_version,
            "--dataset",
            str(tiny_dataset_dir),
            "--out",
            str(report),
        ],
    )
    assert result.exit_code == 0, result.output
    evaluated = json.loads(report.read_text())
    assert evaluated["backend"] == "onnx" and evaluated["images"] == 8
    assert evaluated["map50"] == pytest.approx(float(version.tags["map50"]), abs=1e-6)

    # [5] `cxr train quantize`: the INT8 variant attached to the same version, file and figures
    versions_before = len(client.search_model_versions("name='cxr-detector'"))
    result = CliRunner().invoke(
        app,
        [
            "quantize",
            "--model-version",
            outcome.model_version,
            "--dataset",
            str(tiny_dataset_dir),
            "--calibration-images",
            "4",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "attached to v" in " ".join(result.output.split())  # rich wraps
    assert len(client.search_model_versions("name='cxr-detector'")) == versions_before  # no new version
    tags = client.get_model_version("cxr-detector", outcome.model_version).tags
    assert tags["variants"] == "fp32,int8"
    int8_file = ModelRegistry.from_settings(settings).download_onnx(
        outcome.model_version, tmp_path / "int8", "int8"
    )
    assert file_sha256(int8_file) == tags["variant_int8_sha256"] != tags["onnx_sha256"]
    drop = float(tags["variant_int8_map50"]) - float(tags["map50"])
    assert float(tags["variant_int8_map50_drop"]) == pytest.approx(-drop, abs=1e-5)
    assert 0.0 <= float(tags["variant_int8_score_max_abs_diff"]) < 1.0
