"""The one-machine reconcile: "unchanged" means that very version served; one reconcile of a stage at a time;
it builds only from the ONNX bytes the version's lineage tag records.

Triton is a stand-in here (its real counterpart: tests/integration/delivery/test_gitops_promote_stack.py,
steps [7] and [8]); the repository is someone else's (``build_local=False``), so no ONNX is needed,
or (the ONNX cache's tests) a recorder of what would have been built from which bytes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from filelock import FileLock

import delivery.reconcile as rec
from core.stage_file import StageFile, write_stage_file
from delivery.context import DeliveryContext
from delivery.errors import ReconcileError
from delivery.onnx_cache import OnnxIntegrityError
from tests.unit.delivery.registry_support import TaggedRegistry, sha256

pytestmark = pytest.mark.unit

MODEL = "cxr-detector"


class FakeTriton:
    """TritonAdmin's surface: ``load`` serves what the repository holds (``repository``)."""

    repository = ""
    served: dict[str, str] = {}
    loads: list[str] = []

    def __init__(self, url: str, *, timeout_s: float = 60.0) -> None:
        self.url = url

    def load(self, model_name: str = MODEL) -> None:
        FakeTriton.loads.append(FakeTriton.repository)
        FakeTriton.served[model_name] = FakeTriton.repository

    def unload(self, model_name: str = MODEL) -> None:
        FakeTriton.served.pop(model_name, None)

    def require_live(self) -> None:
        pass

    def is_ready(self, model_name: str = MODEL, version: str = "") -> bool:
        served = FakeTriton.served.get(model_name)
        return served is not None and (not version or served == version)

    def wait_ready(self, model_name: str = MODEL, timeout_s: float = 60.0, version: str = "") -> bool:
        return self.is_ready(model_name, version)

    def close(self) -> None:
        pass


@pytest.fixture
def ctx(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> DeliveryContext:
    monkeypatch.setattr("serving.inference.triton_repo.TritonAdmin", FakeTriton)
    monkeypatch.setattr(FakeTriton, "served", {})
    monkeypatch.setattr(FakeTriton, "loads", [])
    write_stage_file(tmp_path / "gitops", StageFile(stage="canary", model_version="3", canary_weight=10))
    return DeliveryContext(
        gitops_dir=tmp_path / "gitops",
        mlflow_uri="http://mlflow.invalid",
        prometheus_url="http://prometheus.invalid",
        stack_dir=tmp_path / "stack",
        triton_urls=(("canary", "127.0.0.1:1"),),
    )


def _reconcile(ctx: DeliveryContext) -> Any:
    return rec.reconcile_stage(ctx, "canary", build_local=False)


def test_unchanged_only_while_triton_serves_that_very_version(ctx: DeliveryContext) -> None:
    FakeTriton.repository = "3"
    assert _reconcile(ctx).action == "loaded"
    assert _reconcile(ctx).action == "unchanged" and FakeTriton.loads == ["3"]
    # the record says v3, but the Triton went back to v2 (a failed load keeps the older one)
    FakeTriton.served[MODEL] = "2"
    assert _reconcile(ctx).action == "loaded" and FakeTriton.served[MODEL] == "3"
    applied = json.loads(next((ctx.stack_dir / "gitops").glob("applied-canary-*.json")).read_text())
    assert applied["model_version"] == "3"


def test_a_stage_whose_lock_is_held_is_refused_with_a_message_naming_it(
    ctx: DeliveryContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(rec, "LOCK_TIMEOUT_S", 0.05)
    path = rec.stage_lock_path(ctx, "canary")
    path.parent.mkdir(parents=True)
    with (
        FileLock(path),
        pytest.raises(ReconcileError, match=r"another reconcile of stage canary held its lock"),
    ):
        _reconcile(ctx)
    assert FakeTriton.loads == []


def test_an_unwritable_stack_folder_is_a_reconcile_error_not_a_traceback(ctx: DeliveryContext) -> None:
    ctx.stack_dir.write_text("a file where the stack folder belongs")
    with pytest.raises(ReconcileError, match=r"cannot reconcile stage canary: .*must be writable"):
        _reconcile(ctx)


# ---------------------------------------------------------- the ONNX it builds from (delivery/onnx_cache.py)


@pytest.fixture
def built(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str, str, bytes]]:
    """Each repository the reconcile builds: (model name, version, variant, the ONNX bytes put in it)."""
    builds: list[tuple[str, str, str, bytes]] = []

    def build_repository(onnx: Path, repo: Path, **kw: Any) -> Path:
        builds.append((kw["model_name"], kw["model_version"], kw["precision"], onnx.read_bytes()))
        FakeTriton.repository = kw["model_version"]
        return repo / kw["model_name"]

    monkeypatch.setattr("serving.inference.triton_repo.build_repository", build_repository)
    return builds


def _build(ctx: DeliveryContext, registry: TaggedRegistry) -> Any:
    return rec.reconcile_stage(ctx, "canary", registry=registry, force=True)  # type: ignore[arg-type]


def test_reconcile_builds_from_the_bytes_the_lineage_tag_records_cached_by_name_and_hash(
    ctx: DeliveryContext, built: list[tuple[str, str, str, bytes]]
) -> None:
    registry = TaggedRegistry().register("3", b"model A")
    assert _build(ctx, registry).action == "loaded"
    assert built == [(MODEL, "3", "fp32", b"model A")] and FakeTriton.loads == ["3"]
    cached = rec.fetch_onnx(registry, "3", ctx.onnx_cache)  # type: ignore[arg-type]
    assert cached.read_bytes() == b"model A"
    assert cached.relative_to(ctx.onnx_cache).parts[:2] == (MODEL, sha256(b"model A"))  # name, then hash
    assert registry.downloads == [("3", "fp32")]  # downloaded once
    assert sorted(p.name for p in cached.parent.iterdir() if not p.name.startswith("operating_points")) == [
        "model.onnx",
        "variant",
    ]  # no download folder or temp file left beside it


def test_a_cached_file_of_another_model_name_or_registry_is_not_reused(
    ctx: DeliveryContext, built: list[tuple[str, str, str, bytes]]
) -> None:
    _build(ctx, TaggedRegistry().register("3", b"model A"))
    # the registry was reset: version 3 is another model now, at the same address
    _build(ctx, TaggedRegistry().register("3", b"model C after a reset"))
    # the stage file names another registered model, whose version 3 is its own
    write_stage_file(
        ctx.gitops_dir, StageFile(stage="canary", model_name="cxr-other", model_version="3", canary_weight=10)
    )
    _build(ctx, TaggedRegistry("cxr-other").register("3", b"model D"))
    # versions without a hash tag (before onnx_sha256 existed) are cached per registry and version
    _build(ctx, TaggedRegistry("cxr-other", "http://a.invalid").register("3", b"untagged E", tagged=False))
    _build(ctx, TaggedRegistry("cxr-other", "http://b.invalid").register("3", b"untagged F", tagged=False))
    assert [b[3] for b in built] == [
        b"model A",
        b"model C after a reset",
        b"model D",
        b"untagged E",
        b"untagged F",
    ]
    assert built[2][0] == built[3][0] == "cxr-other"


def test_a_download_whose_bytes_differ_from_the_tag_is_refused_and_nothing_is_served(
    ctx: DeliveryContext, built: list[tuple[str, str, str, bytes]]
) -> None:
    registry = TaggedRegistry().register("3", b"registered")
    registry.swap("3", b"swapped in the artifact store")
    with pytest.raises(OnnxIntegrityError) as refused:
        _build(ctx, registry)
    message = str(refused.value)
    assert f"{MODEL} v3" in message
    assert sha256(b"registered")[:12] in message
    assert sha256(b"swapped in the artifact store")[:12] in message
    assert "re-register" in message and "artifact store" in message
    assert built == [] and FakeTriton.loads == []
    assert list(ctx.onnx_cache.rglob("*.onnx")) == []  # nothing cached either
    assert not list((ctx.stack_dir / "gitops").glob("applied-canary-*.json"))


def test_a_cached_file_that_no_longer_matches_its_tag_is_fetched_again_never_served(
    ctx: DeliveryContext, built: list[tuple[str, str, str, bytes]]
) -> None:
    registry = TaggedRegistry().register("3", b"registered")
    _build(ctx, registry)
    cached = rec.fetch_onnx(registry, "3", ctx.onnx_cache)  # type: ignore[arg-type]
    cached.write_bytes(b"damaged")
    _build(ctx, registry)  # downloaded again: the registered bytes
    assert [b[3] for b in built] == [b"registered", b"registered"]
    cached.write_bytes(b"damaged")
    registry.swap("3", b"swapped")  # and the store's copy no longer matches either: refused
    with pytest.raises(OnnxIntegrityError):
        _build(ctx, registry)
    assert len(built) == 2 and not cached.exists()


def test_a_variant_is_checked_against_its_own_sha256_tag(
    ctx: DeliveryContext, built: list[tuple[str, str, str, bytes]]
) -> None:
    registry = TaggedRegistry().register("3", b"fp32 export").register("3", b"int8 file", "int8")
    write_stage_file(
        ctx.gitops_dir, StageFile(stage="canary", model_version="3", variant="int8", canary_weight=10)
    )
    _build(ctx, registry)
    assert built == [(MODEL, "3", "int8", b"int8 file")]
    registry.swap("3", b"another int8 file", "int8")
    with pytest.raises(OnnxIntegrityError, match=r"variant_int8_sha256"):
        rec.fetch_onnx(registry, "3", ctx.onnx_cache / "fresh", "int8")  # type: ignore[arg-type]


def test_while_mlflow_is_down_a_cached_file_that_still_matches_its_tag_is_served(
    ctx: DeliveryContext, built: list[tuple[str, str, str, bytes]]
) -> None:
    """A Triton restarted or a rollback while the registry is down must not leave a stage serving
    nothing when the version's checked file is in the cache; what the cache cannot vouch for is not served."""
    from training.errors import RegistryUnreachable

    registry = TaggedRegistry().register("3", b"model A").register("4", b"model B")
    cached = rec.fetch_onnx(registry, "3", ctx.onnx_cache)  # type: ignore[arg-type]
    registry.offline = True
    assert rec.fetch_onnx(registry, "3", ctx.onnx_cache) == cached  # type: ignore[arg-type]
    assert registry.downloads == [("3", "fp32")]
    with pytest.raises(RegistryUnreachable):  # never fetched: nothing to serve
        rec.fetch_onnx(registry, "4", ctx.onnx_cache)  # type: ignore[arg-type]
    with pytest.raises(RegistryUnreachable):  # another variant of a cached version: not this file
        rec.fetch_onnx(registry, "3", ctx.onnx_cache, "int8")  # type: ignore[arg-type]
    cached.write_bytes(b"damaged")
    with pytest.raises(RegistryUnreachable):  # no longer the checked bytes: not served
        rec.fetch_onnx(registry, "3", ctx.onnx_cache)  # type: ignore[arg-type]


def test_a_gitops_dir_that_is_not_there_unloads_and_unpublishes_nothing(ctx: DeliveryContext) -> None:
    """A missing stage file means "serves nothing": a CXR_GITOPS_DIR naming no folder (a typo) read as
    "no stage serves anything", and the reconcile unloaded every stage's model and said so, exit 0."""
    FakeTriton.repository = "3"
    assert _reconcile(ctx).action == "loaded"
    typo = DeliveryContext(
        gitops_dir=ctx.gitops_dir.parent / "gitopz",
        mlflow_uri=ctx.mlflow_uri,
        prometheus_url=ctx.prometheus_url,
        stack_dir=ctx.stack_dir,
        triton_urls=ctx.triton_urls,
    )
    with pytest.raises(ReconcileError, match="not a GitOps checkout"):
        rec.reconcile_stage(typo, "canary", build_local=False)
    assert FakeTriton.served == {MODEL: "3"}, "the stage's model was unloaded"

    class Store:
        deleted: list[str] = []

        def delete_prefix(self, prefix: str) -> int:
            self.deleted.append(prefix)
            return 1

    store = Store()
    with pytest.raises(ReconcileError, match="not a GitOps checkout"):
        rec.publish_stage(typo, "production", store=store)
    assert store.deleted == [], "every replica of the stage would have unloaded its model"


def test_a_stage_naming_nothing_whose_triton_does_not_answer_is_an_error_not_unloaded(tmp_path: Path) -> None:
    """Triton's readiness call answers False for a server that does not answer at all: the stage was
    reported (and recorded) "unloaded", and every later reconcile "unchanged" without asking again."""
    import socket

    write_stage_file(tmp_path / "gitops", StageFile(stage="staging"))
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = DeliveryContext(
        gitops_dir=tmp_path / "gitops",
        mlflow_uri="http://mlflow.invalid",
        prometheus_url="http://prometheus.invalid",
        stack_dir=tmp_path / "stack",
        triton_urls=(("staging", f"127.0.0.1:{port}"),),
    )
    for _ in range(2):
        with pytest.raises(ReconcileError, match="is the stack up"):
            rec.reconcile_stage(ctx, "staging", build_local=False)
    assert rec.applied_version(ctx, "staging", f"127.0.0.1:{port}") is None
