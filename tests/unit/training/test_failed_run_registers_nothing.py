"""A run that fails after registering its version leaves no usable model in a real (SQLite) MLflow.

``train_and_register`` runs for real from the opened MLflow run to the end, registration included;
only the steps before it (dataset, Ray training, evaluation, export, reports) are stood in for.
A failure after the version was created must delete it, and where MLflow refuses the delete the
version must stay refused by every read (``cxr promote``'s gates, the pipeline's checks, downloads).
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

import training.run as run_module
from tests.unit.training.test_training_registry import _lineage
from training.config import TrainConfig, TrainSettings
from training.dataset import DatasetRef
from training.errors import RegistryError, RegistryUnreachable
from training.registry import ModelRegistry
from training.tracking import Tracker

pytestmark = pytest.mark.unit

MODEL = "cxr-detector"


class LaterStepFailed(RuntimeError):
    """The failure of a step after the version was created."""


@pytest.fixture
def settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> TrainSettings:
    """A real MLflow (SQLite) and a job whose steps before registration are stood in for."""
    monkeypatch.chdir(tmp_path)  # MLflow's defaults write ./mlruns
    s = TrainSettings(stack_dir=tmp_path / "stack", mlflow_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    client = MlflowClient(tracking_uri=s.mlflow_uri)
    client.create_experiment(s.mlflow_experiment, artifact_location=str(tmp_path / "artifacts"))
    data = DatasetRef(path=tmp_path, version="d" * 64, data_yaml=tmp_path / "data.yaml", synthetic=True)
    report = SimpleNamespace(map50=0.5, subgroups=[])
    export = SimpleNamespace(onnx_path=tmp_path / "model.onnx")
    results = SimpleNamespace(onnx_report=report, operating_points=None, int8=None, export=export)
    lineage = _lineage()  # its dataset_version is data.version's

    def register(settings: TrainSettings, run_id: str, *_: Any) -> str:  # the real registration path
        return run_module.register_version(settings, run_id, lineage, "# card", run_tags={"run_name": "r"})

    stand_ins: dict[str, Any] = {
        "dataset_ref": lambda configured, given: "tiny",
        "resolve_dataset": lambda ref, out, cache: data,
        "check_test_split": lambda data, minimum: None,
        "git_commit": lambda: "c" * 40,
        "_fit": lambda *a: SimpleNamespace(metrics={}, checkpoint_uri="", epochs_completed=1),
        "_check_trained": lambda *a: results,
        "_write_reports": lambda *a: "# card",
        "_final_metrics": lambda r: {},
        "_log_run": lambda *a: None,
        "_register": register,
    }
    for name, stand_in in stand_ins.items():
        monkeypatch.setattr(run_module, name, stand_in)
    monkeypatch.setattr("training.tracking.system_info", dict)  # no torch/ray/ultralytics imports
    return s


def _fail_after_registration(monkeypatch: pytest.MonkeyPatch, step: str) -> None:
    if step == "artifact_uri":
        monkeypatch.setattr(Tracker, "artifact_uri", lambda self: (_ for _ in ()).throw(LaterStepFailed()))
    else:  # the run cannot be marked FINISHED; FAILED still can
        end = Tracker.end

        def end_unless_finished(self: Tracker, status: str) -> None:
            if status == "FINISHED":
                raise LaterStepFailed()
            end(self, status)

        monkeypatch.setattr(Tracker, "end", end_unless_finished)


def _only_run(settings: TrainSettings) -> Any:
    client = MlflowClient(tracking_uri=settings.mlflow_uri)
    experiment = client.get_experiment_by_name(settings.mlflow_experiment)
    (run,) = client.search_runs([experiment.experiment_id])
    return run


@pytest.mark.parametrize("step", ["artifact_uri", "end_finished"])
def test_a_run_that_fails_after_registering_leaves_no_version(
    settings: TrainSettings, monkeypatch: pytest.MonkeyPatch, step: str
) -> None:
    _fail_after_registration(monkeypatch, step)
    with pytest.raises(LaterStepFailed):
        run_module.train_and_register(TrainConfig(imgsz=64), settings=settings)
    client = MlflowClient(tracking_uri=settings.mlflow_uri, registry_uri=settings.mlflow_uri)
    assert client.search_model_versions(f"name='{MODEL}'") == []
    assert _only_run(settings).info.status == "FAILED"


def test_a_version_mlflow_would_not_delete_is_refused_by_every_read(
    settings: TrainSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Neither the delete nor a tag write reaches MLflow: the version stays, and stays unusable."""
    _fail_after_registration(monkeypatch, "artifact_uri")

    def refuse(self: MlflowClient, *args: Any) -> None:
        raise MlflowException("the write did not reach MLflow")

    monkeypatch.setattr(MlflowClient, "delete_model_version", refuse)
    monkeypatch.setattr(MlflowClient, "set_model_version_tag", refuse)
    with pytest.raises(LaterStepFailed):
        run_module.train_and_register(TrainConfig(imgsz=64), settings=settings)
    client = MlflowClient(tracking_uri=settings.mlflow_uri, registry_uri=settings.mlflow_uri)
    (left,) = client.search_model_versions(f"name='{MODEL}'")
    registry = ModelRegistry(settings.mlflow_uri, MODEL)
    with pytest.raises(RegistryError, match="incomplete") as refused:
        registry.facts(left.version)  # what `cxr promote`'s gates and the pipeline's checks read first
    # RegistryUnreachable would let delivery fall back on a cached model; this version has none to use
    assert not isinstance(refused.value, RegistryUnreachable)
    with pytest.raises(RegistryError, match="incomplete"):
        registry.download_onnx(left.version, settings.work_dir / "onnx")
    assert _only_run(settings).info.status == "FAILED"


def test_a_run_that_finishes_leaves_a_usable_version(settings: TrainSettings) -> None:
    from training.registry import INCOMPLETE_TAG

    outcome = run_module.train_and_register(TrainConfig(imgsz=64), settings=settings)
    facts = ModelRegistry(settings.mlflow_uri, MODEL).facts(outcome.model_version)
    assert INCOMPLETE_TAG not in facts.tags and not facts.missing_tags
    assert _only_run(settings).info.status == "FINISHED"
