"""GET /v1/worklist never lists a study past the results' retention, whether or not the job deleted it yet."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from serving.gateway.auth import hash_key
from tests.unit.serving.serving_support import onnx_settings

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def short_retention(
    onnx_model: Path, gitops_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[TestClient, str]]:
    from serving.gateway.app import create_app

    root = tmp_path_factory.mktemp("worklist-retention")
    key = "cxr_rad_" + "0" * 32
    entries = [{"id": "rad", "role": "radiologist", "sha256": hash_key(key), "tenant": "hospital-a"}]
    (root / "keys.json").write_text(json.dumps({"keys": entries}))
    settings = onnx_settings(
        onnx_model, root / "keys.json", root, gitops_dir=gitops_dir, results_retention_days=1
    )
    with TestClient(create_app(settings, use_store=False), raise_server_exceptions=False) as client:
        yield client, key


def test_a_study_past_the_results_retention_is_not_listed_before_the_retention_job_deletes_it(
    short_retention: tuple[TestClient, str],
) -> None:
    from serving.gateway.app import RETENTION_STATUS

    client, key = short_retention
    state = client.app.state.cxr  # type: ignore[attr-defined]
    deadline = time.monotonic() + 30  # the job's run at start is over: the rows below wait for its next run
    while not (state.settings.resolved_results_dir.parent / RETENTION_STATUS).exists():
        assert time.monotonic() < deadline, "the retention job did not run at start"
        time.sleep(0.05)
    worklist = state.worklist
    now = datetime.now(UTC)
    worklist.record(
        "hospital-a", "1.2.3.30", ["r30"], [0.9], "1", "production", 0.5, now=now - timedelta(hours=30)
    )
    worklist.record(
        "hospital-a", "1.2.3.20", ["r20"], [0.9], "1", "production", 0.5, now=now - timedelta(hours=20)
    )
    r = client.get("/v1/worklist?hours=48", headers={"X-API-Key": key})
    assert r.status_code == 200, r.text
    # the 30 h old study's results are past the 1-day retention: neither its UID nor its result ids show
    assert [s["study_uid"] for s in r.json()["studies"]] == ["1.2.3.20"]
