"""A 30-second Locust smoke of the load profile (tests/load/locustfile.py) against a real
gateway and tritonserver: every request type is exercised and none fails."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from serving.gateway.app import create_app
from tests.fixtures.servers import free_port
from tests.unit.serving.serving_support import LiveServer

pytestmark = [pytest.mark.integration, pytest.mark.slow]
LOCUSTFILE = Path(__file__).resolve().parents[2] / "load" / "locustfile.py"


def test_locust_smoke_runs_every_request_type_without_failures(
    gateway_settings: Any, serving_keys: tuple[Path, dict[str, str]], tmp_path: Path
) -> None:
    keys = serving_keys[1]
    app = create_app(gateway_settings, use_store=False)
    with LiveServer(app, free_port()) as server:
        env = {
            **os.environ,
            "CXR_LOAD_PACS_KEY": keys["pacs"],
            "CXR_LOAD_RADIOLOGIST_KEY": keys["radiologist"],
            "CXR_LOAD_IMAGES": "3",
        }
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "locust",
                "-f",
                str(LOCUSTFILE),
                "--headless",
                "-u",
                "4",
                "-r",
                "4",
                "-t",
                "30s",
                "--host",
                server.url,
                "--csv",
                str(tmp_path / "smoke"),
                "--only-summary",
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=180,
        )
    assert result.returncode == 0, result.stderr[-3000:]
    with (tmp_path / "smoke_stats.csv").open() as handle:
        rows = {row["Name"]: row for row in csv.DictReader(handle)}
    for name in ("/v1/detect", "/v1/detect/batch", "/dicomweb/studies", "/v1/feedback"):
        assert int(rows[name]["Request Count"]) > 0, f"{name} was never called"
    assert int(rows["Aggregated"]["Failure Count"]) == 0, result.stderr[-3000:]
