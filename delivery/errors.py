"""Typed delivery errors: each carries a message that tells the operator what to do next.

The CLI turns any :class:`DeliveryError` into a one-line message and a non-zero exit code
instead of a traceback.
"""

from __future__ import annotations


class DeliveryError(Exception):
    """Base class of every error raised by :mod:`delivery`."""


class StageFileError(DeliveryError):
    """A stage model file is missing or does not match the schema."""


class GitOpsRepoError(DeliveryError):
    """The GitOps directory is not a usable git repository (missing, no identity, push refused)."""


class RegistryError(DeliveryError):
    """The MLflow registry does not know the model version, or cannot be reached."""


class GateFailed(DeliveryError):
    """A promotion gate failed and ``--force`` was not given."""


class NoPreviousVersion(DeliveryError):
    """A rollback found no earlier version of the stage in the git history."""


class PrometheusError(DeliveryError):
    """Prometheus could not be reached or rejected a query."""


class ReconcileError(DeliveryError):
    """A stage's Triton could not be made to serve the version named in its stage file."""
