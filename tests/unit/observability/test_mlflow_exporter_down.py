"""The MLflow exporter reports MLflow being down as a metric, not as a failed scrape."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from typer.testing import CliRunner

from serving.observability.mlflow_exporter import MlflowCollector

pytestmark = pytest.mark.unit


def test_an_unreachable_mlflow_yields_cxr_mlflow_up_zero_and_nothing_else(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    with socket.socket() as sock:  # a loopback port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    families = list(MlflowCollector(f"http://127.0.0.1:{port}").collect())
    assert [(f.name, [s.value for s in f.samples]) for f in families] == [("cxr_mlflow_up", [0.0])]


def test_the_exporter_reads_the_model_and_experiment_training_uses(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """CXR_REGISTERED_MODEL renames the model training registers into; an exporter still reading
    cxr-detector found no model, exported no versions with cxr_mlflow_up 1, and so
    CxrProductionModelStale could never fire and the registry panels stayed empty."""
    import serving.observability.mlflow_exporter as exporter
    from serving.observability.cli import app

    seen: dict[str, str] = {}

    def fake_serve(uri: str, host: str, port: int, experiment: str, model_name: str) -> None:
        seen.update(uri=uri, model_name=model_name, experiment=experiment)

    monkeypatch.setattr(exporter, "serve", fake_serve)
    monkeypatch.setenv("CXR_STACK_DIR", str(tmp_path))
    monkeypatch.setenv("CXR_REGISTERED_MODEL", "chest-v2")
    monkeypatch.setenv("CXR_MLFLOW_EXPERIMENT", "chest-runs")  # training's runs: the run alerts read them
    monkeypatch.setenv("CXR_MLFLOW_URI", "http://127.0.0.1:5999")
    result = CliRunner().invoke(app, ["mlflow-exporter"])
    assert result.exit_code == 0, result.output
    assert seen == {"uri": "http://127.0.0.1:5999", "model_name": "chest-v2", "experiment": "chest-runs"}
    result = CliRunner().invoke(app, ["mlflow-exporter", "--model-name", "other"])
    assert seen["model_name"] == "other"
