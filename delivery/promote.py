"""``promote``: gates, then the published repository, the MLflow alias, the stage file and one commit.

Every side effect that can fail on someone else's server (registry, store) happens before the
commit, so a failed promotion leaves git untouched; the commit is last because ArgoCD (and the
one-machine reconciler) act on it. A commit that fails puts the stage files back as they were
and the alias back where it was (:func:`_promote_locked` says why in this order), so a retry
promotes again. The local Triton is reconciled after the commit: if it is down the commit still
stands and ``python -m delivery reconcile`` catches up.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from core.errors import CxrError
from core.progress import Reporter, reporting
from core.stage_file import VERSION_PATTERN, StageFile, read_stage_file
from core.stages import PROMOTION_ORDER, Stage
from core.variants import DEFAULT_VARIANT, VARIANTS, Variant
from data_pipeline.classes import CLASS_NAMES
from delivery import canary as canary_analysis
from delivery.canary_window import analyze_current_canary
from delivery.context import DeliveryContext
from delivery.errors import DeliveryError, GateFailed
from delivery.gates import (
    GateReport,
    GateResult,
    VersionFacts,
    latency_gate,
    production_gates,
    regression_gate,
    staging_gates,
    variant_gate,
)
from delivery.git_repo import GitOpsRepo
from delivery.golden_gate import GATE_NAME, GoldenVerdict, golden_gate
from delivery.latency import measure_onnx_latency
from delivery.messages import DeliveryRecord
from delivery.onnx_cache import fetch_onnx
from delivery.policy import DeliveryPolicy, load_policy
from delivery.reconcile import ReconcileResult, publish_repository, reconcile_stage
from training.registry import ModelRegistry

log = logging.getLogger(__name__)

#: the ONNX file of (version, serving variant), fetched once into the delivery cache
OnnxFor = Callable[[str, Variant], Path]


@dataclass(frozen=True)
class PromotionRequest:
    """What the operator asked for."""

    version: str
    to: Stage
    variant: Variant = DEFAULT_VARIANT  # the serving precision the stage file will name
    force: bool = False
    reason: str = ""
    push: bool = False
    remote: str = "origin"
    # Upload the stage's Triton repository to the object store before the commit. Off by default:
    # in the cluster the Sync hook publishes what the synced stage file names (Tritons poll it), so
    # publishing here would make a version live that git does not (yet) name.
    publish: bool = False
    apply_local: bool = True  # make the one-machine stack's Triton follow at once


@dataclass
class PromotionOutcome:
    """What happened: the gates, the commit (None when nothing changed) and follow-up notes."""

    report: GateReport
    commit: str | None
    record: DeliveryRecord | None
    applied: ReconcileResult | None = None
    warnings: list[str] = field(default_factory=list)


def _check_request(request: PromotionRequest) -> None:
    if request.to not in PROMOTION_ORDER:
        raise DeliveryError(f"unknown stage {request.to!r}; use one of {', '.join(PROMOTION_ORDER)}")
    if request.variant not in VARIANTS:
        raise DeliveryError(f"unknown variant {request.variant!r}; use one of {', '.join(VARIANTS)}")
    if not VERSION_PATTERN.fullmatch(request.version):
        raise DeliveryError(f"version must be an MLflow version number like 3, got {request.version!r}")
    if request.force and not request.reason.strip():
        raise DeliveryError("--force needs --reason TEXT: the reason goes into the commit for reviewers")


def _guarded(name: str, compute: Callable[[], list[GateResult]]) -> list[GateResult]:
    """A gate whose inputs cannot be fetched fails with the reason (so --force can still override).

    Its measurement (seconds: an ONNX latency run, a canary analysis) shows as a task in progress.
    """
    with reporting() as progress, progress.task("promote_check", name, check=name) as task:
        try:
            results = compute()
        except CxrError as exc:
            results = [GateResult(name, False, f"could not evaluate: {exc}", "its inputs")]
        task.done("done" if all(r.passed for r in results) else "fail")
        return results


def _golden(
    ctx: DeliveryContext,
    policy: DeliveryPolicy,
    candidate: StageFile,
    production: StageFile,
    onnx_for: OnnxFor,
    store: object | None,
) -> GoldenVerdict:
    """The paired golden-set gate; inputs that cannot be fetched fail it with the reason."""
    with reporting() as progress, progress.task("promote_check", GATE_NAME, check=GATE_NAME) as task:
        try:
            verdict = golden_gate(
                gitops_dir=ctx.gitops_dir,
                cache_dir=ctx.golden_cache,
                policy=policy.golden,
                candidate=candidate.model_version,
                production=production.model_version,
                onnx_for=onnx_for,
                store=store,
                class_names=dict(enumerate(CLASS_NAMES)),
                candidate_variant=candidate.variant,
                production_variant=production.variant,
            )
        except CxrError as exc:
            verdict = GoldenVerdict(
                GateResult(GATE_NAME, False, f"could not evaluate: {exc}", "its inputs"), []
            )
        task.done("done" if verdict.result.passed else "fail")
        return verdict


def evaluate_gates(
    ctx: DeliveryContext,
    registry: ModelRegistry,
    policy: DeliveryPolicy,
    version: str,
    stage: Stage,
    *,
    onnx_for: OnnxFor,
    analysis: canary_analysis.CanaryAnalysis | None = None,
    store: object | None = None,
    variant: Variant = DEFAULT_VARIANT,
) -> tuple[GateReport, GoldenVerdict | None]:
    """The gates of ``stage`` for ``version``, each with its numbers, and the golden comparison if run.

    Canary and production compare the candidate with the production model on the pinned golden
    set (delivery/golden_gate.py). Only when no golden set is pinned AND the policy allows it
    (``golden.required: false``) does the canary fall back to comparing registry mAP tags, which
    were measured on different test splits and say much less. Every stage judges the serving
    ``variant`` against the fp32 export it was built from (:func:`variant_gate`); the golden
    comparison and the latency budget measure the variant's own file.
    """
    if stage == "staging":
        facts = registry.facts(version)
        results = [*staging_gates(facts, policy.gates), variant_gate(facts, variant, policy.variants)]
        return GateReport(stage, version, results), None
    production_file = read_stage_file(ctx.gitops_dir, "production")
    production_version = production_file.model_version
    candidate_file = StageFile(stage=stage, model_version=version, variant=variant)
    golden = _golden(ctx, policy, candidate_file, production_file, onnx_for, store)
    if stage == "canary":
        candidate = registry.facts(version)
        production: VersionFacts | None = registry.facts(production_version) if production_version else None
        comparison = [golden.result]
        if golden.comparison is None and golden.result.passed and production is not None:
            comparison.append(regression_gate(candidate, production, policy.gates))  # the weak fallback

        def with_latency() -> list[GateResult]:
            measured = measure_onnx_latency(onnx_for(version, variant), runs=policy.gates.latency_runs)
            return [latency_gate(measured.p95_ms, policy.gates)]

        latency = _guarded("latency budget", with_latency)
        results = [
            *staging_gates(candidate, policy.gates),
            variant_gate(candidate, variant, policy.variants),
            *comparison,
            *latency,
        ]
        return GateReport(stage, version, results, golden.table), golden
    canary_file = read_stage_file(ctx.gitops_dir, "canary")

    def from_analysis() -> list[GateResult]:
        result = analysis or analyze_current_canary(ctx.prometheus_url, policy.canary, ctx.gitops_dir)
        return production_gates(
            version,
            canary_file.model_version,
            result.verdict,
            result.summary(),
            variant=variant,
            canary_variant=canary_file.variant,
        )

    results = [
        *_guarded("canary analysis", from_analysis),
        variant_gate(registry.facts(version), variant, policy.variants),
        golden.result,
    ]
    return GateReport(stage, version, results, golden.table), golden


def gate_verdict(result: GateResult) -> str:
    """``pass``, ``warn`` (passed because the policy only warns) or ``fail``."""
    return ("warn" if result.warning else "pass") if result.passed else "fail"


def report_gates(progress: Reporter, report: GateReport) -> None:
    """Each gate with its verdict as a ``promote_gate`` event, then the promotion's ``promote_gates`` one.

    On a terminal the echoed report shows them (so these print nothing there); logs get one
    structured line per gate.
    """
    for result in report.results:
        progress.event(
            "promote_gate",
            "",
            stage=report.stage,
            version=report.version,
            gate=result.name,
            verdict=gate_verdict(result),
            observed=result.observed,
            expected=result.expected,
        )
    progress.event(
        "promote_gates",
        "",
        stage=report.stage,
        version=report.version,
        verdict="pass" if report.passed else "fail",
        gates=len(report.results),
        failed=len(report.failed),
        warnings=sum(r.warning for r in report.results),
    )


def _next_files(ctx: DeliveryContext, request: PromotionRequest, policy: DeliveryPolicy) -> list[StageFile]:
    """The stage files after the promotion (production also takes the canary's traffic back)."""
    current = read_stage_file(ctx.gitops_dir, request.to)
    if request.to == "canary":
        update = {
            "model_version": request.version,
            "variant": request.variant,
            "canary_weight": policy.canary.weights[0],
        }
        return [current.model_copy(update=update)]
    files = [current.model_copy(update={"model_version": request.version, "variant": request.variant})]
    if request.to == "production":
        canary = read_stage_file(ctx.gitops_dir, "canary")
        if canary.model_version == request.version and canary.canary_weight:
            files.append(canary.model_copy(update={"canary_weight": 0}))
    return files


def _record_comparison(reg: ModelRegistry, request: PromotionRequest, golden: GoldenVerdict) -> None:
    """The golden table into the version's model card (its registry description) and a tag."""
    heading = f"## Golden set comparison (promotion to {request.to})"
    reg.record_section(
        request.version,
        heading,
        "\n".join([golden.result.line().removeprefix("- "), "", *golden.table]),
        tags={f"golden_vs_production_{request.to}": json.dumps(golden.summary(), separators=(",", ":"))},
    )


def promote_through(
    ctx: DeliveryContext,
    request: PromotionRequest,
    **kwargs: object,
) -> list[PromotionOutcome]:
    """Promote to every stage up to ``request.to``, in order, each with its own gates and commit.

    ``cxr promote V --to production --through``: what the first-run bootstrap does with v1. One
    process instead of one ``cxr promote`` per stage: each of those paid Python's start and
    mlflow's import (~4 s on the 2-core reference machine) for ~3 s of work. It stops at the
    first refusal (:class:`GateFailed`, whose message then names the stages already promoted),
    the earlier stages staying promoted, exactly as the same commands run one after the other
    would. ``force`` (with its one reason) applies to every stage's gates.
    """
    _check_request(request)
    stages = PROMOTION_ORDER[: PROMOTION_ORDER.index(request.to) + 1]
    outcomes: list[PromotionOutcome] = []
    for stage in stages:
        try:
            outcomes.append(promote_version(ctx, replace(request, to=stage), **kwargs))  # type: ignore[arg-type]
        except GateFailed as exc:
            if not outcomes:
                raise
            done = ", ".join(stages[: len(outcomes)])
            raise GateFailed(f"{exc} (promoted before it by --through: {done})") from exc
    return outcomes


def promote_version(
    ctx: DeliveryContext,
    request: PromotionRequest,
    *,
    registry: ModelRegistry | None = None,
    store: object | None = None,
    analysis: canary_analysis.CanaryAnalysis | None = None,
    echo: Callable[[str], None] = print,
) -> PromotionOutcome:
    """Run the whole promotion; raises :class:`GateFailed` (nothing changed) when a gate fails unforced.

    From its first read of a stage file to its commit and push it holds the checkout's delivery
    lock (:meth:`GitOpsRepo.delivery_lock`), so no ``canary step`` or ``rollback`` writes the
    stage files in between; the local Triton follows after the lock is released.
    """
    _check_request(request)
    repo = GitOpsRepo(ctx.gitops_dir)
    policy = load_policy(repo.root)
    ctx = DeliveryContext(**{**ctx.__dict__, "gitops_dir": repo.root})
    with repo.delivery_lock(f"cxr promote {request.version} --to {request.to}", echo=echo):
        if request.push:  # before the gates and the alias: a push that cannot happen changes nothing
            repo.check_push(request.remote)
        outcome, reg = _promote_locked(ctx, repo, policy, request, registry, store, analysis, echo)
    if outcome.commit is None or outcome.record is None:
        return outcome

    # [4] the one-machine stack follows the file (in the cluster ArgoCD + the Sync hook do this)
    if request.apply_local:
        try:
            label = f"{request.to} Triton loads v{request.version}"
            with reporting() as progress, progress.task("promote_apply", label, stage=request.to):
                outcome.applied = reconcile_stage(ctx, request.to, registry=reg)
            served = outcome.applied.model_version or "nothing"  # its file, read under the stage's lock
            echo(f"{request.to} Triton now serves v{served} ({outcome.applied.seconds:.1f} s)")
        except CxrError as exc:
            outcome.warnings.append(f"local stack not updated: {exc}")
            echo(f"warning: local stack not updated ({exc}); run `python -m delivery reconcile`")
    log.info(
        "promoted model=%s version=%s stage=%s commit=%s forced=%s",
        outcome.record.model_name,
        request.version,
        request.to,
        outcome.commit[:12],
        outcome.record.forced,
    )
    return outcome


def _promote_locked(
    ctx: DeliveryContext,
    repo: GitOpsRepo,
    policy: DeliveryPolicy,
    request: PromotionRequest,
    registry: ModelRegistry | None,
    store: object | None,
    analysis: canary_analysis.CanaryAnalysis | None,
    echo: Callable[[str], None],
) -> tuple[PromotionOutcome, ModelRegistry]:
    """Gates, registry, stage files, commit and push: the promotion's part under the delivery lock.

    The MLflow alias moves after everything else that can fail before the commit (the model card,
    the published repository) and immediately before the commit, and back to the version the
    stage file still names if the commit fails (:func:`_alias_back`). That order leaves no half
    state on either failure: a registry that refuses the alias stops the promotion before git
    changes (git is what ArgoCD and the stack act on, and a commit once pushed cannot be taken
    back quietly), and a refused commit leaves the stage files as they were
    (:meth:`GitOpsRepo.commit_stage_files`) and the alias where it was. Moving the alias only after
    the commit would instead leave it behind whenever the registry failed then, and a retry would
    find the file already changed ("nothing to commit") and never move it. What remains is a crash
    between the alias and the commit; the stage file is then unchanged, so the retry redoes both.
    """
    current = read_stage_file(ctx.gitops_dir, request.to)
    reg = registry or ModelRegistry(ctx.mlflow_uri, current.model_name)

    @functools.cache  # one registry look-up and one hash of the file per promotion, not per gate
    def onnx_for(version: str, variant: Variant) -> Path:
        return fetch_onnx(reg, version, ctx.onnx_cache, variant)  # downloaded once into the cache

    with reporting() as progress:
        report, golden = evaluate_gates(
            ctx,
            reg,
            policy,
            request.version,
            request.to,
            onnx_for=onnx_for,
            analysis=analysis,
            store=store,
            variant=request.variant,
        )
        report_gates(progress, report)
    for line in report.lines():
        echo(line)
    if not report.passed and not request.force:
        raise GateFailed(
            f"{len(report.failed)} gate(s) failed for {current.model_name} v{request.version} "
            f"-> {request.to}: "
            + "; ".join(r.name for r in report.failed)
            + ". Fix the model, or override with --force --reason TEXT"
        )
    files = _next_files(ctx, request, policy)
    if all(f == read_stage_file(ctx.gitops_dir, f.stage) for f in files):
        echo(f"{request.to} already serves v{request.version} ({request.variant}): nothing to commit")
        return PromotionOutcome(report, None, None), reg

    # [1] the golden comparison on the version (its tag and model card),
    # [2] published repository: before the commit, so a failure changes nothing
    if golden is not None and golden.comparison is not None:
        _record_comparison(reg, request, golden)
    if request.publish:
        if store is None:
            from data_pipeline.store import ObjectStore

            store = ObjectStore.from_env()
        publish_repository(
            onnx_for(request.version, request.variant),
            request.to,
            request.version,
            current.model_name,
            store,
            request.variant,
        )

    # [3] the registry alias, then the stage file(s) and one commit (the alias moves back if it fails)
    record = DeliveryRecord(
        action="promote",
        model_name=current.model_name,
        stage=request.to,
        from_version=current.model_version,
        to_version=request.version,
        variant=request.variant,
        canary_weight=files[0].canary_weight if request.to == "canary" else None,
        forced=request.force and not report.passed,
        reason=request.reason,
        details=report.lines()
        + ([f"Canary weight reset to 0 (v{request.version} now in production)."] if len(files) > 1 else []),
    )
    reg.set_alias(request.to, request.version)
    try:
        sha = repo.commit_stage_files(files, record)
    except BaseException as exc:
        _alias_back(reg, request, current.model_version, exc)
        raise
    echo(f"committed {sha[:12]}: {record.subject()}")
    if request.push:
        repo.push(request.remote)
        echo(f"pushed to {request.remote}")
    return PromotionOutcome(report, sha, record), reg


def _alias_back(reg: ModelRegistry, request: PromotionRequest, previous: str, failure: BaseException) -> None:
    """After a failed commit, the stage's alias back on ``previous``: the version its file still names."""
    try:
        reg.set_alias(request.to, previous)
    except CxrError as exc:
        log.error("alias_not_moved_back stage=%s version=%s error=%s", request.to, request.version, exc)
        if isinstance(failure, CxrError):
            raise DeliveryError(
                f"{failure}; and the MLflow alias {request.to} could not be moved back from "
                f"v{request.version} to v{previous or 'none'} ({exc}): promote again once git commits "
                "(the stage file is unchanged)"
            ) from failure
