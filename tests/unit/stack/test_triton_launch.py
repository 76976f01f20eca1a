"""The Triton launcher kills the Python backend stubs a dead Triton left, and only those."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from stack import triton_launch

pytestmark = pytest.mark.unit


def _stub(backends: Path) -> Path:
    """A stand-in stub (a copy of ``sleep``) at the path Triton runs its stubs from."""
    stub = backends / "python" / triton_launch.STUB_NAME
    stub.parent.mkdir(parents=True)
    shutil.copy2(shutil.which("sleep") or "/bin/sleep", stub)
    return stub


def test_an_orphaned_stub_is_killed_and_one_under_a_live_tritonserver_is_kept(tmp_path: Path) -> None:
    stub = _stub(tmp_path / "backends")
    server = tmp_path / "tritonserver"  # a live "Triton": a shell under that name, parent of its stub
    shutil.copy2(shutil.which("sh") or "/bin/sh", server)
    kept = subprocess.Popen(
        [str(server), "-c", f"{stub} 60 & echo $!; wait"], stdout=subprocess.PIPE, text=True
    )
    assert kept.stdout is not None
    kept_stub = int(kept.stdout.readline())
    # an orphan: its parent shell exits at once, so it is re-parented away from any tritonserver
    out = subprocess.run(
        ["sh", "-c", f"{stub} 60 > /dev/null 2>&1 & echo $!"], capture_output=True, text=True
    )
    orphan = int(out.stdout)
    try:
        deadline = time.monotonic() + 10
        while (
            orphan not in triton_launch.orphaned_stubs(tmp_path / "backends") and time.monotonic() < deadline
        ):
            time.sleep(0.05)
        assert triton_launch.orphaned_stubs(tmp_path / "backends") == [orphan]
        assert triton_launch.reap(tmp_path / "backends") == [orphan]
        deadline = time.monotonic() + 10
        while orphan in triton_launch.stub_parents(tmp_path / "backends") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert list(triton_launch.stub_parents(tmp_path / "backends")) == [kept_stub]  # another stage's, kept
    finally:
        for pid in (kept_stub, orphan):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)
        kept.wait(10)


def test_the_launcher_refuses_a_command_line_without_the_server() -> None:
    with pytest.raises(SystemExit, match="usage"):
        triton_launch.main(["/nowhere"])
