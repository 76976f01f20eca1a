"""The one-machine twin of Argo's CronWorkflow controller: the stack's ``scheduler`` component.

In the cluster, Argo fires ``cxr-retrain-weekly`` and ``cxr-retrain-on-feedback``; on one
machine nothing did, and feedback piled up until someone typed ``cxr pipeline run``. This
process keeps the same schedules, read from the rendered YAML (:mod:`workflows.schedules`):

- when a fire time comes it starts the retrain the way a person would, ``cxr pipeline run``
  as a child process with the options the CronWorkflow submits the retrain with;
- for the feedback CronWorkflow it first counts waiting feedback with the check-feedback
  step's own function (:func:`workflows.steps.check_feedback`) and the threshold the YAML
  names, and starts a run only when that step would say ``should-retrain``;
- one retrain at a time: a fire time that comes while a run is going (its own child, or a
  run started by hand or by the bootstrap, which hold :mod:`workflows.run_lock`) is skipped
  and recorded, as ``concurrencyPolicy: Forbid`` skips it in the cluster; one that comes
  later than ``startingDeadlineSeconds`` (the stack was down) is skipped as missed.

Every pass writes ``<stack>/scheduler/status.json`` (:class:`SchedulerStatus`): each
schedule's next fire time, its last feedback count and its last run (start, end, outcome,
exit code, log file). ``cxr stack status`` (``make status``) prints it; each run's output
goes to ``<stack>/scheduler/runs/<run name>.log``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

from filelock import FileLock, Timeout
from pydantic import BaseModel, Field, ValidationError
from rich.table import Table

from workflows.config import WorkflowSettings
from workflows.run_lock import BUSY_EXIT_CODE, holder, is_held
from workflows.schedules import Schedule, ScheduleError, load_schedules
from workflows.steps import FeedbackCheck

log = logging.getLogger(__name__)

Clock = Callable[[], datetime]
FeedbackCounter = Callable[[int], FeedbackCheck]
CommandFor = Callable[[Schedule, str], list[str]]

STOP_GRACE_S = 15.0  # supervisord waits 20 s before it kills the group
ALL_SCHEDULES = "*"


def status_path(stack_dir: Path) -> Path:
    return stack_dir / "scheduler" / "status.json"


# --------------------------------------------------------------------------- status records


class RunRecord(BaseModel):
    """One retrain the scheduler started: why, when, how it ended and where its output is."""

    schedule: str
    run_name: str
    reason: str
    command: list[str]
    started_at: datetime
    finished_at: datetime | None = None
    outcome: str = "running"  # running | succeeded | failed | busy | interrupted
    exit_code: int | None = None
    pid: int | None = None
    log: Path
    summary: Path | None = Field(default=None, description="the run's summary.json, when it wrote one")


class CheckRecord(BaseModel):
    """The feedback count at a fire time of a feedback-gated schedule."""

    at: datetime
    threshold: int
    new_items: int | None = None
    should_retrain: bool = False
    error: str | None = None


class ScheduleState(BaseModel):
    """One schedule as ``make status`` shows it."""

    name: str
    crons: list[str]
    timezone: str
    concurrency_policy: str
    trigger: str
    source: Path
    next_run: datetime | None = None
    last_fire: datetime | None = None
    last_skip: str | None = None
    runs_started: int = 0
    fires_skipped: int = 0
    last_check: CheckRecord | None = None
    last_run: RunRecord | None = None


class SchedulerStatus(BaseModel):
    """``<stack>/scheduler/status.json``."""

    pid: int
    updated_at: datetime
    running: RunRecord | None = None
    schedules: dict[str, ScheduleState] = Field(default_factory=dict)


def read_status(path: Path) -> SchedulerStatus | None:
    """The last status the scheduler wrote, or ``None`` when there is none (or it is unreadable)."""
    try:
        return SchedulerStatus.model_validate_json(path.read_text())
    except (OSError, ValueError, ValidationError):
        return None


def _utc_now() -> datetime:
    return datetime.now(UTC)


# --------------------------------------------------------------------------- the scheduler


class Scheduler:
    """Fires the schedules, one retrain at a time, and keeps the status file.

    Driven by :meth:`tick` (one look at the clock and the running child); the clock, the
    feedback count and the command are injected so a test can run a real child process
    against a fake clock.
    """

    def __init__(
        self,
        schedules: list[Schedule],
        stack_dir: Path,
        *,
        command_for: CommandFor,
        count_feedback: FeedbackCounter,
        clock: Clock = _utc_now,
    ) -> None:
        self.schedules = schedules
        self.stack_dir = stack_dir
        self.command_for = command_for
        self.count_feedback = count_feedback
        self.clock = clock
        self.status_file = status_path(stack_dir)
        self._child: subprocess.Popen[bytes] | None = None
        self._running: RunRecord | None = None
        now = clock()
        previous = read_status(self.status_file)
        self.states = {s.name: _state_of(s, previous) for s in schedules}
        # Fire times passed while the scheduler was down are still due (then run, or skipped as
        # missed past startingDeadlineSeconds), as Argo's controller treats them after a restart.
        since = min(previous.updated_at, now) if previous else now
        self._due = {s.name: s.next_fire(since) for s in schedules}
        self._last_tick = now
        if previous and previous.running and not _alive(previous.pid):
            self._close_stale(previous.running, now)

    # ---- one pass

    def tick(self) -> None:
        """Reap a finished run, fire what is due, write the status file."""
        now = self.clock()
        if now < self._last_tick:
            self._clock_stepped_back(now)
        self._last_tick = now
        self._reap(now)
        for schedule in self.schedules:
            due = self._due[schedule.name]
            if now >= due:
                self._due[schedule.name] = schedule.next_fire(now)
                try:
                    self._fire(schedule, due, now)
                except Exception as exc:  # a runs/ folder it cannot write, a lock file it cannot open
                    # Raised out of run_forever, it ended the scheduler: its shutdown killed the retrain
                    # going on, and the restart fired this fire time again (the status file still said
                    # it was due), failing the same way until supervisord gave the scheduler up.
                    log.exception("event=schedule_fire_failed schedule=%s", schedule.name)
                    self._skip(self.states[schedule.name], f"could not fire: {type(exc).__name__}: {exc}")
        self._write(now)

    def _clock_stepped_back(self, now: datetime) -> None:
        """Fire times computed from a clock that was ahead (NTP's step, a clock set by hand) would hold
        every schedule back by the step: take the next fire time from the corrected clock instead, but
        never the fire time that last fired again (a small step back just after a fire)."""
        log.warning("event=clock_stepped_back by_s=%.0f", (self._last_tick - now).total_seconds())
        for schedule in self.schedules:
            due = schedule.next_fire(now)
            if due == self.states[schedule.name].last_fire:
                due = schedule.next_fire(due)
            self._due[schedule.name] = due

    def seconds_to_next(self) -> float:
        """Seconds until the earliest fire time (never negative)."""
        soonest = min(self._due.values())
        return max(0.0, (soonest - self.clock()).total_seconds())

    @property
    def running(self) -> RunRecord | None:
        return self._running

    def snapshot(self) -> SchedulerStatus:
        """The status as it would be written now."""
        for schedule in self.schedules:
            self.states[schedule.name].next_run = self._due[schedule.name]
        return SchedulerStatus(
            pid=os.getpid(), updated_at=self.clock(), running=self._running, schedules=self.states
        )

    # ---- firing

    def _fire(self, schedule: Schedule, due: datetime, now: datetime) -> None:
        state = self.states[schedule.name]
        state.last_fire = due
        late = (now - due).total_seconds()
        deadline = schedule.starting_deadline_s
        if deadline is not None and late > deadline:
            self._skip(state, f"missed by {late:.0f} s (startingDeadlineSeconds {deadline:g})")
            return
        if self._running is not None:
            self._skip(
                state,
                f"{self._running.run_name} still running (one retrain at a time; "
                f"concurrencyPolicy {schedule.concurrency_policy})",
            )
            return
        if is_held(self.stack_dir):
            self._skip(state, f"{holder(self.stack_dir)} holds the retrain lock")
            return
        reason = (
            f"schedule {' | '.join(schedule.crons)} ({schedule.timezone or 'local'}) at {due.isoformat()}"
        )
        if schedule.feedback_threshold is not None:
            check = self._check_feedback(schedule.feedback_threshold, now)
            state.last_check = check
            if not check.should_retrain:
                return
            reason = f"{check.new_items} new feedback items >= {check.threshold}"
        self._start(schedule, reason, now)

    def _skip(self, state: ScheduleState, why: str) -> None:
        state.fires_skipped += 1
        state.last_skip = why
        log.warning("event=schedule_skipped schedule=%s reason=%r", state.name, why)

    def _check_feedback(self, threshold: int, now: datetime) -> CheckRecord:
        """The check-feedback step's count; a failure is recorded and the next fire time tries again."""
        try:
            result = self.count_feedback(threshold)
        except Exception as exc:  # the store down, bad keys: never let one count stop the scheduler
            log.warning("event=feedback_check_failed error=%r", str(exc))
            return CheckRecord(at=now, threshold=threshold, error=f"{type(exc).__name__}: {exc}")
        return CheckRecord(
            at=now, threshold=threshold, new_items=result.new_items, should_retrain=result.should_retrain
        )

    def _start(self, schedule: Schedule, reason: str, now: datetime) -> None:
        run_name = f"{schedule.name}-{now.astimezone(UTC):%Y%m%d-%H%M%S}"
        log_file = self.status_file.parent / "runs" / f"{run_name}.log"
        log_file.parent.mkdir(parents=True, exist_ok=True)
        command = self.command_for(schedule, run_name)
        record = RunRecord(
            schedule=schedule.name,
            run_name=run_name,
            reason=reason,
            command=command,
            started_at=now,
            log=log_file,
        )
        state = self.states[schedule.name]
        state.runs_started += 1
        state.last_run = record
        try:
            with log_file.open("ab") as out:  # the child writes through its own copy of the descriptor
                self._child = subprocess.Popen(
                    command, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT
                )
        except OSError as exc:
            with contextlib.suppress(OSError):  # the log file may be what could not be opened
                log_file.write_text(f"could not start {command}: {exc}\n")
            record.finished_at, record.outcome = now, "failed"
            log.error("event=scheduled_run_failed_to_start schedule=%s error=%r", schedule.name, str(exc))
            return
        record.pid = self._child.pid
        self._running = record
        log.info(
            "event=scheduled_run_start schedule=%s run=%s pid=%d reason=%r log=%s",
            schedule.name,
            run_name,
            record.pid,
            reason,
            log_file,
        )

    # ---- ending

    def _reap(self, now: datetime) -> None:
        if self._child is not None and self._child.poll() is not None:
            self._finish(self._child.returncode, now)

    def _finish(self, exit_code: int, now: datetime, outcome: str | None = None) -> None:
        record = self._running
        assert record is not None
        record.finished_at, record.exit_code = now, exit_code
        record.outcome = outcome or _outcome(exit_code)
        summary = self.stack_dir / "pipeline" / record.run_name / "summary.json"
        record.summary = summary if summary.exists() else None
        self._child, self._running = None, None
        level = logging.INFO if record.outcome == "succeeded" else logging.ERROR
        log.log(
            level,
            "event=scheduled_run_done schedule=%s run=%s outcome=%s exit_code=%d seconds=%.1f log=%s",
            record.schedule,
            record.run_name,
            record.outcome,
            exit_code,
            (now - record.started_at).total_seconds(),
            record.log,
        )

    def shutdown(self) -> None:
        """Stop a running retrain (TERM, then KILL after a grace period) and write the final status."""
        child = self._child
        if child is not None:
            child.terminate()
            try:
                child.wait(timeout=STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
            self._finish(child.returncode, self.clock(), outcome="interrupted")
        self._write(self.clock())

    def _close_stale(self, record: RunRecord, now: datetime) -> None:
        """A run the previous scheduler process left 'running' ended with it (supervisord stops the group)."""
        record.finished_at, record.outcome = now, "interrupted"
        state = self.states.get(record.schedule)
        if state is not None and state.last_run is not None and state.last_run.run_name == record.run_name:
            state.last_run = record

    def _write(self, now: datetime) -> None:
        """Replace the status file in one rename, so a reader never sees half of it."""
        status = self.snapshot()
        status.updated_at = now
        tmp = self.status_file.with_suffix(".json.tmp")
        try:
            self.status_file.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(status.model_dump_json(indent=2))
            os.replace(tmp, self.status_file)
        except OSError as exc:  # a full disk: the next pass writes it again; the retrain goes on meanwhile
            log.error("event=scheduler_status_not_written path=%s error=%r", self.status_file, str(exc))


def _alive(pid: int) -> bool:
    """Whether the process that wrote a status file still runs (then its 'running' record is true)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _outcome(exit_code: int) -> str:
    if exit_code == 0:
        return "succeeded"
    if exit_code == BUSY_EXIT_CODE:
        return "busy"  # a run started by hand got the lock first
    return "failed"


def _state_of(schedule: Schedule, previous: SchedulerStatus | None) -> ScheduleState:
    """The schedule as read now, keeping what the previous process recorded about its runs."""
    state = ScheduleState(
        name=schedule.name,
        crons=list(schedule.crons),
        timezone=schedule.timezone,
        concurrency_policy=schedule.concurrency_policy,
        trigger=schedule.trigger,
        source=schedule.source,
    )
    old = previous.schedules.get(schedule.name) if previous else None
    if old is not None:
        state.last_fire, state.last_skip, state.last_check = old.last_fire, old.last_skip, old.last_check
        state.runs_started, state.fires_skipped, state.last_run = (
            old.runs_started,
            old.fires_skipped,
            old.last_run,
        )
    return state


# --------------------------------------------------------------------------- wiring


def pipeline_run_command(schedule: Schedule, run_name: str) -> list[str]:
    """``cxr pipeline run`` as a person (and the stack's bootstrap) runs it, plus the schedule's options."""
    return [sys.executable, "-m", "cxr.cli", "pipeline", "run", "--run-name", run_name, *schedule.run_args]


def configured_schedules(settings: WorkflowSettings) -> list[Schedule]:
    """The rendered CronWorkflows, with ``CXR_SCHEDULER_CRON``'s overrides applied."""
    from workflows.render import ARGO_DIR

    schedules = load_schedules(settings.schedules_dir or ARGO_DIR)
    overrides = settings.scheduler_cron
    unknown = sorted(set(overrides) - {s.name for s in schedules} - {ALL_SCHEDULES})
    if unknown:
        raise ScheduleError(f"CXR_SCHEDULER_CRON names no CronWorkflow: {', '.join(unknown)}")
    crons = {s.name: overrides.get(s.name, overrides.get(ALL_SCHEDULES)) for s in schedules}
    return [s.with_crons((cron,)) if (cron := crons[s.name]) else s for s in schedules]


def build_scheduler(settings: WorkflowSettings, *, clock: Clock = _utc_now) -> Scheduler:
    """The scheduler the stack runs: the rendered schedules, the real feedback count, ``cxr pipeline run``
    (or ``CXR_SCHEDULER_COMMAND``)."""
    from workflows import steps

    def count_feedback(threshold: int) -> FeedbackCheck:
        return steps.check_feedback(threshold=threshold, store=steps.default_store(), settings=settings)

    def command_for(schedule: Schedule, run_name: str) -> list[str]:
        if settings.scheduler_command:
            return list(settings.scheduler_command)
        return pipeline_run_command(schedule, run_name)

    return Scheduler(
        configured_schedules(settings),
        settings.stack_dir,
        command_for=command_for,
        count_feedback=count_feedback,
        clock=clock,
    )


def run_forever(scheduler: Scheduler, poll_s: float, stop: threading.Event) -> None:
    """Tick until ``stop`` is set (SIGTERM from supervisord), waking for each fire time; then shut down."""
    # one scheduler per stack folder: a second one (typed by hand beside the stack's) would fire all twice
    single = FileLock(scheduler.status_file.parent / "scheduler.lock", blocking=False)
    scheduler.status_file.parent.mkdir(parents=True, exist_ok=True)
    try:
        single.acquire()
    except Timeout as exc:
        raise ScheduleError(
            f"another scheduler already keeps the schedules of {scheduler.stack_dir} "
            f"(`make status`; {scheduler.status_file})"
        ) from exc
    names = ", ".join(f"{s.name} [{' | '.join(s.crons)} {s.timezone}]" for s in scheduler.schedules)
    log.info("event=scheduler_start schedules=%r status=%s", names, scheduler.status_file)
    try:
        while not stop.is_set():
            scheduler.tick()
            stop.wait(min(poll_s, max(scheduler.seconds_to_next(), 0.05)))
    finally:
        scheduler.shutdown()
        single.release()
        log.info("event=scheduler_stop")


# --------------------------------------------------------------------------- display


def _when(moment: datetime | None) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S %z") if moment else "-"


def _last_run(record: RunRecord | None) -> str:
    if record is None:
        return "none yet"
    if record.outcome == "running":
        return f"{record.run_name}: running since {_when(record.started_at)} (pid {record.pid})"
    took = (
        f", {(record.finished_at - record.started_at) / timedelta(seconds=1):.0f} s"
        if record.finished_at
        else ""
    )
    code = f"exit {record.exit_code}" if record.exit_code is not None else "not started"
    return f"{record.run_name}: {record.outcome} ({code}{took}) at {_when(record.finished_at)}"


def status_table(status: SchedulerStatus) -> Table:
    """Each schedule's next fire time, last feedback count and last run, for ``make status``."""
    table = Table(title=f"retrain schedules (scheduler pid {status.pid}, updated {_when(status.updated_at)})")
    table.add_column("schedule", no_wrap=True)
    for column in ("trigger", "next run", "last run", "log"):
        table.add_column(column, overflow="fold")
    for state in status.schedules.values():
        trigger = f"{' | '.join(state.crons)} {state.timezone}: {state.trigger}"
        if state.last_check is not None:
            check = state.last_check
            trigger += (
                f" (last count: {check.new_items})"
                if check.error is None
                else f" (count failed: {check.error})"
            )
        last = _last_run(state.last_run)
        if state.last_skip:
            last += f"; skipped {state.fires_skipped}x, last: {state.last_skip}"
        table.add_row(
            state.name,
            trigger,
            _when(state.next_run),
            last,
            str(state.last_run.log) if state.last_run else "-",
        )
    return table
