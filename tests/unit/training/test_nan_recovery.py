"""[9] Ultralytics' NaN recovery across two real gloo ranks: rank 1 restores from rank 0's ``last.pt``.

Each rank runs ultralytics' own ``_handle_nan_recovery`` (loading the checkpoint, the optimizer
and the EMA) on a real model; only rank 0 has a ``last.pt`` in its folder, as in a Ray run.
"""

from __future__ import annotations

import copy
import json
import os
from datetime import timedelta
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


def _write_checkpoint(trainer: Any, value: float) -> None:
    ema = copy.deepcopy(trainer.ema.ema)
    with torch.no_grad():
        for p in ema.parameters():
            p.fill_(value)
    trainer.last.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {"ema": ema.half(), "updates": 7, "optimizer": trainer.optimizer.state_dict(), "best_fitness": 0.5},
        trainer.last,
    )


#: name -> (rank 0's loss, rank 0's fitness, epoch, rank 0 has last.pt, rank 1's own last.pt)
CASES: dict[str, tuple[float, float | None, int, bool, bool]] = {
    "nan_loss": (float("nan"), None, 3, True, False),
    "nan_fitness": (0.5, float("nan"), 3, True, False),
    "rank1_holds_an_older_checkpoint": (float("nan"), None, 3, True, True),  # as after a resume
    "finite": (0.5, 0.2, 3, True, False),
    "first_epoch": (float("nan"), None, 0, True, False),
    "rank0_has_none": (float("nan"), None, 3, False, True),
}
STALE_VALUE = 0.75  # every weight of the EMA in rank 1's own, older last.pt


def _rank_main(rank: int, folder: str) -> None:
    """Every case on one process group of two ranks; each rank writes what it saw per case."""
    import ultralytics.engine.trainer as ultralytics_trainer

    torch.set_num_threads(1)
    root = Path(folder)
    dist.init_process_group(
        "gloo", init_method=f"file://{root / 'store'}", rank=rank, world_size=2, timeout=timedelta(seconds=60)
    )
    ultralytics_trainer.RANK = rank  # read from the environment when ultralytics was imported
    outcomes: dict[str, Any] = {}
    for name, (loss, fitness, epoch, rank0_file, rank1_file) in CASES.items():
        trainer = _rank_trainer(rank, root / name)
        if rank == 0 and rank0_file:
            _write_checkpoint(trainer, CHECKPOINT_BIAS)
        if rank == 1 and rank1_file:
            _write_checkpoint(trainer, STALE_VALUE)
        trainer.loss = torch.tensor(loss if rank == 0 else 1.0)  # ultralytics judges rank 0's epoch
        trainer.fitness = fitness if rank == 0 else None
        try:
            outcome: dict[str, Any] = {"recovered": trainer._handle_nan_recovery(epoch)}
            first = next(trainer.model.parameters())
            outcome["weights"] = float(first.flatten()[0]) if outcome["recovered"] else None
            outcome["ema_updates"] = trainer.ema.updates
        except RuntimeError as exc:
            outcome = {"error": str(exc)}
        outcomes[name] = outcome
    (root / f"outcome{rank}.json").write_text(json.dumps(outcomes))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]]]:
    root = tmp_path_factory.mktemp("nan-recovery")
    with mock.patch.dict(os.environ, {"GLOO_SOCKET_IFNAME": "lo"}):  # loopback only; the children inherit it
        mp.spawn(_rank_main, args=(str(root),), nprocs=2, join=True)
    return root, [json.loads((root / f"outcome{r}.json").read_text()) for r in (0, 1)]


def _last(root: Path, case: str, rank: int) -> Path:
    return root / case / f"rank{rank}" / "weights" / "last.pt"


@pytest.mark.parametrize("case", ["nan_loss", "nan_fitness", "rank1_holds_an_older_checkpoint"])
def test_a_non_finite_epoch_restores_every_rank_from_rank_0s_last_checkpoint(
    outcomes: tuple[Path, list[dict[str, Any]]], case: str
) -> None:
    root, by_rank = outcomes
    for outcome in by_rank:  # ultralytics' own recovery ran on both ranks, from rank 0's file
        assert outcome[case] == {"recovered": True, "weights": CHECKPOINT_BIAS, "ema_updates": 7}
    assert _last(root, case, 1).read_bytes() == _last(root, case, 0).read_bytes()


@pytest.mark.parametrize("case", ["finite", "first_epoch"])
def test_when_ultralytics_does_not_recover_nothing_is_sent(
    outcomes: tuple[Path, list[dict[str, Any]]], case: str
) -> None:
    root, by_rank = outcomes
    assert [o[case]["recovered"] for o in by_rank] == [False, False]
    assert not _last(root, case, 1).exists()


def test_when_rank_0_has_no_checkpoint_every_rank_raises_alike(
    outcomes: tuple[Path, list[dict[str, Any]]],
) -> None:
    root, by_rank = outcomes
    # rank 1's own older last.pt is not restored from: the group fails together and Ray restarts it
    assert all("no valid last.pt" in o["rank0_has_none"].get("error", "") for o in by_rank)
    assert not _last(root, "rank0_has_none", 1).exists()
