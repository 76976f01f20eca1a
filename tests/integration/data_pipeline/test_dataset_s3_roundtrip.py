"""Dataset versions through a real S3 server (SeaweedFS): publish, fetch, feedback merge, outages."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from typer.testing import CliRunner

from data_pipeline.cli import app
from data_pipeline.config import DataSettings
from data_pipeline.errors import DatasetNotFound, StoreError
from data_pipeline.feedback import put_feedback
from data_pipeline.ingest import build_dataset
from data_pipeline.synth import SynthConfig, generate
from data_pipeline.versioning import fetch_dataset, list_versions, publish, verify

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth-s3")
    generate(SynthConfig(n_images=10, seed=11, size=256, workers=1), out)
    return out


def _settings() -> DataSettings:
    return DataSettings(max_side=128, workers=1)


def test_ingest_uploads_and_fetch_downloads_the_same_version(
    phantoms: Path, tmp_path: Path, s3_store: Any
) -> None:
    store = s3_store.store()
    build = build_dataset(
        phantoms / "dicom",
        phantoms / "annotations.csv",
        tmp_path / "out",
        settings=_settings(),
        store=store,
        feedback=False,
        cache_dir=tmp_path / "seeded",
    )
    assert build.published
    assert build.version in list_versions(store)
    # the published version is also in the fetch cache it was given (the local runner's train step)
    assert verify(tmp_path / "seeded" / build.version)["version"] == build.version

    fetched = fetch_dataset(build.version, tmp_path / "cache", store)
    manifest = verify(fetched)
    assert manifest["version"] == build.version
    local = {p.relative_to(build.path).as_posix() for p in build.path.rglob("*") if p.is_file()}
    remote = {p.relative_to(fetched).as_posix() for p in fetched.rglob("*") if p.is_file()}
    assert local == remote
    assert (fetched / "data.yaml").read_text().count(str(fetched.resolve())) == 1

    # publishing again sends nothing but the manifest (idempotent upload)
    assert publish(build.path, build.version, store) == 1
    # a second fetch is served from the cache
    assert fetch_dataset(build.version, tmp_path / "cache", store) == fetched
    assert fetch_dataset("latest", tmp_path / "cache2", store).name == build.version


def test_unknown_version_is_a_typed_error_listing_known_ones(tmp_path: Path, s3_store: Any) -> None:
    with pytest.raises(DatasetNotFound, match="not in"):
        fetch_dataset("0000000000000000", tmp_path, s3_store.store())


def test_feedback_rows_in_s3_change_the_next_version(
    phantoms: Path, tmp_path: Path, s3_store_factory: Any
) -> None:
    server = s3_store_factory()
    store = server.store()
    first = build_dataset(
        phantoms / "dicom", phantoms / "annotations.csv", tmp_path / "v1", settings=_settings(), store=store
    )
    image_id = sorted(first.manifest["images"])[0]
    correction = pd.DataFrame(
        [[image_id, "Pleural effusion", 10, "radiologist-7", 20.0, 150.0, 120.0, 240.0]],
        columns=["image_id", "class_name", "class_id", "rad_id", "x_min", "y_min", "x_max", "y_max"],
    )
    put_feedback(store, "review-0001", correction)
    # an item without its feedback.json marker is still being uploaded: it must be ignored
    store.put_bytes("feedback/review-0002/annotations.csv", correction.to_csv(index=False).encode())
    # a correction of an image the DICOM folder does not have: its bytes come with the feedback
    new_image = sorted((phantoms / "dicom").iterdir())[-1].read_bytes()
    extra = correction.assign(image_id="feedbackonly0001", class_id=8, class_name="Nodule/Mass")
    put_feedback(store, "review-0003", extra, image=new_image, image_ext="dcm")
    second = build_dataset(
        phantoms / "dicom", phantoms / "annotations.csv", tmp_path / "v2", settings=_settings(), store=store
    )
    assert second.version != first.version
    # an item is merged only with its own image: review-0001 would have relabelled an image of the
    # DICOM folder (whose labels are the readers'), so it is skipped, said in the manifest
    assert second.manifest["source"]["feedback_objects"] == ["feedback/review-0003/annotations.csv"]
    assert list(second.manifest["source"]["feedback_skipped"]) == ["review-0001"]
    assert "feedbackonly0001" in second.manifest["images"]
    fused = pd.read_csv(second.path / "annotations_fused.csv")
    assert fused[fused["image_id"] == "feedbackonly0001"]["class_id"].tolist() == [8]
    before = pd.read_csv(first.path / "annotations_fused.csv")
    kept = fused[fused["image_id"] == image_id].reset_index(drop=True)
    assert kept.equals(before[before["image_id"] == image_id].reset_index(drop=True))


def test_a_stopped_store_fails_fast_with_a_typed_error_and_recovers(s3_store_factory: Any) -> None:
    server = s3_store_factory()
    store = server.store()
    store.put_bytes("probe/x", b"1")
    server.stop()
    started = time.perf_counter()
    with pytest.raises(StoreError, match="unreachable"):
        store.list_prefix("probe/")
    assert time.perf_counter() - started < 15
    server.start()
    # SeaweedFS answers 500 for a moment after a restart while its volume server registers: poll
    deadline = time.monotonic() + 30
    while True:
        try:
            assert store.get_bytes("probe/x") == b"1"
            break
        except StoreError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def test_cli_synth_then_ingest_publishes_a_version(tmp_path: Path, s3_store: Any) -> None:
    runner = CliRunner()
    env = {
        **s3_store.env,
        "CXR_MAX_SIDE": "128",
        "CXR_WORKERS": "1",
        "CXR_STACK_DIR": str(tmp_path / "stack"),
    }
    synth = runner.invoke(
        app,
        [
            "synth",
            "--out",
            str(tmp_path / "s"),
            "--n-images",
            "6",
            "--seed",
            "5",
            "--size",
            "256",
            "--workers",
            "1",
        ],
        env=env,
    )
    assert synth.exit_code == 0, synth.output
    ingest = runner.invoke(
        app,
        [
            "ingest",
            "--dicom-dir",
            str(tmp_path / "s" / "dicom"),
            "--annotations",
            str(tmp_path / "s" / "annotations.csv"),
            "--out",
            str(tmp_path / "d"),
            "--upload",
            "yes",
            "--no-feedback",
        ],
        env=env,
    )
    assert ingest.exit_code == 0, ingest.output
    version = ingest.output.strip().splitlines()[-1]
    assert version in list_versions(s3_store.store())
    fetched = runner.invoke(app, ["fetch", version, "--cache-dir", str(tmp_path / "c")], env=env)
    assert fetched.exit_code == 0, fetched.output
    assert Path(fetched.output.strip().splitlines()[-1]).name == version


def test_cli_buckets_creates_the_missing_buckets_and_is_idempotent(tmp_path: Path, s3_store: Any) -> None:
    """The cluster's and compose's first step: MinIO starts without the buckets everything writes to."""
    from data_pipeline.store import ObjectStore

    env = {**s3_store.env, "CXR_S3_BUCKET": "fresh-cxr", "CXR_STACK_DIR": str(tmp_path / "stack")}
    for _ in range(2):
        result = CliRunner().invoke(app, ["buckets", "--bucket", "fresh-mlflow"], env=env)
        assert result.exit_code == 0, result.output
    for name in ("fresh-cxr", "fresh-mlflow"):
        store = ObjectStore(s3_store.endpoint, s3_store.access_key, s3_store.secret_key, name)
        store.put_bytes("probe", b"ok")
        assert store.get_bytes("probe") == b"ok"
