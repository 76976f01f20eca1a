"""An error message is printed as text, not read as rich markup.

Messages carry what the user gave (paths, setting values) and pydantic's own brackets
("[type=int_parsing, input_value=..."): read as markup, "[x]" vanished from the line and a
"[/x]" (a path, a value) raised MarkupError, a traceback in place of the error line.
"""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from core.errors import CxrError

pytestmark = pytest.mark.unit

HOSTILE = "[/etc/passwd] and [x_min, y_min]"


def _one_line(output: str) -> str:
    return " ".join(output.split())


def test_the_gateways_invalid_setting_line_shows_pydantics_brackets(
    monkeypatch: pytest.MonkeyPatch, tmp_path: object
) -> None:
    from serving.cli import app

    monkeypatch.setenv("CXR_STACK_DIR", str(tmp_path))
    monkeypatch.setenv("CXR_ONNX_THREADS", HOSTILE)
    result = CliRunner().invoke(app, ["serve"])
    assert result.exit_code == 2, result.output
    assert "[type=int_parsing" in result.output, result.output  # was swallowed as a style tag


@pytest.mark.parametrize("module", ["training.cli", "serving.observability.cli"])
def test_an_error_line_keeps_its_brackets(module: str, capsys: pytest.CaptureFixture[str]) -> None:
    import importlib

    fail = importlib.import_module(module)._fail
    fail(CxrError(f"cannot read {HOSTILE}"))
    printed = capsys.readouterr()
    assert HOSTILE in _one_line(printed.out + printed.err)


def test_the_demos_failure_line_keeps_its_brackets(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: object
) -> None:
    import typer

    import cxr.demo as demo

    def fail(*args: object, **kwargs: object) -> None:
        raise demo.DemoError(f"cannot read {HOSTILE}")

    monkeypatch.setattr(demo, "run_demo", fail)
    with pytest.raises(typer.Exit):
        demo.demo(out=tmp_path)  # type: ignore[arg-type]
    assert HOSTILE in _one_line(capsys.readouterr().out)
