"""The scheduler against a fake clock and real child processes: a due schedule starts one run whose
start, finish, outcome, exit code and log reach the status file; a fire time while a run goes on,
while someone else holds the retrain lock, or past the starting deadline is skipped and recorded;
the feedback schedule runs only at its threshold; a stop interrupts the run and says so."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from rich.console import Console

from workflows.run_lock import BUSY_EXIT_CODE, pipeline_lock
from workflows.scheduler import (
    Scheduler,
    SchedulerStatus,
    read_status,
    run_forever,
    status_path,
    status_table,
)
from workflows.schedules import Schedule, ScheduleError
from workflows.steps import FeedbackCheck

pytestmark = pytest.mark.unit

T0 = datetime(2026, 12, 7, 1, 59, 30, tzinfo=UTC)


class FakeClock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def _schedule(
    name: str = "cxr-retrain-weekly", *, threshold: int | None = None, deadline: float = 60
) -> Schedule:
    return Schedule(
        name=name,
        crons=("* * * * *",),  # every minute, in UTC: the fake clock steps a minute at a time
        timezone="UTC",
        concurrency_policy="Forbid",
        starting_deadline_s=deadline,
        run_args=("--feedback",),
        feedback_threshold=threshold,
        source=Path("k8s/workflows/x.yaml"),
    )


def _python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def _gated(gate: Path) -> list[str]:
    """A child that runs until the test opens the gate (so 'still running' is certain, not a race)."""
    return _python(
        f"import pathlib, time\nprint('retrain started', flush=True)\n"
        f"while not pathlib.Path({str(gate)!r}).exists():\n    time.sleep(0.02)\nprint('retrain done')"
    )


def _scheduler(
    tmp_path: Path,
    command: list[str],
    *,
    schedules: list[Schedule] | None = None,
    count: Callable[[int], FeedbackCheck] | None = None,
) -> tuple[Scheduler, FakeClock]:
    clock = FakeClock(T0)
    scheduler = Scheduler(
        schedules or [_schedule()],
        tmp_path / "stack",
        command_for=lambda schedule, run_name: command,
        count_feedback=count or (lambda threshold: pytest.fail("no feedback count expected")),
        clock=clock,
    )
    return scheduler, clock


def _status(tmp_path: Path) -> SchedulerStatus:
    status = read_status(status_path(tmp_path / "stack"))
    assert status is not None
    return status


def _until_finished(scheduler: Scheduler, timeout: float = 60.0) -> None:
    """Poll the scheduler (as its loop does) until its run has ended."""
    deadline = time.monotonic() + timeout
    while scheduler.running is not None:
        assert time.monotonic() < deadline, "the run did not finish"
        scheduler.tick()
        time.sleep(0.02)


def test_a_due_schedule_runs_once_records_its_finish_and_skips_a_fire_while_it_runs(tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    scheduler, clock = _scheduler(tmp_path, _gated(gate))
    scheduler.tick()
    assert _status(tmp_path).schedules["cxr-retrain-weekly"].next_run == datetime(2026, 12, 7, 2, tzinfo=UTC)
    assert scheduler.running is None

    clock.now = datetime(2026, 12, 7, 2, 0, 1, tzinfo=UTC)  # the fire time came
    scheduler.tick()
    running = _status(tmp_path)
    assert running.running is not None and running.running.outcome == "running"
    state = running.schedules["cxr-retrain-weekly"]
    assert state.runs_started == 1 and state.last_run is not None and state.last_run.pid
    assert state.last_run.run_name == "cxr-retrain-weekly-20261207-020001"
    assert state.next_run == datetime(2026, 12, 7, 2, 1, tzinfo=UTC)

    clock.now = datetime(2026, 12, 7, 2, 1, 0, tzinfo=UTC)  # next fire while the first run goes on
    scheduler.tick()
    skipped = _status(tmp_path).schedules["cxr-retrain-weekly"]
    assert (skipped.runs_started, skipped.fires_skipped) == (1, 1)
    assert "cxr-retrain-weekly-20261207-020001 still running" in (skipped.last_skip or "")
    assert "concurrencyPolicy Forbid" in (skipped.last_skip or "")

    gate.touch()
    _until_finished(scheduler)
    done = _status(tmp_path)
    assert done.running is None
    last = done.schedules["cxr-retrain-weekly"].last_run
    assert last is not None
    assert (last.outcome, last.exit_code) == ("succeeded", 0)
    assert last.started_at == datetime(2026, 12, 7, 2, 0, 1, tzinfo=UTC)
    assert last.finished_at is not None and last.finished_at >= last.started_at
    assert last.log.read_text().splitlines() == ["retrain started", "retrain done"]
    assert "schedule * * * * * (UTC)" in last.reason
    raw = json.loads(status_path(tmp_path / "stack").read_text())  # the file itself, as a person reads it
    assert raw["schedules"]["cxr-retrain-weekly"]["last_run"]["outcome"] == "succeeded"


@pytest.mark.parametrize(
    ("exit_code", "outcome"), [(3, "failed"), (BUSY_EXIT_CODE, "busy")], ids=["failed", "lock-taken-by-hand"]
)
def test_how_a_run_ended_is_its_exit_code(tmp_path: Path, exit_code: int, outcome: str) -> None:
    scheduler, clock = _scheduler(tmp_path, _python(f"import sys; print('boom'); sys.exit({exit_code})"))
    clock.now = datetime(2026, 12, 7, 2, tzinfo=UTC)
    scheduler.tick()
    _until_finished(scheduler)
    last = _status(tmp_path).schedules["cxr-retrain-weekly"].last_run
    assert last is not None and (last.outcome, last.exit_code) == (outcome, exit_code)
    assert "boom" in last.log.read_text()


def test_a_fire_while_a_run_by_hand_holds_the_retrain_lock_starts_nothing(tmp_path: Path) -> None:
    scheduler, clock = _scheduler(tmp_path, _python("raise SystemExit('must not start')"))
    clock.now = datetime(2026, 12, 7, 2, tzinfo=UTC)
    with pipeline_lock(tmp_path / "stack", "local-by-hand"):
        scheduler.tick()
    state = _status(tmp_path).schedules["cxr-retrain-weekly"]
    assert (state.runs_started, state.fires_skipped, state.last_run) == (0, 1, None)
    assert "run local-by-hand (pid" in (state.last_skip or "") and "holds the retrain lock" in (
        state.last_skip or ""
    )


def test_a_fire_later_than_the_starting_deadline_is_skipped_as_missed(tmp_path: Path) -> None:
    scheduler, clock = _scheduler(tmp_path, _python("raise SystemExit('must not start')"))
    clock.now = datetime(2026, 12, 7, 2, 5, tzinfo=UTC)  # the 02:00 fire, 5 minutes late (deadline 60 s)
    scheduler.tick()
    state = _status(tmp_path).schedules["cxr-retrain-weekly"]
    assert state.runs_started == 0 and "missed by 300 s" in (state.last_skip or "")
    assert state.next_run == datetime(2026, 12, 7, 2, 6, tzinfo=UTC)


def test_feedback_schedule_runs_only_once_enough_feedback_waits(tmp_path: Path) -> None:
    waiting = iter([3, RuntimeError("s3 down"), 51])

    def count(threshold: int) -> FeedbackCheck:
        value = next(waiting)
        if isinstance(value, Exception):
            raise value
        return FeedbackCheck(
            threshold=threshold, new_items=value, should_retrain=value >= threshold, last_dataset_version=None
        )

    feedback = _schedule("cxr-retrain-on-feedback", threshold=50)
    scheduler, clock = _scheduler(tmp_path, _python("print('retrain')"), schedules=[feedback], count=count)
    for minute, new_items in ((0, 3), (1, None)):
        clock.now = datetime(2026, 12, 7, 2, minute, tzinfo=UTC)
        scheduler.tick()
        state = _status(tmp_path).schedules["cxr-retrain-on-feedback"]
        assert state.runs_started == 0 and state.last_check is not None
        assert (state.last_check.new_items, state.last_check.threshold) == (new_items, 50)
    assert "s3 down" in (state.last_check.error or "")  # recorded; the scheduler goes on

    clock.now = datetime(2026, 12, 7, 2, 2, tzinfo=UTC)
    scheduler.tick()
    _until_finished(scheduler)
    state = _status(tmp_path).schedules["cxr-retrain-on-feedback"]
    assert state.runs_started == 1 and state.last_run is not None
    assert state.last_run.reason == "51 new feedback items >= 50" and state.last_run.outcome == "succeeded"


def test_stopping_interrupts_the_run_and_a_restart_keeps_its_record(tmp_path: Path) -> None:
    scheduler, clock = _scheduler(tmp_path, _gated(tmp_path / "never"))
    clock.now = datetime(2026, 12, 7, 2, tzinfo=UTC)
    scheduler.tick()
    assert scheduler.running is not None
    scheduler.shutdown()
    last = _status(tmp_path).schedules["cxr-retrain-weekly"].last_run
    assert last is not None and last.outcome == "interrupted" and last.exit_code is not None

    again, _ = _scheduler(tmp_path, _python("print('x')"))
    kept = again.snapshot().schedules["cxr-retrain-weekly"]
    assert kept.runs_started == 1 and kept.last_run is not None and kept.last_run.outcome == "interrupted"


def test_status_table_shows_next_run_and_last_outcome(tmp_path: Path) -> None:
    scheduler, clock = _scheduler(tmp_path, _python("print('x')"))
    clock.now = datetime(2026, 12, 7, 2, tzinfo=UTC)
    scheduler.tick()
    _until_finished(scheduler)
    console = Console(record=True, width=250)
    console.print(status_table(_status(tmp_path)))
    text = console.export_text()
    assert "cxr-retrain-weekly" in text and "2026-12-07 02:01:00 +0000" in text
    assert "succeeded (exit 0" in text and "run" in text


def test_fire_times_missed_while_the_scheduler_was_down_are_caught_up_within_the_deadline(
    tmp_path: Path,
) -> None:
    first, _ = _scheduler(tmp_path, _python("print('x')"))
    first.tick()  # status written at T0 (01:59:30); then the scheduler is down across 02:00
    again = Scheduler(
        [_schedule()],
        tmp_path / "stack",
        command_for=lambda schedule, run_name: _python("print('caught up')"),
        count_feedback=lambda threshold: pytest.fail("no count"),
        clock=FakeClock(T0 + timedelta(seconds=45)),  # back at 02:00:15, within the 60 s deadline
    )
    again.tick()
    _until_finished(again)
    last = _status(tmp_path).schedules["cxr-retrain-weekly"].last_run
    assert last is not None and last.outcome == "succeeded" and "at 2026-12-07T02:00:00+00:00" in last.reason


def test_a_running_record_is_closed_only_when_the_scheduler_that_wrote_it_is_gone(tmp_path: Path) -> None:
    scheduler, clock = _scheduler(tmp_path, _gated(tmp_path / "gate"))
    clock.now = datetime(2026, 12, 7, 2, tzinfo=UTC)
    scheduler.tick()  # this process (alive) now has a run going
    live, _ = _scheduler(tmp_path, _python("print('x')"))  # `cxr pipeline schedule --show` beside it
    assert live.snapshot().schedules["cxr-retrain-weekly"].last_run.outcome == "running"

    path = status_path(tmp_path / "stack")
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    status = _status(tmp_path)
    path.write_text(status.model_copy(update={"pid": int(dead.stdout)}).model_dump_json())  # killed mid-run
    restarted, _ = _scheduler(tmp_path, _python("print('x')"))
    assert restarted.snapshot().schedules["cxr-retrain-weekly"].last_run.outcome == "interrupted"
    (tmp_path / "gate").touch()
    _until_finished(scheduler)


def test_a_second_scheduler_for_the_same_stack_is_refused(tmp_path: Path) -> None:
    first, _ = _scheduler(tmp_path, _python("print('x')"))
    second, _ = _scheduler(tmp_path, _python("print('x')"))
    stop = threading.Event()
    thread = threading.Thread(target=run_forever, args=(first, 0.05, stop))
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not status_path(tmp_path / "stack").exists():  # the first one has taken the folder
            assert time.monotonic() < deadline
            time.sleep(0.02)
        with pytest.raises(ScheduleError, match="another scheduler already keeps"):
            run_forever(second, 0.05, threading.Event())
    finally:
        stop.set()
        thread.join(timeout=30)


def test_a_clock_stepped_back_resumes_the_schedule_from_the_corrected_time(tmp_path: Path) -> None:
    """A clock a day ahead (no RTC, NTP not yet synced) then corrected: the next fire time is the one
    after the corrected time, not a day away; a fire time that already fired does not fire again."""
    clock = FakeClock(T0 + timedelta(days=1))  # the scheduler starts with the clock a day ahead
    scheduler = Scheduler(
        [_schedule()],
        tmp_path / "stack",
        command_for=lambda schedule, run_name: _python("print('retrain')"),
        count_feedback=lambda threshold: pytest.fail("no count"),
        clock=clock,
    )
    clock.now = T0 + timedelta(days=1, seconds=31)  # 02:00 of the wrong day: it fires
    scheduler.tick()
    _until_finished(scheduler)
    clock.now = T0  # NTP steps the clock back a day: 01:59:30
    scheduler.tick()
    assert _status(tmp_path).schedules["cxr-retrain-weekly"].next_run == datetime(2026, 12, 7, 2, tzinfo=UTC)
    clock.now = datetime(2026, 12, 7, 2, 0, 1, tzinfo=UTC)
    scheduler.tick()
    _until_finished(scheduler)
    assert _status(tmp_path).schedules["cxr-retrain-weekly"].runs_started == 2

    # a small step back just after a fire: that fire time is not fired a second time
    clock.now = datetime(2026, 12, 7, 1, 59, 55, tzinfo=UTC)
    scheduler.tick()
    state = _status(tmp_path).schedules["cxr-retrain-weekly"]
    assert state.next_run == datetime(2026, 12, 7, 2, 1, tzinfo=UTC) and state.runs_started == 2


def test_a_fire_that_cannot_start_its_run_is_recorded_and_the_scheduler_fires_again(tmp_path: Path) -> None:
    """A runs/ folder it cannot write raised out of tick(), ending the scheduler (and, restarted, the
    same fire time failed again until supervisord gave it up): now the fire is a recorded skip."""
    scheduler, clock = _scheduler(tmp_path, _python("print('retrain')"))
    runs = status_path(tmp_path / "stack").parent / "runs"
    runs.parent.mkdir(parents=True)
    runs.write_text("not a folder")  # the run's log cannot be created
    clock.now = datetime(2026, 12, 7, 2, tzinfo=UTC)
    scheduler.tick()
    state = _status(tmp_path).schedules["cxr-retrain-weekly"]
    assert scheduler.running is None and (state.runs_started, state.fires_skipped) == (0, 1)
    assert "could not fire: FileExistsError" in (state.last_skip or "")
    assert state.next_run == datetime(2026, 12, 7, 2, 1, tzinfo=UTC)

    runs.unlink()  # fixed: the next fire time runs
    clock.now = datetime(2026, 12, 7, 2, 1, tzinfo=UTC)
    scheduler.tick()
    _until_finished(scheduler)
    last = _status(tmp_path).schedules["cxr-retrain-weekly"].last_run
    assert last is not None and last.outcome == "succeeded"


def test_a_status_file_that_cannot_be_written_does_not_stop_the_running_retrain(tmp_path: Path) -> None:
    """A failed status write (a full disk) raised out of tick(), and run_forever's shutdown killed the
    retrain going on; now the run goes on and the next pass writes the status."""
    gate = tmp_path / "gate"
    scheduler, clock = _scheduler(tmp_path, _gated(gate))
    clock.now = datetime(2026, 12, 7, 2, tzinfo=UTC)
    scheduler.tick()
    assert scheduler.running is not None
    blocker = status_path(tmp_path / "stack").with_suffix(".json.tmp")
    blocker.mkdir()  # the status cannot be written
    clock.now = datetime(2026, 12, 7, 2, 1, tzinfo=UTC)
    stop = threading.Event()
    thread = threading.Thread(target=run_forever, args=(scheduler, 0.05, stop))
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while scheduler.states["cxr-retrain-weekly"].fires_skipped == 0:  # the 02:01 pass, its write failed
            assert time.monotonic() < deadline and thread.is_alive(), "the scheduler stopped"
            time.sleep(0.02)
        assert thread.is_alive() and scheduler.running is not None
        blocker.rmdir()
        gate.touch()
        deadline = time.monotonic() + 60
        while (last := _status(tmp_path).schedules["cxr-retrain-weekly"].last_run) is None or (
            last.outcome == "running"
        ):
            assert time.monotonic() < deadline, "the run did not finish"
            time.sleep(0.05)
    finally:
        stop.set()
        thread.join(timeout=30)
    assert last.outcome == "succeeded" and last.exit_code == 0
