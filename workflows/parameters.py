"""The retrain template's training parameters, checked before the RayJob is made from them.

Argo pastes ``{{...}}`` values into a resource template's manifest as text, before the
YAML is parsed, so the values the ``train`` step's RayJob receives must be plain
tokens: the ``check-parameters`` step (the DAG's first) runs :func:`check_train_parameters`
on the workflow's parameters, each passed as a separate argument, fails the workflow
with a message naming every bad one, and hands the checked values on as its output
parameters; the RayJob is made from those outputs only. Its entrypoint is a fixed
command that reads them from the head's environment (:data:`TRAIN_STEP_ENV`), never
from a shell string.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from workflows.errors import ParameterError

# The RayJob's GPU worker group scales between 1 and this (its maxReplicas).
MAX_WORKERS = 16
MAX_EPOCHS = 10_000
# A training config inside the image, relative to its WORKDIR (the repository's layout):
# path segments of letters, digits, '_', '-' and '.', none starting with '.' (no '..', no
# hidden files), ending in .yaml or .yml.
TRAINING_CONFIG_PATTERN = re.compile(r"(?:[A-Za-z0-9_][A-Za-z0-9_.-]*/)*[A-Za-z0-9_][A-Za-z0-9_.-]*\.ya?ml")
MAX_CONFIG_CHARS = 200
# 'production' (fine-tune its version), 'none'/'scratch' (train from scratch), or a registered version
BASE_MODEL_PATTERN = re.compile(r"production|none|scratch|[1-9][0-9]{0,9}")
_DIGITS = re.compile(r"[0-9]{1,6}")

# The workflow parameters check-parameters checks and hands on to the train step, by name.
CHECKED_PARAMETERS = ("training-config", "base-model", "epochs", "workers")

# Where the train step's RayJob puts each value for its fixed entrypoint (`cxr pipeline step
# train` reads these as its options' environment variables), by the train step's input name.
TRAIN_STEP_ENV: dict[str, str] = {
    "dataset-version": "CXR_TRAIN_STEP_DATASET_VERSION",
    "training-config": "CXR_TRAIN_STEP_CONFIG",
    "base-model": "CXR_TRAIN_STEP_BASE_MODEL",
    "epochs": "CXR_TRAIN_STEP_EPOCHS",
    "workers": "CXR_TRAIN_STEP_WORKERS",
    "run-name": "CXR_TRAIN_STEP_RUN_NAME",
}


@dataclass(frozen=True)
class TrainParameters:
    """The checked values: each a plain token that is safe as a YAML scalar and a command argument."""

    training_config: str
    base_model: str
    epochs: int
    workers: int

    def outputs(self) -> dict[str, object]:
        """The values by parameter name: the ``check-parameters`` step's output parameters."""
        return {
            "training-config": self.training_config,
            "base-model": self.base_model,
            "epochs": self.epochs,
            "workers": self.workers,
        }


def _shown(value: str) -> str:
    """A value as a message shows it: quoted, escapes visible (a newline reads \\n), cut short."""
    return repr(value if len(value) <= 60 else value[:60] + "...")


def _integer(name: str, value: str, low: int, high: int, problems: list[str]) -> int:
    if not _DIGITS.fullmatch(value) or not low <= int(value) <= high:
        problems.append(f"{name} {_shown(value)} is not a whole number from {low} to {high}")
        return low
    return int(value)


def check_train_parameters(
    *, training_config: str, base_model: str, epochs: str, workers: str
) -> TrainParameters:
    """The parameters as checked values, or :class:`ParameterError` naming every one that is not.

    Strict patterns, no repair: ``training-config`` a repository-relative ``.yaml`` path,
    ``base-model`` 'production', 'none', 'scratch' or a version number (any case; lowercased),
    ``epochs`` a whole number 0..:data:`MAX_EPOCHS` (0 = the config's), ``workers`` 1..:data:`MAX_WORKERS`.
    """
    problems: list[str] = []
    if len(training_config) > MAX_CONFIG_CHARS or not TRAINING_CONFIG_PATTERN.fullmatch(training_config):
        problems.append(
            f"training-config {_shown(training_config)} is not a repository-relative .yaml path "
            "(letters, digits, '_', '-', '.' and '/', e.g. training/configs/gpu-large.yaml)"
        )
    model = base_model.lower()
    if not BASE_MODEL_PATTERN.fullmatch(model):
        problems.append(
            f"base-model {_shown(base_model)} is not 'production', 'none' or a registered version number"
        )
    n_epochs = _integer("epochs", epochs, 0, MAX_EPOCHS, problems)
    n_workers = _integer("workers", workers, 1, MAX_WORKERS, problems)
    if problems:
        raise ParameterError("refused workflow parameters: " + "; ".join(problems))
    return TrainParameters(training_config, model, n_epochs, n_workers)
