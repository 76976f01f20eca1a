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


def test_a_render_check_of_a_folder_that_is_not_there_says_so(tmp_path: Path) -> None:
    """It said "out of date in ...: run `cxr pipeline render`" for a typo in --out-dir."""
    result = CliRunner().invoke(app, ["render", "--check", "--out-dir", str(tmp_path / "nowhere" / "[/x]")])
    assert result.exit_code == 2, result.output
    assert "is not a folder" in _text(result.output) and "out of date" not in result.output, result.output


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


_CHECK_ARGS = ["step", "check-parameters", "--training-config", "training/configs/cpu-small.yaml"]
_CHECK_ARGS += ["--base-model", "none", "--epochs", "1", "--workers", "1"]


def test_a_step_refuses_outputs_that_name_a_file_before_its_work(tmp_path: Path) -> None:
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    result = CliRunner().invoke(app, [*_CHECK_ARGS, "--outputs", str(a_file)])
    assert result.exit_code == 2, result.output  # was FileExistsError from mkdir, after the step's work
    assert "is a file, not a folder" in _text(result.output), result.output
    assert "parameters ok" not in result.output  # refused before the step ran
    assert a_file.read_text() == "x"


def test_a_step_that_cannot_write_its_outputs_says_so_in_one_line(tmp_path: Path) -> None:
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    result = CliRunner().invoke(app, [*_CHECK_ARGS, "--outputs", str(a_file / "sub")])
    assert result.exit_code == 1, result.output  # was NotADirectoryError with a traceback
    assert "cannot write the outputs into --outputs" in _text(result.output), result.output
    assert isinstance(result.exception, SystemExit), result.exception


@pytest.mark.parametrize("name", ["../elsewhere", "a/b", ".."])
def test_a_step_refuses_a_run_name_that_is_no_folder_name(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # was "S3 ... unreachable ... is the stack running?" (the store client's ValueError), or a nested key
    monkeypatch.setenv("CXR_STACK_DIR", str(tmp_path / "stack"))
    monkeypatch.setenv("CXR_S3_ENDPOINT", "http://127.0.0.1:9")
    result = CliRunner().invoke(app, ["step", "record-exit", "--run-name", name, "--status", "Failed"])
    assert result.exit_code == 2, result.output
    assert "is not a run name" in _text(result.output), result.output
    assert "unreachable" not in result.output
