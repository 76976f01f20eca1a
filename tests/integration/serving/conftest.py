"""Fixtures for the gateway's integration tests: a real tritonserver holding the test model."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.unit.serving.serving_support import export_test_model, write_keys, write_stage_files


@pytest.fixture(scope="session")
def serving_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_test_model(tmp_path_factory.mktemp("serving-it-model"))


@pytest.fixture(scope="session")
def serving_keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    path = tmp_path_factory.mktemp("serving-it-keys") / "api_keys.json"
    return path, write_keys(path)


@pytest.fixture(scope="session")
def production_triton(
    serving_model: Path, triton_factory: Callable[..., Any], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Any]:
    """tritonserver (explicit model control) with the python-backend variant of the model loaded."""
    from serving.inference.triton_repo import TritonAdmin, build_repository

    repo = tmp_path_factory.mktemp("serving-it-repo")
    build_repository(serving_model, repo, variant="python", version=1, model_version="7")
    server = triton_factory("production", repo)
    admin = TritonAdmin(server.http_url)
    admin.load("cxr-detector")
    assert admin.wait_ready("cxr-detector", timeout_s=60)
    yield server
    admin.close()


@pytest.fixture
def gateway_settings(
    production_triton: Any, serving_keys: tuple[Path, dict[str, str]], tmp_path: Path
) -> Any:
    from serving.config import ServingSettings

    gitops = tmp_path / "gitops"
    write_stage_files(gitops, production="7")
    return ServingSettings(
        backend="triton",
        triton_production_url=production_triton.http_url,
        api_keys_file=serving_keys[0],
        gitops_dir=gitops,
        stack_dir=tmp_path / "state",
        conf_threshold=0.6,
        spool_retry_s=0.3,
        triton_timeout_s=20.0,
    )
