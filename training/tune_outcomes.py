"""How each trial of a search ended, which one wins, and the files a search leaves behind."""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from training.config import TrainConfig

Outcome = Literal["completed", "stopped", "failed"]


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


def trial_outcome(
    trial_id: str, params: Mapping[str, Any], last: Mapping[str, Any], metric: str, failed: bool
) -> TrialOutcome:
    """A trial's outcome from its parameters and its last reported result."""
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
