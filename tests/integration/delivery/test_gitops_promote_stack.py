"""promote / rollback / git revert against real MLflow, S3 and Triton, in a temporary git repo.

Proves: each promotion is one structured commit touching the stage file only; the MLflow alias
and the s3:// Triton repository follow; the canary stage's real Triton loads the promoted
version; ``rollback`` and ``git revert`` bring the previous version back and the Triton follows
the file; a failed gate changes nothing; ``--force --reason`` goes into the commit; a Triton
serving another version than last applied is reloaded; two reconciles of one stage at once load
it once.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from mlflow.tracking import MlflowClient
from tritonclient.http import InferenceServerClient

from core.stage_file import StageFile, read_stage_file
from data_pipeline.store import ObjectStore
from delivery.context import DeliveryContext
from delivery.errors import GateFailed
from delivery.messages import parse_record
from delivery.promote import PromotionRequest, promote_through, promote_version
from delivery.reconcile import fetch_onnx, reconcile_stage
from delivery.rollback import rollback_stage
from serving.inference.triton_repo import TritonAdmin, build_repository
from tests.integration.delivery.gitops_helpers import git, init_gitops_repo, register_version, tiny_detector
from training.registry import ModelRegistry

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture
def gitops_repo(tmp_path: Path) -> tuple[Path, str]:
    model_name = f"cxr-detector-gitops-{secrets.token_hex(3)}"
    # the mechanics of promotion are judged here with the weak mAP-tag fallback; the golden-set
    # comparison has its own test (test_golden_gate.py)
    root = init_gitops_repo(tmp_path / "gitops", model_name, "golden:\n  required: false\n")
    return root, model_name


@pytest.fixture
def private_store(s3_store: Any) -> Iterator[ObjectStore]:
    """A bucket of its own, so publishing triton/<stage>/ never touches other tests' objects."""
    store = ObjectStore(
        s3_store.endpoint,
        s3_store.access_key,
        s3_store.secret_key,
        f"gitops-{secrets.token_hex(3)}",
        s3_store.region,
    )
    store.ensure_bucket()
    yield store
    store.delete_prefix("")


def model_version_in_triton(url: str, model_name: str) -> str:
    client = InferenceServerClient(url)
    try:
        config = client.get_model_config(model_name)
        return str(config["parameters"]["cxr_model_version"]["string_value"])
    finally:
        client.close()


def test_promote_rollback_and_revert_drive_registry_store_git_and_triton(
    gitops_repo: tuple[Path, str],
    mlflow_server: Any,
    private_store: ObjectStore,
    triton_factory: Any,
    tmp_path: Path,
) -> None:
    root, model_name = gitops_repo
    v1 = register_version(
        mlflow_server.uri, model_name, tiny_detector(tmp_path / "v1" / "model.onnx", score=0.9)
    )
    v2 = register_version(
        mlflow_server.uri, model_name, tiny_detector(tmp_path / "v2" / "model.onnx", score=0.8)
    )
    weak = register_version(
        mlflow_server.uri, model_name, tiny_detector(tmp_path / "v3" / "model.onnx", score=0.7), map50="0.05"
    )
    stack = tmp_path / "stack"
    canary_triton = triton_factory("canary", stack.resolve() / "triton" / "canary")
    ctx = DeliveryContext(
        gitops_dir=root,
        mlflow_uri=mlflow_server.uri,
        prometheus_url="http://127.0.0.1:9",
        stack_dir=stack,
        model_name=model_name,
        triton_urls=(("canary", canary_triton.http_url),),
    )
    registry = ModelRegistry(mlflow_server.uri, model_name)
    lines: list[str] = []

    def promote(version: str, to: str, **kw: Any) -> Any:
        request = PromotionRequest(  # type: ignore[arg-type]
            version=version, to=to, apply_local=(to == "canary"), publish=True, **kw
        )
        return promote_version(ctx, request, registry=registry, store=private_store, echo=lines.append)

    # [1] v1 through staging, canary and production in one call (`cxr promote --through`, the
    # bootstrap's); production's canary analysis fails (no canary traffic here) and is forced
    outcomes = promote_through(
        ctx,
        PromotionRequest(
            version=v1, to="production", force=True, reason="first model, approved in change ticket CX-1"
        ),
        registry=registry,
        store=private_store,
        echo=lines.append,
    )
    assert [o.record.stage for o in outcomes if o.record] == ["staging", "canary", "production"]
    assert [o.record.forced for o in outcomes if o.record] == [False, False, True]  # only where a gate failed
    applied = outcomes[1].applied
    assert applied is not None and applied.action == "loaded"
    assert model_version_in_triton(canary_triton.http_url, model_name) == v1
    assert any(line.startswith("- latency budget: pass") for line in lines)
    body = git(root, "log", "-1", "--format=%B")
    assert "Cxr-Forced: true" in body and "Cxr-Reason: first model, approved in change ticket CX-1" in body
    assert "canary analysis: FAIL" in body  # the overridden gate is on record
    assert read_stage_file(root, "canary").canary_weight == 0  # production took the traffic back

    # [2] one commit per promotion, each touching only its stage file(s)
    subjects = git(root, "log", "--format=%s").splitlines()
    assert subjects[:3] == [
        f"promote {model_name} {v1} to production (was none)",
        f"promote {model_name} {v1} to canary (was none)",
        f"promote {model_name} {v1} to staging (was none)",
    ]
    assert git(root, "show", "--name-only", "--format=", "HEAD~2").split() == [
        "k8s/overlays/staging/model.yaml"
    ]

    # [3] v2 to canary: registry alias, s3:// repository and the canary Triton follow
    promote(v2, "canary")
    assert read_stage_file(root, "canary") == StageFile(
        stage="canary", model_name=model_name, model_version=v2, canary_weight=10
    )
    client = MlflowClient(tracking_uri=mlflow_server.uri)
    assert client.get_model_version_by_alias(model_name, "canary").version == v2
    keys = private_store.list_prefix("triton/canary/")
    assert f"triton/canary/{model_name}/{v2}/model.onnx" in keys
    assert f"triton/canary/{model_name}/config.pbtxt" in keys
    assert not any(f"/{v1}/" in k for k in keys)  # no stale older version beside it
    assert model_version_in_triton(canary_triton.http_url, model_name) == v2

    # [4] a failing gate refuses and changes nothing
    head = git(root, "rev-parse", "HEAD")
    with pytest.raises(GateFailed, match=r"mAP@0\.5"):
        promote(weak, "canary")
    assert git(root, "rev-parse", "HEAD") == head
    # ... and `--through` stops there too, its message naming the stage it promoted before it
    with pytest.raises(GateFailed, match=r"mAP@0\.5.*\(promoted before it by --through: staging\)$"):
        promote_through(
            ctx,
            PromotionRequest(version=weak, to="canary", apply_local=False, publish=True),
            registry=registry,
            store=private_store,
            echo=lines.append,
        )
    assert read_stage_file(root, "staging").model_version == weak
    assert read_stage_file(root, "canary").model_version == v2

    # [5] rollback: v1 back in the file, in a new commit, and in the Triton
    rolled = rollback_stage(ctx, "canary", reason="test rollback", registry=registry, echo=lines.append)
    assert (rolled.from_version, rolled.to_version) == (v2, v1)
    record = parse_record(git(root, "log", "-1", "--format=%B"))
    assert record is not None and record.action == "rollback"
    assert model_version_in_triton(canary_triton.http_url, model_name) == v1
    assert client.get_model_version_by_alias(model_name, "canary").version == v1

    # [6] git revert of the rollback: the file says v2 again and the stack follows the file
    git(root, "revert", "--no-edit", "HEAD")
    assert read_stage_file(root, "canary").model_version == v2
    result = reconcile_stage(ctx, "canary", registry=registry)
    assert result.action == "loaded"
    assert model_version_in_triton(canary_triton.http_url, model_name) == v2
    assert reconcile_stage(ctx, "canary", registry=registry).action == "unchanged"

    # [7] a Triton that serves another version than this machine last applied is not "unchanged":
    # v1 loaded behind the reconciler's back (as a failed load leaves the older version serving)
    build_repository(
        fetch_onnx(registry, v1, ctx.onnx_cache),
        ctx.local_repo_root / "canary",
        variant="python",
        model_name=model_name,
        version=int(v1),
        model_version=v1,
    )
    admin = TritonAdmin(canary_triton.http_url)
    try:
        admin.load(model_name)
    finally:
        admin.close()
    assert model_version_in_triton(canary_triton.http_url, model_name) == v1
    assert reconcile_stage(ctx, "canary", registry=registry).action == "loaded"
    assert model_version_in_triton(canary_triton.http_url, model_name) == v2

    # [8] the stack's watcher and a promote reconcile the same stage at once: one loads, the
    # other waits for it and finds the stage served (before the lock, both rebuilt and loaded)
    git(root, "revert", "--no-edit", "HEAD")  # the revert of the revert: v1 again
    assert read_stage_file(root, "canary").model_version == v1
    with ThreadPoolExecutor(2) as pool:
        both = list(pool.map(lambda _: reconcile_stage(ctx, "canary", registry=registry).action, range(2)))
    assert sorted(both) == ["loaded", "unchanged"], both
    assert model_version_in_triton(canary_triton.http_url, model_name) == v1
