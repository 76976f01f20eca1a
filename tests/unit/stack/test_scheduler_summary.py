"""`make status` shows the retrain schedules: next run and last outcome from the scheduler's status file,
or why there is none."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
from rich.console import Console

from stack.cli import scheduler_summary
from stack.config import StackSettings
from workflows.scheduler import RunRecord, SchedulerStatus, ScheduleState, status_path

pytestmark = pytest.mark.unit


def _text(renderable: object) -> str:
    console = Console(record=True, width=500)
    console.print(renderable)
    return console.export_text()


def test_status_shows_each_schedules_next_run_and_last_outcome(tmp_path: Path) -> None:
    settings = StackSettings(stack_dir=tmp_path)
    assert "CXR_SCHEDULER=false" in _text(scheduler_summary(settings, running=False))
    assert "no status yet" in _text(scheduler_summary(settings, running=True))

    started = datetime(2026, 12, 7, 2, tzinfo=UTC)
    run = RunRecord(
        schedule="cxr-retrain-weekly",
        run_name="cxr-retrain-weekly-20261207-020000",
        reason="schedule 0 3 * * 1",
        command=["cxr", "pipeline", "run"],
        started_at=started,
        finished_at=datetime(2026, 12, 7, 2, 9, tzinfo=UTC),
        outcome="failed",
        exit_code=1,
        log=tmp_path / "scheduler" / "runs" / "cxr-retrain-weekly-20261207-020000.log",
    )
    state = ScheduleState(
        name="cxr-retrain-weekly",
        crons=["0 3 * * 1"],
        timezone="Europe/Berlin",
        concurrency_policy="Forbid",
        trigger="run",
        source=Path("k8s/workflows/cxr-retrain-weekly.yaml"),
        next_run=datetime(2026, 12, 14, 2, tzinfo=UTC),
        last_run=run,
    )
    status = SchedulerStatus(pid=42, updated_at=started, schedules={state.name: state})
    path = status_path(tmp_path)
    path.parent.mkdir(parents=True)
    path.write_text(status.model_dump_json())
    text = _text(scheduler_summary(settings, running=True))
    assert "cxr-retrain-weekly" in text and "2026-12-14 02:00:00 +0000" in text
    assert "failed (exit 1, 540 s)" in text and "cxr-retrain-weekly-20261207-020000.log" in text
