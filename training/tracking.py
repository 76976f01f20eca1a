"""MLflow tracking of a training run: lineage, parameters, final metrics and artifacts.

The driver opens the run before Ray starts (so the Ray run name and the MLflow
run name are the same string) and hands the run id to the workers; rank 0
adds per-epoch metrics to it (see :mod:`training.ray_trainer`). Everything
goes through ``MlflowClient`` with an explicit run id rather than MLflow's
fluent "active run", because the run outlives any one process that writes to it.
"""

from __future__ import annotations

import logging
import os
import platform
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from training.config import TrainConfig, TrainSettings
from training.dataset import DatasetRef
from training.errors import TrainingError

log = logging.getLogger(__name__)


def git_commit(repo_dir: Path | None = None) -> str:
    """HEAD of the code that trains (``-dirty`` with uncommitted changes, ``unknown`` outside git)."""
    cwd = repo_dir or Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{head}-dirty" if dirty else head


def system_info() -> dict[str, str]:
    """Versions and hardware that influence the numbers, logged as run tags."""
    import ray
    import torch
    import ultralytics

    return {
        "sys.python": platform.python_version(),
        "sys.platform": platform.platform(),
        "sys.cpu_count": str(os.cpu_count()),
        "sys.torch": torch.__version__,
        "sys.ultralytics": ultralytics.__version__,
        "sys.ray": ray.__version__,
        "sys.cuda": str(torch.cuda.is_available()),
    }


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config -> ``optim.lr0``-style params (MLflow params are flat strings)."""
    out: dict[str, str] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = str(value)
    return out


@dataclass
class Tracker:
    """One MLflow run, addressed by id."""

    settings: TrainSettings
    run_id: str = ""

    @property
    def client(self) -> Any:
        from mlflow.tracking import MlflowClient

        return MlflowClient(tracking_uri=self.settings.mlflow_uri)

    def start(self, run_name: str, config: TrainConfig, dataset: DatasetRef, commit: str) -> str:
        """Create the run with lineage tags and the recipe as parameters; returns the run id."""
        from mlflow.entities import Param

        client = self.client
        try:
            experiment = client.get_experiment_by_name(self.settings.mlflow_experiment)
            experiment_id = (
                experiment.experiment_id
                if experiment is not None
                else client.create_experiment(self.settings.mlflow_experiment)
            )
            tags = {
                "mlflow.runName": run_name,
                "ray_run_name": run_name,
                "dataset_version": dataset.version,
                "dataset_synthetic": str(dataset.synthetic),
                "git_commit": commit,
                "mlflow.source.git.commit": commit,
                "config_sha256": config.sha256(),
                **system_info(),
            }
            run = client.create_run(experiment_id, run_name=run_name, tags=tags)
        except Exception as exc:  # connection refused, 403 ... : say where MLflow was expected
            raise TrainingError(
                f"cannot create an MLflow run at {self.settings.mlflow_uri} ({exc}); "
                "is the stack up (`cxr stack up`) and CXR_MLFLOW_URI right?"
            ) from exc
        self.run_id = run.info.run_id
        params = flatten(config.model_dump(mode="json"))
        params.update({"global_batch": str(config.global_batch), "dataset_path": str(dataset.path)})
        items = [Param(k, v[:500]) for k, v in sorted(params.items())]
        for i in range(0, len(items), 100):  # MLflow caps a batch at 100 params
            client.log_batch(self.run_id, params=items[i : i + 100])
        log.info("event=mlflow_run_started run_id=%s run_name=%s", self.run_id, run_name)
        return self.run_id

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step or 0) for k, v in metrics.items()]
        for i in range(0, len(items), 500):
            self.client.log_batch(self.run_id, metrics=items[i : i + 500])

    def set_tags(self, tags: dict[str, str]) -> None:
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, value)

    def log_artifacts(self, files: Iterable[Path], artifact_path: str) -> None:
        client = self.client
        for path in files:
            if path.is_file():
                client.log_artifact(self.run_id, str(path), artifact_path=artifact_path)

    def artifact_uri(self) -> str:
        return str(self.client.get_run(self.run_id).info.artifact_uri)

    def end(self, status: str) -> None:
        if self.run_id:
            self.client.set_terminated(self.run_id, status=status)
