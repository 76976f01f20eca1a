"""One training job from recipe to registered model: the Python API the CLI and the pipeline call.

Steps, in order: resolve the dataset, open the MLflow run, train with Ray,
evaluate the best weights on the test split, export ONNX and prove parity
(raw outputs and mAP), evaluate the ONNX model (with latency), log artifacts,
register the version with its lineage tags and model card. Any failure marks
the MLflow run FAILED and leaves nothing registered: the version is usable only once the run has
FINISHED, and a failure after its creation deletes it (or, where MLflow cannot, leaves it marked
incomplete, which every read of it refuses: training/registry.py).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from core.operating_points import OPERATING_POINTS_FILE, OperatingPoints
from core.progress import reporting
from core.variants import artifact_dir
from data_pipeline.report import INDEX, REPORT_DIR
from data_pipeline.versioning import version_prefix
from training.config import TrainConfig, TrainSettings
from training.dataset import DatasetRef, dataset_ref, resolve_dataset
from training.errors import DatasetError, ParityError
from training.evaluate import EvalReport, evaluate
from training.export import ExportResult, export_with_parity
from training.model_card import DatasetReportLink, render_model_card
from training.operating_points import (
    operating_point_metrics,
    operating_point_tags,
    operating_points_on_split,
    write_operating_points,
)
from training.predictors import OrtPredictor, TorchPredictor
from training.prelaunch import PrelaunchedFit, make_run_name
from training.ray_trainer import DistributedRun, fit_distributed
from training.registry import (
    LineageTags,
    complete_version,
    download_weights,
    follow_base_architecture,
    register_version,
    withdraw_version,
)
from training.subgroups import run_metrics as subgroup_run_metrics
from training.subgroups import version_tags as subgroup_tags
from training.tracking import Tracker, git_commit
from training.variants import BuiltVariant, build_variant

log = logging.getLogger(__name__)

DATASET_REPORT_ARTIFACTS = "dataset_report"


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
        simplify=config.eval.onnx_simplify,
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
) -> BuiltVariant | None:
    """The optional INT8 variant, evaluated like the fp32 export; registered as a variant of the
    version (its figures as tags), served only where a stage file names it and its gate passed."""
    if not config.eval.int8:
        return None
    return build_variant(
        "int8",
        export.onnx_path,
        out / artifact_dir("int8"),
        dataset,
        config.eval,
        onnx_report,
        config.eval.int8_calibration_images,
    )


@dataclass(frozen=True)
class _Results:
    """Everything training and its checks produced, read by the reports, the metrics and the registration."""

    dist: DistributedRun
    torch_report: EvalReport
    onnx_report: EvalReport
    export: ExportResult
    int8: BuiltVariant | None
    operating_points: OperatingPoints | None = None  # chosen on val; None when val is empty


def _fit(
    config: TrainConfig,
    data: DatasetRef,
    run_name: str,
    settings: TrainSettings,
    run_id: str,
    out: Path,
    prelaunched: PrelaunchedFit | None = None,
) -> DistributedRun:
    """Fetch the base model's weights when fine-tuning, then train with Ray, epochs logged to ``run_id``."""
    base = None
    if config.base_model_version:
        base = download_weights(config.base_model_version, out / "base", settings)
    if prelaunched is not None:
        return prelaunched.run(config, data, mlflow_run_id=run_id, base_weights=base)
    return fit_distributed(
        config,
        data,
        run_name=run_name,
        settings=settings,
        mlflow_run_id=run_id,
        base_weights=base,
    )


def _check_trained(config: TrainConfig, data: DatasetRef, dist: DistributedRun, out: Path) -> _Results:
    """Test-split evaluation, ONNX export with parity, the optional INT8 model, and training curves."""
    torch_report, onnx_report, export = _evaluate_and_export(config, data, dist, out)
    int8 = _quantize_and_evaluate(config, data, export, onnx_report, out)
    _plot_results(dist.results_csv, out / "plots")
    ops = _operating_points(config, data, export)
    return _Results(dist, torch_report, onnx_report, export, int8, operating_points=ops)


def _operating_points(config: TrainConfig, data: DatasetRef, export: ExportResult) -> OperatingPoints | None:
    """Per-class thresholds and calibrator of the EXPORTED model (what is served), chosen on val.

    Written beside the ONNX, so the registered version's ``onnx/`` artifacts carry them to
    serving. Never chosen on test, which stays the unbiased estimate; without val images there
    are none, and the gateway keeps its global threshold for this version.
    """
    if not data.images("val"):
        log.warning("event=operating_points_skipped reason=no_val_images dataset=%s", data.version)
        return None
    ops = operating_points_on_split(
        OrtPredictor.load(export.onnx_path), data, config.eval, onnx_sha256=export.sha256
    )
    write_operating_points(ops, export.onnx_path.parent)
    return ops


def _log_dataset_report(
    tracker: Tracker, data: DatasetRef, settings: TrainSettings
) -> DatasetReportLink | None:
    """The version's report (drawn at ingest, data_pipeline/report.py) into the run's ``dataset_report/``.

    Logged first, so even a failed run shows what it trained on; the model card links both copies.
    """
    folder = data.path / REPORT_DIR
    if not (folder / INDEX).is_file():
        log.info("event=dataset_report_missing dataset=%s path=%s", data.version, folder)
        return None
    tracker.log_artifacts(sorted(p for p in folder.iterdir() if p.is_file()), DATASET_REPORT_ARTIFACTS)
    return DatasetReportLink(
        mlflow=f"runs:/{tracker.run_id}/{DATASET_REPORT_ARTIFACTS}/{INDEX}",
        s3=f"s3://{settings.s3_bucket}/{version_prefix(data.version)}{REPORT_DIR}/{INDEX}",
    )


def _write_reports(
    config: TrainConfig,
    data: DatasetRef,
    run_name: str,
    commit: str,
    r: _Results,
    out: Path,
    dataset_report: DatasetReportLink | None = None,
) -> str:
    """Write ``eval/evaluation.json`` and ``model_card.md``; the card is also what the registry shows."""
    eval_dir = out / "eval"
    eval_dir.mkdir(parents=True, exist_ok=True)
    evaluation = {
        "pytorch": r.torch_report.model_dump(mode="json"),
        "onnx": r.onnx_report.model_dump(mode="json"),
        "parity": {"max_abs_diff": r.export.parity_max_abs_diff, "images": r.export.parity_images},
        **({"int8": r.int8.outcome.summary()} if r.int8 and r.int8.outcome else {}),
        **({"operating_points": r.operating_points.model_dump(mode="json")} if r.operating_points else {}),
    }
    (eval_dir / "evaluation.json").write_text(json.dumps(evaluation, indent=2))
    card = render_model_card(
        config=config,
        dataset=data,
        run_name=run_name,
        git_commit=commit,
        epochs_completed=r.dist.epochs_completed,
        torch_report=r.torch_report,
        onnx_report=r.onnx_report,
        export=r.export,
        operating_points=r.operating_points,
        dataset_report=dataset_report,
    )
    (out / "model_card.md").write_text(card)
    return card


def _final_metrics(r: _Results) -> dict[str, float]:
    """The run's headline metrics: the ONNX model's (what is served), parity, latency, training time."""
    final = {
        "test/map50": r.onnx_report.map50,
        "test/map40": r.onnx_report.map40,
        "test/map50_95": r.onnx_report.map50_95,
        "test/precision": r.onnx_report.precision,
        "test/recall": r.onnx_report.recall,
        **(
            {"test/no_finding_auc": r.onnx_report.no_finding_auc}
            if r.onnx_report.no_finding_auc is not None
            else {}
        ),
        **(
            {"test/study_triage_auc": r.onnx_report.study_triage_auc}
            if r.onnx_report.study_triage_auc is not None
            else {}
        ),
        "test/pytorch_map50": r.torch_report.map50,
        "parity_max_abs_diff": r.export.parity_max_abs_diff,
        "ort_latency_ms_b1": r.onnx_report.latency_ms_b1 or 0.0,
        "ort_latency_ms_b8": r.onnx_report.latency_ms_b8 or 0.0,
        "epochs_completed": float(r.dist.epochs_completed),
        "train_seconds": r.dist.seconds,
    }
    if r.int8:
        final.update(r.int8.outcome.metrics() if r.int8.outcome else {})
    final.update(subgroup_run_metrics(r.onnx_report.subgroups))  # test/subgroup/<attr>/<value>/...
    if r.operating_points:  # val/threshold/<class>, val/ece_{before,after}/<class>, val/ece_*_mean
        final.update(operating_point_metrics(r.operating_points))
    return final


def _log_run(tracker: Tracker, r: _Results, final: dict[str, float], out: Path) -> None:
    """Metrics, weights, ONNX, evaluation, plots and card into the MLflow run, so a run explains itself."""
    tracker.log_metrics(final, step=r.dist.epochs_completed)
    tracker.log_artifacts([r.dist.best_weights.with_name("best.pt")], "weights")
    tracker.log_artifacts([r.export.onnx_path], "onnx")
    if r.operating_points:  # beside the ONNX: the registered version's source is the run's onnx/ folder
        tracker.log_artifacts([r.export.onnx_path.parent / OPERATING_POINTS_FILE], "onnx")
    tracker.log_artifacts([out / "eval" / "evaluation.json"], "eval")
    tracker.log_artifacts([*sorted((out / "plots").glob("*.png")), out / "plots" / "results.csv"], "plots")
    tracker.log_artifacts([out / "model_card.md"], "")
    if r.int8:  # the variant's model.onnx and operating points, where the registry looks for them
        tracker.log_artifacts(sorted(p for p in r.int8.folder.iterdir() if p.is_file()), artifact_dir("int8"))
    tracker.set_tags(
        {
            "checkpoint_uri": r.dist.checkpoint_uri,
            "onnx_sha256": r.export.sha256,
            **operating_point_tags(r.operating_points),
        }
    )


def _register(
    settings: TrainSettings,
    run_id: str,
    config: TrainConfig,
    data: DatasetRef,
    commit: str,
    r: _Results,
    card: str,
    run_name: str,
) -> str:
    """Register the version with its card and lineage tags (dataset, commit, config/ONNX hashes, mAP).

    The version is incomplete (refused by every read) until :func:`complete_version`.
    """
    lineage = LineageTags(
        dataset_version=data.version,
        git_commit=commit,
        config_sha256=config.sha256(),
        onnx_sha256=r.export.sha256,
        map50=round(r.onnx_report.map50, 6),
        map40=round(r.onnx_report.map40, 6),
        parity_max_abs_diff=r.export.parity_max_abs_diff,
        imgsz=r.export.imgsz,
        classes=len(TorchPredictor.load(r.dist.best_weights).class_names),
    )
    return register_version(
        settings,
        run_id,
        lineage,
        card,
        run_tags={
            "run_name": run_name,
            "dataset_synthetic": str(data.synthetic),
            **subgroup_tags(r.onnx_report.subgroups),  # read by delivery's subgroup gate
            **operating_point_tags(r.operating_points),  # the artifact beside the version's ONNX
            **(r.int8.figures.tags() if r.int8 else {}),  # read by delivery's variant gate
        },
    )


def check_test_split(data: DatasetRef, minimum: int) -> None:
    """Refuse, before minutes of training, a dataset whose test split cannot measure anything."""
    images = len(data.images("test"))
    if images < minimum:
        raise DatasetError(
            f"dataset {data.version} has {images} test images, fewer than CXR_MIN_TEST_IMAGES={minimum}: "
            "its mAP would be noise (a model registered with 0.000 says nothing). Build a larger dataset "
            "(e.g. `cxr data synth --n-images 200` then `cxr data ingest`), or lower CXR_MIN_TEST_IMAGES "
            "for a smoke run that is not meant to be promoted"
        )


def train_and_register(
    config: TrainConfig,
    dataset: str | Path | None = None,
    workers: int | None = None,
    *,
    settings: TrainSettings | None = None,
    prelaunched: PrelaunchedFit | None = None,
) -> TrainOutcome:
    """Train ``config`` (with ``workers`` Ray workers if given) on ``dataset`` and register the result.

    With ``prelaunched`` (:func:`prelaunch`) the run trains on the workers already started, under
    their run name; the caller cancels them if this fails before training.
    """
    settings = settings or TrainSettings()
    # [1] the job: recipe (with the workers override), dataset, one run name for Ray and MLflow
    if workers is not None:
        config = config.with_workers(workers)
    ref = dataset_ref(config.dataset, dataset)
    run_name = prelaunched.run_name if prelaunched is not None else make_run_name(config)
    out = (settings.work_dir / run_name).resolve()
    data = resolve_dataset(ref, out, settings.dataset_cache)
    check_test_split(data, settings.min_test_images)
    config = follow_base_architecture(config, settings)
    commit = git_commit()
    # [2] the MLflow run: any failure below marks it FAILED and withdraws the version it registered
    tracker = Tracker(settings)
    tracker.start(run_name, config, data, commit)
    version = ""
    try:
        with reporting() as progress:  # the command's reporter: epochs as a bar, then each stage
            report_link = _log_dataset_report(tracker, data, settings)
            # [3] train with Ray (the epoch bar), then evaluate, export with parity, quantize and plot
            dist = _fit(config, data, run_name, settings, tracker.run_id, out, prelaunched)
            label = "evaluate on test, export ONNX with parity, operating points"
            with progress.task("train_stage", label, spinner=False, stage="check", run=run_name) as check:
                results = _check_trained(config, data, dist, out)
                check.done("ok", f"mAP@0.5 {results.onnx_report.map50:.3f}", map50=results.onnx_report.map50)
            # [4] reports and metrics into the run, then the registered version with its lineage
            with progress.task(
                "train_stage", "register", spinner=False, stage="register", run=run_name
            ) as reg:
                card = _write_reports(config, data, run_name, commit, results, out, report_link)
                final = _final_metrics(results)
                _log_run(tracker, results, final, out)
                version = _register(settings, tracker.run_id, config, data, commit, results, card, run_name)
                artifact_uri = tracker.artifact_uri()
                reg.done("ok", f"{settings.registered_model} v{version}", model_version=version)
        tracker.end("FINISHED")
        # [5] the last step: only a version whose run FINISHED may be used (a crash before leaves it refused)
        complete_version(settings, version)
    except BaseException:
        if version:  # first: ending the run needs MLflow too, and may fail as well
            withdraw_version(settings, version, tracker.run_id)
        tracker.end("FAILED")
        raise
    return TrainOutcome(
        run_id=tracker.run_id,
        model_version=version,
        metrics={**dist.metrics, **final},
        onnx_path=results.export.onnx_path,
        run_name=run_name,
        dataset_version=data.version,
        checkpoint_uri=dist.checkpoint_uri,
        artifact_uri=artifact_uri,
        results_csv=out / "plots" / "results.csv",
        eval_report=results.onnx_report,
    )
