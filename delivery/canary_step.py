"""``canary step``: one move of the canary state machine, decided by the analysis, one commit per move.

pass -> the next weight (10 -> 50 -> 100), and at 100 the canary version is promoted to
production; fail -> weight 0 and the canary file rolled back; inconclusive -> nothing changes.
Run it on a schedule (the CronJob in ``k8s/base/canary``) or by hand; every move it makes is a
commit that ArgoCD applies, so the cluster and the one-machine stack take the same path.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from delivery import canary as canary_analysis
from delivery.canary_window import analyze_current_canary
from delivery.context import DeliveryContext
from delivery.errors import DeliveryError
from delivery.git_repo import GitOpsRepo
from delivery.messages import DeliveryRecord
from delivery.model_file import read_stage_file, write_stage_file
from delivery.policy import load_policy
from delivery.promote import PromotionRequest, promote_version
from delivery.reconcile import reconcile_stage
from delivery.registry import ModelRegistry
from delivery.rollback import rollback_stage

log = logging.getLogger(__name__)

StepAction = Literal["idle", "wait", "increase", "promote", "rollback"]


@dataclass(frozen=True)
class StepOutcome:
    action: StepAction
    message: str
    analysis: canary_analysis.CanaryAnalysis | None = None
    commit: str | None = None
    weight_before: int = 0
    weight_after: int = 0


def next_weight(current: int, weights: list[int]) -> int | None:
    """The first configured weight above ``current``; None once the canary takes all it can (100)."""
    return next((w for w in weights if w > current), None)


def step(
    ctx: DeliveryContext,
    *,
    push: bool = False,
    remote: str = "origin",
    publish: bool = True,
    apply_local: bool = True,
    update_alias: bool = True,
    registry: ModelRegistry | None = None,
    store: object | None = None,
    analysis: canary_analysis.CanaryAnalysis | None = None,
    echo: Callable[[str], None] = print,
) -> StepOutcome:
    """Analyse the running canary and make the one move the verdict calls for."""
    repo = GitOpsRepo(ctx.gitops_dir)
    ctx = DeliveryContext(**{**ctx.__dict__, "gitops_dir": repo.root})
    policy = load_policy(repo.root)
    canary = read_stage_file(repo.root, "canary")
    production = read_stage_file(repo.root, "production")
    weight = int(canary.canary_weight or 0)
    if not canary.model_version:
        return StepOutcome("idle", "no canary: promote a version with `cxr promote V --to canary`")
    if canary.model_version == production.model_version:
        return StepOutcome(
            "idle",
            f"v{canary.model_version} is already in production",
            weight_before=weight,
            weight_after=weight,
        )
    if weight == 0:
        return StepOutcome("idle", f"canary v{canary.model_version} gets no traffic (weight 0)")

    result = analysis or analyze_current_canary(ctx.prometheus_url, policy.canary, repo.root)
    for line in result.lines():
        echo(line)
    if result.verdict == "inconclusive":
        return StepOutcome(
            "wait",
            f"inconclusive, weight stays {weight}%: {result.reason}",
            result,
            weight_before=weight,
            weight_after=weight,
        )
    if result.verdict == "fail":
        outcome = rollback_stage(
            ctx,
            "canary",
            reason=f"canary analysis failed: {result.summary()}",
            push=push,
            remote=remote,
            apply_local=apply_local,
            update_alias=update_alias,
            registry=registry,
            details=result.lines(),
            action="canary step",
            echo=echo,
        )
        return StepOutcome(
            "rollback",
            f"canary v{outcome.from_version} failed; rolled back to "
            f"v{outcome.to_version or 'none'} at weight 0",
            result,
            outcome.commit,
            weight,
            0,
        )

    target = next_weight(weight, policy.canary.weights)
    if target is not None:
        new = canary.model_copy(update={"canary_weight": target})
        record = DeliveryRecord(
            action="canary-step",
            model_name=canary.model_name,
            stage="canary",
            from_version=canary.model_version,
            to_version=canary.model_version,
            canary_weight=target,
            details=[f"Canary weight {weight}% -> {target}%.", *result.lines()],
        )
        sha = repo.commit([write_stage_file(repo.root, new)], record)
        echo(f"committed {sha[:12]}: {record.subject()}")
        if push:
            repo.push(remote)
        if apply_local:
            try:  # the weight lives in the gateway's routing; the Triton only needs to hold the model
                reconcile_stage(ctx, "canary", registry=registry)
            except DeliveryError as exc:
                echo(f"warning: canary Triton not checked ({exc})")
        return StepOutcome(
            "increase",
            f"canary v{canary.model_version} weight {weight}% -> {target}%",
            result,
            sha,
            weight,
            target,
        )

    promoted = promote_version(
        ctx,
        PromotionRequest(
            canary.model_version,
            "production",
            push=push,
            remote=remote,
            publish=publish,
            apply_local=apply_local,
        ),
        registry=registry,
        store=store,
        analysis=result,
        echo=echo,
    )
    return StepOutcome(
        "promote", f"v{canary.model_version} promoted to production", result, promoted.commit, weight, 0
    )
