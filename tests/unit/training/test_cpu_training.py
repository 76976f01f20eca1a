"""The trainer's CPU hooks: channels-last layout (set before DDP and the EMA copy, batches follow it),
fused optimizer steps, and ultralytics' weights written only on epochs that leave a checkpoint."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any
from unittest import mock

import pytest
import torch

from training.config import MODEL_FILES, CheckpointConfig
from training.ultralytics_ddp import _ULTRALYTICS_AUTOCAST, RayDetectionTrainer, cpu_computes_bf16

pytestmark = pytest.mark.unit


def _bare_trainer(channels_last: bool = False, device: str = "cpu", **options: Any) -> Any:
    """The trainer's own constructor and hooks on a real model; ultralytics' constructor (which
    checks a dataset) is skipped."""
    from ultralytics.models.yolo.detect import DetectionTrainer
    from ultralytics.nn.tasks import DetectionModel

    def constructor(self: Any, overrides: dict[str, Any]) -> None:
        self.args = SimpleNamespace(amp=False)

    with mock.patch.object(DetectionTrainer, "__init__", constructor):
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


def _bf16_trainer(
    cpu_bf16: bool, device: str = "cpu", checkpoint_amp: str | None = None
) -> tuple[Any, dict[str, Any]]:
    """A trainer built with ``cpu_bf16``; also the overrides it handed to ultralytics' constructor.

    ``checkpoint_amp``: ultralytics' constructor resumes a run whose checkpoint says this ``amp``
    (a resume keeps the checkpoint's, whatever the overrides say).
    """
    from ultralytics.models.yolo.detect import DetectionTrainer

    handed: dict[str, Any] = {}

    def constructor(self: Any, overrides: dict[str, Any]) -> None:
        handed.update(overrides)
        self.args = SimpleNamespace(amp=overrides["amp"] if checkpoint_amp is None else checkpoint_amp)

    with mock.patch.object(DetectionTrainer, "__init__", constructor):
        trainer: Any = RayDetectionTrainer(
            {"amp": False}, world_size=2, device=torch.device(device), cpu_bf16=cpu_bf16
        )
    trainer.amp = trainer.args.amp not in (False, "fp32")
    return trainer, handed


def _loop_precision(trainer: Any) -> tuple[torch.dtype, set[torch.dtype], bool]:
    """What ultralytics' training loop computes in, as the trainer runs it: the network's
    convolutions' output dtype, the dtypes the loss criterion is given, and whether autocast is
    still on inside the criterion.

    ultralytics' ``_do_train`` is replaced by its forward step: the ``autocast`` helper its module
    imported, called as the loop calls it, around a real model's ``loss`` on a batch (the
    criterion, which needs labels, replaced by a recorder).
    """
    import ultralytics.engine.trainer as ultralytics_trainer
    from ultralytics.models.yolo.detect import DetectionTrainer
    from ultralytics.nn.tasks import DetectionModel

    model = DetectionModel(str(MODEL_FILES["yolo11-slim"]), nc=14, verbose=False).train()
    convs: list[torch.dtype] = []
    first_layer: Any = model.model[0]
    first_layer.register_forward_hook(lambda module, args, out: convs.append(out.dtype))
    given: set[torch.dtype] = set()
    autocast_in_criterion: list[bool] = []

    def criterion(preds: Any, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        given.update(t.dtype for t in (preds["boxes"], preds["scores"], *preds["feats"]))
        autocast_in_criterion.append(torch.is_autocast_enabled("cpu"))
        return preds["scores"].sum(), {}

    model.criterion = criterion

    def forward_step(self: Any) -> None:
        precision = torch.bfloat16 if self.args.amp == "bf16" else self.amp
        with ultralytics_trainer.autocast(precision, device="cpu"):
            model({"img": torch.rand(1, 3, 64, 64)})

    with mock.patch.object(DetectionTrainer, "_do_train", forward_step):
        trainer._do_train()
    return convs[0], given, autocast_in_criterion[0]


@pytest.mark.skipif(not cpu_computes_bf16(), reason="this CPU has no native bfloat16 arithmetic")
def test_cpu_bf16_runs_the_network_in_bfloat16_and_its_loss_in_fp32() -> None:
    trainer, handed = _bf16_trainer(cpu_bf16=True)
    assert handed["amp"] == "bf16"  # ultralytics' own switch: no loss scaler, no fp16 check
    # ultralytics' helper alone refuses bfloat16 on a CPU; the trainer's loop gets it
    with pytest.raises(RuntimeError, match="bfloat16"):
        _ULTRALYTICS_AUTOCAST(torch.bfloat16, device="cpu")
    conv, given, autocast_in_criterion = _loop_precision(trainer)
    assert conv == torch.bfloat16
    # the loss sees fp32 predictions with autocast off (in bfloat16 the recipe learnt less a second)
    assert given == {torch.float32}
    assert autocast_in_criterion is False


def test_without_cpu_bf16_the_training_step_stays_fp32() -> None:
    trainer, handed = _bf16_trainer(cpu_bf16=False)
    assert handed["amp"] is False
    assert _loop_precision(trainer) == (torch.float32, {torch.float32}, False)


def test_cpu_bf16_is_ignored_on_a_gpu_rank_and_on_cores_without_bf16() -> None:
    assert _bf16_trainer(cpu_bf16=True, device="cuda")[1]["amp"] is False
    with mock.patch("training.ultralytics_ddp.cpu_computes_bf16", return_value=False):
        assert _bf16_trainer(cpu_bf16=True)[1]["amp"] is False


def test_a_resumed_run_keeps_its_checkpoints_precision_where_the_cores_allow() -> None:
    resumed, _ = _bf16_trainer(cpu_bf16=False, checkpoint_amp="bf16")
    assert resumed.cpu_bf16 is cpu_computes_bf16()
    with mock.patch("training.ultralytics_ddp.cpu_computes_bf16", return_value=False):
        elsewhere, _ = _bf16_trainer(cpu_bf16=True, checkpoint_amp="bf16")
    # ultralytics' loop would raise on a bfloat16 ``amp`` here: the run goes on in fp32
    assert (elsewhere.args.amp, elsewhere.cpu_bf16) == (False, False)
    assert _loop_precision(elsewhere) == (torch.float32, {torch.float32}, False)


def test_a_cpu_rank_keeps_its_own_precision_after_rank_0s_broadcast() -> None:
    """Ultralytics' ``_setup_train`` broadcasts rank 0's ``amp``; on cores without bfloat16 this
    rank must not autocast (it would emulate bfloat16, the loss included)."""
    from ultralytics.models.yolo.detect import DetectionTrainer

    with mock.patch("training.ultralytics_ddp.cpu_computes_bf16", return_value=False):
        trainer, _ = _bf16_trainer(cpu_bf16=True)
    trainer.device = torch.device("cpu")

    def rank_0_trains_in_bf16(self: Any) -> None:
        self.amp = True  # what the broadcast from a bfloat16 rank 0 leaves here

    with mock.patch.object(DetectionTrainer, "_setup_train", rank_0_trains_in_bf16):
        trainer._setup_train()
    assert trainer.amp is False
    assert _loop_precision(trainer) == (torch.float32, {torch.float32}, False)


@pytest.mark.skipif(not Path("/proc/cpuinfo").exists(), reason="needs Linux's /proc/cpuinfo")
def test_native_bf16_is_what_the_kernel_reports_of_the_cores() -> None:
    """AMX or AVX512-BF16 in the CPU flags: not any AVX-512 core (oneDNN emulates bfloat16 there)."""
    flags = {
        flag
        for line in Path("/proc/cpuinfo").read_text().splitlines()
        if line.startswith("flags")
        for flag in line.split(":", 1)[1].split()
    }
    assert cpu_computes_bf16() is bool({"amx_bf16", "avx512_bf16"} & flags)
