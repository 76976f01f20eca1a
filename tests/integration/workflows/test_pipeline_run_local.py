"""`cxr pipeline run` end to end on real servers: synthetic DICOMs -> dataset version -> Ray training ->
registered model with lineage -> promotion commit to staging. Tiny sizes keep it near a minute.
"""

from __future__ import annotations

import json
import logging
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from mlflow.tracking import MlflowClient
from rich.console import Console

from data_pipeline.store import ObjectStore
from tests.fixtures.ray_workers import ray_train_workers
from workflows.config import WorkflowSettings, get_settings

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO_ROOT = Path(__file__).resolve().parents[3]

# The training integration tests' tiny recipe: 64 px, one Ray worker, one epoch.
TINY_TRAINING = {
    "name": "pipeline-it",
    "imgsz": 64,
    "epochs": 1,
    "batch_per_worker": 4,
    "dataset": "latest",
    "optim": {"nbs": 8, "warmup_epochs": 0},
    "augment": {"close_mosaic": 0},
    "scaling": {"num_workers": 1, "use_gpu": False, "cpus_per_worker": 1, "torch_threads": 1},
    "eval": {"parity_images": 4, "latency_repeats": 2},
}


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, text=True).stdout


@pytest.fixture
def pipeline_env(
    s3_store: Any, mlflow_server: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[dict[str, Any]]:
    """A private bucket, a private registered-model name and a temporary GitOps repo, set as CXR_* env."""
    from core.stage_file import StageFile, write_stage_file
    from data_pipeline.config import get_settings as data_settings

    bucket = f"pipeline-{secrets.token_hex(3)}"
    model_name = f"cxr-detector-pipeline-{secrets.token_hex(3)}"
    store = ObjectStore(s3_store.endpoint, s3_store.access_key, s3_store.secret_key, bucket, s3_store.region)
    store.ensure_bucket()
    gitops = tmp_path / "gitops"
    gitops.mkdir()
    _git(gitops, "init", "-q", "-b", "main")
    _git(gitops, "config", "user.name", "Pipeline Test")
    _git(gitops, "config", "user.email", "pipeline@example.org")
    for stage in ("staging", "canary", "production"):
        write_stage_file(gitops, StageFile(stage=stage, model_name=model_name))  # type: ignore[arg-type]
    shutil.copy(REPO_ROOT / "k8s" / "delivery-policy.yaml", gitops / "k8s" / "delivery-policy.yaml")
    _git(gitops, "add", ".")
    _git(gitops, "commit", "-q", "-m", "initial stage files")
    env = {
        **s3_store.env,
        "CXR_S3_BUCKET": bucket,
        "CXR_MLFLOW_URI": mlflow_server.uri,
        "CXR_REGISTERED_MODEL": model_name,  # training
        "CXR_MODEL_NAME": model_name,  # serving / promote
        "CXR_GITOPS_DIR": str(gitops),
        "CXR_STACK_DIR": str(tmp_path / "stack"),
        "CXR_MAX_SIDE": "128",
        "CXR_TRITON_STAGING_URL": "127.0.0.1:9",  # no local Triton: promote warns, the commit stands
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    data_settings.cache_clear()
    get_settings.cache_clear()
    yield {"store": store, "gitops": gitops, "model_name": model_name, "mlflow": mlflow_server.uri}
    data_settings.cache_clear()
    get_settings.cache_clear()
    store.delete_prefix("")


def test_local_run_goes_from_synthetic_dicoms_to_a_staging_promotion(
    pipeline_env: dict[str, Any], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from core.stage_file import read_stage_file
    from data_pipeline.versioning import latest_version
    from workflows.runner import RunOptions, run_pipeline, summary_table

    source = tmp_path / "synth"
    # `cxr data synth` in its own process, as a user runs it (rendering in this process first would
    # leave its threads behind for the ingest's forked pool workers)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "data_pipeline",
            "synth",
            "--out",
            str(source),
            "--n-images",
            "16",
            "--seed",
            "7",
            "--size",
            "320",
            "--compressed-fraction",
            "0",
            "--workers",
            "1",
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY_TRAINING))
    options = RunOptions(
        source=str(source),
        training_config=config,
        base_model="production",  # production is empty: trains from scratch and says so
        epochs=0,
        workers=1,
        include_feedback=True,
        promote=True,
        run_name="it-run",
        work_dir=tmp_path / "work",
    )
    console = Console(record=True, width=140)
    caplog.set_level(logging.INFO)
    summary = run_pipeline(
        options, WorkflowSettings(prelaunch_training=True), store=pipeline_env["store"], console=console
    )
    console.print(summary_table(summary))
    shown = console.export_text()

    assert summary.succeeded, f"{summary.failed_step}: {summary.error}\n{shown}"
    assert [s.status for s in summary.steps] == ["ok"] * 8
    # the train step trained on the Ray workers started beside the data steps (training/prelaunch.py)
    assert "event=prelaunch_start" in caplog.text and "prelaunched=1" in caplog.text
    assert "prelaunch_cancelled" not in caplog.text
    # the dataset version is the one published, and the model carries it as lineage
    assert summary.dataset_version == latest_version(pipeline_env["store"])
    assert summary.base_model_version is None
    client = MlflowClient(tracking_uri=pipeline_env["mlflow"])
    version = client.get_model_version(pipeline_env["model_name"], summary.model_version)
    assert version.tags["dataset_version"] == summary.dataset_version
    assert version.run_id == summary.run_id
    # the train step read the version from the fetch cache the build step seeded (hard links), not
    # downloaded back from the store it had just been uploaded to
    built = options.work_dir / "datasets" / summary.dataset_version
    cached = tmp_path / "stack" / "datasets" / summary.dataset_version
    image = next((cached / "images" / "train").glob("*.png"))
    assert image.stat().st_ino == (built / image.relative_to(cached)).stat().st_ino
    assert {"map50", "map40"} <= set(summary.metrics)
    # promoted by one commit that set the staging stage file to the new version
    assert summary.promoted and summary.commit
    staging = read_stage_file(pipeline_env["gitops"], "staging")
    assert staging.model_version == summary.model_version
    assert _git(pipeline_env["gitops"], "rev-parse", "HEAD").strip() == summary.commit
    assert _git(pipeline_env["gitops"], "show", "--name-only", "--format=", "HEAD").split() == [
        "k8s/overlays/staging/model.yaml"
    ]
    # the summary says all of it, on screen and on disk
    for needle in (summary.dataset_version[:12], summary.run_id, f"v{summary.model_version}", "mAP@0.5"):
        assert needle in shown
    saved = json.loads((options.work_dir / "summary.json").read_text())
    assert saved["model_version"] == summary.model_version and saved["promoted"] is True


def test_a_run_that_fails_before_training_ends_its_prelaunched_ray_workers(
    pipeline_env: dict[str, Any], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """validate fails (an annotated image has no file): the workers started at the run's start never
    train, and the Ray the run started is shut down, so nothing of it outlives the command."""
    import ray

    from workflows.runner import RunOptions, run_pipeline

    source = tmp_path / "broken"
    (source / "dicom").mkdir(parents=True)
    (source / "dicom" / "a.dicom").write_bytes(b"DICM")
    (source / "annotations.csv").write_text(
        "image_id,class_name,class_id,rad_id,x_min,y_min,x_max,y_max\n"
        "a,No finding,14,R1,,,,\nb,No finding,14,R1,,,,\n"
    )
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY_TRAINING))
    options = RunOptions(
        source=str(source),
        training_config=config,
        base_model="none",
        epochs=0,
        workers=1,
        include_feedback=False,
        promote=False,
        run_name="it-broken",
        work_dir=tmp_path / "work",
    )
    caplog.set_level(logging.INFO)
    ray_was_up = ray.is_initialized()
    settings = WorkflowSettings(prelaunch_training=True)  # whatever this machine's environment says
    summary = run_pipeline(options, settings, store=pipeline_env["store"], console=Console(width=140))
    assert summary.failed_step == "validate" and "no file" in (summary.error or "")
    assert "event=prelaunch_start" in caplog.text
    assert "event=prelaunch_cancelled" in caplog.text and "the run ended at step validate" in caplog.text
    # the cancelled workers are gone; the Ray the run started is shut down (in `make test` the
    # training tests' session Ray may be up already: the run joined it and leaves it to them)
    deadline = time.monotonic() + 60
    while ray_train_workers() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not ray_train_workers()
    if not ray_was_up:
        assert not ray.is_initialized()
    assert not list((tmp_path / "stack").glob("training/*/rank0/weights"))  # nothing trained
