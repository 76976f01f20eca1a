"""Command line of delivery: ``cxr promote``, ``cxr rollback``, ``cxr canary analyze|step``.

The root ``cxr`` command mounts ``promote`` and ``rollback`` as plain commands and ``canary_app``
as a group; ``python -m delivery`` offers the same plus ``reconcile`` (with ``--publish`` the ArgoCD
Sync hook, without it the one-machine stack's follower). A :class:`DeliveryError` ends the command
with its message and exit code 1 (a failed gate or a failed canary: 3), never a traceback.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console

from core.errors import CxrError
from core.progress import reporting
from core.stages import PROMOTION_ORDER, as_stage
from core.variants import DEFAULT_VARIANT, VARIANTS, Variant, parse_variant
from delivery.errors import DeliveryError, GateFailed

if TYPE_CHECKING:
    from delivery.policy import CanaryPolicy

console = Console(highlight=False)
canary_app = typer.Typer(
    help="Canary analysis against production (PromQL) and the step state machine.", no_args_is_help=True
)
app = typer.Typer(help="GitOps delivery: promote, rollback, canary, reconcile.", no_args_is_help=True)

GATE_EXIT = 3

GitopsDirOpt = Annotated[
    Path | None, typer.Option("--gitops-dir", help="checkout holding k8s/overlays (default: CXR_GITOPS_DIR)")
]
MlflowOpt = Annotated[str | None, typer.Option("--mlflow-uri", help="default: CXR_MLFLOW_URI")]
PrometheusOpt = Annotated[
    str | None, typer.Option("--prometheus-url", help="default: CXR_PROMETHEUS_URL or http://127.0.0.1:9090")
]
PushOpt = Annotated[bool, typer.Option("--push", help="git push the commit to the remote ArgoCD watches")]
ApplyOpt = Annotated[
    bool, typer.Option("--apply/--no-apply", help="make the one-machine stack's Triton follow")
]
PublishOpt = Annotated[
    bool,
    typer.Option(
        "--publish/--no-publish",
        help="also upload the stage's Triton repository before the commit (the cluster's Sync hook does "
        "it after the commit is synced)",
    ),
]


def _echo(line: str) -> None:
    style = "red" if ("FAIL" in line or line.startswith("warning")) else None
    console.print(line, style=style, markup=False)


@contextmanager
def _delivery_errors() -> Iterator[None]:
    """Turn expected failures (delivery, registry, stage files) into one readable line and an exit code."""
    try:
        yield
    except GateFailed as exc:
        console.print(f"promotion refused: {exc}", style="bold red", markup=False)
        raise typer.Exit(GATE_EXIT) from exc
    except CxrError as exc:
        console.print(f"error: {exc}", style="bold red", markup=False)
        raise typer.Exit(1) from exc


def _context(
    gitops_dir: Path | None,
    mlflow_uri: str | None = None,
    prometheus_url: str | None = None,
    *,
    asks_prometheus: bool = False,
) -> Any:
    """The delivery context; ``asks_prometheus``: its Prometheus address is checked first.

    httpx's ``InvalidURL`` (``http://[::1``) is no ``HTTPError``, so the canary client let it
    through as a traceback; a wrong scheme read as "unreachable, is the stack up?".
    """
    from core.offline import apply_offline_env
    from core.urls import http_url
    from delivery.context import DeliveryContext

    ctx = DeliveryContext.from_settings(
        gitops_dir=gitops_dir, mlflow_uri=mlflow_uri, prometheus_url=prometheus_url
    )
    if asks_prometheus:
        http_url(ctx.prometheus_url, "--prometheus-url / CXR_PROMETHEUS_URL", "http://127.0.0.1:9090")
    apply_offline_env(ctx.stack_dir)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    return ctx


def promote(
    version: Annotated[str, typer.Argument(help="MLflow version of cxr-detector, e.g. 3")],
    to: Annotated[str, typer.Option("--to", help="staging | canary | production")],
    variant: Annotated[
        str,
        typer.Option(
            "--variant", help=f"serving precision: {' | '.join(VARIANTS)} (non-fp32 ones are gated vs fp32)"
        ),
    ] = DEFAULT_VARIANT,
    push: PushOpt = False,
    force: Annotated[bool, typer.Option("--force", help="override failed gates (needs --reason)")] = False,
    reason: Annotated[str, typer.Option("--reason", help="why; goes into the commit message")] = "",
    publish: PublishOpt = False,
    apply: ApplyOpt = True,
    through: Annotated[
        bool,
        typer.Option(
            "--through",
            help="first promote to each earlier stage, in order (each its own gates and commit; "
            "stops at the first refusal; --force applies to every stage)",
        ),
    ] = False,
    gitops_dir: GitopsDirOpt = None,
    mlflow_uri: MlflowOpt = None,
    prometheus_url: PrometheusOpt = None,
) -> None:
    """Check the stage's gates, then publish + alias + edit the stage file + one git commit."""
    from delivery.promote import PromotionRequest, promote_through, promote_version

    with _delivery_errors():
        # only production's gate reads the canary's metrics (--through reaches it too)
        ctx = _context(gitops_dir, mlflow_uri, prometheus_url, asks_prometheus=as_stage(to) == "production")
        request = PromotionRequest(
            version=version,
            to=as_stage(to),
            variant=_variant(variant),
            force=force,
            reason=reason,
            push=push,
            publish=publish,
            apply_local=apply,
        )
        with reporting(console):  # each gate's verdict: live on a terminal, event lines in logs
            (promote_through if through else promote_version)(ctx, request, echo=_echo)


def _variant(value: str) -> Variant:
    try:
        return parse_variant(value)
    except ValueError as exc:
        raise DeliveryError(str(exc)) from exc


def rollback(
    stage: Annotated[str, typer.Option("--stage", help="staging | canary | production")],
    reason: Annotated[str, typer.Option("--reason", help="goes into the commit message")] = "",
    push: PushOpt = False,
    apply: ApplyOpt = True,
    gitops_dir: GitopsDirOpt = None,
    mlflow_uri: MlflowOpt = None,
) -> None:
    """Write the stage's previous version back, as a new commit."""
    from delivery.rollback import rollback_stage

    with _delivery_errors():
        ctx = _context(gitops_dir, mlflow_uri)
        outcome = rollback_stage(
            ctx, as_stage(stage), reason=reason, push=push, apply_local=apply, echo=_echo
        )
        for warning in outcome.warnings or []:
            _echo(f"warning: {warning}")


@canary_app.command("analyze")
def analyze(
    prometheus_url: PrometheusOpt = None,
    window: Annotated[
        str | None, typer.Option("--window", help="PromQL range, e.g. 5m (default: policy)")
    ] = None,
    gitops_dir: GitopsDirOpt = None,
) -> None:
    """Compare canary with production now; exit 0 pass, 3 fail, 4 inconclusive.

    Without --window the policy's window is cut to the time the current canary version has
    been serving (its overlay commit), so a previous canary's samples never count.
    """
    from delivery.canary import analyze as run_analysis
    from delivery.canary_window import analyze_current_canary
    from delivery.policy import load_policy

    with _delivery_errors():
        ctx = _context(gitops_dir, prometheus_url=prometheus_url, asks_prometheus=True)
        policy = load_policy(ctx.gitops_dir).canary
        if window:
            result = run_analysis(ctx.prometheus_url, _with_window(policy, window))
        else:
            result = analyze_current_canary(ctx.prometheus_url, policy, ctx.gitops_dir)
        for line in result.lines():
            _echo(line)
        raise typer.Exit({"pass": 0, "fail": GATE_EXIT, "inconclusive": 4}[result.verdict])


def _with_window(policy: CanaryPolicy, window: str) -> CanaryPolicy:
    """The policy with ``--window``, validated as the policy file's own (model_copy checks nothing)."""
    from pydantic import ValidationError

    from delivery.policy import CanaryPolicy

    try:
        return CanaryPolicy.model_validate({**policy.model_dump(), "window": window})
    except ValidationError as exc:
        raise DeliveryError(f"--window {window!r} is not a PromQL range like 5m, 30s or 1h") from exc


@canary_app.command("step")
def step(
    push: PushOpt = False,
    publish: PublishOpt = False,
    apply: ApplyOpt = True,
    gitops_dir: GitopsDirOpt = None,
    mlflow_uri: MlflowOpt = None,
    prometheus_url: PrometheusOpt = None,
) -> None:
    """pass: raise the weight (10 -> 50 -> 100 -> production); fail: weight 0 + rollback commit."""
    from delivery.canary_step import step as run_step

    with _delivery_errors():
        ctx = _context(gitops_dir, mlflow_uri, prometheus_url, asks_prometheus=True)
        outcome = run_step(ctx, push=push, publish=publish, apply_local=apply, echo=_echo)
        _echo(f"canary step: {outcome.action}: {outcome.message}")


def reconcile(
    stage: Annotated[
        list[str] | None, typer.Option("--stage", help="stage(s) to follow (default: all)")
    ] = None,
    watch: Annotated[bool, typer.Option("--watch", help="keep following the files (poll)")] = False,
    poll_s: Annotated[float, typer.Option("--poll-s", min=0.1, help="seconds between polls")] = 2.0,
    publish: Annotated[
        bool,
        typer.Option(
            "--publish",
            help="cluster: only publish the stage's s3:// repository (the ArgoCD Sync hook); "
            "its Tritons poll it, no load call",
        ),
    ] = False,
    gitops_dir: GitopsDirOpt = None,
    mlflow_uri: MlflowOpt = None,
) -> None:
    """Make each stage's Triton serve the version its file names."""
    from delivery import reconcile as rec

    with _delivery_errors():
        ctx = _context(gitops_dir, mlflow_uri)
        if watch:
            rec.watch(ctx, poll_s=poll_s, publish=publish)
            return
        for name in stage or PROMOTION_ORDER:
            if publish:
                result = rec.publish_stage(ctx, as_stage(name))
            else:
                result = rec.reconcile_stage(ctx, as_stage(name))
            _echo(
                f"{result.stage}: v{result.model_version or 'none'} {result.action} ({result.seconds:.1f} s)"
            )


def _register(target: typer.Typer) -> None:
    commands: list[tuple[str, Callable[..., None]]] = [
        ("promote", promote),
        ("rollback", rollback),
        ("reconcile", reconcile),
    ]
    for name, fn in commands:
        target.command(name)(fn)
    target.add_typer(canary_app, name="canary")


_register(app)
