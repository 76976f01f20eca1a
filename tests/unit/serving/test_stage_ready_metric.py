"""Every scrape of ``/metrics`` says whether each stage is ready NOW, and what git assigns it.

``cxr_stage_ready`` was set only by ``GET /readyz``, and only for ``CXR_SERVING_STAGES``
(production alone by default, in the cluster too); the one-machine stack calls ``/readyz``
only while its bootstrap waits. A production Triton that died afterwards kept reading 1,
canary and staging had no series at all, and ``cxr_model_info`` existed only for stages a
request had reached: ``CxrStageNotReady`` could not fire.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from core.stages import Stage
from data_pipeline.classes import CLASS_NAMES
from serving.contract import ModelContract
from serving.errors import ModelNotReady
from serving.inference.backend import ServedModel
from tests.unit.serving.serving_support import onnx_settings, write_keys, write_stage_files

pytestmark = pytest.mark.unit

CONTRACT = ModelContract(imgsz=(128, 128), class_names=tuple(CLASS_NAMES))


class SwitchableServer:
    """A backend whose stages are up or down as the test says; a down stage answers nothing."""

    def __init__(self, up: set[Stage]) -> None:
        self.up = up

    async def model(self, stage: Stage) -> ServedModel:
        if stage not in self.up:
            raise ModelNotReady(f"stage '{stage}' has no model ready")
        return ServedModel(name="cxr-detector", version="7", contract=CONTRACT)

    async def infer(self, stage: Stage, batch: np.ndarray, model: ServedModel | None = None) -> np.ndarray:
        raise NotImplementedError

    async def ready(self, stage: Stage) -> bool:
        return stage in self.up

    def forget(self, stage: Stage) -> None:
        return None

    async def close(self) -> None:
        return None


def _samples(client: TestClient, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    from prometheus_client.parser import text_string_to_metric_families

    text = client.get("/metrics").text
    return {
        tuple(sorted(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name
    }


def test_a_scrape_reports_the_readiness_of_every_stage_as_it_is_now(tmp_path: Path) -> None:
    from serving.gateway.app import create_app

    keys = tmp_path / "keys.json"
    write_keys(keys)
    settings = onnx_settings(tmp_path / "unused.onnx", keys, tmp_path, routing_poll_s=0.0)
    write_stage_files(settings.gitops_dir, production="7", canary="8", weight=10)
    server = SwitchableServer(up={"production", "canary", "staging"})
    with TestClient(create_app(settings, backend=server, use_store=False)) as client:
        assert client.get("/readyz").status_code == 200
        ready = _samples(client, "cxr_stage_ready")
        assert ready == {(("stage", s),): 1.0 for s in ("production", "canary", "staging")}

        server.up = {"staging"}  # production's and canary's Tritons die; nobody calls /readyz
        ready = _samples(client, "cxr_stage_ready")
        assert ready[(("stage", "production"),)] == 0.0
        assert ready[(("stage", "canary"),)] == 0.0
        assert ready[(("stage", "staging"),)] == 1.0


def test_a_down_stage_names_the_model_git_assigns_it_so_the_not_ready_alert_can_fire(tmp_path: Path) -> None:
    """No request ever reached canary, whose Triton is down: the alert still needs its assigned version."""
    from serving.gateway.app import create_app

    keys = tmp_path / "keys.json"
    write_keys(keys)
    settings = onnx_settings(tmp_path / "unused.onnx", keys, tmp_path, routing_poll_s=0.0)
    write_stage_files(settings.gitops_dir, production="7", canary="8", weight=10)
    server = SwitchableServer(up={"production"})
    with TestClient(create_app(settings, backend=server, use_store=False)) as client:
        info = {
            dict(labels)["stage"]: dict(labels)["model_version"]
            for labels, value in _samples(client, "cxr_model_info").items()
            if value == 1.0
        }
    # canary: assigned 8 in git, down -> the alert's join finds it; staging: nothing assigned
    assert info["canary"] == "8"
    assert info["staging"] == ""


def test_an_idle_gateway_names_the_model_each_ready_stage_serves(tmp_path: Path) -> None:
    """No request yet: the production model's age (CxrProductionModelStale) must not wait for traffic."""
    from serving.gateway.app import create_app

    keys = tmp_path / "keys.json"
    write_keys(keys)
    settings = onnx_settings(tmp_path / "unused.onnx", keys, tmp_path, routing_poll_s=0.0)
    write_stage_files(settings.gitops_dir, production="7")
    server = SwitchableServer(up={"production", "canary", "staging"})
    with TestClient(create_app(settings, backend=server, use_store=False)) as client:
        info = {
            dict(labels)["stage"]: dict(labels)["model_version"]
            for labels, value in _samples(client, "cxr_model_info").items()
            if value == 1.0
        }
    assert info == {"production": "7", "canary": "", "staging": ""}


def test_readyz_503_carries_the_error_object_of_every_5xx_naming_the_stage_that_is_down(
    tmp_path: Path,
) -> None:
    """DESIGN.md: every 4xx/5xx is the error object; /readyz's 503 had none."""
    from serving.gateway.app import create_app

    keys = tmp_path / "keys.json"
    write_keys(keys)
    settings = onnx_settings(
        tmp_path / "unused.onnx", keys, tmp_path, routing_poll_s=0.0, serving_stages=["production", "canary"]
    )
    write_stage_files(settings.gitops_dir, production="7", canary="8", weight=10)
    server = SwitchableServer(up={"production"})
    with TestClient(create_app(settings, backend=server, use_store=False)) as client:
        r = client.get("/readyz")
    assert r.status_code == 503
    body = r.json()
    assert body["ready"] is False and body["stages"] == {"production": True, "canary": False}
    assert set(body["error"]) == {"code", "message", "request_id"}
    assert body["error"]["code"] == "not_ready" and "canary" in body["error"]["message"]
    assert "production" not in body["error"]["message"]
    assert body["error"]["request_id"] == r.headers["X-Request-ID"]


class MalformedStagingServer(SwitchableServer):
    """Staging's Triton holds a model whose config the gateway cannot read (a malformed contract)."""

    async def model(self, stage: Stage) -> ServedModel:
        if stage == "staging":
            raise ValueError("cxr_contract is not JSON")
        return await super().model(stage)


def test_a_stage_whose_model_cannot_be_read_does_not_take_the_whole_scrape_down(tmp_path: Path) -> None:
    """/metrics asks every stage's backend at each scrape: one stage's unreadable model config
    answered 500 for the scrape, and every gateway series (production's included) went missing."""
    from serving.gateway.app import create_app

    keys = tmp_path / "keys.json"
    write_keys(keys)
    settings = onnx_settings(tmp_path / "unused.onnx", keys, tmp_path, routing_poll_s=0.0)
    write_stage_files(settings.gitops_dir, production="7", staging="9")
    server = MalformedStagingServer(up={"production", "canary", "staging"})
    with TestClient(create_app(settings, backend=server, use_store=False)) as client:
        assert client.get("/metrics").status_code == 200
        info = {
            dict(labels)["stage"]: dict(labels)["model_version"]
            for labels, value in _samples(client, "cxr_model_info").items()
            if value == 1.0
        }
    assert info["production"] == "7"
    assert info["staging"] == "9"  # what git assigns it, as for any stage whose model is not known
