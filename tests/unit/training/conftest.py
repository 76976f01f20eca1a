"""Fixtures of the training unit tests: a tiny dataset and an untrained checkpoint, built once."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.unit.training.tiny_dataset import build_tiny_dataset
from tests.unit.training.tiny_model import make_checkpoint
from training.dataset import DatasetRef, open_dataset_dir
from training.export import export_onnx


@pytest.fixture(scope="session")
def tiny_dataset_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_dataset(tmp_path_factory.mktemp("tiny-data"))


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("tiny-model") / "model.pt", imgsz=64, cls_bias=6.0)


@pytest.fixture(scope="session")
def exported(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny checkpoint exported to ONNX once; export and INT8 tests read it, none changes it."""
    return export_onnx(tiny_checkpoint, tmp_path_factory.mktemp("onnx"))


@pytest.fixture(scope="session")
def dataset(tiny_dataset_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> DatasetRef:
    """The tiny dataset opened once (a module may override it with its own)."""
    return open_dataset_dir(tiny_dataset_dir, tmp_path_factory.mktemp("work"))
