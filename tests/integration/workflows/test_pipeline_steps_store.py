"""The store-facing pipeline steps against a real (private) S3 server: feedback trigger, staging, records."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from workflows import steps
from workflows.config import WorkflowSettings, get_settings
from workflows.errors import HandoffMissing, SourceNotFound
from workflows.pipeline_cli import app

pytestmark = pytest.mark.integration


@pytest.fixture
def server(
    s3_store_factory: Callable[[], Any], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> Iterator[Any]:
    """A private S3 server (feedback counts must not see other tests' objects), set as the CXR_S3_* env."""
    srv = s3_store_factory()
    for key, value in srv.env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("CXR_STACK_DIR", str(tmp_path / "stack"))
    from data_pipeline.config import get_settings as data_settings

    data_settings.cache_clear()
    get_settings.cache_clear()
    yield srv
    data_settings.cache_clear()
    get_settings.cache_clear()


def _feedback(store: Any, feedback_id: str, *, complete: bool = True) -> str:
    csv_key = f"feedback/{feedback_id}/annotations.csv"
    store.put_bytes(csv_key, b"image_id,class_name,class_id,rad_id,x_min,y_min,x_max,y_max\n")
    if complete:
        store.put_bytes(
            f"feedback/{feedback_id}/feedback.json", json.dumps({"feedback_id": feedback_id}).encode()
        )
    return csv_key


def _publish_manifest(
    store: Any, version: str, feedback_objects: list[str], skipped: dict[str, str] | None = None
) -> None:
    """What data_pipeline.versioning.publish leaves: the manifest, then datasets/LATEST."""
    from data_pipeline.versioning import LATEST, MANIFEST, version_prefix

    source = {"feedback_objects": feedback_objects, "feedback_skipped": skipped or {}}
    manifest = {"version": version, "source": source}
    store.put_bytes(version_prefix(version) + MANIFEST, json.dumps(manifest).encode())
    store.put_bytes(LATEST, version.encode())


def test_feedback_trigger_counts_only_complete_items_newer_than_the_latest_dataset(server: Any) -> None:
    store = server.store()
    settings = WorkflowSettings()
    keys = [_feedback(store, f"fb-{i}") for i in range(3)]
    _feedback(store, "fb-half-written", complete=False)  # no feedback.json yet: not an item

    first = steps.check_feedback(threshold=3, store=store, settings=settings)
    assert (first.new_items, first.should_retrain, first.last_dataset_version) == (3, True, None)

    _publish_manifest(store, "00000000000000ab", keys[:2])  # a dataset version merged two of them
    after = steps.check_feedback(threshold=3, store=store, settings=settings)
    assert (after.new_items, after.should_retrain, after.last_dataset_version) == (
        1,
        False,
        "00000000000000ab",
    )
    # one it skipped (no image of its own) was judged: not new for ever
    _publish_manifest(store, "00000000000000ac", keys[:2], {"fb-2": "it holds no image"})
    judged = steps.check_feedback(threshold=1, store=store, settings=settings)
    assert (judged.new_items, judged.should_retrain) == (0, False)


def test_check_feedback_command_writes_argo_output_files(server: Any, tmp_path: Path) -> None:
    store = server.store()
    for i in range(2):
        _feedback(store, f"cli-{i}")
    outputs = tmp_path / "outputs"
    result = CliRunner().invoke(
        app, ["step", "check-feedback", "--threshold", "2", "--outputs", str(outputs)]
    )
    assert result.exit_code == 0, result.output
    assert (outputs / "new-feedback").read_text() == "2"
    assert (outputs / "should-retrain").read_text() == "true"  # what the CronWorkflow's `when` compares
    assert json.loads((outputs / "result.json").read_text())["threshold"] == 2


def test_ingest_downloads_an_s3_source_into_the_artifact_folder(server: Any, tmp_path: Path) -> None:
    store = server.store()
    source = tmp_path / "incoming"
    (source / "dicom").mkdir(parents=True)
    for name in ("a", "b"):
        (source / "dicom" / f"{name}.dicom").write_bytes(b"DICM" + name.encode())
    (source / "annotations.csv").write_text("image_id,class_name,class_id,rad_id,x_min,y_min,x_max,y_max\n")
    store.upload_dir(source, "incoming/batch-1")
    _feedback(store, "waiting")

    dest = tmp_path / "staged"
    result = steps.ingest(
        f"s3://{store.bucket}/incoming/batch-1", dest=dest, include_feedback=True, store=store
    )
    assert result.staged.dicom_dir == dest / "dicom" and result.staged.annotations_csv.exists()
    assert (result.n_images, result.n_feedback_items) == (2, 1)
    assert (dest / "dicom" / "b.dicom").read_bytes() == b"DICMb"

    with pytest.raises(SourceNotFound, match="nothing under"):
        steps.ingest(
            f"s3://{store.bucket}/incoming/empty", dest=tmp_path / "e", include_feedback=False, store=store
        )


def test_train_record_travels_between_cluster_steps_and_a_missing_one_is_named(server: Any) -> None:
    store = server.store()
    settings = WorkflowSettings()
    with pytest.raises(HandoffMissing, match="did not finish"):
        steps.load_train_handoff(store, settings, "cxr-retrain-x1")
    record = steps.TrainResult(
        run_name="cxr-retrain-x1",
        run_id="r1",
        model_version="4",
        dataset_version="d1",
        base_model_version="3",
        metrics={"test/map50": 0.5, "test/map40": 0.45},
    )
    steps.save_handoff(store, settings, "cxr-retrain-x1", "train", record)
    assert steps.load_train_handoff(store, settings, "cxr-retrain-x1") == record


def test_exit_handler_records_a_failed_run_with_its_failures(server: Any) -> None:
    failures = json.dumps([{"displayName": "train", "message": "RayJob FAILED", "phase": "Failed"}])
    result = CliRunner().invoke(
        app, ["step", "record-exit", "--run-name", "wf-9", "--status", "Failed", "--failures", failures]
    )
    assert result.exit_code == 0, result.output
    stored = json.loads(server.store().get_bytes("pipelines/wf-9/exit.json"))
    assert stored["status"] == "Failed"
    assert stored["failures"][0]["message"] == "RayJob FAILED"


def test_store_outage_ends_a_step_with_one_readable_line(
    s3_store_factory: Callable[[], Any], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    srv = s3_store_factory()
    for key, value in srv.env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("CXR_STACK_DIR", str(tmp_path / "stack"))
    from data_pipeline.config import get_settings as data_settings

    data_settings.cache_clear()
    srv.stop()
    try:
        result = CliRunner().invoke(app, ["step", "check-feedback", "--threshold", "1"])
    finally:
        data_settings.cache_clear()
    assert result.exit_code == 1
    assert "unreachable" in result.output and "Traceback" not in result.output


def test_latest_source_is_the_folder_the_latest_dataset_was_built_from(server: Any, tmp_path: Path) -> None:
    from data_pipeline.versioning import LATEST, MANIFEST, version_prefix

    store = server.store()
    with pytest.raises(SourceNotFound, match="no dataset version yet"):
        steps.ingest("latest", dest=None, include_feedback=False, store=store)
    src = tmp_path / "studies"
    (src / "dicom").mkdir(parents=True)
    (src / "dicom" / "x.dicom").write_bytes(b"DICM")
    (src / "annotations.csv").write_text("image_id,class_name,class_id,rad_id,x_min,y_min,x_max,y_max\n")
    source = {
        "dicom_dir": str(src / "dicom"),
        "annotations": str(src / "annotations.csv"),
        "feedback_objects": [],
    }
    version = "00000000000000a1"
    manifest = {"version": version, "source": source}
    store.put_bytes(version_prefix(version) + MANIFEST, json.dumps(manifest).encode())
    store.put_bytes(LATEST, version.encode())
    staged = steps.ingest("latest", dest=None, include_feedback=False, store=store).staged
    assert (staged.dicom_dir, staged.annotations_csv) == (src / "dicom", src / "annotations.csv")
    (src / "annotations.csv").unlink()  # built on another machine: say so instead of failing later
    with pytest.raises(SourceNotFound, match="not on this machine"):
        steps.ingest("latest", dest=None, include_feedback=False, store=store)
