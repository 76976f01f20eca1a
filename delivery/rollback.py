"""``rollback``: write the stage's previous version back, as a new commit (history is never rewritten).

"Previous" is read from the stage file's own git history: the newest earlier version that no
later commit rolled away from, so rolling back twice walks further back instead of bouncing
between the last two versions. ``git revert <promote commit>`` is the other way back; both leave
the file as the truth the stack follows.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from core.errors import CxrError
from core.stage_file import read_stage_file, write_stage_file
from core.stages import PROMOTION_ORDER, Stage
from core.variants import DEFAULT_VARIANT, Variant
from delivery.context import DeliveryContext
from delivery.errors import DeliveryError, NoPreviousVersion
from delivery.git_repo import GitOpsRepo
from delivery.messages import DeliveryRecord
from delivery.reconcile import ReconcileResult, reconcile_stage
from training.registry import ModelRegistry

log = logging.getLogger(__name__)


@dataclass
class RollbackOutcome:
    stage: Stage
    from_version: str
    to_version: str
    commit: str
    applied: ReconcileResult | None = None
    warnings: list[str] | None = None


def previous_version(repo: GitOpsRepo, stage: Stage, current: str) -> str:
    """The newest version in the file's history that differs from ``current`` and was not rolled back.

    Returns "" when the stage served nothing before (a first canary rolls back to no canary).
    """
    rejected = {current}
    seen_current = False
    for entry in repo.history(stage):
        if entry.record and entry.record.action == "rollback" and entry.record.rolled_back_version:
            rejected.add(entry.record.rolled_back_version)
        version = entry.content.model_version
        if version == current:
            seen_current = True
            continue
        if seen_current and version not in rejected:
            return version
    if seen_current:
        return ""
    raise NoPreviousVersion(
        f"the git history of k8s/overlays/{stage}/model.yaml never held v{current or 'none'}; "
        "nothing to roll back to (use `cxr promote VERSION --to {stage}` instead)"
    )


def _variant_served(repo: GitOpsRepo, stage: Stage, version: str) -> Variant:
    """The serving variant the stage last named together with ``version`` (fp32 when none did)."""
    for entry in repo.history(stage):
        if version and entry.content.model_version == version:
            return entry.content.variant
    return DEFAULT_VARIANT


def rollback_stage(
    ctx: DeliveryContext,
    stage: Stage,
    *,
    reason: str = "",
    push: bool = False,
    remote: str = "origin",
    apply_local: bool = True,
    update_alias: bool = True,
    registry: ModelRegistry | None = None,
    details: list[str] | None = None,
    action: str = "rollback",
    echo: Callable[[str], None] = print,
) -> RollbackOutcome:
    """Write the previous version into the stage file (canary weight 0) and commit it."""
    if stage not in PROMOTION_ORDER:
        raise DeliveryError(f"unknown stage {stage!r}; use one of {', '.join(PROMOTION_ORDER)}")
    repo = GitOpsRepo(ctx.gitops_dir)
    ctx = DeliveryContext(**{**ctx.__dict__, "gitops_dir": repo.root})
    current = read_stage_file(repo.root, stage)
    if not current.model_version:
        raise NoPreviousVersion(f"{stage} serves nothing; there is nothing to roll back")
    target = previous_version(repo, stage, current.model_version)
    update: dict[str, object] = {"model_version": target, "variant": _variant_served(repo, stage, target)}
    if stage == "canary":
        update["canary_weight"] = 0  # no production traffic to a canary being rolled back
    new = current.model_copy(update=update)
    record = DeliveryRecord(
        action="rollback",
        model_name=current.model_name,
        stage=stage,
        from_version=current.model_version,
        to_version=target,
        canary_weight=new.canary_weight if stage == "canary" else None,
        reason=reason,
        rolled_back_version=current.model_version,
        details=details or [f"Rolled back by {action}: v{current.model_version} -> v{target or 'none'}."],
    )
    path = write_stage_file(repo.root, new)
    sha = repo.commit([path], record)
    echo(f"committed {sha[:12]}: {record.subject()}")
    outcome = RollbackOutcome(stage, current.model_version, target, sha, warnings=[])
    if push:
        repo.push(remote)
    if update_alias:
        try:  # the alias follows the file ("" removes it); the commit stands either way
            (registry or ModelRegistry(ctx.mlflow_uri, current.model_name)).set_alias(stage, target)
        except CxrError as exc:
            outcome.warnings = [*(outcome.warnings or []), f"MLflow alias not moved: {exc}"]
    if apply_local:
        try:
            outcome.applied = reconcile_stage(ctx, stage, registry=registry)
        except CxrError as exc:
            outcome.warnings = [*(outcome.warnings or []), f"local stack not updated: {exc}"]
            echo(f"warning: local stack not updated ({exc}); run `python -m delivery reconcile`")
    log.info("rolled_back stage=%s from=%s to=%s commit=%s", stage, current.model_version, target, sha[:12])
    return outcome
