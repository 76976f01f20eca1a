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

This module is the Ray side and the driver. The space and a trial's recipe are in
:mod:`training.tune_space`, the trials' outcomes and the files a search writes in
:mod:`training.tune_outcomes`, the MLflow parent and child runs in :mod:`training.tune_tracking`.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from training.config import TrainConfig, TrainSettings
from training.dataset import DatasetRef, dataset_ref, resolve_dataset
from training.errors import ConfigError, TrainingError
from training.ray_trainer import ray_storage
from training.tracking import git_commit
from training.tune_outcomes import (
    SearchOutcome,
    TrialOutcome,
    pick_best,
    trial_outcome,
    write_trials_csv,
    write_tuned_config,
)
from training.tune_space import TuneSpace, apply_trial, tuned_config
from training.tune_tracking import (
    MlflowChildren,
    child_runs,
    close_children,
    search_tracking,
    start_parent,
)

log = logging.getLogger(__name__)

#: what a trial's driver function reserves instead of a CPU (it only waits on its Train run)
TRIAL_DRIVER_MEMORY = 256 * 2**20


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


def _make_callback(children: MlflowChildren, registry: str) -> Any:
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
            outcome = trial_outcome(
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

    return PlacementGroups.options(name=name).remote()  # type: ignore[attr-defined]


def _remove_job_groups() -> None:
    """Remove every placement group this search's job still holds once the search is over.

    The registered ones (trials still running when the search ended) and those a worker never got
    to register: a trial Tune stops while its Train run is still starting (the budget ran out,
    ASHA), since Ray keeps a group whose creator was killed (seen in CI: one CPU still reserved
    30 s after the search). Only this job's groups are touched: a PlacementGroupID ends with the
    JobID of the driver whose actors created it.
    """
    import ray
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    job = ray.get_runtime_context().get_job_id()
    for group_id, info in ray.util.placement_group_table().items():
        if group_id.endswith(job) and info.get("state") != "REMOVED":
            try:
                remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(group_id))))
                log.info("event=tune_pg_removed group=%s", group_id[:12])
            except Exception as exc:  # removed meanwhile
                log.debug("event=tune_pg_remove_skipped error=%s", exc)


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


def _collect(grid: Any, metric: str, runs: Mapping[str, str], scheme: str) -> list[TrialOutcome]:
    """Tune's results as outcomes, in trial order, with each trial's child run and checkpoint URI."""
    outcomes = []
    for result in grid:
        trial_id = str(result.metrics.get("trial_id") or Path(result.path).name.removeprefix("trial_"))
        outcome = trial_outcome(
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


def _run_tuner(
    job: _Job, space: TuneSpace, children: MlflowChildren, trials: int, budget_minutes: float
) -> Any:
    """Start Ray if needed, run the Tune experiment, release what it left behind; return Tune's results."""
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from training.ray_trainer import ray_init

    scaling = job.recipe.scaling
    started = ray_init(job.settings, scaling.cpus_per_worker * scaling.num_workers)
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
            _remove_job_groups()
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
    from training.registry import download_weights, follow_base_architecture

    recipe = follow_base_architecture(recipe, settings)  # trials fine-tune the base's own network
    # [1] the job: the recipe at the search's scale, the dataset, the space made concrete
    searched = recipe.with_workers(workers) if workers is not None else recipe
    resolved = (space or TuneSpace()).resolved(recipe)
    search_name = make_search_name(recipe)
    work = (settings.work_dir / search_name).resolve()
    data = resolve_dataset(dataset_ref(recipe.dataset, dataset), work, settings.dataset_cache)
    commit = git_commit()
    # [2] the parent run: any failure below marks it FAILED
    tracking = search_tracking(settings)
    parent = start_parent(tracking, search_name, searched, data, commit, resolved, trials, budget_minutes)
    try:
        base = None
        if recipe.base_model_version:
            base = download_weights(recipe.base_model_version, work / "base", settings)
        job = _Job(searched, data, settings, search_name, _registry_name(search_name), base)
        children = MlflowChildren(
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
        outcomes = _collect(grid, resolved.metric, child_runs(parent), scheme)
        close_children(parent, outcomes)
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
