"""Starts a stage's ``tritonserver`` after killing the Python backend stubs a dead one left behind.

Triton's Python backend runs each model instance in a stub process. A stub normally notices
that its Triton is gone and exits (a SIGKILLed production Triton's stubs did, in the stack's
fault test); but one stub of a fault-test stack in this project's CI was still running 25
minutes after its Triton had gone, re-parented to init, holding its model session and its
shared-memory region (which ``cxr stack down`` then keeps, as it is mapped). So the stage's
command is this launcher: it kills every stub started from the stack's backend folder whose
parent is no longer a ``tritonserver`` (the other stages' live stubs are left alone), then
``exec``s the server, which keeps the PID supervisord signals. ``cxr stack down`` sweeps the
same way after supervisord has stopped.

Run as ``python -m stack.triton_launch BACKENDS_DIR -- TRITONSERVER ARGS...``; it imports
nothing beyond the standard library, so the restart costs no extra second.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from pathlib import Path

log = logging.getLogger("cxr.stack")

STUB_NAME = "triton_python_backend_stub"


def backends_dir(state: Path) -> Path:
    """The stack's Triton backend folder (stack.components fills it; its stubs run from there)."""
    return state / "triton-backends"


def _parent_pid(pid: str) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[1])  # after "(comm)": state, then the parent's PID


def stub_parents(backends: Path) -> dict[int, int]:
    """The live stubs run from ``backends``: their PID and their parent's (a zombie has no exe: left out)."""
    stub = (backends / "python" / STUB_NAME).resolve()
    found = {}
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            if Path(os.readlink(entry / "exe")) == stub:
                found[int(entry.name)] = _parent_pid(entry.name)
        except (OSError, ValueError, IndexError):  # gone meanwhile, or not ours to read
            continue
    return found


def orphaned_stubs(backends: Path) -> list[int]:
    """PIDs of stubs run from ``backends`` whose parent is not a running ``tritonserver``."""
    found = []
    for pid, parent in stub_parents(backends).items():
        try:
            parent_exe = Path(os.readlink(f"/proc/{parent}/exe")).name if parent > 1 else ""
        except OSError:  # the parent is gone too
            parent_exe = ""
        if parent_exe != "tritonserver":
            found.append(pid)
    return found


def reap(backends: Path) -> list[int]:
    """Kill the orphaned stubs (SIGKILL: they serve no one); the PIDs killed."""
    killed = []
    for pid in orphaned_stubs(backends):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            continue
        killed.append(pid)
    if killed:
        log.warning("triton_orphaned_stubs_killed count=%d", len(killed))
    return killed


def main(argv: list[str]) -> None:
    if len(argv) < 3 or argv[1] != "--":
        sys.exit("usage: python -m stack.triton_launch BACKENDS_DIR -- TRITONSERVER [ARGS...]")
    backends, command = Path(argv[0]), argv[2:]
    reap(backends)  # its warning reaches the Triton's log through logging's last-resort handler
    os.execv(command[0], command)


if __name__ == "__main__":
    main(sys.argv[1:])
