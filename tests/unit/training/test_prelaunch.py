"""A prelaunched run's pieces that need no Ray: the inputs actor's logic, the workers' wait, the guards."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from training.config import TrainConfig, TrainSettings
from training.errors import DistributedTrainingError
from training.prelaunch import PrelaunchedFit, ray_is_local
from training.ray_trainer import RUN_CANCELLED, RUN_INPUTS, RunInputs, await_run_inputs

pytestmark = pytest.mark.unit


def test_run_inputs_are_read_by_every_rank_and_again_after_a_restart() -> None:
    async def scenario() -> list[Any]:
        holder = RunInputs()
        early = [asyncio.ensure_future(holder.get()) for _ in range(2)]  # two ranks already waiting
        await asyncio.sleep(0)
        assert not any(f.done() for f in early)
        holder.put({"data_yaml": "/d/data.yaml"})
        late = await holder.get()  # a rank Ray restarted after a failure reads the same inputs
        return [*(await asyncio.gather(*early)), late]

    assert asyncio.run(scenario()) == [{"data_yaml": "/d/data.yaml"}] * 3


class _Handle:
    """A RunInputs actor handle's shape: ``handle.get.remote()``."""

    def __init__(self, value: dict[str, Any]) -> None:
        self.get = self
        self.value = value

    def remote(self) -> dict[str, Any]:
        return self.value


def test_workers_merge_the_inputs_over_their_config_or_return_when_cancelled(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import ray

    monkeypatch.setattr(ray, "get", lambda ref, timeout=None: ref)
    plain = {"torch_threads": 1}
    assert await_run_inputs(plain, 0) is plain  # not prelaunched: the config as it is
    handle = _Handle({"data_yaml": "/d/data.yaml", "torch_threads": 2})
    merged = await_run_inputs({"torch_threads": 1, RUN_INPUTS: handle}, 1)
    assert merged is not None and merged["data_yaml"] == "/d/data.yaml" and merged["torch_threads"] == 2
    assert await_run_inputs({RUN_INPUTS: _Handle({RUN_CANCELLED: "validate failed"})}, 0) is None


def test_ray_is_local_unless_an_address_names_a_cluster() -> None:
    assert ray_is_local(TrainSettings(ray_address=None), {})
    assert ray_is_local(TrainSettings(ray_address=None), {"RAY_ADDRESS": "local"})
    assert not ray_is_local(TrainSettings(ray_address=None), {"RAY_ADDRESS": "10.0.0.5:6379"})
    assert not ray_is_local(TrainSettings(ray_address="ray://head:10001"), {})


def test_a_train_step_that_asks_for_another_job_than_was_prelaunched_is_refused() -> None:
    config = TrainConfig(name="t", epochs=4)
    fit = PrelaunchedFit(config, "t-run", TrainSettings())  # never started: nothing to wait for
    with pytest.raises(DistributedTrainingError, match="other epochs"):
        fit.run(config.model_copy(update={"epochs": 8}), dataset=None)  # type: ignore[arg-type]


def test_a_cancelled_run_cannot_train_afterwards() -> None:
    fit = PrelaunchedFit(TrainConfig(name="t"), "t-run", TrainSettings())
    fit._ready.set()  # as if its launch had failed before the inputs actor: nothing to tell
    fit.cancel("the run ended at step validate")
    with pytest.raises(DistributedTrainingError, match="cancelled before its train step"):
        fit.run(TrainConfig(name="t"), dataset=None)  # type: ignore[arg-type]
