"""The CPU trace's windows: idle core-seconds add up, a partial last window is its own length."""

from __future__ import annotations

import subprocess
import sys

import pytest

from benchmarks import cpu_trace
from benchmarks.cpu_trace import render, windows

pytestmark = pytest.mark.unit


def test_windows_sum_idle_core_seconds_and_keep_a_short_last_window() -> None:
    busy = [1.0, 1.0, 0.5, 0.5, 0.0]  # two cores: 0, 0, 1, 1, 2 idle core-seconds
    rows = windows(busy, cores=2, width=2)
    assert [(w.start_s, w.end_s) for w in rows] == [(0, 2), (2, 4), (4, 5)]
    assert [w.idle_core_s for w in rows] == [0.0, 2.0, 2.0]
    assert [w.busy_share for w in rows] == [1.0, 0.5, 0.0]
    text = render(rows, cores=2)
    assert text.splitlines()[-1] == "total: 4.0 of 10 core-s idle over 5 s"
    assert "   2-   4 s   50.0%          2.0" in text


def test_a_traced_command_runs_and_its_exit_status_is_printed(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def until_it_exits(seconds: int, proc: subprocess.Popen[bytes] | None) -> list[float]:
        assert seconds == 5 and proc is not None
        proc.wait()  # the real sampler polls it once a second; here no second passes
        return [0.5, 1.0]

    monkeypatch.setattr(cpu_trace, "sample", until_it_exits)
    monkeypatch.setattr("psutil.cpu_count", lambda *args, **kwargs: 2)
    assert cpu_trace.main(["5", "1", "--", sys.executable, "-c", "raise SystemExit(3)"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[-1] == "command: exit status 3"
    assert "total: 1.0 of 4 core-s idle over 2 s" in out


@pytest.mark.parametrize(
    "argv",
    [[], ["ten"], ["60", "0"], ["60", "x", "--", "true"], ["60", "10", "3"]],
)
def test_arguments_that_are_not_positive_whole_seconds_print_the_usage(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert cpu_trace.main(argv) == 2
    assert "python -m benchmarks.cpu_trace" in capsys.readouterr().err


def test_a_command_that_does_not_exist_is_said_so(capsys: pytest.CaptureFixture[str]) -> None:
    assert cpu_trace.main(["5", "--", "/nonexistent/cxr-no-such-command"]) == 2
    assert "cannot start '/nonexistent/cxr-no-such-command'" in capsys.readouterr().err
