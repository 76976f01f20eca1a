"""``cxr train``: run a training job, evaluate a registered version.

Mounted by the root ``cxr`` command; also ``python -m training``.
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from core.errors import CxrError
from core.progress import reporting
from core.variants import VARIANTS_TAG, artifact_dir, parse_variant
from training.config import TrainSettings, load_config
from training.dataset import DatasetRef
from training.errors import TrainingError

# options several commands share, declared once
ConfigOption = Annotated[
    Path, typer.Option("--config", "-c", help="recipe YAML, e.g. training/configs/cpu-small.yaml")
]
DatasetOption = Annotated[str | None, typer.Option("--dataset", "-d", help="dataset version or directory")]

app = typer.Typer(help="Train, evaluate and register the chest X-ray detector.", no_args_is_help=True)
console = Console()


def _setup(settings: TrainSettings) -> None:
    from core.offline import apply_offline_env

    apply_offline_env(settings.stack_dir)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")


def epoch_table(results_csv: Path) -> Table:
    """Ultralytics' per-epoch CSV as a rich table (losses and validation metrics)."""
    table = Table(title="epochs")
    with results_csv.open() as handle:
        rows = list(csv.DictReader(handle))
    wanted = [
        ("epoch", "epoch"),
        ("train/box_loss", "box"),
        ("train/cls_loss", "cls"),
        ("train/dfl_loss", "dfl"),
        ("metrics/precision(B)", "P"),
        ("metrics/recall(B)", "R"),
        ("metrics/mAP50(B)", "mAP50"),
        ("metrics/mAP50-95(B)", "mAP50-95"),
        ("time", "s"),
    ]
    columns = [(key, label) for key, label in wanted if rows and key in rows[0]]
    for _, label in columns:
        table.add_column(label, justify="right")
    for row in rows:
        table.add_row(*(f"{float(row[key]):.4g}" for key, _ in columns))
    return table


def _output_file(value: Path | None) -> Path | None:
    """Refuse ``--out`` naming a folder, or a place under a file, before the work.

    The file is written last: ``tune`` raised ``IsADirectoryError`` (a traceback) after its whole
    search, with the search's parent run marked FAILED and its best recipe nowhere.
    """
    if value is None:
        return value
    if value.is_dir():
        raise typer.BadParameter(f"{value} is a folder: pass the path of the file to write")
    for parent in value.parents:
        if parent.exists():
            if not parent.is_dir():
                raise typer.BadParameter(f"{parent} is a file, so {value} cannot be written under it")
            break
    return value


def _fail(exc: CxrError) -> typer.Exit:
    console.print(f"[bold red]error:[/] {escape(str(exc))}", soft_wrap=True)
    return typer.Exit(code=2)


@app.command()
def run(
    config: ConfigOption,
    workers: Annotated[
        int | None, typer.Option("--workers", "-w", min=1, help="Ray workers (data parallel)")
    ] = None,
    dataset: DatasetOption = None,
) -> None:
    """Train with Ray, evaluate, export ONNX with parity, and register a cxr-detector version."""
    settings = TrainSettings()
    _setup(settings)
    from training.run import train_and_register

    try:
        recipe = load_config(config)
        with reporting(console):  # the epoch bar and each stage: live on a terminal, log lines elsewhere
            outcome = train_and_register(recipe, dataset, workers, settings=settings)
    except CxrError as exc:
        raise _fail(exc) from exc
    if outcome.results_csv is not None and outcome.results_csv.exists():
        console.print(epoch_table(outcome.results_csv))
    summary = Table(title="registered", show_header=False)
    summary.add_column("what", no_wrap=True)
    summary.add_column("value", overflow="fold")
    summary.add_row("run id", outcome.run_id)
    summary.add_row("run name (Ray = MLflow)", outcome.run_name)
    summary.add_row("model", f"{settings.registered_model} version {outcome.model_version}")
    summary.add_row("dataset", outcome.dataset_version)
    for key in ("test/map50", "test/map40", "test/map50_95", "parity_max_abs_diff", "ort_latency_ms_b1"):
        summary.add_row(key, f"{outcome.metrics.get(key, float('nan')):.4g}")
    summary.add_row("MLflow artifacts", outcome.artifact_uri)
    summary.add_row("Ray checkpoint", outcome.checkpoint_uri)
    summary.add_row("ONNX (local)", str(outcome.onnx_path))
    console.print(summary)


def _registered_onnx(
    settings: TrainSettings, model_version: str, dataset: str | None, work: Path
) -> tuple[DatasetRef, Path]:
    """A registered version's ONNX file and its dataset (``--dataset`` or its dataset_version tag)."""
    from training.dataset import resolve_dataset
    from training.registry import ModelRegistry

    registry = ModelRegistry.from_settings(settings)  # one client, one reachability probe
    version = registry.facts(model_version)
    ref = dataset or version.tags.get("dataset_version")
    if not ref:
        raise TrainingError(f"version {model_version} has no dataset_version tag; pass --dataset")
    if not dataset:  # a tag names a published version, never a folder (only --dataset may)
        from data_pipeline.errors import DatasetNotFound
        from data_pipeline.versioning import checked_version

        try:
            checked_version(ref, f"version {model_version}'s dataset_version tag")
        except DatasetNotFound as exc:
            raise TrainingError(str(exc)) from None
    data = resolve_dataset(ref, work, settings.dataset_cache)
    return data, registry.download_onnx(model_version, work / "model")


def _known_split(value: str) -> str:
    """Refused before the model and dataset are downloaded, not after (an unknown split has no images)."""
    if value not in ("train", "val", "test"):
        raise typer.BadParameter(f"{value!r} is not a split: use train, val or test")
    return value


@app.command("evaluate")
def evaluate_cmd(
    model_version: Annotated[
        str, typer.Option("--model-version", "-m", help="registered cxr-detector version")
    ],
    split: Annotated[str, typer.Option("--split", callback=_known_split, help="train | val | test")] = "test",
    dataset: Annotated[
        str | None, typer.Option("--dataset", "-d", help="default: the version's dataset_version tag")
    ] = None,
    out: Annotated[
        Path | None, typer.Option("--out", callback=_output_file, help="write the report JSON here")
    ] = None,
) -> None:
    """Evaluate a registered version's ONNX model (mAP@0.5, VinDr mAP@0.4, per class, latency)."""
    settings = TrainSettings()
    _setup(settings)
    from training.config import EvalConfig
    from training.evaluate import evaluate
    from training.predictors import OrtPredictor

    work = settings.work_dir / f"evaluate-v{model_version}"
    try:
        data, onnx_path = _registered_onnx(settings, model_version, dataset, work)
        report = evaluate(
            OrtPredictor.load(onnx_path), data, EvalConfig(), split=split, plots_dir=work / "plots"
        )
    except CxrError as exc:
        raise _fail(exc) from exc
    table = Table(title=f"{settings.registered_model} v{model_version} on {data.version}/{split}")
    for col in ("finding", "boxes", "AP50", "AP40", "AP50-95", "P", "R"):
        table.add_column(col, justify="right")
    for c in report.per_class:
        table.add_row(
            c.class_name,
            str(c.instances),
            *(f"{v:.3f}" for v in (c.ap50, c.ap40, c.ap50_95, c.precision, c.recall)),
        )
    console.print(table)
    console.print(
        f"mAP@0.5 {report.map50:.4f}  mAP@0.4 {report.map40:.4f}  mAP@0.5:0.95 {report.map50_95:.4f}  "
        f"P {report.precision:.3f} R {report.recall:.3f} @ conf {report.conf_threshold}  "
        f"ORT {report.latency_ms_b1:.2f} ms/img (b1), {report.latency_ms_b8:.2f} ms/img (b8)"
    )
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)  # as tune's --out: a new folder is no reason to fail
        out.write_text(json.dumps(report.model_dump(mode="json"), indent=2))
        console.print(f"report: {out}")


@app.command("quantize")
def quantize_cmd(
    model_version: Annotated[
        str, typer.Option("--model-version", "-m", help="registered cxr-detector version")
    ],
    dataset: Annotated[
        str | None, typer.Option("--dataset", "-d", help="default: the version's dataset_version tag")
    ] = None,
    calibration_images: Annotated[
        int,
        typer.Option("--calibration-images", min=1, help="INT8 calibration (val) and parity (test) images"),
    ] = 32,
    variant: Annotated[
        str,
        typer.Option(
            "--variant",
            help="int8 (ONNX Runtime QDQ, any machine) or fp16-trt (needs onnxruntime-gpu with TensorRT)",
        ),
    ] = "int8",
    register: Annotated[
        bool,
        typer.Option(
            "--register/--no-register",
            help="attach the INT8 file and its figures to the version (its int8 variant)",
        ),
    ] = True,
) -> None:
    """Build a serving variant of a registered version (INT8 by default, calibrated on val), measure
    it beside fp32 on the same test split, and attach it to the version.

    Attaching serves nothing: a stage serves it only after `cxr promote V --to STAGE --variant
    NAME`, whose variant gate reads the figures recorded here.
    """
    settings = TrainSettings()
    _setup(settings)
    from training.config import EvalConfig
    from training.evaluate import evaluate
    from training.predictors import OrtPredictor
    from training.registry import ModelRegistry
    from training.variants import build_variant

    work = settings.work_dir / f"quantize-v{model_version}"
    try:
        name = parse_variant(variant)
    except ValueError as exc:
        raise _fail(TrainingError(str(exc))) from exc
    try:
        if name == "fp32":
            raise TrainingError("fp32 is the version's own export; build int8 or fp16-trt")
        data, onnx_path = _registered_onnx(settings, model_version, dataset, work)
        eval_config = EvalConfig()
        fp32 = evaluate(OrtPredictor.load(onnx_path), data, eval_config)
        built = build_variant(
            name, onnx_path, work / artifact_dir(name), data, eval_config, fp32, calibration_images
        )
        if register:
            registry = ModelRegistry.from_settings(settings)
            carried = registry.facts(model_version).tags.get(VARIANTS_TAG, "fp32")
            registry.attach_variant(model_version, name, built.folder, built.figures.tags(carried))
    except CxrError as exc:
        raise _fail(exc) from exc
    figures = built.figures
    title = f"{settings.registered_model} v{model_version}: fp32 vs {name} on {data.version}/test"
    table = Table(title=title)
    for col in ("variant", "mAP@0.5", "mAP@0.4", "mAP@0.5:0.95", "ms/img b1", "ms/img b8"):
        table.add_column(col, justify="right")
    for label, r in (("fp32", built.fp32_report), (name, built.report)):
        table.add_row(
            label,
            *(f"{v:.4f}" for v in (r.map50, r.map40, r.map50_95)),
            *(f"{v:.2f}" if v is not None else "-" for v in (r.latency_ms_b1, r.latency_ms_b8)),
        )
    console.print(table)
    console.print(
        f"{name}: mAP@0.5 drop {figures.map50_drop:+.4f}, mAP@0.4 drop {figures.map40_drop:+.4f}, "
        f"max |fp32 - {name}| class score {figures.score_max_abs_diff:.4f}, finding agreement "
        f"{figures.finding_agreement:.3f} on up to {calibration_images} test images; "
        f"file {built.folder / 'model.onnx'} (sha256 {figures.sha256[:12]})."
    )
    if register:
        console.print(
            f"attached to v{model_version} as its {name} variant; serve it with "
            f"`cxr promote {model_version} --to staging --variant {name}` (the variant gate decides)"
        )
    else:
        console.print("not attached (--no-register): no stage can serve this file")


def _positive_minutes(value: float) -> float:
    """Typer's ``min`` is inclusive; a zero budget would end the search before its first trial."""
    if not value > 0:
        raise typer.BadParameter(f"must be above 0 minutes, got {value}")
    return value


@app.command("tune")
def tune_cmd(
    config: Annotated[
        Path,
        typer.Option("--config", "-c", help="recipe YAML whose lr, augmentation, imgsz, epochs are tuned"),
    ],
    trials: Annotated[
        int, typer.Option("--trials", "-n", min=1, help="Tune trials (each a Ray Train run)")
    ] = 8,
    budget_minutes: Annotated[
        float,
        typer.Option("--budget-minutes", callback=_positive_minutes, help="wall-clock budget of the search"),
    ] = 60.0,
    dataset: DatasetOption = None,
    workers: Annotated[
        int | None, typer.Option("--workers", "-w", min=1, help="Ray workers per trial (default: recipe's)")
    ] = None,
    space: Annotated[
        Path | None, typer.Option("--space", help="search-space YAML (fields of tune_space.TuneSpace)")
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out", "-o", callback=_output_file, help="where the tuned recipe goes (default: the work dir)"
        ),
    ] = None,
) -> None:
    """Search the recipe's hyper-parameters with Ray Tune (ASHA); write the best as a new recipe."""
    settings = TrainSettings()
    _setup(settings)
    from training.tune import tune_search
    from training.tune_space import load_space

    try:
        recipe = load_config(config)
        search_space = load_space(space) if space is not None else None
        outcome = tune_search(
            recipe,
            dataset,
            trials=trials,
            budget_minutes=budget_minutes,
            workers=workers,
            space=search_space,
            out=out,
            settings=settings,
        )
    except CxrError as exc:
        raise _fail(exc) from exc
    table = Table(title=f"trials of {outcome.search_name} ({outcome.metric}, {outcome.mode})")
    table.add_column("", no_wrap=True)
    for col in ("trial", "outcome", "lr0", "aug x", "imgsz", "epochs", "run", outcome.metric):
        table.add_column(col, justify="right", no_wrap=col == "trial")
    for t in outcome.trials:
        best = t.trial_id == outcome.best.trial_id
        table.add_row(
            "*" if best else "",
            t.trial_id,
            t.outcome,
            f"{t.lr0:.3g}",
            f"{t.augment_strength:.2f}",
            str(t.imgsz),
            str(t.epochs),
            str(t.epochs_run),
            f"{t.metric:.4f}" if t.metric is not None else "-",
            style="bold green" if best else None,
        )
    console.print(table)
    summary = Table(title="best", show_header=False)
    summary.add_column("what", no_wrap=True)
    summary.add_column("value", overflow="fold")
    summary.add_row("MLflow parent run", outcome.parent_run_id)
    summary.add_row("best trial (child run)", f"{outcome.best.trial_id} ({outcome.best.child_run_id})")
    summary.add_row(outcome.metric, f"{outcome.best.metric:.4f}" if outcome.best.metric is not None else "-")
    summary.add_row("tuned recipe", str(outcome.config_path))
    summary.add_row("Ray checkpoint", outcome.best.checkpoint or "-")
    summary.add_row("seconds", f"{outcome.seconds:.0f}")
    console.print(summary)
    console.print(f"next: cxr train run --config {outcome.config_path}  (the search registered nothing)")
