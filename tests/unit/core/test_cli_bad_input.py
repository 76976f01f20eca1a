"""The root ``cxr`` command and the shared address check: bad input is one line, never a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from core.urls import AddressError, http_url
from cxr.cli import app

pytestmark = pytest.mark.unit


def test_a_stack_env_that_is_no_utf8_is_one_line_not_a_traceback_before_every_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stack = tmp_path / "stack"
    stack.mkdir()
    (stack / "stack.env").write_bytes(b"\xff\xfeCXR_S3_BUCKET=x\n")
    monkeypatch.setenv("CXR_STACK_DIR", str(stack))
    result = CliRunner().invoke(app, ["stack", "status"])
    assert result.exit_code == 2, result.output  # was UnicodeDecodeError from python-dotenv
    assert "the stack's settings file" in result.output and "cannot be read" in result.output
    assert isinstance(result.exception, SystemExit), result.exception


@pytest.mark.parametrize(
    "value", ["http://[::1", "http://h:99999", "http://h:port", "ftp://h", "h:8080", "http://", ""]
)
def test_an_address_that_is_no_http_url_is_refused_with_its_setting(value: str) -> None:
    with pytest.raises(AddressError, match="CXR_X_URL"):
        http_url(value, "CXR_X_URL", "http://127.0.0.1:1")


def test_an_http_or_https_address_passes_unchanged() -> None:
    for value in ("http://127.0.0.1:8080", "https://gw.example.org/", "http://[::1]:9090"):
        assert http_url(value, "CXR_X_URL", "http://127.0.0.1:1") == value


@pytest.fixture
def stack_that_is_down(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A stack folder with its keys, and a gateway address nothing answers on."""
    stack = tmp_path / "stack"
    stack.mkdir()
    keys = '{"s3": {"access_key": "a", "secret_key": "b"}, "api_keys": {"pacs": "p", "radiologist": "r"}}'
    (stack / "credentials.json").write_text(keys)
    monkeypatch.setenv("CXR_STACK_DIR", str(stack))
    monkeypatch.setenv("CXR_GATEWAY_URL", "http://127.0.0.1:9")


@pytest.mark.parametrize(
    ("under", "expected"), [("", "is a file, not a folder"), ("sub", "cannot create the output folder")]
)
def test_demo_into_a_file_or_under_one_is_one_error_line(
    under: str, expected: str, tmp_path: Path, stack_that_is_down: None
) -> None:
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    result = CliRunner().invoke(
        app, ["demo", "--out", str(a_file / under if under else a_file), "--n-images", "1"]
    )
    assert result.exit_code == 1, result.output  # was FileExistsError / NotADirectoryError from mkdir
    assert expected in " ".join(result.output.split()), result.output
    assert isinstance(result.exception, SystemExit), result.exception
    assert a_file.read_text() == "x"


def test_demo_against_a_stack_that_is_down_says_so_before_drawing_any_phantom(
    tmp_path: Path, stack_that_is_down: None
) -> None:
    """The gateway was asked only after the phantoms were drawn and written (seconds of work, files left)."""
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["demo", "--out", str(out), "--n-images", "1"])
    assert result.exit_code == 1, result.output
    assert "does not answer" in " ".join(result.output.split()) and "make up" in result.output
    assert not (out / "studies").exists(), "phantoms were drawn for a stack that is down"
