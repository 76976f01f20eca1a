"""Typed delivery errors: each carries a message that tells the operator what to do next.

The CLI turns any :class:`DeliveryError` (and any other :class:`core.errors.CxrError`, such as
the registry's or a stage file's) into a one-line message and a non-zero exit code
instead of a traceback.
"""

from __future__ import annotations

from core.errors import CxrError


class DeliveryError(CxrError):
    """Base class of every error raised by :mod:`delivery`."""


class GitOpsRepoError(DeliveryError):
    """The GitOps directory is not a usable git repository (missing, no identity, push refused)."""


class GateFailed(DeliveryError):
    """A promotion gate failed and ``--force`` was not given."""


class NoPreviousVersion(DeliveryError):
    """A rollback found no earlier version of the stage in the git history."""


class PrometheusError(DeliveryError):
    """Prometheus could not be reached or rejected a query."""


class ReconcileError(DeliveryError):
    """A stage's Triton could not be made to serve the version named in its stage file."""


class DeliveryLocked(DeliveryError):
    """Another delivery command held the repository's delivery lock for longer than one waits."""
