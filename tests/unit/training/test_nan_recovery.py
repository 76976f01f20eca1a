"""[9] Ultralytics' NaN recovery across two real gloo ranks: rank 1 restores from rank 0's ``last.pt``.

Each rank runs ultralytics' own ``_handle_nan_recovery`` (loading the checkpoint, the optimizer
and the EMA) on a real model; only rank 0 has a ``last.pt`` in its folder, as in a Ray run.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from unittest import mock

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from training.config import MODEL_FILES
from training.ultralytics_ddp import RayDetectionTrainer

pytestmark = pytest.mark.unit

CHECKPOINT_BIAS = 0.25  # every weight of the EMA in rank 0's last.pt is set to this


def _rank_trainer(rank: int, folder: Path) -> Any:
    """A trainer with what ultralytics' recovery touches: a real model, optimizer, EMA, scheduler."""
    from ultralytics.models.yolo.detect import DetectionTrainer
    from ultralytics.nn.tasks import DetectionModel
    from ultralytics.utils.torch_utils import EarlyStopping, ModelEMA

    def constructor(self: Any, overrides: dict[str, Any]) -> None:
        self.args = SimpleNamespace(amp=False)

    with mock.patch.object(DetectionTrainer, "__init__", constructor):
        trainer: Any = RayDetectionTrainer({}, world_size=2, device=torch.device("cpu"))
    torch.manual_seed(rank)
    trainer.model = DetectionModel(str(MODEL_FILES["yolo11-slim"]), nc=14, verbose=False)
    trainer.optimizer = torch.optim.SGD(trainer.model.parameters(), lr=0.01)
    trainer.scheduler = torch.optim.lr_scheduler.LambdaLR(trainer.optimizer, lambda e: 1.0)
    trainer.ema = ModelEMA(trainer.model)
    trainer.stopper = EarlyStopping(patience=100)
    trainer.freeze_layer_names = []
    trainer.nan_recovery_attempts = 0
    trainer.start_epoch = 0
    trainer.fitness = None
    trainer.last = folder / f"rank{rank}" / "weights" / "last.pt"
    return trainer


def _write_rank0_checkpoint(trainer: Any) -> None:
    ema = copy.deepcopy(trainer.ema.ema)
    with torch.no_grad():
        for p in ema.parameters():
            p.fill_(CHECKPOINT_BIAS)
    trainer.last.parent.mkdir(parents=True)
    torch.save(
        {"ema": ema.half(), "updates": 7, "optimizer": trainer.optimizer.state_dict(), "best_fitness": 0.5},
        trainer.last,
    )


def _rank_main(rank: int, folder: str, loss: float, epoch: int) -> None:
    import ultralytics.engine.trainer as ultralytics_trainer

    root = Path(folder)
    dist.init_process_group("gloo", init_method=f"file://{root / 'store'}", rank=rank, world_size=2)
    ultralytics_trainer.RANK = rank  # read from the environment when ultralytics was imported
    trainer = _rank_trainer(rank, root)
    if rank == 0:
        _write_rank0_checkpoint(trainer)
    trainer.loss = torch.tensor(loss if rank == 0 else 1.0)  # ultralytics judges rank 0's loss
    try:
        outcome: dict[str, Any] = {"recovered": trainer._handle_nan_recovery(epoch)}
        first = next(trainer.model.parameters())
        outcome["weights_from_checkpoint"] = bool(torch.all(first == CHECKPOINT_BIAS))
        outcome["ema_updates"] = trainer.ema.updates
    except RuntimeError as exc:
        outcome = {"error": str(exc)}
    (root / f"outcome{rank}.json").write_text(json.dumps(outcome))
    dist.destroy_process_group()


def _run(tmp_path: Path, loss: float, epoch: int = 3) -> list[dict[str, Any]]:
    mp.spawn(_rank_main, args=(str(tmp_path), loss, epoch), nprocs=2, join=True)
    return [json.loads((tmp_path / f"outcome{r}.json").read_text()) for r in (0, 1)]


def test_a_nan_loss_restores_every_rank_from_rank_0s_last_checkpoint(tmp_path: Path) -> None:
    outcomes = _run(tmp_path, loss=float("nan"))
    for outcome in outcomes:  # ultralytics' own recovery ran on both ranks, from the same file
        assert outcome == {"recovered": True, "weights_from_checkpoint": True, "ema_updates": 7}
    assert (tmp_path / "rank1" / "weights" / "last.pt").read_bytes() == (
        tmp_path / "rank0" / "weights" / "last.pt"
    ).read_bytes()


def test_a_finite_loss_sends_nothing_and_recovers_nothing(tmp_path: Path) -> None:
    outcomes = _run(tmp_path, loss=0.5)
    assert [o["recovered"] for o in outcomes] == [False, False]
    assert not (tmp_path / "rank1" / "weights" / "last.pt").exists()


def test_on_the_first_epoch_ultralytics_goes_on_and_nothing_is_sent(tmp_path: Path) -> None:
    outcomes = _run(tmp_path, loss=float("nan"), epoch=0)
    assert [o["recovered"] for o in outcomes] == [False, False]
    assert not (tmp_path / "rank1" / "weights" / "last.pt").exists()
