"""Fault tolerance: kill a Ray worker process mid-run; Ray restarts the group from the S3 checkpoint."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest
import torch

from tests.fixtures.ray_workers import ray_train_workers
from training.config import TrainConfig, TrainSettings
from training.dataset import open_dataset_dir
from training.ray_trainer import fit_distributed
from training.ultralytics_ddp import cpu_computes_bf16

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _kill_after_second_checkpoint(store: Any, prefix: str, killed: list[int], deadline: float) -> None:
    """Kill one worker once Ray Train has registered epoch 3's checkpoint.

    Epoch 3's files in S3 are not enough: the controller registers a reported checkpoint
    only at its next poll (every 2 s), and a worker killed before that resumes from an older
    one (CI, 2026-12-06: killed after epoch 3's files, resumed from epoch 1). With
    ``num_to_keep`` 2, registering epoch 3's checkpoint deletes epoch 1's: that deletion is
    the sign. The run has 6 epochs, so the kill still lands while it trains.
    """
    while time.monotonic() < deadline and not killed:
        names = store.list_prefix(prefix)
        written = any(name.endswith("epoch_0002/state.json") for name in names)
        if written and not any("/epoch_0000/" in name for name in names):
            workers = ray_train_workers()
            if workers:
                victim = workers[-1]
                os.kill(victim.pid, signal.SIGKILL)
                killed.append(victim.pid)
                return
        time.sleep(0.2)


def test_killed_worker_resumes_from_s3_checkpoint_with_epoch_count_intact(
    tiny_dataset_dir: Path,
    tiny_recipe: Callable[..., TrainConfig],
    train_settings: Callable[..., TrainSettings],
    s3_store: Any,
    ray_session: None,
) -> None:
    settings = train_settings()
    # in bfloat16 where the cores have it (these do): the resumed run must go on in its checkpoint's precision
    config = tiny_recipe(
        epochs=6, checkpoint={"max_failures": 2, "num_to_keep": 2}, scaling={"cpu_bf16": True}
    ).with_workers(2)
    dataset = open_dataset_dir(tiny_dataset_dir, settings.work_dir)
    run_name = f"resume-{int(time.time())}"
    killed: list[int] = []
    killer = threading.Thread(
        target=_kill_after_second_checkpoint,
        args=(s3_store.store(), f"checkpoints/{run_name}/", killed, time.monotonic() + 300),
        daemon=True,
    )
    killer.start()

    run = fit_distributed(config, dataset, run_name=run_name, settings=settings)
    killer.join(timeout=5)

    assert killed, "no worker was killed: the test did not exercise a failure"
    assert not psutil.pid_exists(killed[0]) or psutil.Process(killed[0]).status() == psutil.STATUS_ZOMBIE
    assert run.epochs_completed == 6
    assert run.metrics["resumed_from_epoch"] >= 3  # the last attempt started from epoch 3's checkpoint
    epochs = [line.split(",")[0].strip() for line in run.results_csv.read_text().splitlines()[1:]]
    assert [int(float(e)) for e in epochs] == [1, 2, 3, 4, 5, 6]
    state = json.loads((run.checkpoint_dir / "state.json").read_text())
    assert state["epoch"] + 1 == state["epochs"] == 6
    last = torch.load(run.checkpoint_dir / "last.pt", map_location="cpu", weights_only=False)
    assert last["train_args"]["amp"] == ("bf16" if cpu_computes_bf16() else False)
