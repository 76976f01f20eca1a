"""Triton's own queue full -> 503 + Retry-After from the gateway, never a hang or a 500.

A dedicated tritonserver holds the model with a queue of one request and no batching
(``timeout_action: REJECT``), and the gateway's own in-flight limit is set far above it, so
the refusals can only come from Triton. Concurrent detects then overflow that queue.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from serving.config import ServingSettings
from serving.gateway.app import create_app
from serving.inference.triton_repo import RepositoryOptions, TritonAdmin, build_repository
from tests.unit.serving.serving_support import make_png, write_stage_files

pytestmark = pytest.mark.integration


def test_full_triton_queue_is_a_503_with_retry_after(
    serving_model: Path,
    serving_keys: tuple[Path, dict[str, str]],
    triton_factory: Callable[..., Any],
    tmp_path: Path,
) -> None:
    repo = tmp_path / "repo"
    tight = RepositoryOptions(max_batch_size=1, max_queue_delay_us=0, max_queue_size=1)
    build_repository(serving_model, repo, variant="python", model_version="3", options=tight)
    assert "max_queue_size: 1" in (repo / "cxr-detector" / "config.pbtxt").read_text()
    triton = triton_factory("production", repo)
    admin = TritonAdmin(triton.http_url)
    admin.load("cxr-detector")
    assert admin.wait_ready("cxr-detector", timeout_s=60)
    admin.close()

    gitops = tmp_path / "gitops"
    write_stage_files(gitops, production="3")
    settings = ServingSettings(
        backend="triton",
        triton_production_url=triton.http_url,
        api_keys_file=serving_keys[0],
        gitops_dir=gitops,
        stack_dir=tmp_path / "state",
        max_inflight_per_stage=256,  # the gateway admits everything: Triton must refuse
        rate_limit_per_s=100_000,
        rate_limit_burst=100_000,
        triton_timeout_s=30.0,
    )
    headers = {"Authorization": f"Bearer {serving_keys[1]['pacs']}", "Content-Type": "image/png"}
    images = [make_png(256, 256, seed=i) for i in range(8)]
    with TestClient(create_app(settings, use_store=False)) as client:
        assert client.get("/readyz").status_code == 200

        def detect(i: int) -> Any:
            return client.post("/v1/detect", content=images[i % len(images)], headers=headers)

        replies: list[Any] = []
        for _ in range(5):  # rounds of 24 at once until the queue overflowed at least once
            with ThreadPoolExecutor(max_workers=24) as pool:
                replies += list(pool.map(detect, range(24)))
            if any(r.status_code == 503 for r in replies):
                break

    statuses = sorted({r.status_code for r in replies})
    assert set(statuses) <= {200, 503}, statuses  # never a 500, never a timeout
    refused = [r for r in replies if r.status_code == 503]
    assert refused, f"Triton's queue of one never overflowed in {len(replies)} concurrent requests"
    assert any(r.status_code == 200 for r in replies)
    for r in refused:
        assert int(r.headers["Retry-After"]) >= 1
        error = r.json()["error"]
        assert error["code"] == "overloaded" and "queue is full" in error["message"], error
