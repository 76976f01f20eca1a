"""One retrain at a time: `cxr pipeline run` refuses, with who holds it and the exit code the scheduler
reads, while another run holds the lock; the OS frees the lock with its holder."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from workflows.config import WorkflowSettings, get_settings
from workflows.pipeline_cli import app
from workflows.run_lock import BUSY_EXIT_CODE, PipelineBusy, is_held, pipeline_lock

pytestmark = pytest.mark.unit


@pytest.fixture
def stack_dir(settings: WorkflowSettings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.setenv("CXR_STACK_DIR", str(tmp_path / "stack"))
    get_settings.cache_clear()
    yield tmp_path / "stack"
    get_settings.cache_clear()


def test_pipeline_run_refuses_while_another_run_holds_the_lock(stack_dir: Path) -> None:
    with pipeline_lock(stack_dir, "cxr-retrain-weekly-20261207-020000"):
        result = CliRunner().invoke(app, ["run", "--run-name", "by-hand"])
    assert result.exit_code == BUSY_EXIT_CODE, result.output
    assert "another retrain is running: run cxr-retrain-weekly-20261207-020000" in " ".join(
        result.output.split()
    )
    assert not (stack_dir / "pipeline" / "by-hand").exists()  # refused before any step


def test_the_lock_is_exclusive_and_dies_with_its_holder(stack_dir: Path) -> None:
    assert not is_held(stack_dir)
    with pipeline_lock(stack_dir, "first"):
        assert is_held(stack_dir)
        with pytest.raises(PipelineBusy, match="run first"), pipeline_lock(stack_dir, "second"):
            pass
    assert not is_held(stack_dir)
    code = (
        "import os, sys\nfrom pathlib import Path\nfrom workflows.run_lock import pipeline_lock\n"
        f"with pipeline_lock(Path({str(stack_dir)!r}), 'killed'):\n    os._exit(9)"  # dies holding it
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 9
    assert not is_held(stack_dir)
