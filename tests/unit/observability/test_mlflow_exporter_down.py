"""The MLflow exporter reports MLflow being down as a metric, not as a failed scrape."""

from __future__ import annotations

import socket

import pytest

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
