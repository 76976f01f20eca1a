"""The gateway builds a study's objects once at startup when it sends results back to a PACS."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from serving.pacs.sendback import SendBack
from tests.unit.serving.serving_support import onnx_settings, write_stage_files

pytestmark = pytest.mark.unit


def test_warm_up_builds_objects_and_queues_nothing(tmp_path: Path) -> None:
    from serving.config import ServingSettings
    from serving.inference.cpu_pool import CpuPool
    from serving.metrics import GatewayMetrics

    settings = ServingSettings(
        stack_dir=tmp_path,
        pacs_destinations=[
            {"name": "pacs", "kind": "stow", "url": "http://127.0.0.1:9/dicom-web", "callers": ["*"]}
        ],
    )
    sendback = SendBack(settings, GatewayMetrics(), CpuPool(1))
    sendback.warm_up()
    assert sendback.outbox.depth() == {}


@pytest.mark.parametrize("destinations", [0, 1])
def test_the_gateway_warms_the_send_back_before_it_is_ready_only_when_it_sends_back(
    onnx_model: Path,
    api_keys: tuple[Path, dict[str, str]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    destinations: int,
) -> None:
    from serving.gateway.app import create_app

    calls: list[int] = []
    monkeypatch.setattr(SendBack, "warm_up", lambda self: calls.append(1))
    write_stage_files(tmp_path / "gitops", production="1")
    dests = [{"name": "pacs", "kind": "stow", "url": "http://127.0.0.1:9/dicom-web", "callers": ["*"]}][
        :destinations
    ]
    app = create_app(
        onnx_settings(onnx_model, api_keys[0], tmp_path, pacs_destinations=dests), use_store=False
    )
    with TestClient(app):  # entering runs the startup: the gateway is ready after it
        assert calls == [1] * destinations
