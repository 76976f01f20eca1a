"""The epoch bar of ``cxr train run``: rank 0's epoch callback -> the driver's queue -> the reporter.

No Ray cluster here: the callback runs on a stand-in trainer (``ray.train.report`` stubbed) and the
driver side drains a stdlib queue. The whole path through Ray's queue actor runs in
tests/integration/training/test_training_pipeline.py.
"""

from __future__ import annotations

import io
import queue
import re
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from rich.console import Console

from core.progress import Reporter, reporting
from training import ray_trainer
from training.ray_trainer import PROGRESS_QUEUE, epoch_message, feed_bar, show_epoch

pytestmark = pytest.mark.unit

LOSSES = {"train/box_loss": 1.5, "train/cls_loss": 2.25, "train/dfl_loss": 1.25}


class _Trainer(SimpleNamespace):
    """What the epoch callback reads of ultralytics' trainer."""

    def label_loss_items(self, tloss: Any) -> dict[str, float]:
        return dict(LOSSES)

    def checkpoint_due(self, stopping: bool = False) -> bool:
        return True


def _trainer(tmp_path: Path, epoch: int) -> _Trainer:
    return _Trainer(
        epoch=epoch,
        epochs=3,
        tloss=torch.zeros(3),
        metrics={"metrics/mAP50(B)": 0.125, "metrics/mAP50-95(B)": 0.0625, "val/box_loss": 1.0},
        lr={"lr/pg0": 0.01},
        fitness=0.07,
        epoch_time=4.5,
        model=torch.nn.Linear(2, 1),
        seen_files=["a.png"],
        last=tmp_path / "last.pt",
        best=tmp_path / "best.pt",
        csv=tmp_path / "results.csv",
        save_dir=tmp_path / "rank0",
    )


def _plain() -> tuple[Reporter, io.StringIO]:
    out = io.StringIO()
    return Reporter(Console(file=out, width=120)), out


@pytest.mark.parametrize("rank", [0, 1])
def test_rank_0s_epoch_callback_sends_the_epoch_to_the_driver(
    rank: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import ray.train

    reported: list[dict[str, float]] = []
    monkeypatch.setattr(ray.train, "report", lambda metrics, **_: reported.append(metrics))
    monkeypatch.setattr(ray.train.Checkpoint, "from_directory", staticmethod(lambda path: path))
    sent: queue.Queue[dict[str, Any]] = queue.Queue()
    cfg = {"mlflow_uri": "", "mlflow_run_id": "", PROGRESS_QUEUE: sent}
    callback = ray_trainer._make_epoch_reporter(cfg, rank, world_size=2, resumed_from=0)
    callback(_trainer(tmp_path, epoch=1))
    assert reported and reported[0]["val/mAP50"] == 0.125  # Ray still gets every metric
    if rank != 0:
        assert sent.empty()  # one voice per epoch: the ranks train in lockstep
        return
    assert sent.get_nowait() == {
        "epoch": 2,
        "epochs": 3,
        "metrics": {
            "box_loss": 1.5,
            "cls_loss": 2.25,
            "dfl_loss": 1.25,
            "map50": 0.125,
            "map50_95": 0.0625,
            "epoch_s": 4.5,
        },
    }


def test_a_lost_queue_never_stops_training(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    class Gone:
        def put_nowait(self, item: object) -> None:
            raise RuntimeError("the queue actor died")

    import ray.train

    monkeypatch.setattr(ray.train, "report", lambda metrics, **_: None)
    monkeypatch.setattr(ray.train.Checkpoint, "from_directory", staticmethod(lambda path: path))
    cfg = {"mlflow_uri": "", "mlflow_run_id": "", PROGRESS_QUEUE: Gone()}
    ray_trainer._make_epoch_reporter(cfg, 0, world_size=1, resumed_from=0)(_trainer(tmp_path, epoch=0))


def test_each_epoch_is_a_log_line_with_loss_and_map() -> None:
    reporter, out = _plain()
    metrics = {**LOSSES, "val/mAP50": 0.125, "val/mAP50-95": 0.0625, "epoch_seconds": 4.5, "fitness": 0.1}
    with reporter.bar("train_epoch", "train r", 3, run="r", workers=2) as bar:
        show_epoch(bar, epoch_message(1, 3, metrics))
    assert out.getvalue().splitlines() == [
        "event=train_epoch run=r workers=2 epoch=1 epochs=3 loss=5 box_loss=1.5 cls_loss=2.25 "
        "dfl_loss=1.25 map50=0.125 map50_95=0.0625 epoch_s=4.5"
    ]


def test_on_a_terminal_the_bar_shows_the_epoch_count_loss_and_map() -> None:
    out = io.StringIO()
    reporter = Reporter(Console(file=out, force_terminal=True, width=140))
    metrics = {**LOSSES, "val/mAP50": 0.125, "val/mAP50-95": 0.0625}
    with reporter.bar("train_epoch", "train r", 3, run="r") as bar:
        for epoch in (1, 2, 3):
            show_epoch(bar, epoch_message(epoch, 3, metrics))
    shown = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", out.getvalue())
    assert "event=" not in shown
    assert re.search(r"✓ train r 3/3 \(\d+\.\d s\) loss 5  mAP50 0\.125  mAP50-95 0\.062", shown), shown


def test_the_driver_shows_every_epoch_including_those_queued_as_training_ends() -> None:
    reporter, out = _plain()
    epochs: queue.Queue[dict[str, Any]] = queue.Queue()

    def take(timeout: float) -> dict[str, Any] | None:
        try:
            return epochs.get(timeout=timeout) if timeout else epochs.get_nowait()
        except queue.Empty:
            return None

    stop = threading.Event()
    with reporter.bar("train_epoch", "train r", 3, run="r") as bar:
        drain = threading.Thread(target=feed_bar, args=(take, bar, stop))
        drain.start()
        epochs.put(epoch_message(1, 3, LOSSES))
        for _ in range(100):  # the bar moves while training runs
            if bar.completed == 1:
                break
            threading.Event().wait(0.05)
        assert bar.completed == 1
        epochs.put(epoch_message(2, 3, LOSSES))
        epochs.put(epoch_message(3, 3, LOSSES))
        stop.set()  # fit() returned right after the last epochs were queued: none may be lost
        drain.join(timeout=5)
    assert [re.search(r" epoch=(\d)", line)[1] for line in out.getvalue().splitlines()] == ["1", "2", "3"]  # type: ignore[index]
    assert bar.completed == 3


class _LocalQueue:
    """``ray.util.queue.Queue`` in this process: the same calls the driver and rank 0 make."""

    def __init__(self, maxsize: int = 0, actor_options: dict[str, Any] | None = None) -> None:
        assert actor_options == {"num_cpus": 0}  # never holds a CPU the workers need
        self.items: queue.Queue[Any] = queue.Queue()
        self.closed = False

    def put_nowait(self, item: Any) -> None:
        self.items.put_nowait(item)

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        from ray.util.queue import Empty

        try:
            return self.items.get(block=block, timeout=timeout)
        except queue.Empty as exc:
            raise Empty from exc

    def shutdown(self) -> None:
        self.closed = True


def test_fit_distributed_moves_the_bar_with_each_epoch_rank_0_sends(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import ray.util.queue

    from training.config import TrainConfig, TrainSettings
    from training.dataset import DatasetRef

    queues: list[_LocalQueue] = []

    def make_queue(**kwargs: Any) -> _LocalQueue:
        queues.append(_LocalQueue(**kwargs))
        return queues[-1]

    class Trainer:
        """Ray Train's part: run rank 0's loop with the config it was given, return the checkpoint."""

        def __init__(self, extras: dict[str, Any]) -> None:
            self.extras = extras

        def fit(self) -> SimpleNamespace:
            for epoch in (1, 2):
                ray_trainer._post_epoch(self.extras[PROGRESS_QUEUE], epoch_message(epoch, 2, LOSSES))
            ckpt = tmp_path / "ckpt" / "checkpoint_epoch_0001"
            ckpt.mkdir(parents=True)
            (ckpt / "state.json").write_text('{"epoch": 1, "metrics": {}}')

            def to_directory(dest: str) -> None:
                Path(dest).mkdir(parents=True)
                (Path(dest) / "state.json").write_text((ckpt / "state.json").read_text())

            return SimpleNamespace(checkpoint=SimpleNamespace(path=str(ckpt), to_directory=to_directory))

    def make_trainer(*args: Any, loop_extras: dict[str, Any], **kwargs: Any) -> tuple[Trainer, Any]:
        return Trainer(loop_extras), ray_trainer.RayStorage(str(tmp_path / "ckpt"), None, "file://")

    monkeypatch.setattr(ray.util.queue, "Queue", make_queue)
    monkeypatch.setattr(ray_trainer, "ray_init", lambda settings, cpus: False)
    monkeypatch.setattr(ray_trainer, "make_trainer", make_trainer)
    monkeypatch.setenv("CXR_STACK_DIR", str(tmp_path / "stack"))
    out = io.StringIO()
    with reporting(Console(file=out), live=False):
        run = ray_trainer.fit_distributed(
            TrainConfig(epochs=2).with_workers(2),
            DatasetRef(path=tmp_path, version="v", data_yaml=tmp_path / "data.yaml", synthetic=True),
            run_name="r",
            settings=TrainSettings(),
        )
    assert run.epochs_completed == 2
    lines = out.getvalue().splitlines()
    assert [
        re.search(r"^event=train_epoch run=r workers=2 epoch=(\d) epochs=2 loss=5 ", line)[1]
        for line in lines
    ] == ["1", "2"]  # type: ignore[index]
    assert queues and queues[0].closed  # the queue actor goes with the run


def test_an_epoch_without_validation_shows_no_map() -> None:
    skipped = {"train/box_loss": 2.7, "val/mAP50": 0.0, "val/mAP50-95": 0.0, "val/box_loss": 0.0}
    assert "map50" not in epoch_message(3, 20, skipped)["metrics"]
    validated = {**skipped, "val/mAP50": 0.0, "val/box_loss": 1.9}
    assert epoch_message(3, 20, validated)["metrics"]["map50"] == 0.0


def test_an_mlflow_that_hangs_never_holds_the_epoch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With MLflow down the client retries for minutes; the epoch (and every rank waiting on rank 0)
    goes on, and the epoch reaches MLflow once it answers again."""
    import ray.train
    from mlflow.tracking import MlflowClient

    answering = threading.Event()
    logged: list[tuple[str, int]] = []

    def log_batch(self: Any, run_id: str, metrics: Any = (), **_: Any) -> None:
        answering.wait(timeout=30)
        logged.extend((m.key, m.step) for m in metrics if m.key == "epoch")

    monkeypatch.setattr(MlflowClient, "log_batch", log_batch)
    monkeypatch.setattr(ray.train, "report", lambda metrics, **_: None)
    monkeypatch.setattr(ray.train.Checkpoint, "from_directory", staticmethod(lambda path: path))
    cfg = {"mlflow_uri": "http://127.0.0.1:9", "mlflow_run_id": "run-1", PROGRESS_QUEUE: None}
    epoch_log = ray_trainer.EpochLog("http://127.0.0.1:9", "run-1")
    callback = ray_trainer._make_epoch_reporter(cfg, 0, world_size=2, resumed_from=0, epoch_log=epoch_log)
    epochs = threading.Thread(target=lambda: [callback(_trainer(tmp_path, epoch=e)) for e in (0, 1)])
    epochs.start()
    epochs.join(timeout=5)
    hung = epochs.is_alive()
    answering.set()
    epochs.join()
    assert not hung, "the epoch callback waited on MLflow"
    assert epoch_log.close(timeout=10)
    assert logged == [("epoch", 0), ("epoch", 1)]  # in order, at the epochs' steps


def test_closing_the_epoch_log_gives_up_on_an_mlflow_still_down(monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow.tracking import MlflowClient

    released = threading.Event()
    monkeypatch.setattr(MlflowClient, "log_batch", lambda *_a, **_k: released.wait(timeout=30))
    epoch_log = ray_trainer.EpochLog("http://127.0.0.1:9", "run-1")
    epoch_log.post({"epoch": 1.0}, 0)
    try:
        assert epoch_log.close(timeout=0.2) is False
    finally:
        released.set()
    assert ray_trainer.EpochLog("http://127.0.0.1:9", "").close(timeout=0) is True  # nothing to send
