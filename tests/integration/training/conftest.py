"""Fixtures of the training integration tests: the tiny dataset and settings aimed at the test servers."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.unit.training.tiny_dataset import build_tiny_dataset
from training.config import TrainConfig, TrainSettings

#: 2 epochs of 16 images at 64 px: the whole distributed machinery in well under a minute of compute.
TINY_RECIPE: dict[str, Any] = {
    "name": "it-tiny",
    "imgsz": 64,
    "epochs": 2,
    "batch_per_worker": 4,
    "optim": {"nbs": 8, "warmup_epochs": 1},
    "augment": {"close_mosaic": 1},
    "eval": {"parity_images": 4, "latency_repeats": 2},
}


@pytest.fixture(scope="session")
def ray_session() -> Iterator[None]:
    """One local Ray for all training tests: its start-up costs ~10-20 s on 2 busy cores."""
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=max(2, os.cpu_count() or 1), include_dashboard=False, logging_level=logging.WARNING)
    yield
    if started:
        ray.shutdown()


@pytest.fixture(scope="session")
def tiny_dataset_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_dataset(tmp_path_factory.mktemp("tiny-data"))


@pytest.fixture
def tiny_recipe() -> Callable[..., TrainConfig]:
    def make(**changes: Any) -> TrainConfig:
        return TrainConfig.model_validate({**TINY_RECIPE, **changes})

    return make


@pytest.fixture
def train_settings(s3_store: Any, tmp_path: Path) -> Callable[..., TrainSettings]:
    def make(mlflow_uri: str = "http://127.0.0.1:9") -> TrainSettings:
        return TrainSettings(
            stack_dir=tmp_path / "stack",
            s3_endpoint=s3_store.endpoint,
            s3_access_key=s3_store.access_key,
            s3_secret_key=s3_store.secret_key,
            s3_region=s3_store.region,
            s3_bucket=s3_store.bucket,
            mlflow_uri=mlflow_uri,
        )

    return make
