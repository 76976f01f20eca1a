"""Hyper-parameter search on Ray Tune: ASHA over a recipe's learning rate, augmentation, image size, epochs.

Why it is built this way:

* Ray 2.60 runs Ray Train V2, where a ``TorchTrainer`` is no longer a Tune trainable. Each Tune
  trial is a small function (:func:`_trial`) that builds the same ``TorchTrainer`` as
  ``cxr train run`` (:func:`training.ray_trainer.make_trainer`) and fits it with Tune's
  ``TuneReportCallback``, which forwards every epoch's report (validation metrics included) from
  rank 0 to Tune. ASHA compares trials at rungs of epochs and stops the weak ones early.
* The trial function needs no CPU of its own (it only waits on its Train run), so it asks for a
  little memory instead: on a 2-core machine two 1-worker trials then run side by side. How many
  trials run at once follows from the cluster's CPUs (or GPUs) and the per-trial workers, as the
  Ray Train + Tune guide advises, so no Train run waits for workers another trial holds.
* When Tune stops a trial (ASHA, the time budget, the last epoch) it kills the trial's actor; the
  Train run's placement group outlives it, because Ray Train's own cleaner needs the dashboard's
  state API, which this closed, dashboard-less Ray lacks. Each worker therefore registers its
  placement group under its trial id, and the search removes it when the trial ends; otherwise the
  CPUs stay reserved and the next trials never start.
* MLflow is written by the search driver only (a Tune callback): one parent run with the recipe,
  the space, the best config and the trials table, and one child run per trial
  (``mlflow.parentRunId``) with the trial's recipe as parameters and its per-epoch metrics.
  Nothing is registered: a search produces a recipe, and ``cxr train run`` turns it into a model.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import secrets
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from training.config import AugmentConfig, TrainConfig, TrainSettings
from training.dataset import DatasetRef, dataset_ref, resolve_dataset
from training.errors import ConfigError, TrainingError
from training.ray_trainer import ray_storage
from training.tracking import Tracker, git_commit

log = logging.getLogger(__name__)

PARENT_TAG = "mlflow.parentRunId"
TUNE_EXPERIMENT_SUFFIX = "-tune"
TRIAL_TAG = "tune_trial_id"
OUTCOME_TAG = "tune_outcome"
#: what a trial's driver function reserves instead of a CPU (it only waits on its Train run)
TRIAL_DRIVER_MEMORY = 256 * 2**20
#: upper bounds of the augmentations the strength multiplies (the recipe's own validation limits)
_AUGMENT_LIMITS = {"mosaic": 1.0, "hsv_v": 1.0, "degrees": 45.0, "translate": 0.5, "scale": 0.9, "mixup": 1.0}

Outcome = Literal["completed", "stopped", "failed"]


class TuneSpace(BaseModel):
    """The search space and the scheduler, with defaults derived from the recipe where left empty.

    ``augment_strength`` multiplies the recipe's mosaic, brightness, rotation, translation, scale
    and mixup (each clipped to its limit); horizontal flips stay off whatever the strength, for the
    clinical reason given in :class:`training.config.AugmentConfig`.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    lr0: tuple[float, float] | None = Field(
        default=None,
        description="log-uniform range of the initial learning rate; default recipe / 10 .. x 10",
    )
    augment_strength: tuple[float, float] = Field(
        default=(0.25, 1.5), description="uniform range of the factor on the recipe's augmentations"
    )
    imgsz: list[int] | None = Field(
        default=None, description="choices (multiples of 32, <= the recipe's); default 1/2, 3/4, 1 of it"
    )
    epochs: list[int] | None = Field(
        default=None, description="choices (<= the recipe's); default 1/2, 3/4, 1 of it"
    )
    metric: str = Field(default="val/mAP50", description="reported each epoch by the Ray Train workers")
    mode: Literal["max", "min"] = "max"
    grace_period: int = Field(default=1, ge=1, description="epochs every trial gets before ASHA may stop it")
    reduction_factor: float = Field(default=2.0, gt=1, description="ASHA keeps 1/factor of trials per rung")
    seed: int | None = Field(default=0, description="seed of the random search (None: different each time)")

    @field_validator("lr0", "augment_strength")
    @classmethod
    def _ordered(cls, value: tuple[float, float] | None) -> tuple[float, float] | None:
        if value is not None and not 0 < value[0] < value[1]:
            raise ValueError(f"a range must be (low, high) with 0 < low < high, got {value}")
        return value

    @field_validator("imgsz", "epochs")
    @classmethod
    def _choices(cls, value: list[int] | None) -> list[int] | None:
        if value is not None and (not value or min(value) < 1):
            raise ValueError(f"choices must be a non-empty list of positive integers, got {value}")
        return sorted(set(value)) if value is not None else None

    @model_validator(mode="after")
    def _stride(self) -> TuneSpace:
        bad = [s for s in self.imgsz or [] if s % 32]
        if bad:
            raise ValueError(f"imgsz choices must be multiples of 32 (the model's largest stride): {bad}")
        return self

    def resolved(self, recipe: TrainConfig) -> TuneSpace:
        """Every range and choice made concrete for ``recipe``; choices above the recipe's are refused.

        The recipe is the budget: a search may try smaller images and fewer epochs, never more,
        so a tuned recipe never costs more to train than the one it came from.
        """
        lr0 = self.lr0 or (recipe.optim.lr0 / 10, recipe.optim.lr0 * 10)
        imgsz = self.imgsz or _fractions(recipe.imgsz, step=32, floor=min(64, recipe.imgsz))
        epochs = self.epochs or _fractions(recipe.epochs, step=1, floor=1)
        if max(imgsz) > recipe.imgsz:
            raise ConfigError(f"imgsz choices {imgsz} go above the recipe's imgsz {recipe.imgsz}")
        if max(epochs) > recipe.epochs:
            raise ConfigError(f"epochs choices {epochs} go above the recipe's epochs {recipe.epochs}")
        return self.model_copy(update={"lr0": lr0, "imgsz": imgsz, "epochs": epochs})

    def param_space(self) -> dict[str, Any]:
        """Tune's search space (call on a :meth:`resolved` space)."""
        from ray import tune

        if self.lr0 is None or self.imgsz is None or self.epochs is None:
            raise ConfigError("resolve the space against the recipe first (TuneSpace.resolved)")
        return {
            "lr0": tune.loguniform(*self.lr0),
            "augment_strength": tune.uniform(*self.augment_strength),
            "imgsz": tune.choice(self.imgsz),
            "epochs": tune.choice(self.epochs),
        }


def _fractions(value: int, *, step: int, floor: int) -> list[int]:
    """1/2, 3/4 and all of ``value``, rounded down to ``step`` and never below ``floor``."""
    return sorted({max(floor, int(value * f) // step * step) for f in (0.5, 0.75, 1.0)})


def load_space(path: Path) -> TuneSpace:
    """A search space from YAML (any subset of :class:`TuneSpace`'s fields)."""
    if not path.is_file():
        raise ConfigError(f"search space {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
        return TuneSpace.model_validate(raw)
    except (yaml.YAMLError, ValidationError) as exc:
        raise ConfigError(f"search space {path} is invalid:\n{exc}") from exc


def scaled_augment(augment: AugmentConfig, strength: float) -> AugmentConfig:
    """The recipe's augmentations times ``strength``, each clipped to what the recipe allows."""
    values = augment.model_dump()
    for key, limit in _AUGMENT_LIMITS.items():
        values[key] = round(min(limit, values[key] * strength), 6)
    return AugmentConfig.model_validate(values)


def apply_trial(recipe: TrainConfig, params: Mapping[str, Any]) -> TrainConfig:
    """The recipe with one trial's values; validation runs every epoch because ASHA needs the metric."""
    data = recipe.model_dump(mode="json")
    data["imgsz"] = int(params["imgsz"])
    data["epochs"] = int(params["epochs"])
    data["val_every_epoch"] = True
    data["optim"]["lr0"] = float(f"{float(params['lr0']):.6g}")
    data["augment"] = scaled_augment(recipe.augment, float(params["augment_strength"])).model_dump()
    return TrainConfig.model_validate(data)


def tuned_config(recipe: TrainConfig, params: Mapping[str, Any]) -> TrainConfig:
    """The recipe to train next: the best trial's values on the recipe's own scale, renamed ``-tuned``."""
    config = apply_trial(recipe, params)
    return config.model_copy(
        update={"name": f"{recipe.name}-tuned", "val_every_epoch": recipe.val_every_epoch}
    )


# --------------------------------------------------------------------------- outcomes


@dataclass(frozen=True)
class TrialOutcome:
    """One trial as the search saw it: its values, how it ended and its metric at its last epoch."""

    trial_id: str
    lr0: float
    augment_strength: float
    imgsz: int
    epochs: int
    epochs_run: int
    outcome: Outcome
    metric: float | None
    checkpoint: str = ""
    child_run_id: str = ""
    error: str = ""

    @property
    def params(self) -> dict[str, Any]:
        return {
            "lr0": self.lr0,
            "augment_strength": self.augment_strength,
            "imgsz": self.imgsz,
            "epochs": self.epochs,
        }


def classify(epochs: int, epochs_run: int, failed: bool) -> Outcome:
    """Completed (ran every epoch), stopped (ASHA or the time budget ended it early) or failed."""
    if failed:
        return "failed"
    return "completed" if epochs_run >= epochs else "stopped"


def pick_best(trials: Iterable[TrialOutcome], mode: Literal["max", "min"]) -> TrialOutcome | None:
    """The trial with the best metric at its last epoch; failed trials and NaN metrics never win.

    A trial's last value is what its recipe achieves (a stopped trial's is lower by design: ASHA
    stopped it for being behind). Ties go to the earlier trial, so the choice is reproducible.
    """
    scored = [t for t in trials if t.outcome != "failed" and t.metric is not None and math.isfinite(t.metric)]
    if not scored:
        return None
    sign = 1.0 if mode == "max" else -1.0
    return max(scored, key=lambda t: sign * float(t.metric or 0.0))


@dataclass(frozen=True)
class SearchOutcome:
    """What ``cxr train tune`` prints and its tests check."""

    search_name: str
    parent_run_id: str
    metric: str
    mode: str
    trials: list[TrialOutcome]
    best: TrialOutcome
    config: TrainConfig
    config_path: Path
    trials_csv: Path
    seconds: float
    dataset_version: str


def write_tuned_config(
    config: TrainConfig, path: Path, *, search_name: str, parent_run_id: str, best: TrialOutcome, metric: str
) -> Path:
    """The best recipe as YAML, headed by where it came from (``load_config`` reads it back)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    header = (
        f"# Written by `cxr train tune` (search {search_name}, MLflow parent run {parent_run_id}).\n"
        f"# Best trial {best.trial_id}: {metric} = {best.metric} after {best.epochs_run} epoch(s);\n"
        f"# tuned: optim.lr0, augment (strength {best.augment_strength:.3g}), imgsz, epochs.\n"
    )
    path.write_text(header + yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
    return path


def write_trials_csv(trials: list[TrialOutcome], path: Path, metric: str) -> Path:
    """The trials table as CSV (an MLflow artifact of the parent run)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(
            ["trial", "outcome", "lr0", "augment_strength", "imgsz", "epochs", "epochs_run", metric]
        )
        for t in trials:
            writer.writerow(
                [t.trial_id, t.outcome, t.lr0, t.augment_strength, t.imgsz, t.epochs, t.epochs_run, t.metric]
            )
    return path


# --------------------------------------------------------------------------- Ray side


@dataclass(frozen=True)
class _Job:
    """What every trial needs; handed over with ``tune.with_parameters`` (the object store), never
    in the param space, whose values Tune writes to ``params.json`` (the settings hold S3 keys)."""

    recipe: TrainConfig
    dataset: DatasetRef
    settings: TrainSettings
    search_name: str
    registry: str
    base_weights: Path | None


def _registry_name(search_name: str) -> str:
    return f"cxr-tune-pgs-{search_name}"


def _tune_train_loop(cfg: dict[str, Any]) -> None:
    """A trial's Ray Train worker: register this run's placement group, then train as ``cxr train run``."""
    import ray

    from training.ray_trainer import train_loop_per_worker

    pg = ray.util.get_current_placement_group()
    if pg is not None and cfg.get("tune_registry"):
        try:
            registry = ray.get_actor(cfg["tune_registry"])
            ray.get(registry.add.remote(cfg["tune_trial_id"], pg))
        except Exception as exc:  # the search still runs; only this run's CPUs may be held longer
            log.warning("event=tune_pg_register_failed trial=%s error=%s", cfg.get("tune_trial_id"), exc)
    train_loop_per_worker(cfg)


def _trial(params: dict[str, Any], job: _Job) -> None:
    """One Tune trial: a Ray Train run of the recipe with this trial's values (Train V2 pattern)."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from training.ray_trainer import make_trainer

    trial_id = ray.tune.get_context().get_trial_id()
    config = apply_trial(job.recipe, params)
    trainer, _ = make_trainer(
        config,
        job.dataset,
        run_name=f"{job.search_name}-{trial_id}",
        settings=job.settings,
        base_weights=job.base_weights,
        callbacks=[TuneReportCallback()],
        train_loop=_tune_train_loop,
        loop_extras={"tune_trial_id": trial_id, "tune_registry": job.registry},
    )
    trainer.fit()


def _numeric_metrics(result: Mapping[str, Any]) -> dict[str, float]:
    """The workers' epoch metrics in a Tune result (Tune adds its own bookkeeping keys; those stay out)."""
    keep = {"epoch", "fitness", "epoch_seconds"}
    return {
        k: float(v)
        for k, v in result.items()
        if ("/" in k or k in keep) and isinstance(v, int | float) and not isinstance(v, bool)
    }


def _trial_outcome(
    trial_id: str, params: Mapping[str, Any], last: Mapping[str, Any], metric: str, failed: bool
) -> TrialOutcome:
    epochs_run = int(last.get("epoch", 0) or 0)
    value = last.get(metric)
    return TrialOutcome(
        trial_id=trial_id,
        lr0=float(params["lr0"]),
        augment_strength=float(params["augment_strength"]),
        imgsz=int(params["imgsz"]),
        epochs=int(params["epochs"]),
        epochs_run=epochs_run,
        outcome=classify(int(params["epochs"]), epochs_run, failed),
        metric=float(value) if isinstance(value, int | float) else None,
        checkpoint=str(last.get("checkpoint_path") or ""),
    )


@dataclass
class _MlflowChildren:
    """Child runs of the search's parent run, written from the search driver (best effort)."""

    tracking: TrainSettings  # the settings without S3 keys: Tune pickles its callbacks to storage
    parent_run_id: str
    search_name: str
    recipe: TrainConfig
    dataset: DatasetRef
    commit: str
    metric: str

    def start(self, trial_id: str, params: Mapping[str, Any]) -> str:
        tracker = Tracker(self.tracking)
        tracker.start(
            f"{self.search_name}-{trial_id}", apply_trial(self.recipe, params), self.dataset, self.commit
        )
        tracker.set_tags(
            {PARENT_TAG: self.parent_run_id, TRIAL_TAG: trial_id, "tune_search": self.search_name}
        )
        from mlflow.entities import Param

        tracker.client.log_batch(
            tracker.run_id, params=[Param(f"tune.{k}", str(v)) for k, v in sorted(params.items())]
        )
        return tracker.run_id

    def epoch(self, run_id: str, metrics: dict[str, float]) -> None:
        step = int(metrics.get("epoch", 1)) - 1  # the same steps as `cxr train run` (ultralytics' epoch)
        Tracker(self.tracking, run_id).log_metrics(metrics, step=step)

    def end(self, run_id: str, outcome: TrialOutcome) -> None:
        tracker = Tracker(self.tracking, run_id)
        tracker.set_tags({OUTCOME_TAG: outcome.outcome, "tune_epochs_run": str(outcome.epochs_run)})
        tracker.end("FAILED" if outcome.outcome == "failed" else "FINISHED")


def _make_callback(children: _MlflowChildren, registry: str) -> Any:
    """The Tune callback of the search: structured log lines, child runs, placement-group cleanup."""
    import ray
    from ray import tune

    class SearchCallback(tune.Callback):
        def __init__(self) -> None:
            self.runs: dict[str, str] = {}

        def _safe(self, what: str, trial_id: str, fn: Any, *args: Any) -> Any:
            try:
                return fn(*args)
            except Exception as exc:  # MLflow down must not stop the search; the weights are in storage
                log.warning("event=tune_mlflow_failed what=%s trial=%s error=%s", what, trial_id, exc)
                return None

        def on_trial_start(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
            params = {k: trial.config[k] for k in ("lr0", "augment_strength", "imgsz", "epochs")}
            log.info(
                "event=tune_trial_start search=%s trial=%s lr0=%.4g augment_strength=%.3g imgsz=%d epochs=%d",
                children.search_name,
                trial.trial_id,
                params["lr0"],
                params["augment_strength"],
                params["imgsz"],
                params["epochs"],
            )
            run_id = self._safe("start", trial.trial_id, children.start, trial.trial_id, params)
            if run_id:
                self.runs[trial.trial_id] = run_id

        def on_trial_result(
            self, iteration: int, trials: list[Any], trial: Any, result: dict[str, Any], **info: Any
        ) -> None:
            metrics = _numeric_metrics(result)
            log.info(
                "event=tune_trial_epoch search=%s trial=%s epoch=%d/%d %s=%s",
                children.search_name,
                trial.trial_id,
                int(metrics.get("epoch", 0)),
                int(trial.config["epochs"]),
                children.metric,
                f"{metrics[children.metric]:.4g}" if children.metric in metrics else "missing",
            )
            if trial.trial_id in self.runs:
                self._safe("epoch", trial.trial_id, children.epoch, self.runs[trial.trial_id], metrics)

        def _ended(self, trial: Any, failed: bool) -> None:
            self._release(trial.trial_id)
            outcome = _trial_outcome(
                trial.trial_id, trial.config, trial.last_result or {}, children.metric, failed
            )
            log.info(
                "event=tune_trial_end search=%s trial=%s outcome=%s epochs_run=%d/%d %s=%s",
                children.search_name,
                trial.trial_id,
                outcome.outcome,
                outcome.epochs_run,
                outcome.epochs,
                children.metric,
                outcome.metric,
            )
            if trial.trial_id in self.runs:
                self._safe("end", trial.trial_id, children.end, self.runs[trial.trial_id], outcome)

        def _release(self, trial_id: str) -> None:
            """Remove the trial's Train placement group (a no-op when the run ended on its own)."""
            from ray.util.placement_group import remove_placement_group

            try:
                groups: list[Any] = ray.get(ray.get_actor(registry).pop.remote(trial_id))
            except Exception as exc:
                log.warning("event=tune_pg_lookup_failed trial=%s error=%s", trial_id, exc)
                return
            for group in groups:
                try:
                    remove_placement_group(group)
                except Exception as exc:  # already gone
                    log.debug("event=tune_pg_remove_skipped trial=%s error=%s", trial_id, exc)

        def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
            self._ended(trial, failed=False)

        def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
            self._ended(trial, failed=True)

    return SearchCallback()


def _placement_registry(name: str) -> Any:
    """A small actor mapping trial id -> its Train run's placement groups (see the module docstring)."""
    import ray

    @ray.remote(num_cpus=0)
    class PlacementGroups:
        def __init__(self) -> None:
            self.groups: dict[str, list[Any]] = {}

        def add(self, trial_id: str, group: Any) -> None:
            self.groups.setdefault(trial_id, []).append(group)

        def pop(self, trial_id: str) -> list[Any]:
            return self.groups.pop(trial_id, [])

        def pop_all(self) -> list[Any]:
            groups = [g for gs in self.groups.values() for g in gs]
            self.groups.clear()
            return groups

    return PlacementGroups.options(name=name).remote()  # type: ignore[attr-defined]


def max_concurrent_trials(config: TrainConfig, trials: int, cluster: Mapping[str, float]) -> int:
    """How many Train runs fit at once: the limiting resource over what one trial's workers need."""
    scaling = config.scaling
    fits = int(cluster.get("CPU", 1.0) // (scaling.cpus_per_worker * scaling.num_workers))
    if scaling.use_gpu:
        gpus = (scaling.gpus_per_worker or 1.0) * scaling.num_workers
        fits = min(fits, int(cluster.get("GPU", 0.0) // gpus))
    return max(1, min(fits, trials))


# --------------------------------------------------------------------------- driver


def make_search_name(config: TrainConfig) -> str:
    """Unique and sortable; the MLflow parent run and the Tune experiment share it."""
    return f"{config.name}-tune-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{secrets.token_hex(2)}"


def check_budget(trials: int, budget_minutes: float) -> None:
    """A search needs at least one trial and some time; the CLI and the Python API both check."""
    if trials < 1:
        raise ConfigError(f"--trials must be at least 1, got {trials}")
    if not budget_minutes > 0:
        raise ConfigError(f"--budget-minutes must be above 0, got {budget_minutes}")


def search_tracking(settings: TrainSettings) -> TrainSettings:
    """The settings with the search's own MLflow experiment, ``<training experiment>-tune``.

    Searches stay out of the training experiment because the MLflow exporter and its alerts read
    that one: a trial that fails is not a failed training, and a trial's metrics are not the
    latest model's.
    """
    return settings.model_copy(
        update={"mlflow_experiment": f"{settings.mlflow_experiment}{TUNE_EXPERIMENT_SUFFIX}"}
    )


def _start_parent(
    settings: TrainSettings,
    search_name: str,
    config: TrainConfig,
    data: DatasetRef,
    commit: str,
    space: TuneSpace,
    trials: int,
    budget_minutes: float,
) -> Tracker:
    from mlflow.entities import Param

    tracker = Tracker(settings)
    tracker.start(search_name, config, data, commit)
    tracker.set_tags({"cxr_run_kind": "tune", "tune_metric": space.metric, "tune_mode": space.mode})
    params = {
        "tune.trials": str(trials),
        "tune.budget_minutes": str(budget_minutes),
        "tune.space": json.dumps(space.model_dump(mode="json"), sort_keys=True),
    }
    tracker.client.log_batch(tracker.run_id, params=[Param(k, v[:500]) for k, v in params.items()])
    return tracker


def _collect(grid: Any, metric: str, runs: Mapping[str, str], scheme: str) -> list[TrialOutcome]:
    """Tune's results as outcomes, in trial order, with each trial's child run and checkpoint URI."""
    outcomes = []
    for result in grid:
        trial_id = str(result.metrics.get("trial_id") or Path(result.path).name.removeprefix("trial_"))
        outcome = _trial_outcome(
            trial_id, result.config, result.metrics or {}, metric, result.error is not None
        )
        outcomes.append(
            replace(
                outcome,
                child_run_id=runs.get(trial_id, ""),
                error=str(result.error or "")[:300],
                checkpoint=f"{scheme}{outcome.checkpoint}" if outcome.checkpoint else "",
            )
        )
    return sorted(outcomes, key=lambda t: t.trial_id)


def _child_runs(tracker: Tracker) -> dict[str, str]:
    """Trial id -> child run id, read back from MLflow (the Tune callback ran in Tune's event loop)."""
    client = tracker.client
    experiment_id = client.get_run(tracker.run_id).info.experiment_id
    runs = client.search_runs([experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{tracker.run_id}'")
    return {r.data.tags.get(TRIAL_TAG, ""): r.info.run_id for r in runs}


def _close_children(tracker: Tracker, outcomes: list[TrialOutcome]) -> None:
    """Trials Tune ended without a callback (the time budget) get their outcome and status here."""
    client = tracker.client
    for t in outcomes:
        if t.child_run_id and client.get_run(t.child_run_id).info.status == "RUNNING":
            client.set_tag(t.child_run_id, OUTCOME_TAG, t.outcome)
            client.set_terminated(t.child_run_id, status="FAILED" if t.outcome == "failed" else "FINISHED")


def _run_tuner(
    job: _Job, space: TuneSpace, children: _MlflowChildren, trials: int, budget_minutes: float
) -> Any:
    """Start Ray if needed, run the Tune experiment, release what it left behind; return Tune's results."""
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator
    from ray.util.placement_group import remove_placement_group

    from training.ray_trainer import _ray_init

    scaling = job.recipe.scaling
    started = _ray_init(job.settings, scaling.cpus_per_worker * scaling.num_workers)
    registry = _placement_registry(job.registry)
    try:
        concurrent = max_concurrent_trials(job.recipe, trials, ray.cluster_resources())
        storage = ray_storage(job.recipe, job.settings)
        log.info(
            "event=tune_start search=%s trials=%d concurrent=%d budget_s=%d metric=%s mode=%s "
            "space=%s storage=%s",
            job.search_name,
            trials,
            concurrent,
            int(budget_minutes * 60),
            space.metric,
            space.mode,
            json.dumps(space.model_dump(mode="json"), separators=(",", ":")),
            storage.uri(job.search_name),
        )
        trainable = tune.with_resources(
            tune.with_parameters(_trial, job=job), {"cpu": 0, "memory": TRIAL_DRIVER_MEMORY}
        )
        tuner = tune.Tuner(
            trainable,
            param_space=space.param_space(),
            tune_config=tune.TuneConfig(
                metric=space.metric,
                mode=space.mode,
                num_samples=trials,
                time_budget_s=budget_minutes * 60,
                scheduler=ASHAScheduler(
                    max_t=max(space.epochs or [1]),
                    grace_period=space.grace_period,
                    reduction_factor=space.reduction_factor,
                ),
                search_alg=BasicVariantGenerator(max_concurrent=concurrent, random_state=space.seed),
                reuse_actors=False,  # a reused actor would keep a stopped trial's Train run going
                trial_dirname_creator=_trial_dirname,
            ),
            run_config=tune.RunConfig(
                name=job.search_name,
                storage_path=storage.path,
                storage_filesystem=storage.filesystem,
                callbacks=[_make_callback(children, job.registry)],
                verbose=0,
            ),
        )
        return tuner.fit()
    finally:
        try:
            for group in ray.get(registry.pop_all.remote()):
                try:
                    remove_placement_group(group)
                except Exception as exc:  # already removed by its run or the callback
                    log.debug("event=tune_pg_remove_skipped error=%s", exc)
            ray.kill(registry)
        finally:
            if started:
                ray.shutdown()


def _trial_dirname(trial: Any) -> str:
    """Short trial folders named by trial id (the default embeds every parameter)."""
    return f"trial_{trial.trial_id}"


def tune_search(
    recipe: TrainConfig,
    dataset: str | Path | None = None,
    *,
    trials: int,
    budget_minutes: float,
    workers: int | None = None,
    space: TuneSpace | None = None,
    out: Path | None = None,
    settings: TrainSettings | None = None,
) -> SearchOutcome:
    """Search ``recipe``'s learning rate, augmentation strength, image size and epochs; write the best.

    Every trial trains on the same dataset with ``workers`` Ray workers (default: the recipe's);
    the written recipe keeps the recipe's own scale, since the search may run smaller than the
    training that follows it.
    """
    check_budget(trials, budget_minutes)
    settings = settings or TrainSettings()
    t0 = time.perf_counter()
    os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
    # [1] the job: the recipe at the search's scale, the dataset, the space made concrete
    searched = recipe.with_workers(workers) if workers is not None else recipe
    resolved = (space or TuneSpace()).resolved(recipe)
    search_name = make_search_name(recipe)
    work = (settings.work_dir / search_name).resolve()
    data = resolve_dataset(dataset_ref(recipe.dataset, dataset), work, settings.dataset_cache)
    commit = git_commit()
    # [2] the parent run: any failure below marks it FAILED
    tracking = search_tracking(settings)
    parent = _start_parent(tracking, search_name, searched, data, commit, resolved, trials, budget_minutes)
    try:
        base = None
        if recipe.base_model_version:
            from training.registry import download_weights

            base = download_weights(recipe.base_model_version, work / "base", settings)
        job = _Job(searched, data, settings, search_name, _registry_name(search_name), base)
        children = _MlflowChildren(
            tracking=tracking.model_copy(update={"s3_access_key": "", "s3_secret_key": ""}),
            parent_run_id=parent.run_id,
            search_name=search_name,
            recipe=searched,
            dataset=data,
            commit=commit,
            metric=resolved.metric,
        )
        # [3] the search: Tune trials, each a Ray Train run, ASHA stopping the weak ones
        grid = _run_tuner(job, resolved, children, trials, budget_minutes)
        scheme = ray_storage(searched, settings).scheme
        outcomes = _collect(grid, resolved.metric, _child_runs(parent), scheme)
        _close_children(parent, outcomes)
        best = pick_best(outcomes, resolved.mode)
        if best is None:
            errors = "; ".join(f"{t.trial_id}: {t.error or t.outcome}" for t in outcomes)
            raise TrainingError(f"no trial of search {search_name} reported {resolved.metric} ({errors})")
        # [4] the best recipe, the trials table, and the parent run's summary
        config = tuned_config(recipe, best.params)
        target = out or work / f"{recipe.name}-tuned.yaml"
        write_tuned_config(
            config,
            target,
            search_name=search_name,
            parent_run_id=parent.run_id,
            best=best,
            metric=resolved.metric,
        )
        table = write_trials_csv(outcomes, work / "trials.csv", resolved.metric)
        counts = {o: sum(t.outcome == o for t in outcomes) for o in ("completed", "stopped", "failed")}
        parent.log_metrics(
            {
                f"best/{resolved.metric}": float(best.metric or 0.0),
                **{f"trials/{k}": float(v) for k, v in counts.items()},
            }
        )
        parent.log_artifacts([target, table], "tune")
        parent.set_tags(
            {
                "tune_best_trial": best.trial_id,
                "tune_best_run_id": best.child_run_id,
                "tune_tuned_config_sha256": config.sha256(),
            }
        )
        parent.end("FINISHED")
    except BaseException:
        parent.end("FAILED")
        raise
    log.info(
        "event=tune_done search=%s best_trial=%s %s=%s config=%s completed=%d stopped=%d failed=%d "
        "seconds=%.1f",
        search_name,
        best.trial_id,
        resolved.metric,
        best.metric,
        target,
        counts["completed"],
        counts["stopped"],
        counts["failed"],
        time.perf_counter() - t0,
    )
    return SearchOutcome(
        search_name=search_name,
        parent_run_id=parent.run_id,
        metric=resolved.metric,
        mode=resolved.mode,
        trials=outcomes,
        best=best,
        config=config,
        config_path=target,
        trials_csv=table,
        seconds=time.perf_counter() - t0,
        dataset_version=data.version,
    )
