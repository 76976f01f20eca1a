"""Errors of the retrain pipeline: each names the step and what a person can do about it."""

from __future__ import annotations

from core.errors import CxrError


class PipelineError(CxrError):
    """Base class: the CLI prints the message and exits non-zero, never a traceback."""


class SourceNotFound(PipelineError):
    """The dataset source does not exist or lacks ``dicom/`` + ``annotations.csv``."""


class StepFailed(PipelineError):
    """A step could not finish; ``step`` says which, the message says why."""

    def __init__(self, step: str, message: str) -> None:
        super().__init__(f"step {step!r} failed: {message}")
        self.step = step


class HandoffMissing(PipelineError):
    """A cluster step ran before the step whose result it reads (or that step's record was lost)."""


class ParameterError(PipelineError):
    """A workflow parameter is not of the form its step accepts (``check-parameters`` refuses it)."""
