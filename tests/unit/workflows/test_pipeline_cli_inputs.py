"""``cxr pipeline``: an output folder, run name or source that cannot work is one line, not a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from workflows.pipeline_cli import app

pytestmark = pytest.mark.unit


def _text(output: str) -> str:
    return " ".join(output.replace("│", " ").split())


def test_render_into_a_file_or_under_one_is_one_error_line(tmp_path: Path) -> None:
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    for out, expected in (
        (a_file, "is a file, not a folder"),  # was FileExistsError from mkdir
        (a_file / "sub", "cannot create --out-dir"),  # was NotADirectoryError
    ):
        result = CliRunner().invoke(app, ["render", "--out-dir", str(out)])
        assert result.exit_code == 1, result.output
        assert expected in _text(result.output), result.output
        assert isinstance(result.exception, SystemExit), result.exception


def test_run_refuses_a_work_dir_that_is_a_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CXR_STACK_DIR", str(tmp_path / "stack"))
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    result = CliRunner().invoke(
        app,
        [
            "run",
            "--config",
            "training/configs/cpu-small.yaml",
            "--base-model",
            "none",
            "--source",
            str(tmp_path / "none"),
            "--work-dir",
            str(a_file),
        ],
    )
    assert result.exit_code == 1, result.output
    assert "--work-dir" in _text(result.output) and "is a file, not a folder" in _text(result.output)
    assert isinstance(result.exception, SystemExit), result.exception


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--run-name", "../../elsewhere"], "is not a run name"),  # the work dir and S3 prefix escaped
        (["--run-name", ".."], "is not a run name"),
        # was "dataset source ftp:/host/studies is not a directory", after the lock was taken
        (["--source", "ftp://host/studies"], "not a ftp:// URL"),
    ],
)
def test_run_refuses_a_run_name_or_source_it_cannot_use(
    args: list[str], expected: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CXR_STACK_DIR", str(tmp_path / "stack"))
    result = CliRunner().invoke(app, ["run", *args])
    assert result.exit_code == 2, result.output
    assert expected in _text(result.output), result.output
    assert not (tmp_path / "stack").exists()
