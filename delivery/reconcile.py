"""Make what runs follow the stage files: the local Triton per stage, and the store's repositories.

The overlay file is the truth, not a database: after a promote, a rollback or a plain
``git revert``, the stage's Triton must serve the version its file names (or nothing).

- One machine: :func:`reconcile_stage` fetches the named version's ONNX from MLflow (cached per
  model name and sha256, and refused unless its bytes match the version's lineage tag:
  :mod:`delivery.onnx_cache`), rebuilds the stage's local repository (Python-backend variant,
  CPU) and (re)loads it through Triton's repository API (explicit model control), or unloads the
  model when the stage names none.
- Cluster: :func:`publish_stage` runs as each overlay's ArgoCD ``Sync`` hook and only *publishes*
  the cluster variant (ONNX Runtime on the GPU with TensorRT FP16) to ``s3://<bucket>/triton/<stage>/``.
  It calls no Triton: every replica of the stage polls that repository
  (``--model-control-mode=poll``) and loads what appears there, so all replicas follow, not just
  the one a Service would pick.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from core.errors import CxrError
from core.stage_file import StageFile, read_stage_file, stage_file_path
from core.stages import PROMOTION_ORDER, Stage
from core.variants import DEFAULT_VARIANT, Variant
from delivery.context import DeliveryContext
from delivery.errors import ReconcileError
from delivery.onnx_cache import fetch_onnx
from training.registry import ModelRegistry

log = logging.getLogger(__name__)

#: how long a reconcile waits for another one of the same stage: that one's load (up to 60 s) and
#: readiness (up to 120 s), after a download from MLflow
LOCK_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class ReconcileResult:
    stage: Stage
    model_version: str
    action: str  # one machine: "loaded" | "unloaded" | "unchanged"; cluster: "published" | "unpublished"
    seconds: float


def _followed(ctx: DeliveryContext, stage: Stage) -> StageFile:
    """The stage file to follow; :class:`ReconcileError` when its overlay folder is not there.

    A missing file means "the stage serves nothing", so a ``CXR_GITOPS_DIR`` or ``--gitops-dir``
    naming a folder that does not exist (a typo, an unmounted volume) read as "every stage serves
    nothing": the reconcile unloaded (the cluster's: unpublished) every stage's model, production's
    included, and reported success. Every GitOps checkout has the overlay folder of each stage.
    """
    overlay = stage_file_path(ctx.gitops_dir, stage).parent
    if not overlay.is_dir():
        raise ReconcileError(
            f"{overlay} is not there: {ctx.gitops_dir} is not a GitOps checkout (check CXR_GITOPS_DIR "
            f"or --gitops-dir); nothing was loaded or unloaded for stage {stage}"
        )
    return read_stage_file(ctx.gitops_dir, stage)


def _stage_prefix(stage: str) -> str:
    return f"triton/{stage}/"


def _publish(
    onnx_path: Path, stage: Stage, version: str, model_name: str, store: Any, precision: Variant
) -> tuple[str, int]:
    """Publish the cluster variant; returns the prefix and how many objects were written or deleted."""
    import tempfile

    from serving.inference.triton_repo import CLUSTER, build_repository

    prefix = _stage_prefix(stage)
    with tempfile.TemporaryDirectory(prefix="cxr-publish-") as tmp:
        repo = Path(tmp)
        build_repository(
            onnx_path,
            repo,
            variant=CLUSTER,
            model_name=model_name,
            version=int(version),
            model_version=version,
            precision=precision,
        )
        files = {p.relative_to(repo).as_posix() for p in repo.rglob("*") if p.is_file()}
        config = f"{model_name}/config.pbtxt"
        # Every replica polls this prefix, so no poll may see a half-published model: the version
        # directory first, then the config naming it, then the stale objects go. Unchanged files
        # are not re-sent (upload_dir compares hashes), so a re-run changes no timestamp and no
        # Triton reloads: the Sync hook runs on every sync and must be idempotent.
        changed = store.upload_dir(repo, prefix, skip={config})  # the version directory
        changed += store.upload_dir(repo, prefix, skip=files - {config})  # then the config naming it
        wanted = {prefix + f for f in files}
    # Triton serves the highest version directory it finds: an older version published by a
    # rollback must not keep a newer leftover beside it.
    for key in store.list_prefix(prefix):
        if key not in wanted and not any(w.startswith(key) for w in wanted):
            changed += store.delete_prefix(key)
    return prefix, changed


def publish_repository(
    onnx_path: Path,
    stage: Stage,
    version: str,
    model_name: str,
    store: object,
    precision: Variant = DEFAULT_VARIANT,
) -> str:
    """Put the stage's cluster repository (ONNX Runtime on the GPU) at ``s3://<bucket>/triton/<stage>/``.

    What the stage's Tritons serve from their next poll on (within ``--repository-poll-secs``).
    """
    prefix, changed = _publish(onnx_path, stage, version, model_name, store, precision)
    log.info(
        "triton_repo_published stage=%s version=%s prefix=%s changed=%d", stage, version, prefix, changed
    )
    return prefix.rstrip("/")


def publish_stage(
    ctx: DeliveryContext,
    stage: Stage,
    *,
    registry: ModelRegistry | None = None,
    store: object | None = None,
) -> ReconcileResult:
    """The cluster's reconcile (each overlay's ArgoCD Sync hook): publish what the stage file names.

    Calls no Triton and waits for none (the Tritons poll the repository), so it also works for the
    very first model, while nothing is ready yet. A stage that names no version gets an empty
    prefix, which its Tritons answer by unloading the model. Idempotent: publishing what is
    already there writes nothing.
    """
    start = time.monotonic()
    wanted = _followed(ctx, stage)
    if store is None:
        from data_pipeline.store import ObjectStore

        store = ObjectStore.from_env()
    target: Any = store
    if not wanted.model_version:
        removed = target.delete_prefix(_stage_prefix(stage))
        action = "unpublished" if removed else "unchanged"
    else:
        reg = registry or ModelRegistry(ctx.mlflow_uri, wanted.model_name)
        onnx = fetch_onnx(reg, wanted.model_version, ctx.onnx_cache, wanted.variant)
        _, changed = _publish(onnx, stage, wanted.model_version, wanted.model_name, target, wanted.variant)
        action = "published" if changed else "unchanged"
    seconds = time.monotonic() - start
    log.info(
        "published stage=%s version=%s action=%s seconds=%.2f",
        stage,
        wanted.model_version or "none",
        action,
        seconds,
    )
    return ReconcileResult(stage, wanted.model_version, action, seconds)


def _applied_file(ctx: DeliveryContext, stage: Stage, url: str) -> Path:
    safe = url.replace(":", "_").replace("/", "_")
    return ctx.stack_dir.resolve() / "gitops" / f"applied-{stage}-{safe}.json"


def stage_lock_path(ctx: DeliveryContext, stage: Stage) -> Path:
    """The lock one machine's reconciles of ``stage`` take turns on (:func:`reconcile_stage`)."""
    return ctx.stack_dir.resolve() / "gitops" / f"reconcile-{stage}.lock"


def applied_version(ctx: DeliveryContext, stage: Stage, url: str) -> tuple[str, str] | None:
    """(version, variant) this machine last made the stage's Triton at ``url`` serve (None: never)."""
    path = _applied_file(ctx, stage, url)
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
        return str(data["model_version"]), str(data.get("variant", DEFAULT_VARIANT))
    except (ValueError, KeyError, OSError, AttributeError):
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
    """Make the stage's one-machine Triton serve the version its file names (no-op when it already does).

    ``build_local``: write the repository into the one-machine stack's folder (Python-backend
    variant, CPU); off when that Triton reads a repository someone else writes, which must name
    its version folder after the registry version, as :func:`build_repository` is called here and
    in :func:`publish_stage` (readiness is asked of that version). The cluster does not come here:
    :func:`publish_stage` publishes and the Tritons poll.

    The stack's watcher and a `cxr promote` / `canary step` reconcile the same stage at the same
    moment after every promotion; unserialised, one rebuilt the repository folder while Triton
    loaded the other's. So a stage is reconciled under a file lock of its own (whatever spelling
    of the Triton address each caller has), and its file is read inside it: the second to come
    finds the work done ("unchanged") rather than undoing it with what it read before.
    """
    url = triton_url or ctx.triton_url(stage)
    if url is None:
        raise ReconcileError(f"no Triton address for stage {stage}; set CXR_TRITON_{stage.upper()}_URL")
    lock = stage_lock_path(ctx, stage)
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(lock, timeout=LOCK_TIMEOUT_S):
            return _reconcile_locked(
                ctx,
                stage,
                url,
                registry=registry,
                repo_dir=repo_dir,
                force=force,
                build_local=build_local,
            )
    except Timeout as exc:
        raise ReconcileError(
            f"another reconcile of stage {stage} held its lock for over {LOCK_TIMEOUT_S:.0f} s; try again"
        ) from exc
    except OSError as exc:  # the lock or the applied record: the caller's commit stands, it says so
        raise ReconcileError(
            f"cannot reconcile stage {stage}: {exc} (the stack folder {lock.parent} must be writable)"
        ) from exc


def _reconcile_locked(
    ctx: DeliveryContext,
    stage: Stage,
    url: str,
    *,
    registry: ModelRegistry | None,
    repo_dir: Path | None,
    force: bool,
    build_local: bool,
) -> ReconcileResult:
    from serving.inference.triton_repo import TritonAdmin, build_repository

    start = time.monotonic()
    wanted = _followed(ctx, stage)
    repo = repo_dir or ctx.local_repo_root / stage
    admin = TritonAdmin(url, timeout_s=60.0)
    try:
        # a new variant of the same version is a change too: its file differs
        same = applied_version(ctx, stage, url) == (wanted.model_version, wanted.variant)
        # "unchanged" only while Triton serves that very version (its numeric version directory):
        # a restarted Triton forgets what it loaded, and one that kept an older version after a
        # failed load still answers "ready" for the model's name
        if (
            not force
            and same
            and (not wanted.model_version or admin.is_ready(wanted.model_name, wanted.model_version))
        ):
            return ReconcileResult(stage, wanted.model_version, "unchanged", 0.0)
        if not wanted.model_version:
            # asked first: is_ready answers False for a Triton that does not answer at all, which was
            # reported (and recorded) as "unloaded", every later run then "unchanged" without asking
            admin.require_live()
            if admin.is_ready(wanted.model_name):
                admin.unload(wanted.model_name)
            action = "unloaded"
        else:
            if build_local:
                reg = registry or ModelRegistry(ctx.mlflow_uri, wanted.model_name)
                onnx = fetch_onnx(reg, wanted.model_version, ctx.onnx_cache, wanted.variant)
                build_repository(
                    onnx,
                    repo,
                    variant="python",
                    model_name=wanted.model_name,
                    version=int(wanted.model_version),
                    model_version=wanted.model_version,
                    precision=wanted.variant,
                )
            admin.load(wanted.model_name)
            if not admin.wait_ready(wanted.model_name, timeout_s=120.0, version=wanted.model_version):
                raise ReconcileError(
                    f"Triton {url} did not report {wanted.model_name} "
                    f"v{wanted.model_version} ready within 120 s"
                )
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
    _applied_file(ctx, stage, url).write_text(  # beside the stage's lock: its folder exists
        json.dumps({"stage": stage, "model_version": wanted.model_version, "variant": wanted.variant})
    )
    seconds = time.monotonic() - start
    log.info(
        "reconciled stage=%s version=%s action=%s seconds=%.2f", stage, wanted.model_version, action, seconds
    )
    return ReconcileResult(stage, wanted.model_version, action, seconds)


def reconcile_all(
    ctx: DeliveryContext, *, registry: ModelRegistry | None = None, publish: bool = False
) -> list[ReconcileResult]:
    """Every stage once; a stage whose Triton (or store) is down is logged and skipped, the others follow.

    ``publish``: only publish each stage's repository for Tritons in poll mode (compose, cluster).
    """
    results = []
    for stage in PROMOTION_ORDER:
        try:
            follow = publish_stage if publish else reconcile_stage
            results.append(follow(ctx, stage, registry=registry))
        except CxrError as exc:
            log.warning("reconcile_failed stage=%s error=%s", stage, exc)
    return results


def watch(
    ctx: DeliveryContext, poll_s: float = 2.0, stop_after_s: float | None = None, *, publish: bool = False
) -> None:
    """Follow the files forever (the one-machine stack's stand-in for ArgoCD + the Sync hook + polling)."""
    deadline = None if stop_after_s is None else time.monotonic() + stop_after_s
    while deadline is None or time.monotonic() < deadline:
        reconcile_all(ctx, publish=publish)
        time.sleep(poll_s)
