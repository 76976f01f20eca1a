"""The one-machine reconcile: "unchanged" means that very version served; one reconcile of a stage at a time.

Triton is a stand-in here (its real counterpart: tests/integration/delivery/test_gitops_promote_stack.py,
steps [7] and [8]); the repository is someone else's (``build_local=False``), so no ONNX is needed.
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
