"""The project's one base of expected failures, and the two that ``core`` itself raises.

Every package's own base (``DataPipelineError``, ``TrainingError``, ``ServingError``,
``DeliveryError``, ``PipelineError``) derives from :class:`CxrError`, so a command that
drives several packages (promotion reads the registry and the stage files; a pipeline step
trains and promotes) turns any of them into one line a person can act on with one
``except CxrError``, while anything else stays a bug with its traceback.
"""

from __future__ import annotations


class CxrError(Exception):
    """An expected failure whose message says what to do next."""


class CredentialsError(CxrError):
    """The stack's ``credentials.json`` exists but cannot be read."""


class StageFileError(CxrError):
    """A stage model file is missing a field, names an unknown stage, or is not valid YAML."""
