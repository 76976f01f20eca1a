"""A run logs its dataset's report (drawn at ingest) and the model card links it, as the stack's first model.

The chain the stack runs, minus the servers: phantoms -> ``build_dataset`` (which draws
``report/`` into the version) -> the training run's dataset -> MLflow artifacts under
``dataset_report/`` -> the card's "Training data" section naming both copies.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest

from data_pipeline.config import DataSettings
from data_pipeline.ingest import build_dataset
from data_pipeline.synth import SynthConfig, generate
from training.config import TrainConfig, TrainSettings
from training.dataset import DatasetRef, open_dataset_dir
from training.evaluate import EvalReport
from training.export import ExportResult
from training.model_card import DatasetReportLink, render_model_card
from training.run import DATASET_REPORT_ARTIFACTS, _log_dataset_report

pytestmark = pytest.mark.unit


@dataclass
class RecordingTracker:
    """Stands in for :class:`training.tracking.Tracker`: records what would go to MLflow."""

    run_id: str = "run123"
    logged: list[tuple[str, list[Path]]] = field(default_factory=list)

    def log_artifacts(self, files: list[Path], artifact_path: str) -> None:
        self.logged.append((artifact_path, list(files)))


@pytest.fixture(scope="module")
def built_dataset(tmp_path_factory: pytest.TempPathFactory) -> DatasetRef:
    synth = tmp_path_factory.mktemp("synth")
    generate(SynthConfig(n_images=12, seed=5, size=256, workers=1), synth)
    built = build_dataset(
        synth / "dicom",
        synth / "annotations.csv",
        tmp_path_factory.mktemp("datasets"),
        settings=DataSettings(max_side=128, workers=1),
        feedback=False,
    )
    return open_dataset_dir(built.path, tmp_path_factory.mktemp("work"))


def _card(dataset: DatasetRef, link: DatasetReportLink | None, config: TrainConfig | None = None) -> str:
    report = EvalReport(
        backend="onnx",
        split="test",
        images=2,
        instances=0,
        imgsz=64,
        map50=0.0,
        map50_95=0.0,
        map40=0.0,
        conf_threshold=0.25,
        precision=0.0,
        recall=0.0,
        per_class=[],
    )
    return render_model_card(
        config=config or TrainConfig(imgsz=64),
        dataset=dataset,
        run_name="run",
        git_commit="abc",
        epochs_completed=1,
        torch_report=report,
        onnx_report=report,
        export=ExportResult(Path("model.onnx"), "0" * 64, 17, 64, 0.0, 1),
        dataset_report=link,
    )


def test_the_run_logs_the_versions_report_and_the_card_links_both_copies(built_dataset: DatasetRef) -> None:
    tracker = RecordingTracker()
    settings = TrainSettings(s3_bucket="cxr")
    link = _log_dataset_report(tracker, built_dataset, settings)  # type: ignore[arg-type]
    assert link is not None
    ((artifact_path, files),) = tracker.logged
    assert artifact_path == DATASET_REPORT_ARTIFACTS == "dataset_report"
    assert {"index.html", "report.json", "samples.png", "reader_agreement.png"} <= {p.name for p in files}
    assert link.mlflow == "runs:/run123/dataset_report/index.html"
    assert link.s3 == f"s3://cxr/datasets/{built_dataset.version}/report/index.html"

    card = _card(built_dataset, link)
    training_data = card.split("## Training data", 1)[1].split("## Evaluation", 1)[0]
    assert link.mlflow in training_data and link.s3 in training_data
    assert "reader agreement" in training_data


def test_a_version_without_a_report_is_said_so_on_the_card(tmp_path: Path) -> None:
    from tests.unit.training.tiny_dataset import build_tiny_dataset

    dataset = open_dataset_dir(build_tiny_dataset(tmp_path / "tiny"), tmp_path / "work")
    tracker = RecordingTracker()
    assert _log_dataset_report(tracker, dataset, TrainSettings()) is None  # type: ignore[arg-type]
    assert tracker.logged == []
    assert "No dataset report" in _card(dataset, None)


def test_the_card_says_when_the_network_trained_in_bfloat16(tmp_path: Path) -> None:
    from tests.unit.training.tiny_dataset import build_tiny_dataset

    dataset = open_dataset_dir(build_tiny_dataset(tmp_path / "tiny"), tmp_path / "work")
    bf16 = TrainConfig.model_validate({"imgsz": 64, "scaling": {"cpu_bf16": True}})
    assert "forward in bfloat16" in _card(dataset, None, bf16)
    assert "bfloat16" not in _card(dataset, None)
