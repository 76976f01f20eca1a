"""docker-compose.yaml and the Dockerfile describe the same stack as `make up`."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from core.credentials import StackCredentials
from core.stages import STAGES
from serving.config import ServingSettings
from stack.config import StackSettings
from stack.manager import client_env

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yaml").read_text())


def _host_ports(service: dict) -> list[int]:
    return [int(p.split(":")[1]) for p in service.get("ports", [])]


def test_compose_publishes_the_stack_ports_on_loopback(compose: dict) -> None:
    s = StackSettings()
    services = compose["services"]
    assert _host_ports(services["gateway"]) == [s.gateway_port]
    assert _host_ports(services["mlflow"]) == [s.mlflow_port]
    assert _host_ports(services["minio"]) == [s.s3_port]
    assert _host_ports(services["prometheus"]) == [s.prometheus_port]
    for stage in STAGES:
        base = s.triton_http_port(stage)
        assert _host_ports(services[f"triton-{stage}"]) == [base, base + 1, base + 2]
    for service in services.values():
        assert all(p.startswith("127.0.0.1:") for p in service.get("ports", []))


def test_gateway_gets_every_setting_the_stack_gives_it(compose: dict) -> None:
    stack_keys = set(client_env(StackSettings(), StackCredentials("a", "b", {})))
    serving_fields = {f"CXR_{name.upper()}" for name in ServingSettings.model_fields}
    needed = (stack_keys & serving_fields) - {"CXR_STACK_DIR"}
    assert needed <= set(compose["services"]["gateway"]["environment"])


def test_every_service_gets_the_install_secret_from_the_environment_never_a_default(compose: dict) -> None:
    for name in ("gateway",):
        env = compose["services"][name]["environment"]
        assert env["CXR_DEID_SECRET"] == env["CXR_PATIENT_SALT"] == "${CXR_DEID_SECRET:?set CXR_DEID_SECRET}"


def test_images_are_pinned_and_the_project_image_is_non_root_multi_stage(compose: dict) -> None:
    for name, service in compose["services"].items():
        image = service.get("image", "")
        assert image and not image.endswith(":latest") and ":" in image, name
    dockerfile = (ROOT / "Dockerfile").read_text()
    stages = re.findall(r"^FROM \S+ AS (\w+)", dockerfile, flags=re.M)
    assert stages == ["build", "runtime"]
    runtime = dockerfile.split("AS runtime", 1)[1]
    assert "build-essential" not in runtime
    assert re.search(r"^USER 10001$", runtime, flags=re.M)
    assert "python:3.11" in dockerfile and ":latest" not in dockerfile


@pytest.mark.skipif(
    shutil.which("docker-compose") is None,
    reason="docker-compose not installed (apt-get install docker-compose)",
)
def test_docker_compose_accepts_the_file() -> None:
    env = {**os.environ, "CXR_S3_ACCESS_KEY": "k", "CXR_S3_SECRET_KEY": "s", "CXR_DEID_SECRET": "d"}
    result = subprocess.run(
        ["docker-compose", "-f", str(ROOT / "docker-compose.yaml"), "config", "-q"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
