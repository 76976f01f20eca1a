"""The CPU trace's windows: idle core-seconds add up, a partial last window is its own length."""

from __future__ import annotations

import pytest

from benchmarks.cpu_trace import main, render, windows

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


def test_a_traced_command_runs_and_its_exit_status_is_printed(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["5", "1", "--", "python3", "-c", "raise SystemExit(3)"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[-1] == "command: exit status 3"
    assert "total:" in out


def test_without_seconds_it_prints_its_usage(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "python -m benchmarks.cpu_trace" in capsys.readouterr().err
