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
from core.stage_file import StageFile, read_stage_file
from core.stages import PROMOTION_ORDER, Stage
from core.variants import DEFAULT_VARIANT, Variant, served_label
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


def _served(label: str) -> tuple[str, str]:
    version, _, variant = label.partition(" ")
    return version, variant or DEFAULT_VARIANT


def previous_served(repo: GitOpsRepo, stage: Stage, current: StageFile) -> tuple[str, Variant]:
    """The newest (version, variant) in the file's history that differs from ``current``'s and was
    not rolled back; a variant change of one version counts as a model of its own.

    Returns ("", fp32) when the stage served nothing before (a first canary rolls back to none).
    """
    now: tuple[str, str] = (current.model_version, current.variant)
    rejected: set[tuple[str, str]] = {now}
    seen_current = False
    for entry in repo.history(stage):
        if entry.record and entry.record.action == "rollback" and entry.record.rolled_back_version:
            rejected.add(_served(entry.record.rolled_back_version))
        if entry.content is None:  # a hand edit git holds but nothing could serve: never a target
            continue
        served = (entry.content.model_version, entry.content.variant)
        if served == now:
            seen_current = True
            continue
        if seen_current and served not in rejected:
            return served
    if seen_current:
        return "", DEFAULT_VARIANT
    raise NoPreviousVersion(
        f"the git history of k8s/overlays/{stage}/model.yaml never held "
        f"v{served_label(current.model_version, current.variant) or 'none'}; "
        "nothing to roll back to (use `cxr promote VERSION --to {stage}` instead)"
    )


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
    """Write the previous version into the stage file (canary weight 0) and commit it.

    Under the checkout's delivery lock from reading the stage file to the commit, the push and the
    alias (:meth:`GitOpsRepo.delivery_lock`). The alias moves only after the commit succeeded: a
    rollback must not wait on the registry, and a failed commit (the stage file put back by
    :meth:`GitOpsRepo.commit_stage_files`) then leaves nothing moved, so a retry rolls back the
    same version again instead of one further.
    """
    if stage not in PROMOTION_ORDER:
        raise DeliveryError(f"unknown stage {stage!r}; use one of {', '.join(PROMOTION_ORDER)}")
    repo = GitOpsRepo(ctx.gitops_dir)
    ctx = DeliveryContext(**{**ctx.__dict__, "gitops_dir": repo.root})
    with repo.delivery_lock(f"cxr rollback --stage {stage}", echo=echo):
        if push:  # before the commit: a retry after one made would roll back one version further
            repo.check_push(remote)
        current = read_stage_file(repo.root, stage)
        if not current.model_version:
            raise NoPreviousVersion(f"{stage} serves nothing; there is nothing to roll back")
        target, variant = previous_served(repo, stage, current)
        update: dict[str, object] = {"model_version": target, "variant": variant}
        if stage == "canary":
            update["canary_weight"] = 0  # no production traffic to a canary being rolled back
        new = current.model_copy(update=update)
        record = DeliveryRecord(
            action="rollback",
            model_name=current.model_name,
            stage=stage,
            from_version=current.model_version,
            to_version=target,
            variant=variant if target else "",
            canary_weight=new.canary_weight if stage == "canary" else None,
            reason=reason,
            rolled_back_version=served_label(current.model_version, current.variant),
            details=details
            or [
                f"Rolled back by {action}: v{served_label(current.model_version, current.variant)} -> "
                f"v{served_label(target, variant) if target else 'none'}."
            ],
        )
        sha = repo.commit_stage_files([new], record)
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
