"""Progress of long work, the same way in every command: live on a terminal, log lines anywhere else.

Why one helper: training, the pipeline, a promotion and ``stack up`` each run for minutes, and a
person at a terminal wants to see what is happening now, while CI, a supervisord log or a pipe
wants lines it can grep. A :class:`Reporter` takes the events once and renders them for where
they go:

* a terminal (rich's ``Console.is_terminal``): spinners and bars in one rich live display, and a
  coloured line above it for every finished thing;
* anything else: one ``event=<name> key=value ...`` line per event, with no control characters
  (no colours, no carriage returns), like the project's other structured lines.

Only the outermost command makes a reporter (:func:`reporting`); code it calls gets that same
one from a context variable. A training run inside ``cxr pipeline run`` therefore draws its epoch
bar on the pipeline's console: rich allows one live display per console, and two on one
terminal would overwrite each other.

Where a step's own work prints to the terminal (a sub-process, another package's progress
bar), ask for ``spinner=False``: the step then gets a start line instead of a live display.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, SpinnerColumn, TaskID, TextColumn, TimeElapsedColumn

FieldValue = str | int | float | bool | None

#: C0, DEL, C1: what could move a cursor or colour a log (also serving/logsafe.py's OneLine)
CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f-\x9f]")
#: the same less newline and tab, which rich lays out itself; rich drops BEL and CR but passes ESC
_TERMINAL_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_NEEDS_QUOTES = re.compile(r'[\s"=]')
_GOOD = {"ok", "pass", "healthy", "done", "started"}
_SO_SO = {"skipped", "warn"}

_ACTIVE: ContextVar[Reporter | None] = ContextVar("cxr_progress_reporter", default=None)


def format_value(key: str, value: FieldValue) -> str:
    """One value of a log line: seconds to 0.1, other floats to 4 digits, text quoted if needed."""
    if isinstance(value, bool):
        text = str(value).lower()
    elif isinstance(value, float):
        text = f"{value:.1f}" if key == "seconds" or key.endswith("_s") else f"{value:.4g}"
    else:
        text = CONTROL_CHARS.sub(" ", str(value))
    if text == "" or _NEEDS_QUOTES.search(text):
        return json.dumps(text, ensure_ascii=False)  # quotes and backslashes escaped; still one line
    return text


def _printable(text: str) -> str:
    """``text`` without the control characters a terminal would obey.

    A label or detail often carries text from outside (an exception's message, a server's
    answer, a file name): an ESC in it would otherwise reach the operator's terminal as an escape
    sequence (clear the screen, retitle the window, write the clipboard with OSC 52).
    """
    return _TERMINAL_CONTROL.sub(" ", text)


def format_event(event: str, fields: dict[str, FieldValue]) -> str:
    """``event=<name> key=value ...``: the line a non-terminal gets; ``None`` values are left out."""
    parts = [f"event={format_value('event', event)}"]
    parts += [f"{key}={format_value(key, value)}" for key, value in fields.items() if value is not None]
    return " ".join(parts)


def _mark(state: str) -> str:
    if state in _GOOD:
        return "[green]✓[/]"
    if state in _SO_SO:
        return "[yellow]-[/]"
    return "[bold red]✗[/]"


class Reporter:
    """Where a command's progress events go; ``live`` (default: the console is a terminal) picks how."""

    def __init__(self, console: Console | None = None, *, live: bool | None = None) -> None:
        self.console = console or Console(stderr=True)
        terminal = self.console.is_terminal and not self.console.is_dumb_terminal
        self.live = terminal if live is None else live
        self._lock = threading.RLock()  # a training run's epoch events arrive on a drain thread
        self._progress: Progress | None = None
        self._shown = 0

    # ------------------------------------------------------------------ events

    def event(self, event: str, text: str | None = None, /, **fields: FieldValue) -> None:
        """One thing that happened: ``text`` (rich markup) on a terminal, the fields as a log line otherwise.

        ``text=""`` shows nothing on a terminal: for an event the caller already prints its own
        way there (a promotion's gate lines), which logs still get as a structured line.
        """
        if not self.live:
            self._write(format_event(event, fields))
            return
        if text == "":
            return
        if text is None:
            shown = " ".join(f"{k}={format_value(k, v)}" for k, v in fields.items() if v is not None)
            text = f"[bold]{escape(event)}[/] {escape(shown)}"
        with self._lock:  # above a live display, if any
            self.console.print(_printable(text), highlight=False, soft_wrap=True)

    @contextmanager
    def task(
        self, event: str, label: str, *, spinner: bool = True, **fields: FieldValue
    ) -> Iterator[TaskHandle]:
        """Work that takes a while: ``<event>_start`` now, ``<event>_done`` with state and seconds at the end.

        On a terminal it shows as a spinner with the time elapsed (or, with ``spinner=False``, a
        start line). The block ends it with :meth:`TaskHandle.done`; one that raises first ends
        as ``state=failed`` with the exception's type (its message is the caller's to print).
        """
        handle = TaskHandle(self, event, label, fields)
        if not self.live:
            self._write(format_event(f"{event}_start", fields))
        elif spinner:
            handle.task_id = self._show(escape(label), total=None)
        else:
            self.event(f"{event}_start", f"[bold cyan]▶ {escape(label)}[/]")
        try:
            yield handle
        except BaseException as exc:
            if not handle.finished:
                handle.done("failed", error=type(exc).__name__)
            raise
        finally:
            if not handle.finished:
                handle.done("ok")

    @contextmanager
    def bar(self, event: str, label: str, total: int, **fields: FieldValue) -> Iterator[BarHandle]:
        """A count towards ``total`` (epochs): each :meth:`BarHandle.update` is one ``<event>`` line.

        On a terminal: a bar with the latest numbers beside it, and one line with the last of
        them when the block ends, so the numbers stay on screen after the bar goes.
        """
        handle = BarHandle(self, event, label, total, fields)
        if self.live:
            handle.task_id = self._show(escape(label), total=total, count=f"0/{total}")
        state = "failed"
        try:
            yield handle
            state = "ok"
        finally:
            if handle.task_id is not None:
                self._hide(handle.task_id)
                seconds = time.perf_counter() - handle.started
                self.event(
                    event,
                    f"{_mark(state)} [bold]{escape(label)}[/] {handle.completed}/{total} ({seconds:.1f} s) "
                    f"{escape(handle.text)}",
                )

    # ------------------------------------------------------------------ rendering

    def _write(self, line: str) -> None:
        with self._lock:
            self.console.file.write(line + "\n")
            self.console.file.flush()

    def _show(self, description: str, total: int | None, count: str = "") -> TaskID:
        """A row in the live display, started with its first row (no refresh thread while nothing shows)."""
        with self._lock:
            if self._progress is None:
                self._progress = Progress(
                    SpinnerColumn(),
                    TextColumn("[bold]{task.description}"),
                    BarColumn(bar_width=24),
                    TextColumn("{task.fields[count]}"),
                    TimeElapsedColumn(),
                    TextColumn("{task.fields[info]}"),
                    console=self.console,
                    transient=True,
                    refresh_per_second=4,  # a 2-core machine has better uses for its CPU
                )
                self._progress.start()
            self._shown += 1
            return self._progress.add_task(_printable(description), total=total, count=count, info="")

    def _update(self, task_id: TaskID, completed: int, count: str, info: str) -> None:
        with self._lock:
            if self._progress is not None:
                self._progress.update(task_id, completed=completed, count=count, info=_printable(info))

    def _hide(self, task_id: TaskID) -> None:
        """Remove a row; the live display stops with its last row, so plain output follows undisturbed."""
        with self._lock:
            if self._progress is None:
                return
            self._progress.remove_task(task_id)
            self._shown -= 1
            if self._shown == 0:
                self._progress.stop()
                self._progress = None

    def close(self) -> None:
        """Stop the live display if a row was left on it (an interrupted command)."""
        with self._lock:
            if self._progress is not None:
                self._progress.stop()
                self._progress = None
                self._shown = 0


class TaskHandle:
    """One running :meth:`Reporter.task`; ``done`` ends it with its state and any result fields."""

    def __init__(self, reporter: Reporter, event: str, label: str, fields: dict[str, FieldValue]) -> None:
        self.reporter, self.event, self.label, self.fields = reporter, event, label, fields
        self.started = time.perf_counter()
        self.task_id: TaskID | None = None
        self.finished = False

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.started

    def done(self, state: str = "ok", detail: str = "", **fields: FieldValue) -> None:
        """``<event>_done`` with ``state`` (ok, healthy, skipped, failed...) and the seconds it took."""
        if self.finished:
            return
        self.finished = True
        seconds = self.seconds
        if self.task_id is not None:
            self.reporter._hide(self.task_id)
        merged = {**self.fields, "state": state, "seconds": seconds, **fields, "detail": detail or None}
        text = f"{_mark(state)} [bold]{escape(self.label)}[/] ({seconds:.1f} s)"
        extra = " ".join(f"{k}={format_value(k, v)}" for k, v in fields.items() if v is not None)
        text += "".join(f" {escape(part)}" for part in (extra, detail) if part)
        self.reporter.event(f"{self.event}_done", text, **merged)


class BarHandle:
    """One running :meth:`Reporter.bar`."""

    def __init__(
        self, reporter: Reporter, event: str, label: str, total: int, fields: dict[str, FieldValue]
    ) -> None:
        self.reporter, self.event, self.label, self.total, self.fields = reporter, event, label, total, fields
        self.started = time.perf_counter()
        self.task_id: TaskID | None = None
        self.completed = 0
        self.text = ""

    def update(self, completed: int, text: str = "", **fields: FieldValue) -> None:
        """The bar at ``completed`` with ``text`` beside it (terminal), or one ``<event>`` line (logs)."""
        self.completed, self.text = completed, text
        if self.task_id is not None:
            self.reporter._update(self.task_id, completed, f"{completed}/{self.total}", escape(text))
        elif not self.reporter.live:
            self.reporter._write(format_event(self.event, {**self.fields, **fields}))


@contextmanager
def reporting(console: Console | None = None, *, live: bool | None = None) -> Iterator[Reporter]:
    """The reporter of the command running now; the outermost call makes it (on ``console``) and closes it.

    Inner calls ignore their arguments and share it, so nested work renders into one display.
    """
    active = _ACTIVE.get()
    if active is not None:
        yield active
        return
    reporter = Reporter(console, live=live)
    token = _ACTIVE.set(reporter)
    try:
        yield reporter
    finally:
        _ACTIVE.reset(token)
        reporter.close()
