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
    tmp_path.mkdir(parents=True, exist_ok=True)
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


#: a module global whose finalizer leaves a file: it runs only if the interpreter tears modules down
TEARDOWN_SENTINEL = """
import os
from pathlib import Path
class Sentinel:
    def __del__(self, _open=open, _path=str(Path(os.environ["OUT"]) / "torn-down")):
        _open(_path, "w").write("finalized")
sentinel = Sentinel()
"""


def test_the_interpreter_teardown_is_skipped_and_would_have_run(tmp_path: Path) -> None:
    plain = _python(TEARDOWN_SENTINEL + "import sys; sys.exit(0)", tmp_path / "plain")
    fast = _python(
        TEARDOWN_SENTINEL + "from cxr.exit import exit_process; exit_process(0)", tmp_path / "fast"
    )
    assert plain.returncode == 0 and fast.returncode == 0, fast.stderr
    assert (tmp_path / "plain" / "torn-down").exists()  # the sentinel does see a teardown
    assert not (tmp_path / "fast" / "torn-down").exists()


def test_the_cxr_command_exits_fast_with_its_exit_codes(tmp_path: Path) -> None:
    def cxr(*args: str) -> subprocess.CompletedProcess[str]:
        return _python(
            TEARDOWN_SENTINEL + f"import sys; sys.argv = ['cxr', *{list(args)!r}]\n"
            "from cxr.cli import main; main()",
            tmp_path,
        )

    ok = cxr("--help")
    assert ok.returncode == 0 and "stack" in ok.stdout
    assert not (tmp_path / "torn-down").exists()
    unknown = cxr("no-such-command")
    assert unknown.returncode == 2 and "No such command" in unknown.stderr


def test_output_that_cannot_be_written_fails_the_exit(tmp_path: Path) -> None:
    """A full disk under ``cxr ... > out.json`` must not look like success (CPython exits 120)."""
    code = "import sys; from cxr.exit import exit_process; sys.stdout.write('x' * 100); exit_process(0)"
    with open("/dev/full", "w") as full:
        result = subprocess.run(
            [sys.executable, "-c", code],
            cwd=REPO,
            stdout=full,
            stderr=subprocess.PIPE,
            timeout=120,
            check=False,
            env={"PATH": "/usr/bin:/bin"},
        )
    assert result.returncode == 120


def test_missing_standard_streams_are_skipped(tmp_path: Path) -> None:
    code = "from cxr.exit import exit_process; exit_process(0)"
    result = subprocess.run(
        ["/bin/sh", "-c", f'exec "{sys.executable}" -c "{code}" >&- 2>&-'],
        cwd=REPO,
        timeout=120,
        check=False,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0


def test_a_bad_cxr_variable_is_one_line_naming_it_not_a_traceback(tmp_path: Path) -> None:
    """Settings classes outside the data package read CXR_* before any try: main() answers for them."""
    result = _python(
        f"""
        import os, sys
        os.environ.update(CXR_STACK_DIR={str(tmp_path / "stack")!r}, CXR_GATEWAY_PORT="eighty")
        sys.argv = ["cxr", "stack", "status"]
        from cxr.cli import main; main()
        """,
        tmp_path,
    )
    assert result.returncode == 2, result.stderr
    assert "CXR_GATEWAY_PORT" in result.stderr and "valid integer" in result.stderr
    assert "Traceback" not in result.stderr


def test_demo_with_a_garbled_credentials_file_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from cxr.cli import app

    monkeypatch.setenv("CXR_STACK_DIR", str(tmp_path))
    (tmp_path / "credentials.json").write_text("{garbled")
    result = CliRunner().invoke(app, ["demo", "--out", str(tmp_path / "out")])
    assert result.exit_code == 1, result.output
    assert "demo failed" in result.output and "is unreadable" in " ".join(result.output.split())
    assert isinstance(result.exception, SystemExit), result.exception
