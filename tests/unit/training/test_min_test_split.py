"""A dataset whose test split is too small is refused before training, with the way out in the message."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from data_pipeline.classes import CLASS_NAMES
from training.config import TrainSettings, load_config
from training.errors import DatasetError
from training.run import train_and_register

pytestmark = pytest.mark.unit


def _dataset(root: Path, test_images: int) -> Path:
    for split, n in (("train", 4), ("val", 2), ("test", test_images)):
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
        for i in range(n):
            cv2.imwrite(str(root / "images" / split / f"{split}{i}.png"), np.zeros((32, 32, 3), np.uint8))
    (root / "data.yaml").write_text(yaml.safe_dump({"names": dict(enumerate(CLASS_NAMES))}))
    return root


def test_a_test_split_below_the_minimum_is_refused_before_any_training(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CXR_MIN_TEST_IMAGES", raising=False)  # the shipped default, not the tests' 1
    settings = TrainSettings(stack_dir=tmp_path / "stack", mlflow_uri="http://127.0.0.1:9")
    assert settings.min_test_images == 30
    config = load_config(Path("training/configs/bootstrap.yaml"))
    with pytest.raises(DatasetError, match=r"has 6 test images, fewer than CXR_MIN_TEST_IMAGES=30"):
        # MLflow at port 9 is never reached: the refusal comes before the run is opened
        train_and_register(config, _dataset(tmp_path / "ds", 6), settings=settings)
