"""The golden-set gate through ``promote`` against real MLflow and S3: worse refused, equal passed.

A golden set of phantom radiographs is built and published like ``cxr data golden build`` does,
with ground truth the test controls: every second image has one centred box of class 0, the
others are "No finding". The tiny ONNX detectors predict exactly that centred box, so the model in
production, an equal candidate (same box and class, another score) and a worse one (the box
labelled class 1) have known AP; the gate must pass the equal one, refuse the worse one with
nothing committed, and record its table in the commit, the MLflow version's card and a tag.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pydicom
import pytest
from mlflow.tracking import MlflowClient

from core.stage_file import StageFile, write_stage_file
from data_pipeline.config import DataSettings
from data_pipeline.golden import describe, write_pin
from data_pipeline.ingest import build_dataset
from data_pipeline.store import ObjectStore
from data_pipeline.synth import SynthConfig, generate
from data_pipeline.versioning import publish
from delivery.context import DeliveryContext
from delivery.errors import GateFailed
from delivery.golden_gate import GATE_NAME, golden_gate
from delivery.policy import GoldenPolicy
from delivery.promote import PromotionRequest, promote_version
from tests.integration.delivery.gitops_helpers import git, register_version, tiny_detector
from training.registry import ModelRegistry

pytestmark = [pytest.mark.integration, pytest.mark.slow]

GOLDEN_IMAGES = 24


def _centred_truth(synth: Path) -> Path:
    """Replace the phantoms' findings with one centred class-0 box on every second image."""
    rows = []
    for i, dicom in enumerate(sorted((synth / "dicom").glob("*.dicom"))):
        ds = pydicom.dcmread(dicom, stop_before_pixels=True)
        h, w = int(ds.Rows), int(ds.Columns)
        side = max(h, w) / 4  # the detectors' box: a quarter of the letterboxed input, centred
        for reader in ("R1", "R2", "R3"):
            if i % 2:
                rows.append([dicom.stem, "No finding", 14, reader, None, None, None, None])
            else:
                box = [w / 2 - side / 2, h / 2 - side / 2, w / 2 + side / 2, h / 2 + side / 2]
                rows.append([dicom.stem, "Aortic enlargement", 0, reader, *box])
    out = synth / "centred.csv"
    columns = ["image_id", "class_name", "class_id", "rad_id", "x_min", "y_min", "x_max", "y_max"]
    pd.DataFrame(rows, columns=columns).to_csv(out, index=False)
    return out


@pytest.fixture
def private_store(s3_store: Any) -> Iterator[ObjectStore]:
    store = ObjectStore(
        s3_store.endpoint, s3_store.access_key, s3_store.secret_key, f"golden-{secrets.token_hex(3)}"
    )
    store.ensure_bucket()
    yield store
    store.delete_prefix("")


def test_golden_gate_refuses_a_worse_model_and_passes_an_equal_one(
    mlflow_server: Any, private_store: ObjectStore, tmp_path: Path
) -> None:
    # [1] a GitOps repo whose golden set is pinned and published
    root = tmp_path / "gitops"
    root.mkdir()
    git(root, "init", "-q", "-b", "main")
    git(root, "config", "user.name", "Golden Test")
    git(root, "config", "user.email", "golden@example.org")
    synth = tmp_path / "synth"
    generate(
        SynthConfig(n_images=GOLDEN_IMAGES, seed=31, size=256, compressed_fraction=0.0, workers=1), synth
    )
    settings = DataSettings(max_side=128, workers=1, stack_dir=tmp_path / "data", gitops_dir=root)
    build = build_dataset(
        synth / "dicom", _centred_truth(synth), tmp_path / "ds", settings=settings, golden=True
    )
    publish(build.path, build.version, private_store, latest=False)
    write_pin(root, describe(build.path))
    name = f"cxr-detector-golden-{secrets.token_hex(3)}"
    prod = register_version(mlflow_server.uri, name, tiny_detector(tmp_path / "p" / "model.onnx", score=0.9))
    equal = register_version(mlflow_server.uri, name, tiny_detector(tmp_path / "e" / "model.onnx", score=0.8))
    worse = register_version(
        mlflow_server.uri, name, tiny_detector(tmp_path / "w" / "model.onnx", score=0.9, class_id=1)
    )
    for stage in ("staging", "canary", "production"):
        version = prod if stage == "production" else ""
        write_stage_file(root, StageFile(stage=stage, model_name=name, model_version=version))  # type: ignore[arg-type]
    git(root, "add", ".")
    git(root, "commit", "-q", "-m", "golden set pinned, v1 in production")
    ctx = DeliveryContext(
        gitops_dir=root,
        mlflow_uri=mlflow_server.uri,
        prometheus_url="http://127.0.0.1:9",
        stack_dir=tmp_path / "stack",
        model_name=name,
    )
    registry = ModelRegistry(mlflow_server.uri, name)
    lines: list[str] = []

    def promote(version: str) -> Any:
        request = PromotionRequest(version=version, to="canary", apply_local=False, publish=False)
        return promote_version(ctx, request, registry=registry, store=private_store, echo=lines.append)

    # [2] the worse model is refused and nothing is committed
    head = git(root, "rev-parse", "HEAD")
    with pytest.raises(GateFailed, match="golden set vs production"):
        promote(worse)
    assert git(root, "rev-parse", "HEAD") == head
    refused = next(line for line in lines if line.startswith(f"- {GATE_NAME}: FAIL"))
    assert "class 0" in refused, refused  # the class that got worse is named

    # [3] the equal model passes; the table is in the commit, the version's card and a tag
    lines.clear()
    outcome = promote(equal)
    assert outcome.commit is not None
    assert any(line.startswith(f"- {GATE_NAME}: pass") for line in lines), lines
    body = git(root, "log", "-1", "--format=%B")
    assert f"Golden set {build.version}" in body and "| overall (mAP) |" in body
    assert "| Aortic enlargement | 12 | +0.0000 | [+0.0000, +0.0000] |" in body
    version = MlflowClient(tracking_uri=mlflow_server.uri).get_model_version(name, equal)
    assert "## Golden set comparison (promotion to canary)" in version.description
    summary = json.loads(version.tags["golden_vs_production_canary"])
    assert summary["passed"] is True and summary["golden"] == build.version

    # [4] every model was evaluated once per golden version: the cache holds three results
    cached = sorted(
        p.name.split("-")[0] for p in (ctx.golden_cache / "results" / build.version).glob("*.json")
    )
    assert cached == sorted(f"v{v}" for v in (prod, equal, worse))


def test_without_a_pinned_golden_set_the_gate_fails_unless_the_policy_allows_it(tmp_path: Path) -> None:
    def gate(required: bool) -> Any:
        return golden_gate(
            gitops_dir=tmp_path,
            cache_dir=tmp_path / "cache",
            policy=GoldenPolicy(required=required),
            candidate="2",
            production="1",
            onnx_for=lambda v, _variant: tmp_path / f"{v}.onnx",
        )

    refused = gate(True)
    assert not refused.result.passed and "cxr data golden build" in refused.result.expected
    assert gate(False).result.passed
    first = golden_gate(
        gitops_dir=tmp_path,
        cache_dir=tmp_path,
        policy=GoldenPolicy(),
        candidate="1",
        production="",
        onnx_for=lambda v, _variant: tmp_path,
    )
    assert first.result.passed and "no production model yet" in first.result.observed
