"""``cxr serve`` hands the app one settings object built from its options; nothing goes through os.environ."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import typer

from serving.cli import BackendName, serve

pytestmark = pytest.mark.unit


def test_serve_builds_the_app_from_its_options_without_touching_the_environment(
    onnx_model: Path,
    api_keys: tuple[Path, dict[str, str]],
    gitops_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import uvicorn

    keys_file, _ = api_keys
    monkeypatch.setenv("CXR_STACK_DIR", str(tmp_path / "stack"))
    monkeypatch.setenv("CXR_API_KEYS_FILE", str(keys_file))
    monkeypatch.setenv("CXR_GITOPS_DIR", str(gitops_dir))
    monkeypatch.setenv("CXR_STORE_RESULTS", "false")
    monkeypatch.delenv("CXR_BACKEND", raising=False)
    monkeypatch.delenv("CXR_ONNX_MODEL", raising=False)
    served: dict[str, Any] = {}
    # uvicorn.run would block serving forever; the test only needs the app it was handed
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: served.update(app=app, **kwargs))
    before = dict(os.environ)

    serve(backend=BackendName.onnx, model=onnx_model, host="127.0.0.1", port=18080, log_level="warning")

    settings = served["app"].state.cxr.settings
    assert settings.backend == "onnx"
    assert settings.onnx_model == onnx_model.resolve()
    assert served["port"] == 18080
    assert dict(os.environ) == before
    # a caller's X-Forwarded-For would otherwise be its client address for the failed-login limit
    assert uvicorn.Config(served.pop("app"), **served).proxy_headers is False


def test_serve_refuses_the_onnx_backend_without_a_model(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CXR_ONNX_MODEL", raising=False)
    with pytest.raises(typer.Exit) as exc:
        serve(backend=BackendName.onnx, model=None, host="127.0.0.1", port=18080, log_level="warning")
    assert exc.value.exit_code == 2


def _flat(output: str) -> str:
    """Typer's error box wraps at the terminal width: words without the box and the line breaks."""
    return " ".join(output.replace("│", " ").split())


def test_serve_options_out_of_range_or_unloadable_are_one_error_line(
    api_keys: tuple[Path, dict[str, str]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import uvicorn
    from typer.testing import CliRunner

    from serving.cli import app

    keys_file, _ = api_keys
    monkeypatch.setenv("CXR_STACK_DIR", str(tmp_path / "stack"))
    monkeypatch.setenv("CXR_API_KEYS_FILE", str(keys_file))
    monkeypatch.setenv("CXR_STORE_RESULTS", "false")
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: pytest.fail("nothing may be served"))
    not_onnx = tmp_path / "weights.pt"
    not_onnx.write_bytes(b"\x80\x02not a protobuf" * 8)
    for args, expected in (
        # the path itself may be wrapped by the console mid-name (a long tmp path under xdist)
        (["--backend", "onnx", "--model", str(not_onnx)], "cannot be loaded"),
        (["--port", "99999"], "--port"),
        (["--log-level", "loud"], "--log-level"),
    ):
        result = CliRunner().invoke(app, ["serve", *args])
        assert result.exit_code == 2, (args, result.output)
        assert expected in _flat(result.output), (args, result.output)
        assert isinstance(result.exception, SystemExit), (args, result.exception)


def test_pacs_analyze_refuses_bad_input_and_a_garbled_credentials_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from cxr.cli import app  # the pacs app alone is one command: Typer would drop its name

    monkeypatch.setenv("CXR_STACK_DIR", str(tmp_path))
    monkeypatch.setenv("CXR_GATEWAY_URL", "http://127.0.0.1:9")
    monkeypatch.delenv("CXR_API_KEY", raising=False)
    (tmp_path / "credentials.json").write_text("{garbled")
    result = CliRunner().invoke(app, ["pacs", "analyze", "1.2.3"])
    assert result.exit_code == 2 and "is unreadable" in _flat(result.output)
    assert isinstance(result.exception, SystemExit), result.exception
    monkeypatch.setenv("CXR_API_KEY", "k")
    for args, expected in (
        (["1.2.3", "--timeout-s", "-1"], "--timeout-s"),
        (["../../v1/feedback"], "is not a DICOM UID"),  # would reach another route of the gateway
    ):
        result = CliRunner().invoke(app, ["pacs", "analyze", *args])
        assert result.exit_code == 2, (args, result.output)
        assert expected in _flat(result.output), (args, result.output)
        assert isinstance(result.exception, SystemExit), (args, result.exception)


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"{bad", "is not valid"),  # was a ValueError traceback from create_app
        (b"\xff\xfe\x00\x80", "is not valid"),
        (None, "cannot be read (Is a directory)"),  # a folder: was IsADirectoryError
    ],
)
def test_an_api_keys_file_that_cannot_be_read_is_one_line_before_the_app(
    content: bytes | None, expected: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from serving.cli import app

    keys = tmp_path / "api_keys.json"
    if content is None:
        keys.mkdir()
    else:
        keys.write_bytes(content)
    model = tmp_path / "model.onnx"
    model.write_bytes(b"never loaded: the keys file is read first")
    monkeypatch.setenv("CXR_STACK_DIR", str(tmp_path / "stack"))
    monkeypatch.setenv("CXR_API_KEYS_FILE", str(keys))
    result = CliRunner().invoke(app, ["serve", "--backend", "onnx", "--model", str(model)])
    assert result.exit_code == 2, result.output
    assert expected in " ".join(result.output.split()), result.output
    assert isinstance(result.exception, SystemExit), result.exception


def test_a_model_option_naming_a_folder_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from serving.cli import app

    monkeypatch.setenv("CXR_STACK_DIR", str(tmp_path / "stack"))
    result = CliRunner().invoke(app, ["serve", "--backend", "onnx", "--model", str(tmp_path)])
    assert result.exit_code == 2
    assert "is a folder, not a file" in " ".join(result.output.split())
