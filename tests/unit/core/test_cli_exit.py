"""``cxr`` ends a finished command without the interpreter's teardown, and loses nothing doing so."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from cxr.exit import exit_status

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[3]


def _python(code: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={"PATH": "/usr/bin:/bin", "OUT": str(tmp_path)},
    )


def test_exit_status_follows_system_exit() -> None:
    assert exit_status(None) == 0
    assert exit_status(0) == 0 and exit_status(2) == 2 and exit_status(-1) == 255
    assert exit_status("refused: no model") == 1


def test_atexit_handlers_and_buffered_output_survive_the_fast_exit(tmp_path: Path) -> None:
    result = _python(
        """
        import atexit, logging, os, sys
        from pathlib import Path
        from cxr.exit import exit_process
        out = Path(os.environ["OUT"])
        atexit.register(lambda: (out / "atexit").write_text("ran"))
        handler = logging.FileHandler(out / "log.txt", delay=False)
        logging.getLogger().addHandler(handler)
        logging.getLogger().warning("last line")
        sys.stdout.write("buffered, no newline")
        exit_process(3)
        """,
        tmp_path,
    )
    assert result.returncode == 3, result.stderr
    assert result.stdout == "buffered, no newline"
    assert (tmp_path / "atexit").read_text() == "ran"
    assert "last line" in (tmp_path / "log.txt").read_text()


def test_a_running_thread_gets_the_normal_exit_and_finishes(tmp_path: Path) -> None:
    result = _python(
        """
        import os, threading, time
        from pathlib import Path
        from cxr.exit import exit_process
        out = Path(os.environ["OUT"])
        def write_late():
            time.sleep(0.5)
            (out / "thread").write_text("finished")
        threading.Thread(target=write_late).start()
        exit_process("stopped: see the log")
        """,
        tmp_path,
    )
    assert result.returncode == 1
    assert "stopped: see the log" in result.stderr
    assert (tmp_path / "thread").read_text() == "finished"


def test_the_cxr_command_keeps_its_exit_codes(tmp_path: Path) -> None:
    ok = subprocess.run(
        [sys.executable, "-m", "cxr.cli", "--help"], cwd=REPO, capture_output=True, check=False
    )
    assert ok.returncode == 0 and b"stack" in ok.stdout
    unknown = subprocess.run(
        [sys.executable, "-m", "cxr.cli", "no-such-command"], cwd=REPO, capture_output=True, check=False
    )
    assert unknown.returncode == 2 and b"No such command" in unknown.stderr
