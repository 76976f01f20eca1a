"""The local runner: the retrain DAG's steps, in the DAG's order, on one machine.

``cxr pipeline run`` calls :func:`run_pipeline`. It walks
:data:`workflows.retrain.STEP_ORDER` and calls the same functions of
:mod:`workflows.steps` that the Argo steps call, passing records in memory
instead of through artifacts, so the one-machine loop and the cluster cannot
drift apart. Each step reports its start and its end (state, seconds, outcome) through the
command's :mod:`core.progress` reporter: numbered lines (``▶ [i/8] name``, ``✓ [i/8] name
(12.3 s) ...``) on a terminal, ``event=pipeline_step_start`` / ``event=pipeline_step_done``
lines anywhere else; the result is a :class:`PipelineSummary`.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, Field
from rich.console import Console
from rich.table import Table

from core.errors import CxrError
from core.progress import Reporter, reporting
from workflows import steps
from workflows.config import WorkflowSettings
from workflows.errors import PipelineError
from workflows.retrain import STEP_ORDER

if TYPE_CHECKING:
    from training.prelaunch import PrelaunchedFit

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunOptions:
    """What ``cxr pipeline run`` was asked to do (the WorkflowTemplate's parameters)."""

    source: str
    training_config: Path
    base_model: str
    epochs: int
    workers: int
    include_feedback: bool
    promote: bool
    run_name: str
    work_dir: Path
    #: > 0: a golden set is being built beside this run; the dataset's split waits this long for its pin
    golden_wait_s: float = 0.0


class StepRecord(BaseModel):
    name: str
    status: str = "pending"  # pending | ok | failed | skipped
    seconds: float = 0.0
    detail: str = ""


class PipelineSummary(BaseModel):
    """What a person (or the e2e test) wants to know after a run."""

    run_name: str
    succeeded: bool = False
    failed_step: str | None = None
    error: str | None = None
    dataset_version: str | None = None
    n_images: int | None = None
    feedback_items: int | None = None
    run_id: str | None = None
    model_name: str | None = None
    model_version: str | None = None
    base_model_version: str | None = None
    metrics: dict[str, float] = Field(default_factory=dict)
    promoted: bool = False
    promotion_reason: str = ""
    commit: str | None = None
    steps: list[StepRecord] = Field(default_factory=list)


class _StepActions:
    """The DAG's steps as calls to :mod:`workflows.steps`, handing records on in memory, not as artifacts."""

    def __init__(
        self, options: RunOptions, settings: WorkflowSettings, store: Any, summary: PipelineSummary
    ) -> None:
        self.options = options
        self.settings = settings
        self.store = store
        self.summary = summary
        self.state: dict[str, Any] = {}
        self.prelaunched: PrelaunchedFit | None = None  # started by prelaunch()

    def by_name(self) -> dict[str, Callable[[], str]]:
        """Each step of :data:`STEP_ORDER` and the action that runs it."""
        return {
            "ingest": self.ingest,
            "validate": self.validate,
            "build-dataset": self.build,
            "train": self.train,
            "evaluate": self.evaluate,
            "export": self.export,
            "register": self.register,
            "promote-to-staging": self.promote,
        }

    def ingest(self) -> str:
        """Stage the source (an S3 source is downloaded under the work dir) for the next two steps.

        Into an empty folder, as each Argo pod stages: a re-run under the same name would otherwise
        keep the first try's files (``download_prefix`` keeps a file of the object's size, and one
        the source deleted) and build the dataset from studies the source no longer holds.
        """
        options = self.options
        dest = options.work_dir / "staged" if options.source.startswith("s3://") else None
        if dest is not None:
            shutil.rmtree(dest, ignore_errors=True)
        result = steps.ingest(
            options.source, dest=dest, include_feedback=options.include_feedback, store=self.store
        )
        self.state["staged"] = result.staged
        self.summary.feedback_items = result.n_feedback_items
        return f"{result.n_images} images, {result.n_feedback_items} feedback items"

    def validate(self) -> str:
        """Check the staged annotations before any dataset is built from them."""
        result = steps.validate(self.state["staged"])
        return f"{result.total_rows} rows, {result.bad_rows} quarantined, {result.n_images} images"

    def build(self) -> str:
        """Build (or reuse) the versioned dataset the train step reads by version."""
        result = steps.build_dataset(
            self.state["staged"],
            out_dir=self.options.work_dir / "datasets",
            include_feedback=self.options.include_feedback,
            store=self.store,
            settings=self.settings,
            golden_wait_s=self.options.golden_wait_s,
        )
        self.summary.dataset_version, self.summary.n_images = result.version, result.n_images
        return f"version {result.version[:12]} ({result.n_images} images)"

    def prelaunch(self) -> None:
        """Start the train step's Ray workers now, so their start overlaps the data steps (one machine)."""
        options = self.options
        self.prelaunched = steps.prelaunch_train(
            options.training_config,
            base_model=options.base_model,
            epochs=options.epochs,
            workers=options.workers,
            settings=self.settings,
        )

    def close(self) -> None:
        """Cancel prelaunched workers the run did not train on (a step before train failed)."""
        if self.prelaunched is not None:
            failed = self.summary.failed_step
            # no failed step: the train step ran (a no-op then) or the run was interrupted
            self.prelaunched.cancel(f"the run ended at step {failed}" if failed else "the run stopped")

    def train(self) -> str:
        """Train, and save the hand-off record where the cluster's evaluate step would look for it."""
        options, summary = self.options, self.summary
        trained = steps.train(
            summary.dataset_version or "",
            config_path=options.training_config,
            base_model=options.base_model,
            epochs=options.epochs,
            workers=options.workers,
            run_name=options.run_name,
            settings=self.settings,
            prelaunched=self.prelaunched,
        )
        steps.save_handoff(self.store, self.settings, options.run_name, "train", trained)
        self.state["trained"] = trained
        summary.run_id, summary.base_model_version = trained.run_id, trained.base_model_version
        base = (
            f"fine-tuned from v{trained.base_model_version}" if trained.base_model_version else "from scratch"
        )
        return f"run {trained.run_id[:12]} ({base})"

    def evaluate(self) -> str:
        """Evaluate the trained model; its metrics go into the summary."""
        result = steps.evaluate(self.state["trained"])
        self.summary.metrics = {"map50": result.map50, "map40": result.map40, **result.metrics}
        return f"mAP@0.5 {result.map50:.3f}  mAP@0.4 {result.map40:.3f}"

    def export(self) -> str:
        """Export ONNX and prove parity with the PyTorch weights."""
        result = steps.export(
            self.state["trained"],
            mlflow_uri=self.settings.mlflow_uri,
            model_name=self.settings.registered_model,
        )
        return f"onnx {result.onnx_sha256[:12]}, parity {result.parity_max_abs_diff:.1e}"

    def register(self) -> str:
        """Register the model version the promotion step will propose."""
        settings = self.settings
        result = steps.register(
            self.state["trained"], mlflow_uri=settings.mlflow_uri, model_name=settings.registered_model
        )
        self.summary.model_name, self.summary.model_version = settings.registered_model, result.model_version
        return f"{settings.registered_model} v{result.model_version}"

    def promote(self) -> str:
        """Promote to staging through the GitOps folder, unless the run was told not to (a skip)."""
        summary = self.summary
        if not self.options.promote:
            summary.promotion_reason = "not asked (--no-promote)"
            raise _Skipped(summary.promotion_reason)
        result = steps.promote(
            summary.model_version or "", stage="staging", gitops_dir=self.settings.gitops_dir
        )
        summary.promoted, summary.promotion_reason, summary.commit = (
            result.promoted,
            result.reason,
            result.commit,
        )
        return ("promoted: " if result.promoted else "not promoted: ") + result.reason


def _run_step(
    index: int,
    record: StepRecord,
    action: Callable[[], str],
    summary: PipelineSummary,
    progress: Reporter,
) -> None:
    """Run one step and turn how it ended (ok, skipped, failed and why) into its record and the summary.

    Its start and end go to ``progress`` as ``pipeline_step`` events. Never a spinner: the steps
    run other packages' own progress bars (a live display cannot nest) and fork process pools (a
    refresh thread running across ``fork`` can leave a child holding a lock); the train step draws
    its epoch bar only while Ray trains.
    """
    name, total = record.name, len(STEP_ORDER)
    label = f"[{index}/{total}] {name}"
    with progress.task("pipeline_step", label, spinner=False, step=name, index=index, total=total) as task:
        try:
            record.detail = action()
            record.status = "ok"
        except _Skipped as skip:
            record.status, record.detail = "skipped", str(skip)
        except PipelineError as exc:
            record.status, record.detail = "failed", str(exc)
            summary.failed_step, summary.error = name, str(exc)
        except Exception as exc:  # another package's error: still end the run naming the step
            if isinstance(exc, CxrError):  # expected (a store down, a bad file): its message says it all
                log.error("event=step_error step=%s error=%s: %s", name, type(exc).__name__, exc)
            else:
                log.exception("event=step_error step=%s", name)
            record.status, record.detail = "failed", f"{type(exc).__name__}: {exc}"
            summary.failed_step, summary.error = name, record.detail
        record.seconds = round(task.seconds, 2)
        task.done(record.status, record.detail)


def run_pipeline(
    options: RunOptions,
    settings: WorkflowSettings,
    *,
    store: Any | None = None,
    console: Console | None = None,
) -> PipelineSummary:
    """Run every step; stops at the first failure and says which step failed and why."""
    console = console or Console(highlight=False)
    store = store if store is not None else steps.default_store()
    summary = PipelineSummary(run_name=options.run_name, steps=[StepRecord(name=n) for n in STEP_ORDER])
    records = {r.name: r for r in summary.steps}
    # [1] one action per DAG step, sharing the run's hand-offs in memory
    step_actions = _StepActions(options, settings, store, summary)
    actions = step_actions.by_name()
    options.work_dir.mkdir(parents=True, exist_ok=True)
    # [2] the steps in the DAG's order; the first failure ends the run. The train step's Ray
    # workers start first, beside the data steps (training/prelaunch.py), when the run trains
    # with a Ray of its own and the settings allow it
    with reporting(console) as progress:
        if settings.prelaunch_training:
            step_actions.prelaunch()
        try:
            for index, name in enumerate(STEP_ORDER, start=1):
                record = records[name]
                _run_step(index, record, actions[name], summary, progress)
                if record.status == "failed":
                    break
        finally:
            step_actions.close()
    # [3] the outcome, also written beside the run's files
    summary.succeeded = summary.failed_step is None
    (options.work_dir / "summary.json").write_text(summary.model_dump_json(indent=2))
    return summary


class _Skipped(Exception):
    """A step that was not asked for (promotion with --no-promote)."""


def summary_table(summary: PipelineSummary) -> Table:
    """The end-of-run table: dataset, run, model, metrics, promotion and why."""
    table = Table(title=f"retrain {summary.run_name}: {'succeeded' if summary.succeeded else 'FAILED'}")
    table.add_column("what")
    table.add_column("value", overflow="fold")
    rows = [
        ("dataset version", summary.dataset_version or "-"),
        ("images", str(summary.n_images) if summary.n_images is not None else "-"),
        ("feedback items", str(summary.feedback_items) if summary.feedback_items is not None else "-"),
        ("MLflow run id", summary.run_id or "-"),
        (
            "base model",
            f"v{summary.base_model_version}" if summary.base_model_version else "none (from scratch)",
        ),
        ("model version", f"{summary.model_name} v{summary.model_version}" if summary.model_version else "-"),
        ("mAP@0.5", f"{summary.metrics['map50']:.4f}" if "map50" in summary.metrics else "-"),
        ("mAP@0.4 (VinDr)", f"{summary.metrics['map40']:.4f}" if "map40" in summary.metrics else "-"),
        ("promoted to staging", "yes" if summary.promoted else "no"),
        ("why", summary.promotion_reason or (summary.error or "-")),
    ]
    if summary.commit:
        rows.append(("commit", summary.commit[:12]))
    if summary.failed_step:
        rows.append(("failed step", f"{summary.failed_step}: {summary.error}"))
    for what, value in rows:
        table.add_row(what, value)
    return table
