"""Where a long command leaves the machine's cores idle: busy share per second, idle core-seconds per window.

``python -m benchmarks.cpu_trace SECONDS [WINDOW] [-- COMMAND ...]`` samples the whole machine's CPU
(psutil) once a second. With a command it starts it, traces until it exits (or SECONDS pass: it
is then left running, and said so) and prints its exit status; without one it traces SECONDS of
whatever runs. It prints one line per WINDOW seconds (default 10): the mean busy share of all
cores and the core-seconds left idle, then the total.

Why: on two shared cores a phase that keeps one core idle (single-threaded work, waits on a
server or a process start) is where overlapping the next step can still win time; a phase at
100 % only gets faster by doing less. The first ``make up`` was traced with it
(docs/benchmarks.md, "Where the first `make up` leaves a core idle"). A documented command, not
part of ``make bench``: it measures other commands.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Window:
    start_s: int
    end_s: int
    busy_share: float  # 0..1 over all cores
    idle_core_s: float


def windows(busy: Sequence[float], cores: int, width: int) -> list[Window]:
    """Group one-second busy shares (0..1 of all cores) into windows of ``width`` seconds."""
    out = []
    for start in range(0, len(busy), width):
        chunk = busy[start : start + width]
        out.append(
            Window(
                start_s=start,
                end_s=start + len(chunk),
                busy_share=sum(chunk) / len(chunk),
                idle_core_s=sum((1.0 - b) * cores for b in chunk),
            )
        )
    return out


def sample(seconds: int, until_exit: subprocess.Popen[bytes] | None = None) -> list[float]:
    """One busy share (0..1 of all cores) per second, for ``seconds`` or until the process exits."""
    import psutil

    psutil.cpu_percent(None)  # the first call only starts the interval
    busy = []
    for _ in range(seconds):
        time.sleep(1.0)
        busy.append(psutil.cpu_percent(None) / 100.0)
        if until_exit is not None and until_exit.poll() is not None:
            break
    return busy


def render(rows: Iterable[Window], cores: int) -> str:
    rows = list(rows)
    lines = [f"{'window':>11}  {'busy':>6}  {'idle core-s':>11}"]
    lines += [
        f"{w.start_s:4d}-{w.end_s:4d} s  {100 * w.busy_share:5.1f}%  {w.idle_core_s:11.1f}" for w in rows
    ]
    total = sum(w.idle_core_s for w in rows)
    seconds = rows[-1].end_s if rows else 0
    lines.append(f"total: {total:.1f} of {cores * seconds} core-s idle over {seconds} s")
    return "\n".join(lines)


def main(argv: Sequence[str]) -> int:
    import psutil

    rest = list(argv[1:])
    command = rest[rest.index("--") + 1 :] if "--" in rest else []
    options = rest[: rest.index("--")] if "--" in rest else rest
    numbers = [argv[0], *options] if argv else []
    if not numbers or len(numbers) > 2 or not all(n.isdigit() and int(n) > 0 for n in numbers):
        print(__doc__, file=sys.stderr)
        return 2
    seconds = int(numbers[0])
    width = int(numbers[1]) if len(numbers) > 1 else 10
    cores = psutil.cpu_count() or 1
    try:
        proc = subprocess.Popen(command) if command else None
    except OSError as exc:
        print(f"cannot start {command[0]!r}: {exc}", file=sys.stderr)
        return 2
    busy = sample(seconds, proc)
    print(render(windows(busy, cores, width), cores))
    if proc is not None:
        code = proc.wait() if proc.poll() is not None else None
        print(f"command: {'still running after the trace' if code is None else f'exit status {code}'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
