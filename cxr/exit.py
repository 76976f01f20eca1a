"""Leave a finished ``cxr`` command without Python's interpreter teardown.

Once a command has returned, CPython still finalizes every module and frees every object
one by one before the process ends. For a process that loaded torch, Ray, ultralytics and
ONNX Runtime that took 2-3 s after ``cxr train run``'s last line, and 5.5 s for ``make up``'s
pipeline process (docs/benchmarks.md, thirteenth session), and ``make up`` waits for several
such processes in a row. That memory is the operating system's to reclaim anyway.

So :func:`exit_process` does the part of a normal exit that can lose or leave something: it
takes the normal exit while a non-daemon thread still runs (Python joins those), runs the
``atexit`` handlers (logging's flush, temporary directories, multiprocessing's children,
Ray's shutdown, ...) and flushes stdout and stderr; then it ends the process with
``os._exit``. There is no public API for the ``atexit`` half: ``atexit._run_exitfuncs`` is
what the interpreter itself calls.
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
from typing import NoReturn


def exit_status(code: str | int | None) -> int:
    """``SystemExit.code`` as a process status: None is 0, a message is 1 (printed first)."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    if sys.stderr is not None:
        print(code, file=sys.stderr)
    return 1


def _threads_still_working() -> bool:
    main = threading.main_thread()
    return any(t is not main and t.is_alive() and not t.daemon for t in threading.enumerate())


def _flush_standard_streams() -> bool:
    """Flush stdout and stderr as the interpreter does at exit; False when one could not be written.

    A closed or missing stream is skipped, as CPython skips it; a full disk or a reader gone
    away is a failure the exit status must show (CPython exits 120 then).
    """
    ok = True
    streams = {id(s): s for s in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__) if s is not None}
    for stream in streams.values():
        if getattr(stream, "closed", False):
            continue
        try:
            stream.flush()
        except OSError:
            ok = False
    return ok


def exit_process(code: str | int | None) -> NoReturn:
    """End the process with ``code`` (a ``SystemExit.code``), skipping the module teardown.

    Falls back to an ordinary ``sys.exit`` while a non-daemon thread still runs: Python
    joins those before exiting, and cutting one short could lose what it was writing.
    """
    if _threads_still_working():
        sys.exit(code)
    status = exit_status(code)  # a message first, then the handlers, as the interpreter orders them
    atexit._run_exitfuncs()
    if not _flush_standard_streams() and status == 0:
        status = 120
    os._exit(status)
