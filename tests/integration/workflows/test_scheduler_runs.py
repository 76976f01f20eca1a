"""The stack's scheduler for real: its component's own command, a schedule a second away, a real CLI
command as the run, a run that starts and finishes in the status file, never two children at once,
and a clean stop on SIGTERM; and the feedback schedule counting real feedback in a real S3 server
with the check-feedback step's function and the threshold the rendered YAML names.

The run is `python -m workflows render --check` (a real `cxr pipeline` command that takes seconds),
not `cxr pipeline run`: the smallest real retrain needs S3, MLflow and Ray training (about a minute,
tests/integration/workflows/test_pipeline_run_local.py), and what is under test here is the
scheduling, which is the same for any command (CXR_SCHEDULER_COMMAND).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import psutil
import pytest

from stack.components import scheduler_component
from workflows.config import WorkflowSettings, get_settings
from workflows.render import write_all
from workflows.scheduler import SchedulerStatus, build_scheduler, read_status, status_path

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[3]


def _poll(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def _two_fires_soon() -> tuple[str, datetime]:
    """A cron (sixth field: seconds) firing at two consecutive seconds a few seconds from now, in the
    weekly CronWorkflow's own timezone; and the second fire time."""
    zone = ZoneInfo("Europe/Berlin")
    first = (datetime.now(zone) + timedelta(seconds=4)).replace(microsecond=0)
    if first.second > 57:  # keep both seconds inside one minute
        first = first.replace(second=0) + timedelta(minutes=1)
    cron = f"{first.minute} {first.hour} {first.day} {first.month} * {first.second},{first.second + 1}"
    return cron, first + timedelta(seconds=1)


def test_stack_scheduler_fires_a_schedule_seconds_away_and_runs_it_to_the_end_one_at_a_time(
    tmp_path: Path,
) -> None:
    stack = tmp_path / "stack"
    cron, second_fire = _two_fires_soon()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CXR_")}
    env.update(
        {
            "CXR_STACK_DIR": str(stack),
            "CXR_SCHEDULER_CRON": json.dumps(
                {"cxr-retrain-weekly": cron, "cxr-retrain-on-feedback": "0 0 1 1 *"}
            ),
            "CXR_SCHEDULER_COMMAND": json.dumps([sys.executable, "-m", "workflows", "render", "--check"]),
            "CXR_SCHEDULER_POLL_S": "0.5",  # reap the run soon after it ends
        }
    )
    component = scheduler_component(Path(sys.executable), {})  # the command `make up` supervises
    log_file = tmp_path / "scheduler.log"
    log = log_file.open("wb")
    proc = subprocess.Popen(component.command, env=env, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT)
    most_children = 0

    def both_fires_handled() -> bool:
        nonlocal most_children
        most_children = max(most_children, len(psutil.Process(proc.pid).children()))
        assert proc.poll() is None, log_file.read_text()
        status = read_status(status_path(stack))
        state = status.schedules.get("cxr-retrain-weekly") if status else None
        return bool(
            state
            and state.last_fire == second_fire
            and state.last_run is not None
            and state.last_run.outcome != "running"
        )

    try:
        _poll(both_fires_handled, 120, "the two fire times and the runs they started")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    status = read_status(status_path(stack))
    assert status is not None and status.running is None
    state = status.schedules["cxr-retrain-weekly"]
    last = state.last_run
    assert last is not None and (last.outcome, last.exit_code) == ("succeeded", 0)
    assert last.finished_at is not None and last.finished_at >= last.started_at
    assert "matches workflows/retrain.py" in last.log.read_text()
    # two fire times: either two runs one after the other, or one run and the second fire skipped
    # because it came while the first ran (render --check takes over a second here); never both at once
    assert state.runs_started + state.fires_skipped == 2 and state.runs_started >= 1
    assert most_children <= 1
    assert status.schedules["cxr-retrain-on-feedback"].runs_started == 0
    scheduler_log = log_file.read_text()
    assert "event=scheduled_run_start schedule=cxr-retrain-weekly" in scheduler_log
    assert "event=scheduled_run_done schedule=cxr-retrain-weekly" in scheduler_log
    assert "event=scheduler_stop" in scheduler_log


@pytest.fixture
def store_env(
    s3_store_factory: Callable[[], Any], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> Iterator[Any]:
    """A private S3 server (the count must see only this test's feedback), set as the CXR_* env."""
    from data_pipeline.config import get_settings as data_settings

    for key in [k for k in os.environ if k.startswith("CXR_")]:
        monkeypatch.delenv(key)
    server = s3_store_factory()
    for key, value in server.env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("CXR_STACK_DIR", str(tmp_path / "stack"))
    data_settings.cache_clear()
    get_settings.cache_clear()
    yield server
    data_settings.cache_clear()
    get_settings.cache_clear()


def _feedback(store: Any, feedback_id: str) -> None:
    """A complete feedback item as the gateway leaves it (feedback.json written last)."""
    store.put_bytes(f"feedback/{feedback_id}/annotations.csv", b"image_id,class_name\n")
    store.put_bytes(
        f"feedback/{feedback_id}/feedback.json", json.dumps({"feedback_id": feedback_id}).encode()
    )


class _Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 12, 8, 9, 16, 30, tzinfo=UTC)  # Tuesday 10:16:30 in Berlin

    def __call__(self) -> datetime:
        return self.now


def test_feedback_schedule_counts_real_feedback_and_runs_at_the_rendered_threshold(
    store_env: Any, tmp_path: Path
) -> None:
    rendered = tmp_path / "workflows"
    write_all(WorkflowSettings(feedback_threshold=2), rendered)  # the YAML says 2; the scheduler reads it
    settings = WorkflowSettings(
        schedules_dir=rendered, scheduler_command=[sys.executable, "-c", "print('retrain')"]
    )
    clock = _Clock()
    scheduler = build_scheduler(settings, clock=clock)
    store = store_env.store()
    _feedback(store, "fb-1")

    def state() -> Any:
        status: SchedulerStatus | None = read_status(status_path(tmp_path / "stack"))
        assert status is not None
        return status.schedules["cxr-retrain-on-feedback"]

    clock.now = datetime(2026, 12, 8, 9, 17, 1, tzinfo=UTC)  # 10:17 Berlin: the hourly check
    scheduler.tick()
    assert state().last_check.new_items == 1 and state().runs_started == 0

    _feedback(store, "fb-2")
    clock.now = datetime(2026, 12, 8, 10, 17, 1, tzinfo=UTC)
    scheduler.tick()
    assert state().runs_started == 1 and state().last_run.reason == "2 new feedback items >= 2"
    _poll(lambda: (scheduler.tick() or scheduler.running) is None, 60, "the feedback-triggered run")
    assert (state().last_run.outcome, state().last_run.exit_code) == ("succeeded", 0)
    assert state().next_run == datetime(2026, 12, 8, 11, 17, tzinfo=UTC)
