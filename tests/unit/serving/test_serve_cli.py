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


def test_serve_refuses_the_onnx_backend_without_a_model(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CXR_ONNX_MODEL", raising=False)
    with pytest.raises(typer.Exit) as exc:
        serve(backend=BackendName.onnx, model=None, host="127.0.0.1", port=18080, log_level="warning")
    assert exc.value.exit_code == 2
