"""One training job from recipe to registered model: the Python API the CLI and the pipeline call.

Steps, in order: resolve the dataset, open the MLflow run, train with Ray,
evaluate the best weights on the test split, export ONNX and prove parity
(raw outputs and mAP), evaluate the ONNX model (with latency), log artifacts,
register the version with its lineage tags and model card. Any failure marks
the MLflow run FAILED and nothing is registered.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path

from training.config import TrainConfig, TrainSettings
from training.dataset import DatasetRef, resolve_dataset
from training.errors import DatasetError, ParityError
from training.evaluate import EvalReport, evaluate
from training.export import ExportResult, export_with_parity
from training.model_card import render_model_card
from training.predictors import OrtPredictor, TorchPredictor
from training.quantize import Int8Outcome, quantize_and_evaluate
from training.ray_trainer import DistributedRun, fit_distributed
from training.registry import LineageTags, download_weights, register_version
from training.tracking import Tracker, git_commit

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainOutcome:
    """What a finished job hands to its caller (and what ``cxr train run`` prints)."""

    run_id: str
    model_version: str
    metrics: dict[str, float]
    onnx_path: Path
    run_name: str = ""
    dataset_version: str = ""
    checkpoint_uri: str = ""
    artifact_uri: str = ""
    results_csv: Path | None = None
    eval_report: EvalReport | None = None
    extra: dict[str, str] = field(default_factory=dict)


def make_run_name(config: TrainConfig) -> str:
    """Unique, sortable, and the same string for Ray and MLflow."""
    return f"{config.name}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{secrets.token_hex(2)}"


def _plot_results(csv: Path, out_dir: Path) -> None:
    """Ultralytics' loss/metric curves (results.png) from the run's CSV."""
    if not csv.exists():
        return
    from ultralytics.utils.plotting import plot_results

    local = out_dir / "results.csv"
    local.parent.mkdir(parents=True, exist_ok=True)
    if csv.resolve() != local.resolve():
        local.write_bytes(csv.read_bytes())
    try:
        plot_results(file=local)
    except Exception as exc:  # a plot is a nicety; a broken one must not fail a finished training
        log.warning("event=plot_results_failed error=%s", exc)


def _evaluate_and_export(
    config: TrainConfig, dataset: DatasetRef, dist: DistributedRun, out: Path
) -> tuple[EvalReport, EvalReport, ExportResult]:
    weights = dist.best_weights
    torch_report = evaluate(TorchPredictor.load(weights), dataset, config.eval, plots_dir=out / "plots")
    parity_images = (dataset.images("val") or dataset.images("test"))[: config.eval.parity_images]
    export = export_with_parity(
        weights,
        out / "onnx",
        parity_images,
        max_abs_diff=config.eval.parity_max_abs_diff,
        opset=config.eval.opset,
    )
    onnx_report = evaluate(OrtPredictor.load(export.onnx_path), dataset, config.eval)
    map_diff = max(
        abs(torch_report.map50 - onnx_report.map50),
        abs(torch_report.map40 - onnx_report.map40),
        abs(torch_report.map50_95 - onnx_report.map50_95),
    )
    if map_diff > config.eval.parity_max_map_diff:
        raise ParityError(
            f"ONNX mAP differs from PyTorch's by {map_diff:.4f} (limit {config.eval.parity_max_map_diff}); "
            "refusing to register the export"
        )
    return torch_report, onnx_report, export


def _quantize_and_evaluate(
    config: TrainConfig, dataset: DatasetRef, export: ExportResult, onnx_report: EvalReport, out: Path
) -> Int8Outcome | None:
    """The optional INT8 export, evaluated like the fp32 one; reported, never registered."""
    if not config.eval.int8:
        return None
    return quantize_and_evaluate(
        export.onnx_path,
        out / "onnx_int8" / "model.int8.onnx",
        dataset,
        config.eval,
        config.eval.int8_calibration_images,
        onnx_report,
    )


def train_and_register(
    config: TrainConfig,
    dataset: str | Path | None = None,
    workers: int | None = None,
    *,
    settings: TrainSettings | None = None,
) -> TrainOutcome:
    """Train ``config`` (with ``workers`` Ray workers if given) on ``dataset`` and register the result."""
    settings = settings or TrainSettings()
    if workers is not None:
        config = config.with_workers(workers)
    ref = str(dataset) if dataset is not None else config.dataset
    if not ref:
        raise DatasetError("no dataset given: pass --dataset VERSION|DIR or set `dataset:` in the config")
    run_name = make_run_name(config)
    out = (settings.work_dir / run_name).resolve()
    data = resolve_dataset(ref, out, settings.dataset_cache)
    commit = git_commit()
    tracker = Tracker(settings)
    tracker.start(run_name, config, data, commit)
    try:
        base = None
        if config.base_model_version:
            base = download_weights(config.base_model_version, out / "base", settings)
        dist = fit_distributed(
            config,
            data,
            run_name=run_name,
            settings=settings,
            mlflow_run_id=tracker.run_id,
            base_weights=base,
        )
        torch_report, onnx_report, export = _evaluate_and_export(config, data, dist, out)
        int8 = _quantize_and_evaluate(config, data, export, onnx_report, out)
        _plot_results(dist.results_csv, out / "plots")
        eval_dir = out / "eval"
        eval_dir.mkdir(parents=True, exist_ok=True)
        evaluation = {
            "pytorch": torch_report.model_dump(mode="json"),
            "onnx": onnx_report.model_dump(mode="json"),
            "parity": {"max_abs_diff": export.parity_max_abs_diff, "images": export.parity_images},
            **({"int8": int8.summary()} if int8 else {}),
        }
        (eval_dir / "evaluation.json").write_text(json.dumps(evaluation, indent=2))
        card = render_model_card(
            config=config,
            dataset=data,
            run_name=run_name,
            git_commit=commit,
            epochs_completed=dist.epochs_completed,
            torch_report=torch_report,
            onnx_report=onnx_report,
            export=export,
        )
        (out / "model_card.md").write_text(card)
        final = {
            "test/map50": onnx_report.map50,
            "test/map40": onnx_report.map40,
            "test/map50_95": onnx_report.map50_95,
            "test/precision": onnx_report.precision,
            "test/recall": onnx_report.recall,
            "test/pytorch_map50": torch_report.map50,
            "parity_max_abs_diff": export.parity_max_abs_diff,
            "ort_latency_ms_b1": onnx_report.latency_ms_b1 or 0.0,
            "ort_latency_ms_b8": onnx_report.latency_ms_b8 or 0.0,
            "epochs_completed": float(dist.epochs_completed),
            "train_seconds": dist.seconds,
        }
        if int8:
            final.update(int8.metrics())
        tracker.log_metrics(final, step=dist.epochs_completed)
        tracker.log_artifacts([dist.best_weights.with_name("best.pt")], "weights")
        tracker.log_artifacts([export.onnx_path], "onnx")
        tracker.log_artifacts([eval_dir / "evaluation.json"], "eval")
        tracker.log_artifacts(
            [*sorted((out / "plots").glob("*.png")), out / "plots" / "results.csv"], "plots"
        )
        tracker.log_artifacts([out / "model_card.md"], "")
        if int8:
            tracker.log_artifacts([int8.result.onnx_path], "onnx_int8")
        tracker.set_tags({"checkpoint_uri": dist.checkpoint_uri, "onnx_sha256": export.sha256})
        lineage = LineageTags(
            dataset_version=data.version,
            git_commit=commit,
            config_sha256=config.sha256(),
            onnx_sha256=export.sha256,
            map50=round(onnx_report.map50, 6),
            map40=round(onnx_report.map40, 6),
            parity_max_abs_diff=export.parity_max_abs_diff,
            imgsz=export.imgsz,
            classes=len(TorchPredictor.load(dist.best_weights).class_names),
        )
        version = register_version(
            settings,
            tracker.run_id,
            lineage,
            card,
            run_tags={"run_name": run_name, "dataset_synthetic": str(data.synthetic)},
        )
        artifact_uri = tracker.artifact_uri()
        tracker.end("FINISHED")
    except BaseException:
        tracker.end("FAILED")
        raise
    return TrainOutcome(
        run_id=tracker.run_id,
        model_version=version,
        metrics={**dist.metrics, **final},
        onnx_path=export.onnx_path,
        run_name=run_name,
        dataset_version=data.version,
        checkpoint_uri=dist.checkpoint_uri,
        artifact_uri=artifact_uri,
        results_csv=out / "plots" / "results.csv",
        eval_report=onnx_report,
    )
