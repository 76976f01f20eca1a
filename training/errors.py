"""Typed failures of the training package, each with a message a person can act on.

The CLI turns any :class:`TrainingError` into one red line and exit code 2
instead of a traceback; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

from core.errors import CxrError


class TrainingError(CxrError):
    """Base class: an expected failure with an actionable message."""


class ConfigError(TrainingError):
    """The recipe YAML is missing, malformed, or has a wrong value."""


class DatasetError(TrainingError):
    """The dataset version or directory cannot be used for training."""


class ParityError(TrainingError):
    """The exported ONNX model does not reproduce the PyTorch model's outputs."""


class RegistryError(TrainingError):
    """The MLflow registry lacks the requested model or version, or refused a write."""


class RegistryUnreachable(RegistryError):
    """MLflow did not answer (down, or a connection error): a caller may fall back on what it holds."""


class DistributedTrainingError(TrainingError):
    """Ray Train gave up on the run (after its configured retries)."""
