"""`cxr train tune` on real Ray, S3 and MLflow: 4 ASHA trials on the tiny dataset, the tuned recipe."""

from __future__ import annotations

import csv
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from training.cli import app
from training.config import TrainConfig, load_config

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_a_four_trial_search_reports_every_epoch_to_asha_and_writes_the_best_as_a_recipe(
    tiny_dataset_dir: Path,
    tiny_recipe: Callable[..., TrainConfig],
    mlflow_server: Any,
    s3_store: Any,
    ray_session: None,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import ray

    for key, value in {
        **s3_store.env,
        "CXR_MLFLOW_URI": mlflow_server.uri,
        "CXR_STACK_DIR": str(tmp_path),
    }.items():
        monkeypatch.setenv(key, value)
    # imgsz 96 and 2 epochs: the default space tries imgsz 64|96, epochs 1|2, lr0 0.001..0.1
    recipe = tiny_recipe(name="it-tune", imgsz=96, dataset=str(tiny_dataset_dir))
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(yaml.safe_dump(recipe.model_dump(mode="json")))
    out = tmp_path / "configs" / "it-tune-tuned.yaml"
    client = MlflowClient(tracking_uri=mlflow_server.uri)
    versions_before = len(client.search_model_versions("name='cxr-detector'"))

    args = ["--trials", "4", "--budget-minutes", "10", "--workers", "1", "--out", str(out)]
    result = CliRunner().invoke(app, ["tune", "--config", str(recipe_file), *args])
    assert result.exit_code == 0, result.output
    assert "trials of it-tune-tune-" in result.output and "tuned recipe" in result.output

    # [1] the MLflow parent and its 4 children, one per trial, each with its epochs as ASHA saw them
    experiment = client.get_experiment_by_name("cxr-detector-tune")  # not the training experiment
    assert experiment is not None
    (parent,) = client.search_runs([experiment.experiment_id], filter_string="tags.cxr_run_kind = 'tune'")
    assert parent.info.status == "FINISHED"
    children = client.search_runs(
        [experiment.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"
    )
    assert len(children) == 4
    outcomes = {c.data.tags["tune_outcome"] for c in children}
    assert outcomes <= {"completed", "stopped"}  # no trial failed
    for child in children:
        epochs = int(child.data.params["tune.epochs"])
        epochs_run = int(child.data.tags["tune_epochs_run"])
        history = client.get_metric_history(child.info.run_id, "val/mAP50")
        assert sorted(m.step for m in history) == list(range(epochs_run)), "every epoch reached ASHA"
        if child.data.tags["tune_outcome"] == "completed":
            assert epochs_run == epochs
        else:  # stopped early by ASHA: fewer epochs than the trial's recipe asked for
            assert 1 <= epochs_run < epochs
        assert child.info.status == "FINISHED"
        assert float(child.data.params["optim.lr0"]) == pytest.approx(
            float(child.data.params["tune.lr0"]), rel=1e-5
        )
    assert len(client.search_model_versions("name='cxr-detector'")) == versions_before  # nothing registered
    training = client.get_experiment_by_name("cxr-detector")  # what the exporter and its alerts read
    if training is not None:
        assert not client.search_runs([training.experiment_id], filter_string="tags.tune_search != ''")

    # [2] the tuned recipe: a valid TrainConfig, the best child's values, the rest of the recipe kept
    tuned = load_config(out)
    best = next(c for c in children if c.info.run_id == parent.data.tags["tune_best_run_id"])
    assert tuned.name == "it-tune-tuned"
    assert tuned.optim.lr0 != recipe.optim.lr0
    assert str(tuned.optim.lr0) == best.data.params["optim.lr0"]
    assert tuned.imgsz == int(best.data.params["tune.imgsz"]) <= recipe.imgsz
    assert tuned.epochs == int(best.data.params["tune.epochs"]) <= recipe.epochs
    assert tuned.augment != recipe.augment and tuned.augment.fliplr == 0.0
    for field in ("model", "batch_per_worker", "seed", "dataset", "scaling", "checkpoint", "eval"):
        assert getattr(tuned, field) == getattr(recipe, field), field
    assert parent.data.tags["tune_tuned_config_sha256"] == tuned.sha256()
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "tune")}
    assert artifacts == {"tune/it-tune-tuned.yaml", "tune/trials.csv"}
    local_csv = Path(client.download_artifacts(parent.info.run_id, "tune/trials.csv", str(tmp_path / "dl")))
    assert len(list(csv.DictReader(local_csv.open()))) == 4

    # [3] every Train run gave its CPUs back, also the trials Tune stopped by killing their driver
    deadline = time.monotonic() + 30
    while ray.available_resources().get("CPU", 0.0) < ray.cluster_resources()["CPU"]:
        assert time.monotonic() < deadline, f"CPUs still held: {ray.available_resources()}"
        time.sleep(1)
