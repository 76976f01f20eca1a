"""The local runner starts the train step's Ray workers first and ends them when the run stops early.

The prelaunched fit itself is stood in for here; tests/integration/workflows/test_pipeline_run_local.py
runs it on a real Ray (trained on, and cancelled by a failing step).
"""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from workflows import runner, steps
from workflows.config import WorkflowSettings
from workflows.errors import StepFailed
from workflows.retrain import STEP_ORDER

pytestmark = pytest.mark.unit


class FakePrelaunched:
    """What the runner and the train step see of a prelaunched fit."""

    def __init__(self) -> None:
        self.run_name = "prelaunched-run"
        self.cancelled: list[str] = []

    def cancel(self, reason: str) -> None:
        self.cancelled.append(reason)


def _options(tmp_path: Path) -> runner.RunOptions:
    return runner.RunOptions(
        source="latest",
        training_config=tmp_path / "c.yaml",
        base_model="none",
        epochs=0,
        workers=2,
        include_feedback=False,
        promote=False,
        run_name="r",
        work_dir=tmp_path / "work",
    )


def _actions(fail_at: str | None, seen: dict[str, Any]) -> Callable[[runner._StepActions], dict[str, Any]]:
    def by_name(self: runner._StepActions) -> dict[str, Callable[[], str]]:
        def action(name: str) -> Callable[[], str]:
            def run() -> str:
                if name == "train":
                    seen["train_got"] = self.prelaunched
                if name == fail_at:
                    raise StepFailed(name, "broken on purpose")
                if name == "promote-to-staging":
                    raise runner._Skipped("not asked")
                return "ok"

            return run

        return {n: action(n) for n in STEP_ORDER}

    return by_name


@pytest.mark.parametrize("fail_at", ["validate", "build-dataset"])
def test_a_run_that_fails_before_train_cancels_the_prelaunched_workers_naming_the_step(
    fail_at: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, settings: WorkflowSettings
) -> None:
    fake = FakePrelaunched()
    asked: list[dict[str, Any]] = []

    def prelaunch_train(config_path: Path, **kwargs: Any) -> FakePrelaunched:
        asked.append({"config_path": config_path, **kwargs})
        return fake

    seen: dict[str, Any] = {}
    monkeypatch.setattr(steps, "prelaunch_train", prelaunch_train)
    monkeypatch.setattr(runner._StepActions, "by_name", _actions(fail_at, seen))
    summary = runner.run_pipeline(
        _options(tmp_path), settings, store=object(), console=Console(file=io.StringIO())
    )
    assert summary.failed_step == fail_at
    # prelaunched with the run's own recipe, workers and base model, before the first step
    assert asked == [
        {
            "config_path": tmp_path / "c.yaml",
            "base_model": "none",
            "epochs": 0,
            "workers": 2,
            "settings": settings,
        }
    ]
    assert fake.cancelled == [f"the run ended at step {fail_at}"]
    assert "train_got" not in seen


def test_the_train_step_gets_the_prelaunched_workers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, settings: WorkflowSettings
) -> None:
    fake = FakePrelaunched()
    seen: dict[str, Any] = {}
    monkeypatch.setattr(steps, "prelaunch_train", lambda *a, **k: fake)
    monkeypatch.setattr(runner._StepActions, "by_name", _actions(None, seen))
    summary = runner.run_pipeline(
        _options(tmp_path), settings, store=object(), console=Console(file=io.StringIO())
    )
    assert summary.succeeded
    assert seen["train_got"] is fake
    # the real fit closes itself once trained; the runner's cancel after the run is then a no-op
    assert fake.cancelled == ["the run stopped"]


def test_no_prelaunch_when_the_settings_turn_it_off(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, settings: WorkflowSettings
) -> None:
    called: list[Any] = []
    monkeypatch.setattr(steps, "prelaunch_train", lambda *a, **k: called.append(a))
    monkeypatch.setattr(runner._StepActions, "by_name", _actions(None, {}))
    off = settings.model_copy(update={"prelaunch_training": False})
    summary = runner.run_pipeline(
        _options(tmp_path), off, store=object(), console=Console(file=io.StringIO())
    )
    assert summary.succeeded and called == []


def test_an_unreadable_recipe_is_left_for_the_train_step_to_report(
    tmp_path: Path, settings: WorkflowSettings
) -> None:
    got = steps.prelaunch_train(
        tmp_path / "missing.yaml", base_model="none", epochs=0, workers=2, settings=settings
    )
    assert got is None
