"""Fixtures of the training unit tests: a tiny dataset and an untrained checkpoint, built once."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.unit.training.tiny_dataset import build_tiny_dataset
from tests.unit.training.tiny_model import make_checkpoint


@pytest.fixture(scope="session")
def tiny_dataset_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_dataset(tmp_path_factory.mktemp("tiny-data"))


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("tiny-model") / "model.pt", imgsz=64, cls_bias=6.0)
