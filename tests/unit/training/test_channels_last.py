"""CPU ranks may train channels-last: the layout is set before DDP and the EMA copy, and batches follow it."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any
from unittest import mock

import pytest
import torch

from training.config import MODEL_FILES
from training.ultralytics_ddp import RayDetectionTrainer

pytestmark = pytest.mark.unit


def _bare_trainer(channels_last: bool, device: str = "cpu") -> Any:
    """The trainer's own constructor and hooks on a real model; ultralytics' constructor (which
    checks a dataset) is skipped."""
    from ultralytics.models.yolo.detect import DetectionTrainer
    from ultralytics.nn.tasks import DetectionModel

    with mock.patch.object(DetectionTrainer, "__init__", lambda self, overrides: None):
        trainer: Any = RayDetectionTrainer(
            {}, world_size=2, device=torch.device(device), channels_last=channels_last
        )
    trainer.data = {"nc": 14, "names": {i: str(i) for i in range(14)}}
    trainer.args = SimpleNamespace()
    trainer.model = DetectionModel(str(MODEL_FILES["yolo11-slim"]), nc=14, verbose=False)
    return trainer


def _convs_channels_last(model: torch.nn.Module) -> list[bool]:
    return [
        m.weight.is_contiguous(memory_format=torch.channels_last)
        for m in model.modules()
        if isinstance(m, torch.nn.Conv2d) and m.kernel_size != (1, 1) and m.weight.shape[1] > 1
    ]


@pytest.mark.parametrize("channels_last", [True, False])
def test_the_model_attributes_hook_lays_the_model_out_as_configured(channels_last: bool) -> None:
    trainer = _bare_trainer(channels_last)
    trainer.set_model_attributes()
    assert trainer.model.nc == 14  # ultralytics' own hook still ran
    layouts = _convs_channels_last(trainer.model)
    assert layouts and all(layout is channels_last for layout in layouts)


def test_a_gpu_rank_is_left_to_ultralytics_own_choice() -> None:
    trainer = _bare_trainer(True, device="cuda")
    trainer.set_model_attributes()
    assert not any(_convs_channels_last(trainer.model))


def test_batches_follow_the_models_layout(monkeypatch: pytest.MonkeyPatch) -> None:
    from ultralytics.models.yolo.detect import DetectionTrainer

    monkeypatch.setattr(DetectionTrainer, "preprocess_batch", lambda self, batch: batch)
    for channels_last in (True, False):
        trainer = _bare_trainer(channels_last)
        batch = trainer.preprocess_batch({"im_file": ["a.png"], "img": torch.rand(2, 3, 64, 64)})
        assert batch["img"].is_contiguous(memory_format=torch.channels_last) is channels_last
        assert trainer.seen_files == ["a.png"]
