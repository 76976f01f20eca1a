"""Fixtures for the gateway's unit tests: a real tiny ONNX model and an in-process app."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from tests.unit.serving.serving_support import export_test_model, write_keys, write_stage_files


@pytest.fixture(scope="session")
def onnx_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_test_model(tmp_path_factory.mktemp("serving-model"))


@pytest.fixture(scope="session")
def api_keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    path = tmp_path_factory.mktemp("serving-keys") / "api_keys.json"
    return path, write_keys(path)


@pytest.fixture(scope="session")
def gitops_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("serving-gitops")
    write_stage_files(root, production="1")
    return root


@pytest.fixture(scope="session")
def onnx_client(
    onnx_model: Path,
    api_keys: tuple[Path, dict[str, str]],
    gitops_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[TestClient]:
    from serving.config import ServingSettings
    from serving.gateway.app import create_app

    state_dir = tmp_path_factory.mktemp("serving-state")
    settings = ServingSettings(
        backend="onnx",
        onnx_model=onnx_model,
        api_keys_file=api_keys[0],
        gitops_dir=gitops_dir,
        stack_dir=state_dir,
        rate_limit_per_s=1000,
        rate_limit_burst=1000,
        auth_fail_burst=100_000,  # the role matrix sends ~50 bad keys from one address
        conf_threshold=0.6,
        audit_log=state_dir / "audit.jsonl",
    )
    app = create_app(settings, use_store=False)
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client


@pytest.fixture(scope="session")
def keys(api_keys: tuple[Path, dict[str, str]]) -> dict[str, str]:
    return api_keys[1]
