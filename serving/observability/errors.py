"""Errors of the observability tooling, each with a message an operator can act on."""

from __future__ import annotations

from core.errors import CxrError


class ObservabilityError(CxrError):
    """Base class: the CLI prints the message and exits non-zero instead of a traceback."""


class RuleFileError(ObservabilityError):
    """A rule file is missing or is not in Prometheus' rule-group format."""


class PrometheusUnavailable(ObservabilityError):
    """Prometheus' HTTP API did not answer; the message names the URL."""


class RenderedFilesOutdated(ObservabilityError):
    """Committed files under k8s/monitoring differ from what the sources render."""
