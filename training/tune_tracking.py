"""MLflow side of a search: its own experiment, the parent run, and one child run per trial.

Written by the search driver only (a Tune callback feeds :class:`MlflowChildren`), best effort:
MLflow being down must not stop a search, whose weights are in the run storage anyway.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from training.config import TrainConfig, TrainSettings
from training.dataset import DatasetRef
from training.tracking import Tracker
from training.tune_outcomes import TrialOutcome
from training.tune_space import TuneSpace, apply_trial

PARENT_TAG = "mlflow.parentRunId"
TUNE_EXPERIMENT_SUFFIX = "-tune"
TRIAL_TAG = "tune_trial_id"
OUTCOME_TAG = "tune_outcome"


@dataclass
class MlflowChildren:
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


def search_tracking(settings: TrainSettings) -> TrainSettings:
    """The settings with the search's own MLflow experiment, ``<training experiment>-tune``.

    Searches stay out of the training experiment because the MLflow exporter and its alerts read
    that one: a trial that fails is not a failed training, and a trial's metrics are not the
    latest model's.
    """
    return settings.model_copy(
        update={"mlflow_experiment": f"{settings.mlflow_experiment}{TUNE_EXPERIMENT_SUFFIX}"}
    )


def start_parent(
    settings: TrainSettings,
    search_name: str,
    config: TrainConfig,
    data: DatasetRef,
    commit: str,
    space: TuneSpace,
    trials: int,
    budget_minutes: float,
) -> Tracker:
    """The search's parent run: the recipe, the space and the budget as parameters."""
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


def child_runs(tracker: Tracker) -> dict[str, str]:
    """Trial id -> child run id, read back from MLflow (the Tune callback ran in Tune's event loop)."""
    client = tracker.client
    experiment_id = client.get_run(tracker.run_id).info.experiment_id
    runs = client.search_runs([experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{tracker.run_id}'")
    return {r.data.tags.get(TRIAL_TAG, ""): r.info.run_id for r in runs}


def close_children(tracker: Tracker, outcomes: list[TrialOutcome]) -> None:
    """Trials Tune ended without a callback (the time budget) get their outcome and status here."""
    client = tracker.client
    for t in outcomes:
        if t.child_run_id and client.get_run(t.child_run_id).info.status == "RUNNING":
            client.set_tag(t.child_run_id, OUTCOME_TAG, t.outcome)
            client.set_terminated(t.child_run_id, status="FAILED" if t.outcome == "failed" else "FINISHED")
