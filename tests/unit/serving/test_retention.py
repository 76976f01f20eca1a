"""Identified sources are deleted after their retention by a job whose last run `make status` shows."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from serving.results import ResultRecord, ResultStore, Retention
from tests.unit.serving.serving_support import make_dicom

pytestmark = pytest.mark.unit


def test_local_journal_drops_sources_after_hours_and_results_after_days(tmp_path: Path) -> None:
    store = ResultStore(
        None, local_dir=tmp_path, retention=Retention(timedelta(days=30), timedelta(hours=24))
    )
    now = datetime.now(UTC)
    ages = {"fresh": timedelta(0), "day-old": timedelta(hours=25), "month-old": timedelta(days=31)}
    for rid, age in ages.items():
        store.journal(ResultRecord(rid, {"request_id": rid}, "dicom", b"DICM-bytes", now - age, "t"))
    report = ResultStore(None, local_dir=tmp_path, retention=store.retention).purge(now)
    assert (report.results, report.sources) == (1, 1)
    assert (tmp_path / "fresh" / "source.dcm").exists()
    assert (tmp_path / "day-old" / "result.json").exists() and not (
        tmp_path / "day-old" / "source.dcm"
    ).exists()
    assert not (tmp_path / "month-old").exists()
    reopened = ResultStore(None, local_dir=tmp_path, retention=store.retention)
    assert reopened.get("day-old", "t").source is None  # the result stays readable, its image is gone
    assert reopened.get("fresh", "t").source == b"DICM-bytes"


def test_the_retention_job_runs_at_start_and_stack_status_shows_it(
    onnx_client: TestClient, keys: dict[str, str]
) -> None:
    from serving.gateway.app import run_retention
    from stack.cli import retention_summary
    from stack.config import StackSettings

    state = onnx_client.app.state.cxr  # type: ignore[attr-defined]
    r = onnx_client.post(
        "/v1/detect",
        content=make_dicom(seed=90),
        headers={"X-API-Key": keys["pacs"], "Content-Type": "application/dicom"},
    )
    rid = r.json()["request_id"]
    folder = state.settings.resolved_results_dir / rid
    assert (folder / "source.dcm").exists()  # journalled before the answer
    old = state.results.get(rid, "default")
    old.created -= timedelta(hours=state.settings.source_retention_hours + 1)  # as if answered a day ago
    (folder / "result.json").write_text(json.dumps(old.meta()))
    run_retention(state)
    assert not (folder / "source.dcm").exists()
    sr = onnx_client.get(f"/v1/results/{rid}/sr", headers={"X-API-Key": keys["pacs"]})
    assert sr.status_code == 404 and "CXR_SOURCE_RETENTION_HOURS" in sr.json()["error"]["message"]
    line = retention_summary(StackSettings(stack_dir=state.settings.stack_dir))
    assert "retention job: last run" in line and "source images" in line
