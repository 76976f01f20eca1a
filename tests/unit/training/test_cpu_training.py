"""The trainer's CPU hooks: channels-last layout (set before DDP and the EMA copy, batches follow it),
fused optimizer steps, and ultralytics' weights written only on epochs that leave a checkpoint."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any
from unittest import mock

import pytest
import torch

from training.config import MODEL_FILES, CheckpointConfig
from training.ultralytics_ddp import RayDetectionTrainer

pytestmark = pytest.mark.unit


def _bare_trainer(channels_last: bool = False, device: str = "cpu", **options: Any) -> Any:
    """The trainer's own constructor and hooks on a real model; ultralytics' constructor (which
    checks a dataset) is skipped."""
    from ultralytics.models.yolo.detect import DetectionTrainer
    from ultralytics.nn.tasks import DetectionModel

    with mock.patch.object(DetectionTrainer, "__init__", lambda self, overrides: None):
        trainer: Any = RayDetectionTrainer(
            {}, world_size=2, device=torch.device(device), channels_last=channels_last, **options
        )
    trainer.data = {"nc": 14, "names": {i: str(i) for i in range(14)}}
    trainer.args = SimpleNamespace()
    torch.manual_seed(0)
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


@pytest.mark.parametrize("name", ["AdamW", "SGD"])
def test_cpu_ranks_step_the_same_optimizer_fused(name: str) -> None:
    loop, fused = _bare_trainer(fused_optimizer=False), _bare_trainer(fused_optimizer=True)
    optimizers = [
        t.build_optimizer(t.model, name, lr=0.003, momentum=0.9, decay=0.0005) for t in (loop, fused)
    ]
    assert [type(o).__name__ for o in optimizers] == [name, name]
    assert not any(g["fused"] for g in optimizers[0].param_groups)
    assert all(g["fused"] for g in optimizers[1].param_groups)
    # ultralytics' groups survive the rebuild: the same parameters, learning rates and decays
    for ours, theirs in zip(optimizers[1].param_groups, optimizers[0].param_groups, strict=True):
        assert [p.shape for p in ours["params"]] == [p.shape for p in theirs["params"]]
        assert (ours["lr"], ours["weight_decay"], ours["param_group"]) == (
            theirs["lr"],
            theirs["weight_decay"],
            theirs["param_group"],
        )
    # and one step moves both models alike
    for trainer, optimizer in zip((loop, fused), optimizers, strict=True):
        for param in trainer.model.parameters():
            param.grad = torch.full_like(param, 0.5)
        optimizer.step()
    for a, b in zip(loop.model.parameters(), fused.model.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-6)


def test_a_gpu_rank_keeps_ultralytics_optimizer() -> None:
    trainer = _bare_trainer(device="cuda", fused_optimizer=True)
    optimizer = trainer.build_optimizer(trainer.model, "AdamW", lr=0.003, momentum=0.9, decay=0.0005)
    assert not any(g["fused"] for g in optimizer.param_groups)  # ultralytics fuses on CUDA itself


def _saved_epochs(trainer: Any, epochs: int, stop_at: int | None = None) -> list[int]:
    from ultralytics.models.yolo.detect import DetectionTrainer

    saved: list[int] = []
    with mock.patch.object(DetectionTrainer, "save_model", lambda self: saved.append(self.epoch) or True):
        trainer.epochs = epochs
        for epoch in range(epochs):
            trainer.epoch, trainer.stop = epoch, epoch == stop_at
            trainer.save_model()
    return saved


def test_weights_are_written_only_on_epochs_that_leave_a_checkpoint() -> None:
    trainer = _bare_trainer(checkpoints=CheckpointConfig(every_epochs=4))
    trainer.args = SimpleNamespace(val=False)
    assert _saved_epochs(trainer, 10) == [3, 7, 9]  # every 4th and the last
    assert _saved_epochs(trainer, 10, stop_at=5) == [3, 5, 7, 9]  # rank 0's early stop leaves one too


def test_a_recipe_that_validates_every_epoch_keeps_every_write() -> None:
    trainer = _bare_trainer(checkpoints=CheckpointConfig(every_epochs=4))
    trainer.args = SimpleNamespace(val=True)  # best.pt may come from any epoch
    assert _saved_epochs(trainer, 6) == list(range(6))
    trainer = _bare_trainer()  # no cadence given: ultralytics' own behaviour
    trainer.args = SimpleNamespace(val=False)
    assert _saved_epochs(trainer, 3) == [0, 1, 2]
