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

from core.errors import CxrError
from core.stage_file import StageFile, read_stage_file
from delivery import canary as canary_analysis
from delivery.canary_window import analyze_current_canary
from delivery.context import DeliveryContext
from delivery.git_repo import GitOpsRepo
from delivery.messages import DeliveryRecord
from delivery.policy import load_policy
from delivery.promote import PromotionRequest, promote_version
from delivery.reconcile import reconcile_stage
from delivery.rollback import rollback_stage
from training.registry import ModelRegistry

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


@dataclass(frozen=True)
class _Options:
    """How the chosen move is made: pushed or not, which stack follows, where progress goes."""

    push: bool
    remote: str
    publish: bool
    apply_local: bool
    update_alias: bool
    registry: ModelRegistry | None
    store: object | None
    echo: Callable[[str], None]


def step(
    ctx: DeliveryContext,
    *,
    push: bool = False,
    remote: str = "origin",
    publish: bool = False,
    apply_local: bool = True,
    update_alias: bool = True,
    registry: ModelRegistry | None = None,
    store: object | None = None,
    analysis: canary_analysis.CanaryAnalysis | None = None,
    echo: Callable[[str], None] = print,
) -> StepOutcome:
    """Analyse the running canary and make the one move the verdict calls for.

    The whole step holds the checkout's delivery lock (:meth:`GitOpsRepo.delivery_lock`): the move
    is decided on the stage files as read at [1], and no ``promote`` or ``rollback`` may change them
    before it is committed (the rollback or promotion it makes runs inside the same lock).
    """
    opts = _Options(push, remote, publish, apply_local, update_alias, registry, store, echo)
    repo = GitOpsRepo(ctx.gitops_dir)
    with repo.delivery_lock("cxr canary step", echo=echo):
        return _step_locked(ctx, repo, analysis, opts)


def _step_locked(
    ctx: DeliveryContext,
    repo: GitOpsRepo,
    analysis: canary_analysis.CanaryAnalysis | None,
    opts: _Options,
) -> StepOutcome:
    """:func:`step` under the delivery lock."""
    echo = opts.echo
    # [1] what the stage files say now
    ctx = DeliveryContext(**{**ctx.__dict__, "gitops_dir": repo.root})
    policy = load_policy(repo.root)
    canary = read_stage_file(repo.root, "canary")
    production = read_stage_file(repo.root, "production")
    weight = int(canary.canary_weight or 0)
    idle = _nothing_to_analyse(canary, production, weight)
    if idle is not None:
        return idle
    # [2] the verdict on the canary's traffic
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
    # [3] the one move it calls for
    if opts.push:  # before its commit: one that cannot be pushed is a move ArgoCD never sees
        repo.check_push(opts.remote)
    if result.verdict == "fail":
        return _roll_back(ctx, result, weight, opts)
    target = next_weight(weight, policy.canary.weights)
    if target is not None:
        return _increase(ctx, repo, canary, result, weight, target, opts)
    return _promote(ctx, canary, result, weight, opts)


def _nothing_to_analyse(canary: StageFile, production: StageFile, weight: int) -> StepOutcome | None:
    """An idle outcome when no canary takes traffic of its own, else None."""
    if not canary.model_version:
        return StepOutcome("idle", "no canary: promote a version with `cxr promote V --to canary`")
    if (canary.model_version, canary.variant) == (production.model_version, production.variant):
        return StepOutcome(
            "idle",
            f"v{canary.model_version} ({canary.variant}) is already in production",
            weight_before=weight,
            weight_after=weight,
        )
    if weight == 0:
        return StepOutcome("idle", f"canary v{canary.model_version} gets no traffic (weight 0)")
    return None


def _roll_back(
    ctx: DeliveryContext, result: canary_analysis.CanaryAnalysis, weight: int, opts: _Options
) -> StepOutcome:
    """A failed analysis: the canary goes back to its previous version at weight 0."""
    outcome = rollback_stage(
        ctx,
        "canary",
        reason=f"canary analysis failed: {result.summary()}",
        push=opts.push,
        remote=opts.remote,
        apply_local=opts.apply_local,
        update_alias=opts.update_alias,
        registry=opts.registry,
        details=result.lines(),
        action="canary step",
        echo=opts.echo,
    )
    return StepOutcome(
        "rollback",
        f"canary v{outcome.from_version} failed; rolled back to v{outcome.to_version or 'none'} at weight 0",
        result,
        outcome.commit,
        weight,
        0,
    )


def _increase(
    ctx: DeliveryContext,
    repo: GitOpsRepo,
    canary: StageFile,
    result: canary_analysis.CanaryAnalysis,
    weight: int,
    target: int,
    opts: _Options,
) -> StepOutcome:
    """A passing analysis below the last weight: one commit raises the canary's share."""
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
    sha = repo.commit_stage_files([new], record)
    opts.echo(f"committed {sha[:12]}: {record.subject()}")
    if opts.push:
        repo.push(opts.remote)
    if opts.apply_local:
        try:  # the weight lives in the gateway's routing; the Triton only needs to hold the model
            reconcile_stage(ctx, "canary", registry=opts.registry)
        except CxrError as exc:
            opts.echo(f"warning: canary Triton not checked ({exc})")
    return StepOutcome(
        "increase",
        f"canary v{canary.model_version} weight {weight}% -> {target}%",
        result,
        sha,
        weight,
        target,
    )


def _promote(
    ctx: DeliveryContext,
    canary: StageFile,
    result: canary_analysis.CanaryAnalysis,
    weight: int,
    opts: _Options,
) -> StepOutcome:
    """A passing analysis at the last weight: the canary's version goes to production."""
    promoted = promote_version(
        ctx,
        PromotionRequest(
            canary.model_version,
            "production",
            variant=canary.variant,  # production serves what the canary analysis judged
            push=opts.push,
            remote=opts.remote,
            publish=opts.publish,
            apply_local=opts.apply_local,
        ),
        registry=opts.registry,
        store=opts.store,
        analysis=result,
        echo=opts.echo,
    )
    return StepOutcome(
        "promote", f"v{canary.model_version} promoted to production", result, promoted.commit, weight, 0
    )
