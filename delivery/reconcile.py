"""Make what runs follow the stage files: the local Triton per stage, and the store's repositories.

The overlay file is the truth, not a database: after a promote, a rollback or a plain
``git revert``, :func:`reconcile_stage` fetches the named version's ONNX from MLflow, rebuilds
the stage's Triton repository and (re)loads it, or unloads the model when the stage names none.
In the cluster the same function runs as the overlay's ArgoCD PostSync hook against the
``s3://`` repository.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from core.errors import CxrError
from core.stage_file import read_stage_file
from core.stages import PROMOTION_ORDER, Stage
from delivery.context import DeliveryContext
from delivery.errors import ReconcileError
from training.registry import ModelRegistry

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReconcileResult:
    stage: Stage
    model_version: str
    action: str  # "loaded" | "unloaded" | "unchanged"
    seconds: float


def fetch_onnx(registry: ModelRegistry, version: str, cache: Path) -> Path:
    """The version's ONNX, downloaded once per version into the cache."""
    target = cache / version / "model.onnx"
    if target.exists():
        return target
    downloaded = registry.download_onnx(version, cache / version / "download")
    target.parent.mkdir(parents=True, exist_ok=True)
    downloaded.replace(target)
    return target


def publish_repository(onnx_path: Path, stage: Stage, version: str, model_name: str, store: object) -> str:
    """Put the stage's cluster repository (ONNX Runtime platform) at ``s3://<bucket>/triton/<stage>/``.

    The prefix is emptied first: Triton serves the highest version directory it finds, so an older
    version published by a rollback must not sit beside a newer leftover.
    """
    import tempfile

    from serving.inference.triton_repo import build_repository, upload_repository

    with tempfile.TemporaryDirectory(prefix="cxr-publish-") as tmp:
        repo = Path(tmp)
        build_repository(
            onnx_path,
            repo,
            variant="onnxruntime",
            model_name=model_name,
            version=int(version),
            model_version=version,
        )
        store.delete_prefix(f"triton/{stage}/")  # type: ignore[attr-defined]
        prefix = upload_repository(repo, stage, store)
    log.info("triton_repo_published stage=%s version=%s prefix=%s", stage, version, prefix)
    return prefix


def _applied_file(ctx: DeliveryContext, stage: Stage, url: str) -> Path:
    safe = url.replace(":", "_").replace("/", "_")
    return ctx.stack_dir.resolve() / "gitops" / f"applied-{stage}-{safe}.json"


def applied_version(ctx: DeliveryContext, stage: Stage, url: str) -> str | None:
    """The version this machine last made the stage's Triton at ``url`` serve (None: never)."""
    path = _applied_file(ctx, stage, url)
    if not path.exists():
        return None
    try:
        return str(json.loads(path.read_text())["model_version"])
    except (ValueError, KeyError, OSError):
        return None


def reconcile_stage(
    ctx: DeliveryContext,
    stage: Stage,
    *,
    registry: ModelRegistry | None = None,
    repo_dir: Path | None = None,
    triton_url: str | None = None,
    force: bool = False,
    build_local: bool = True,
) -> ReconcileResult:
    """Make the stage's Triton serve the version its file names (no-op when it already does).

    ``build_local``: write the repository into the one-machine stack's folder (Python-backend
    variant). Off in the cluster, where Triton reads the ``s3://`` repository just published.
    """
    from serving.inference.triton_repo import TritonAdmin, build_repository

    start = time.monotonic()
    wanted = read_stage_file(ctx.gitops_dir, stage)
    url = triton_url or ctx.triton_url(stage)
    if url is None:
        raise ReconcileError(f"no Triton address for stage {stage}; set CXR_TRITON_{stage.upper()}_URL")
    repo = repo_dir or ctx.local_repo_root / stage
    admin = TritonAdmin(url, timeout_s=60.0)
    try:
        same = applied_version(ctx, stage, url) == wanted.model_version
        # a restarted Triton forgets what it loaded: "unchanged" only while it still serves it
        if not force and same and (not wanted.model_version or admin.is_ready(wanted.model_name)):
            return ReconcileResult(stage, wanted.model_version, "unchanged", 0.0)
        if not wanted.model_version:
            if admin.is_ready(wanted.model_name):
                admin.unload(wanted.model_name)
            action = "unloaded"
        else:
            if build_local:
                reg = registry or ModelRegistry(ctx.mlflow_uri, wanted.model_name)
                onnx = fetch_onnx(reg, wanted.model_version, ctx.onnx_cache)
                build_repository(
                    onnx,
                    repo,
                    variant="python",
                    model_name=wanted.model_name,
                    version=int(wanted.model_version),
                    model_version=wanted.model_version,
                )
            admin.load(wanted.model_name)
            if not admin.wait_ready(wanted.model_name, timeout_s=120.0):
                raise ReconcileError(f"Triton {url} did not report {wanted.model_name} ready within 120 s")
            action = "loaded"
    except CxrError:
        raise
    except Exception as exc:  # tritonclient raises its own exception types, and socket errors
        raise ReconcileError(
            f"Triton of stage {stage} at {url} could not serve v{wanted.model_version or 'none'}: {exc}; "
            "is the stack up (`cxr stack status`)?"
        ) from exc
    finally:
        admin.close()
    path = _applied_file(ctx, stage, url)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"stage": stage, "model_version": wanted.model_version}))
    seconds = time.monotonic() - start
    log.info(
        "reconciled stage=%s version=%s action=%s seconds=%.2f", stage, wanted.model_version, action, seconds
    )
    return ReconcileResult(stage, wanted.model_version, action, seconds)


def reconcile_all(ctx: DeliveryContext, *, registry: ModelRegistry | None = None) -> list[ReconcileResult]:
    """Every stage once; a stage whose Triton is down is logged and skipped, the others still follow."""
    results = []
    for stage in PROMOTION_ORDER:
        try:
            results.append(reconcile_stage(ctx, stage, registry=registry))
        except CxrError as exc:
            log.warning("reconcile_failed stage=%s error=%s", stage, exc)
    return results


def watch(ctx: DeliveryContext, poll_s: float = 2.0, stop_after_s: float | None = None) -> None:
    """Follow the files forever (the one-machine stack's stand-in for ArgoCD + the PostSync hook)."""
    deadline = None if stop_after_s is None else time.monotonic() + stop_after_s
    while deadline is None or time.monotonic() < deadline:
        reconcile_all(ctx)
        time.sleep(poll_s)
