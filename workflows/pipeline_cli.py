"""``cxr pipeline``: run the retrain DAG locally, run one of its steps (what Argo does), render it.

- ``cxr pipeline run``: every step in order on this machine, against the
  one-machine stack, with a progress row per step and a summary table.
- ``cxr pipeline step <name>``: one step, as each Argo container runs it; output
  parameters are written as files under ``--outputs`` for Argo to read.
- ``cxr pipeline render [--check]``: write ``k8s/workflows/*.yaml`` from the Hera
  definitions, or fail when the committed files drifted from them.
- ``cxr pipeline schedule [--show]``: keep the rendered CronWorkflows' schedules on this
  machine (the stack's ``scheduler`` component), or print them with their next fire times.
"""

from __future__ import annotations

import logging
import re
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer
from pydantic import BaseModel
from rich.console import Console

from core.errors import CxrError, StageFileError
from core.stages import as_stage
from workflows.config import WorkflowSettings, get_settings
from workflows.parameters import MAX_EPOCHS, TRAIN_STEP_ENV

console = Console(highlight=False)
app = typer.Typer(
    help="The retrain pipeline: run it locally, run one step (as Argo does), render it.", no_args_is_help=True
)
step_app = typer.Typer(
    help="Run one step of the retrain DAG (what each Argo container runs).", no_args_is_help=True
)
app.add_typer(step_app, name="step")


def _outputs_folder(value: Path | None) -> Path | None:
    """Checked before the step's work: a file there raised ``FileExistsError`` from ``mkdir``, after it."""
    if value is not None and value.exists() and not value.is_dir():
        raise typer.BadParameter(
            f"{value} is a file, not a folder: pass the folder to write the outputs into"
        )
    return value


OutputsOpt = Annotated[
    Path | None,
    typer.Option(
        "--outputs",
        callback=_outputs_folder,
        help="folder to write output parameters into, one file each (Argo)",
    ),
]


def _setup(settings: WorkflowSettings) -> None:
    """Closed-network environment and structured logging, before any heavy import."""
    from core.offline import apply_offline_env

    apply_offline_env(settings.stack_dir)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")


@contextmanager
def _errors() -> Iterator[None]:
    """A pipeline or store error ends the command with one readable line and exit code 1."""

    try:
        yield
    except CxrError as exc:
        console.print(f"error: {exc}", style="bold red", markup=False)
        raise typer.Exit(1) from exc


def _ensure_folder(folder: Path, option: str) -> None:
    """Create ``folder`` before any work, or say why not in one line.

    An option naming a file (or a place under one, or one this user cannot write) raised
    ``FileExistsError`` or ``NotADirectoryError`` with a traceback from deep in the command.
    """
    from workflows.errors import PipelineError

    if folder.exists() and not folder.is_dir():
        raise PipelineError(f"{option} {folder} is a file, not a folder: pass a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PipelineError(
            f"cannot create {option} {folder} ({exc.strerror or exc}): pass a folder you can write"
        ) from exc


def _run_name(value: str | None) -> str | None:
    """One folder name: it names ``<stack>/pipeline/<run name>`` and the hand-off records' S3 prefix,
    and ``../x`` put both outside their place."""
    if value is not None and (not _RUN_NAME.fullmatch(value) or set(value) == {"."}):
        raise typer.BadParameter(
            f"{value!r} is not a run name: letters, digits, '.', '_' and '-' (at most 200), e.g. retrain-7"
        )
    return value


_RUN_NAME = re.compile(r"[A-Za-z0-9._-]{1,200}")


def _step_run_name(value: str) -> str:
    """A step's run name keys its hand-off records (``pipelines/<run name>/``): ``../x`` was refused by the
    store client only, reported as "S3 unreachable ... is the stack running?"."""
    return _run_name(value) or value


RunNameOpt = Annotated[
    str,
    typer.Option(
        "--run-name", callback=_step_run_name, help="the workflow's name; keys the hand-off records"
    ),
]


def _source(value: str) -> str:
    """A URL of another scheme read as a folder path: "dataset source ftp:/x is not a directory"."""
    scheme, sep, _ = value.partition("://")
    if sep and scheme != "s3":
        raise typer.BadParameter(
            f"{value!r}: the source is a folder, s3://bucket/prefix or 'latest', not a {scheme}:// URL"
        )
    return value


def _write_outputs(outputs: Path | None, values: dict[str, object], record: BaseModel | None = None) -> None:
    """Each value as its own file (Argo's valueFrom.path), plus the whole record as result.json."""
    if outputs is None:
        return
    from workflows.errors import PipelineError

    try:
        outputs.mkdir(parents=True, exist_ok=True)
        for name, value in values.items():
            text = str(value).lower() if isinstance(value, bool) else str(value)
            (outputs / name).write_text(text)
        if record is not None:
            (outputs / "result.json").write_text(record.model_dump_json(indent=2))
    except OSError as exc:  # was a traceback, after the step's work was done
        with _errors():
            raise PipelineError(
                f"cannot write the outputs into --outputs {outputs} ({exc.strerror or exc}): "
                "pass a folder you can write"
            ) from exc


# --------------------------------------------------------------------------- run


@app.command("run")
def run(
    source: Annotated[
        str,
        typer.Option(
            "--source",
            callback=_source,
            help="folder with dicom/ + annotations.csv, s3://bucket/prefix, or 'latest' (the folder the "
            "latest dataset version was built from: same studies + new feedback)",
        ),
    ] = "latest",
    config: Annotated[
        Path | None, typer.Option("--config", help="training config (default: CXR_TRAINING_CONFIG)")
    ] = None,
    base_model: Annotated[
        str | None, typer.Option("--base-model", help="'production' (fine-tune), 'none', or a version")
    ] = None,
    epochs: Annotated[
        int, typer.Option("--epochs", min=0, max=MAX_EPOCHS, help="override the config's epochs (0 = keep)")
    ] = 0,
    workers: Annotated[int, typer.Option("--workers", min=1, help="Ray Train workers")] = 2,
    include_feedback: Annotated[
        bool, typer.Option("--feedback/--no-feedback", help="merge radiologists' feedback from the store")
    ] = True,
    promote: Annotated[
        bool, typer.Option("--promote/--no-promote", help="promote the new version to staging")
    ] = True,
    run_name: Annotated[
        str | None, typer.Option("--run-name", callback=_run_name, help="default: local-<UTC timestamp>")
    ] = None,
    work_dir: Annotated[
        Path | None, typer.Option("--work-dir", help="default: <stack>/pipeline/<run name>")
    ] = None,
    golden_wait: Annotated[
        float,
        typer.Option(
            "--golden-wait",
            min=0.0,
            help="seconds the dataset's split waits for a golden set being built beside this run to be "
            "pinned (the first `make up` does this); 0: use the pin as it is now",
        ),
    ] = 0.0,
) -> None:
    """Run every step of the retrain DAG on this machine, in the DAG's order, against the stack."""
    from workflows import steps
    from workflows.run_lock import BUSY_EXIT_CODE, PipelineBusy, pipeline_lock
    from workflows.runner import RunOptions, run_pipeline, summary_table

    settings = get_settings()
    _setup(settings)
    name = run_name or f"local-{datetime.now(UTC).strftime('%Y%m%d-%H%M%S')}"
    options = RunOptions(
        source=source,
        training_config=config or Path(settings.training_config),
        base_model=base_model or settings.base_model,
        epochs=epochs,
        workers=workers,
        include_feedback=include_feedback,
        promote=promote,
        run_name=name,
        work_dir=work_dir or settings.stack_dir / "pipeline" / name,
        golden_wait_s=golden_wait,
    )
    with _errors():  # a recipe or base model the train step would refuse: before any data step runs
        steps.train_config(
            options.training_config, base_model=options.base_model, epochs=epochs, settings=settings
        )
    try:
        with pipeline_lock(settings.stack_dir, name), _errors():
            _ensure_folder(options.work_dir, "--work-dir")
            summary = run_pipeline(options, settings, console=console)
    except PipelineBusy as exc:  # one retrain at a time (workflows/run_lock.py); the scheduler reads the code
        console.print(f"error: {exc}", style="bold red", markup=False)
        raise typer.Exit(BUSY_EXIT_CODE) from exc
    console.print(summary_table(summary))
    console.print(f"summary: {options.work_dir / 'summary.json'}", markup=False)
    if not summary.succeeded:
        raise typer.Exit(1)


# --------------------------------------------------------------------------- render


@app.command("render")
def render(
    check: Annotated[
        bool, typer.Option("--check", help="only compare; exit 1 when the YAML drifted")
    ] = False,
    out_dir: Annotated[Path | None, typer.Option("--out-dir", help="default: k8s/workflows")] = None,
) -> None:
    """Render the Hera definitions to k8s/workflows/*.yaml (or check they are up to date)."""
    from workflows.render import ARGO_DIR, drifted_files, write_all

    settings = get_settings()
    target = out_dir or ARGO_DIR
    if check:
        if not target.is_dir():  # was "out of date ...: run `cxr pipeline render`", for a typo
            console.print(
                f"error: {target} is not a folder: pass --out-dir the folder of the rendered YAML",
                style="bold red",
                markup=False,
            )
            raise typer.Exit(2)
        drifted = drifted_files(settings, target)
        if drifted:
            console.print(
                f"out of date in {target}: {', '.join(drifted)}; run `cxr pipeline render`",
                style="red",
                markup=False,
            )
            raise typer.Exit(1)
        console.print(f"{target} matches workflows/retrain.py", markup=False)
        return
    with _errors():
        _ensure_folder(target, "--out-dir")
    for path in write_all(settings, target):
        console.print(f"wrote {path}", markup=False)


# --------------------------------------------------------------------------- schedule


@app.command("schedule")
def schedule(
    show: Annotated[
        bool, typer.Option("--show", help="print the schedules and their next fire times, then exit")
    ] = False,
) -> None:
    """Keep the CronWorkflows' schedules on this machine: start `cxr pipeline run` when one fires."""
    from workflows.scheduler import build_scheduler, run_forever, status_table

    settings = get_settings()
    _setup(settings)
    with _errors():
        scheduler = build_scheduler(settings)
    if show:
        console.print(status_table(scheduler.snapshot()))
        return
    if not settings.scheduler:
        console.print("scheduler switched off (CXR_SCHEDULER=false): retrains run only by hand", markup=False)
        return
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    with _errors():
        run_forever(scheduler, settings.scheduler_poll_s, stop)


# --------------------------------------------------------------------------- steps (Argo)


@step_app.command("check-parameters")
def step_check_parameters(
    training_config: Annotated[str, typer.Option("--training-config")],
    base_model: Annotated[str, typer.Option("--base-model")],
    epochs: Annotated[str, typer.Option("--epochs")],
    workers: Annotated[str, typer.Option("--workers")],
    outputs: OutputsOpt = None,
) -> None:
    """Refuse training parameters the train step's RayJob must not receive; output the checked values.

    Every value is read as text, so a bad one gets this step's message, not a usage error.
    """
    from workflows.parameters import check_train_parameters

    with _errors():
        checked = check_train_parameters(
            training_config=training_config, base_model=base_model, epochs=epochs, workers=workers
        )
    _write_outputs(outputs, checked.outputs())
    console.print(
        "parameters ok: " + " ".join(f"{k}={v}" for k, v in checked.outputs().items()), markup=False
    )


@step_app.command("ingest")
def step_ingest(
    source: Annotated[str, typer.Option("--source")],
    dest: Annotated[Path | None, typer.Option("--dest", help="copy/download the studies here")] = None,
    include_feedback: Annotated[str, typer.Option("--include-feedback")] = "true",
    outputs: OutputsOpt = None,
) -> None:
    """Stage new studies and count waiting feedback."""
    from workflows import steps

    settings = get_settings()
    _setup(settings)
    with _errors():
        result = steps.ingest(
            source,
            dest=dest,
            include_feedback=steps.parse_bool(include_feedback),
            store=steps.default_store(),
        )
    _write_outputs(outputs, {"n-images": result.n_images, "n-feedback-rows": result.n_feedback_items}, result)


@step_app.command("validate")
def step_validate(
    staged: Annotated[Path, typer.Option("--staged", help="folder with dicom/ + annotations.csv")],
    outputs: OutputsOpt = None,
) -> None:
    """Schema-check the staged annotations and their images."""
    from workflows import steps

    settings = get_settings()
    _setup(settings)
    with _errors():
        result = steps.validate(steps.StagedData.from_dir(staged))
    _write_outputs(outputs, {"bad-rows": result.bad_rows}, result)


@step_app.command("build-dataset")
def step_build_dataset(
    staged: Annotated[Path, typer.Option("--staged")],
    out: Annotated[Path, typer.Option("--out", help="local folder for the dataset version")],
    include_feedback: Annotated[str, typer.Option("--include-feedback")] = "true",
    outputs: OutputsOpt = None,
) -> None:
    """Build the content-hashed dataset version and upload it to the store."""
    from workflows import steps

    settings = get_settings()
    _setup(settings)
    with _errors():
        result = steps.build_dataset(
            steps.StagedData.from_dir(staged),
            out_dir=out,
            include_feedback=steps.parse_bool(include_feedback),
            store=steps.default_store(),
            settings=settings,
        )
    _write_outputs(outputs, {"dataset-version": result.version, "n-images": result.n_images}, result)


@step_app.command("train")
def step_train(
    dataset_version: Annotated[
        str, typer.Option("--dataset-version", envvar=TRAIN_STEP_ENV["dataset-version"])
    ],
    config: Annotated[Path, typer.Option("--config", envvar=TRAIN_STEP_ENV["training-config"])],
    run_name: Annotated[
        str,
        typer.Option(
            "--run-name",
            envvar=TRAIN_STEP_ENV["run-name"],
            callback=_step_run_name,
            help="the workflow's name; keys the hand-off records",
        ),
    ],
    base_model: Annotated[
        str, typer.Option("--base-model", envvar=TRAIN_STEP_ENV["base-model"])
    ] = "production",
    epochs: Annotated[int, typer.Option("--epochs", envvar=TRAIN_STEP_ENV["epochs"])] = 0,
    workers: Annotated[int, typer.Option("--workers", min=1, envvar=TRAIN_STEP_ENV["workers"])] = 2,
    outputs: OutputsOpt = None,
) -> None:
    """Train (inside the RayJob) and leave the result for the next steps in the store.

    The RayJob's fixed entrypoint gives no options: each comes from its ``CXR_TRAIN_STEP_*`` variable.
    """
    from workflows import steps

    settings = get_settings()
    _setup(settings)
    with _errors():
        store = steps.default_store()
        result = steps.train(
            dataset_version,
            config_path=config,
            base_model=base_model,
            epochs=epochs,
            workers=workers,
            run_name=run_name,
            settings=settings,
        )
        steps.save_handoff(store, settings, run_name, "train", result)
    _write_outputs(outputs, {"run-id": result.run_id, "model-version": result.model_version}, result)


@step_app.command("evaluate")
def step_evaluate(run_name: RunNameOpt, outputs: OutputsOpt = None) -> None:
    """Check the run's test metrics (mAP@0.5, VinDr mAP@0.4)."""
    from workflows import steps

    settings = get_settings()
    _setup(settings)
    with _errors():
        trained = steps.load_train_handoff(steps.default_store(), settings, run_name)
        result = steps.evaluate(trained)
    _write_outputs(outputs, {"map50": result.map50, "map40": result.map40}, result)
    if outputs is not None:
        (outputs / "evaluation.json").write_text(result.model_dump_json(indent=2))


@step_app.command("export")
def step_export(run_name: RunNameOpt, outputs: OutputsOpt = None) -> None:
    """Check the ONNX artifact's checksum and parity."""
    from workflows import steps

    settings = get_settings()
    _setup(settings)
    with _errors():
        trained = steps.load_train_handoff(steps.default_store(), settings, run_name)
        result = steps.export(trained, mlflow_uri=settings.mlflow_uri, model_name=settings.registered_model)
    _write_outputs(
        outputs,
        {"onnx-sha256": result.onnx_sha256, "parity-max-abs-diff": result.parity_max_abs_diff},
        result,
    )


@step_app.command("register")
def step_register(run_name: RunNameOpt, outputs: OutputsOpt = None) -> None:
    """Check the registered version and its lineage tags; output its number."""
    from workflows import steps

    settings = get_settings()
    _setup(settings)
    with _errors():
        trained = steps.load_train_handoff(steps.default_store(), settings, run_name)
        result = steps.register(trained, mlflow_uri=settings.mlflow_uri, model_name=settings.registered_model)
    _write_outputs(outputs, {"model-version": result.model_version}, result)


@step_app.command("promote-to-staging")
def step_promote(
    model_version: Annotated[str, typer.Option("--model-version")],
    stage: Annotated[str, typer.Option("--stage")] = "staging",
    git_url: Annotated[
        str | None, typer.Option("--git-url", help="clone this GitOps repo first (cluster)")
    ] = None,
    push: Annotated[bool, typer.Option("--push", help="push the promotion commit")] = False,
    outputs: OutputsOpt = None,
) -> None:
    """Promote the version (gates, alias, stage file, commit); a refused gate is reported, not an error."""
    from workflows import steps

    settings = get_settings()
    _setup(settings)
    try:
        target = as_stage(stage)
    except StageFileError as exc:
        console.print(f"error: {exc}", style="bold red")
        raise typer.Exit(2) from exc
    with _errors():
        result = steps.promote(
            model_version,
            stage=target,
            gitops_dir=settings.gitops_dir,
            git_url=git_url,
            push=push,
        )
    _write_outputs(outputs, {"promoted": result.promoted, "reason": result.reason}, result)
    console.print(("promoted: " if result.promoted else "not promoted: ") + result.reason, markup=False)


@step_app.command("check-feedback")
def step_check_feedback(
    threshold: Annotated[
        int | None, typer.Option("--threshold", min=1, help="default: CXR_FEEDBACK_THRESHOLD")
    ] = None,
    outputs: OutputsOpt = None,
) -> None:
    """Count feedback newer than the last dataset version; say whether to retrain."""
    from workflows import steps

    settings = get_settings()
    _setup(settings)
    with _errors():
        result = steps.check_feedback(
            threshold=threshold or settings.feedback_threshold, store=steps.default_store(), settings=settings
        )
    _write_outputs(
        outputs, {"new-feedback": result.new_items, "should-retrain": result.should_retrain}, result
    )
    console.print(
        f"{result.new_items} new feedback items (threshold {result.threshold}): "
        + ("retrain" if result.should_retrain else "wait"),
        markup=False,
    )


@step_app.command("record-exit")
def step_record_exit(
    run_name: RunNameOpt,
    status: Annotated[str, typer.Option("--status")],
    failures: Annotated[str, typer.Option("--failures")] = "",
) -> None:
    """onExit handler: store how the workflow ended next to its records."""
    from workflows import steps

    settings = get_settings()
    _setup(settings)
    with _errors():
        steps.record_exit(
            run_name=run_name,
            status=status,
            failures=failures,
            store=steps.default_store(),
            settings=settings,
        )
