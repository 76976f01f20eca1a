"""Inside a Ray job (the RayJob's entrypoint on the head) training joins that cluster; alone it starts one.

And a worker in another pod than the driver finds its inputs (dataset, base weights) itself.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import pytest

from training import ray_trainer
from training.config import TrainSettings
from training.ray_trainer import ray_init_kwargs

pytestmark = pytest.mark.unit


@pytest.fixture
def captured_init(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """``ray.init`` replaced by a recorder, with no Ray running and no address in the environment."""
    import ray

    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: calls.append(kwargs))
    for key in ("RAY_ADDRESS", "CXR_RAY_ADDRESS"):
        monkeypatch.delenv(key, raising=False)
    return calls


def test_alone_starts_a_local_ray_sized_for_the_workers() -> None:
    kwargs = ray_init_kwargs(4.0, configured_address=None, environ={}, cpu_count=2)
    assert "address" not in kwargs
    assert kwargs["num_cpus"] == 4 and kwargs["include_dashboard"] is False
    assert kwargs["logging_level"] == logging.WARNING
    assert kwargs["_system_config"]["enable_worker_prestart"] is False  # no idle task workers on 2 cores
    assert ray_init_kwargs(1.0, configured_address="", environ={}, cpu_count=8)["num_cpus"] == 8


def test_a_local_ray_quiets_the_placement_group_cleaner_that_cannot_work_without_a_dashboard() -> None:
    """Ray imports the hook by path in each worker: it must resolve, and drop that one warning only."""
    import importlib

    from ray.train.v2._internal.execution.controller import placement_group_cleaner

    from training.ray_worker_setup import PLACEMENT_GROUP_CLEANER_LOGGER, UNREACHABLE_STATE_API

    assert placement_group_cleaner.logger.name == PLACEMENT_GROUP_CLEANER_LOGGER  # the installed Ray's
    assert UNREACHABLE_STATE_API in Path(placement_group_cleaner.__file__).read_text()
    hook = ray_init_kwargs(2.0, configured_address=None, environ={}, cpu_count=2)["runtime_env"][
        "worker_process_setup_hook"
    ]
    module, _, name = hook.rpartition(".")
    cleaner = logging.getLogger(PLACEMENT_GROUP_CLEANER_LOGGER)
    before = list(cleaner.filters)
    try:
        getattr(importlib.import_module(module), name)()

        def record(message: str) -> logging.LogRecord:
            return cleaner.makeRecord(cleaner.name, logging.WARNING, __file__, 0, message, (), None)

        assert not cleaner.filter(
            record(UNREACHABLE_STATE_API + ". State API may be temporarily unavailable.")
        )
        assert cleaner.filter(record("Controller actor is dead. Cleaning up placement group"))
    finally:
        cleaner.filters[:] = before
    # a cluster has its dashboard, so its cleaner works and is left alone
    joined = ray_init_kwargs(2.0, configured_address="ray://head:10001", environ={}, cpu_count=2)
    assert "runtime_env" not in joined


def test_ray_address_local_still_starts_ray_here() -> None:
    kwargs = ray_init_kwargs(2.0, configured_address=None, environ={"RAY_ADDRESS": "local"}, cpu_count=2)
    assert kwargs["num_cpus"] == 2 and "address" not in kwargs


def test_inside_a_ray_job_it_joins_the_cluster_without_resource_arguments(
    monkeypatch: pytest.MonkeyPatch, captured_init: list[dict[str, Any]]
) -> None:
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6379")  # what Ray sets for a job's entrypoint
    assert ray_trainer.ray_init(TrainSettings(), cpus_needed=8.0) is True
    assert captured_init == [{"address": "auto", "log_to_driver": True}]
    # Ray refuses these when joining a cluster (ValueError), whatever their value
    forbidden = {"num_cpus", "num_gpus", "resources", "object_store_memory", "labels"}
    assert not forbidden & set(captured_init[0])


def test_cxr_ray_address_names_the_cluster_and_wins(
    monkeypatch: pytest.MonkeyPatch, captured_init: list[dict[str, Any]]
) -> None:
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6379")
    monkeypatch.setenv("CXR_RAY_ADDRESS", "ray://ray-head:10001")
    ray_trainer.ray_init(TrainSettings(), cpus_needed=8.0)
    assert captured_init == [{"address": "ray://ray-head:10001", "log_to_driver": True}]


def test_without_an_address_the_local_start_is_unchanged(captured_init: list[dict[str, Any]]) -> None:
    ray_trainer.ray_init(TrainSettings(), cpus_needed=1.0)
    (kwargs,) = captured_init
    assert kwargs["num_cpus"] == max(1, os.cpu_count() or 1) and "address" not in kwargs


# ------------------------------------------------------------------ worker inputs on another node


def _cfg(data_yaml: Path, pretrained: str | bool, base_version: str) -> dict[str, Any]:
    return {
        "data_yaml": str(data_yaml),
        "dataset_version": "abc123",
        "base_model_version": base_version,
        "overrides": {"epochs": 1, "pretrained": pretrained},
    }


def test_a_worker_beside_the_driver_uses_the_drivers_files(tmp_path: Path) -> None:
    data_yaml, weights = tmp_path / "data.yaml", tmp_path / "base.pt"
    data_yaml.write_text("path: .\n")
    weights.write_bytes(b"pt")
    assert ray_trainer._node_local_inputs(_cfg(data_yaml, str(weights), "7"), tmp_path / "rank0") == {}
    assert ray_trainer._node_local_inputs(_cfg(data_yaml, False, ""), tmp_path / "rank0") == {}


def test_a_worker_in_another_pod_fetches_the_dataset_and_base_weights(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import training.dataset
    import training.registry

    fetched: list[tuple[str, ...]] = []

    class _Ref:
        data_yaml = tmp_path / "worker" / "data-abc123.yaml"

    def fake_resolve(ref: str, work_dir: Path, cache_dir: Path) -> _Ref:
        fetched.append(("dataset", ref, str(work_dir)))
        return _Ref()

    def fake_download(version: str, dest: Path, settings: TrainSettings | None = None) -> Path:
        fetched.append(("weights", version, str(dest)))
        return dest / "best.pt"

    monkeypatch.setattr(training.dataset, "resolve_dataset", fake_resolve)
    monkeypatch.setattr(training.registry, "download_weights", fake_download)
    save_dir = tmp_path / "run" / "rank1"
    cfg = _cfg(tmp_path / "head-only" / "data.yaml", str(tmp_path / "head-only" / "base.pt"), "7")
    updates = ray_trainer._node_local_inputs(cfg, save_dir)
    assert updates == {
        "data": str(_Ref.data_yaml),
        "pretrained": str(tmp_path / "run" / "base-rank1" / "best.pt"),
    }
    assert fetched == [
        ("dataset", "abc123", str(tmp_path / "run")),
        ("weights", "7", str(tmp_path / "run" / "base-rank1")),
    ]
