"""The canary analysis window, cut to the time the current canary version has been serving.

Counters in Prometheus carry the stage, not the history of what served it: right after a new
version becomes canary, a ``5m`` window still holds the previous canary's requests, and a
healthy model would be judged by a broken one's 5xx (or a broken one pass on a healthy one's
numbers). The overlay file's git history says when this version took the canary slot; the
window never reaches back further than that commit.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from pathlib import Path

from core.stage_file import read_stage_file
from delivery.canary import CanaryAnalysis, analyze
from delivery.git_repo import GitOpsRepo
from delivery.policy import CanaryPolicy

_UNIT_S = {"s": 1, "m": 60, "h": 3600}


def window_seconds(window: str) -> int:
    """``30s`` / ``5m`` / ``1h`` in seconds (the policy validates the pattern)."""
    match = re.fullmatch(r"([0-9]+)([smh])", window)
    if match is None:
        raise ValueError(f"window {window!r} is not like 30s, 5m or 1h")
    return int(match.group(1)) * _UNIT_S[match.group(2)]


def canary_since(gitops_dir: Path) -> datetime | None:
    """When the canary file last took its current model version and variant (None: no canary).

    A new variant of the same version is a new model to judge: its window starts there, so INT8
    is never judged on traffic its fp32 predecessor served.
    """
    repo = GitOpsRepo(gitops_dir)
    current = read_stage_file(repo.root, "canary")
    if not current.model_version:
        return None
    served = (current.model_version, current.variant)
    since: datetime | None = None
    for entry in repo.history("canary"):  # newest first: walk back while the same model serves
        # an unreadable revision ends the walk too: what served then is unknown, so not counted
        if entry.content is None or (entry.content.model_version, entry.content.variant) != served:
            break
        since = entry.committed_at
    return since


def current_window(policy: CanaryPolicy, gitops_dir: Path, now: datetime | None = None) -> CanaryPolicy:
    """``policy`` with its window shortened to the current canary version's age, when that is shorter."""
    since = canary_since(gitops_dir)
    if since is None:
        return policy
    age = ((now or datetime.now(UTC)) - since).total_seconds()
    if age >= window_seconds(policy.window):
        return policy
    return policy.model_copy(update={"window": f"{max(int(age), 1)}s"})


def analyze_current_canary(prometheus_url: str, policy: CanaryPolicy, gitops_dir: Path) -> CanaryAnalysis:
    """The analysis every delivery step runs: at the canary's weight, over the window it has served."""
    weight = read_stage_file(GitOpsRepo(gitops_dir).root, "canary").canary_weight
    return analyze(prometheus_url, current_window(policy, gitops_dir), weight)
