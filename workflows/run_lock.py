"""One retrain at a time on this machine: the local twin of the retrain template's Argo mutex.

In the cluster the WorkflowTemplate holds the mutex ``cxr-retrain`` (workflows/retrain.py), so
the weekly run, a feedback-triggered run and one an operator submitted queue behind each
other. On one machine two runs would fight over the CPUs, the stack's ``pipeline/`` folder and
the staging stage file, so ``cxr pipeline run`` takes an OS file lock under the stack folder
for its whole run (the stack's scheduler, the bootstrap and a person at a shell alike), and a
second run is refused with who holds it rather than queued: the scheduler records the refusal
and a person decides.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

from filelock import FileLock, Timeout

from workflows.errors import PipelineError

BUSY_EXIT_CODE = 75  # EX_TEMPFAIL: try again later


class PipelineBusy(PipelineError):
    """Another retrain holds the lock; the message says which run and since when."""


def lock_path(stack_dir: Path) -> Path:
    return stack_dir / "pipeline" / "run.lock"


def _owner_path(stack_dir: Path) -> Path:
    return stack_dir / "pipeline" / "run.owner.json"


def holder(stack_dir: Path) -> str:
    """Who holds (or last held) the lock, in words, from the record its holder left."""
    try:
        owner = json.loads(_owner_path(stack_dir).read_text())
        return f"run {owner['run_name']} (pid {owner['pid']}, since {owner['started_at']})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another run"


@contextmanager
def pipeline_lock(stack_dir: Path, run_name: str) -> Iterator[None]:
    """Hold the retrain lock for the block; :class:`PipelineBusy` at once when someone else holds it.

    The OS releases the lock when the holder dies, so a killed run never blocks the next one.
    """
    path = lock_path(stack_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(path, blocking=False)
    try:
        lock.acquire()
    except Timeout as exc:
        raise PipelineBusy(
            f"another retrain is running: {holder(stack_dir)}; wait for it (`make status` shows the "
            f"scheduler's), lock {path}"
        ) from exc
    try:
        record = {"run_name": run_name, "pid": os.getpid(), "started_at": datetime.now(UTC).isoformat()}
        _owner_path(stack_dir).write_text(json.dumps(record))
        yield
    finally:
        lock.release()


def is_held(stack_dir: Path) -> bool:
    """True while some process (this one included) holds the retrain lock."""
    path = lock_path(stack_dir)
    if not path.exists():
        return False
    probe = FileLock(path, blocking=False, thread_local=False)
    try:
        probe.acquire()
    except Timeout:
        return True
    probe.release()
    return False
