"""``cxr observability report`` / ``mlflow-exporter``: an output or a port that cannot work is one line."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from typer.testing import CliRunner

from serving.observability.cli import app
from serving.observability.prometheus_api import PrometheusClient

pytestmark = pytest.mark.unit


def _text(output: str) -> str:
    return " ".join(output.replace("│", " ").split())


class _AnsweringPrometheus(PrometheusClient):
    """Every range query answers one series, with no network."""

    def __init__(self, url: str, timeout: float = 10.0) -> None:
        self.url = url

    def __enter__(self) -> _AnsweringPrometheus:
        return self

    def __exit__(self, *_: object) -> None:
        return None

    def query_range(
        self, expr: str, start: float, end: float, step: float
    ) -> list[tuple[dict[str, str], list[tuple[float, float]]]]:
        return [({"stage": "production"}, [(start, 1.0), (end, 2.0)])]


@pytest.fixture
def prometheus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("serving.observability.prometheus_api.PrometheusClient", _AnsweringPrometheus)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("report.txt", "does not end in .png"),  # was matplotlib's ValueError, a traceback
        ("report", "does not end in .png"),  # report.png was written, "wrote report" printed
        ("a-folder", "is a folder"),  # a-folder.png was written, "wrote a-folder" printed
    ],
)
def test_report_refuses_an_out_that_is_no_png_file(
    name: str, expected: str, tmp_path: Path, prometheus: None
) -> None:
    (tmp_path / "a-folder").mkdir()
    result = CliRunner().invoke(app, ["report", "--out", str(tmp_path / name)])
    assert result.exit_code == 2, result.output
    assert expected in _text(result.output), result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-folder"]  # nothing written


def test_report_that_cannot_write_its_file_says_so_in_one_line(tmp_path: Path, prometheus: None) -> None:
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    result = CliRunner().invoke(app, ["report", "--out", str(a_file / "report.png")])
    assert result.exit_code == 1, result.output  # was FileExistsError from mkdir, a traceback
    assert "cannot write the report to" in _text(result.output), result.output
    assert isinstance(result.exception, SystemExit), result.exception


@pytest.mark.parametrize("minutes", ["0", "-5"])
def test_report_refuses_a_window_that_is_not_positive(minutes: str, tmp_path: Path, prometheus: None) -> None:
    out = tmp_path / "report.png"
    result = CliRunner().invoke(app, ["report", "--out", str(out), "--minutes", minutes])
    assert result.exit_code == 2, result.output  # was a plot of a range ending before it starts
    assert "must be above 0 minutes" in _text(result.output), result.output
    assert not out.exists()


def test_report_writes_the_png_it_names(tmp_path: Path, prometheus: None) -> None:
    out = tmp_path / "report.png"
    result = CliRunner().invoke(app, ["report", "--out", str(out), "--minutes", "1"])
    assert result.exit_code == 0, result.output
    assert out.read_bytes().startswith(b"\x89PNG")


@pytest.mark.parametrize("port", ["-1", "0", "99999"])
def test_exporter_refuses_a_port_out_of_range(port: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CXR_MLFLOW_URI", "http://127.0.0.1:9")

    def interrupted(_: float) -> None:  # an exporter that did start (port 0: a random one) stops at once
        raise KeyboardInterrupt

    monkeypatch.setattr("time.sleep", interrupted)
    result = CliRunner().invoke(app, ["mlflow-exporter", "--port", port])
    assert result.exit_code == 2, result.output  # -1: gaierror, 99999: OverflowError, each a traceback
    assert "--port" in _text(result.output), result.output


def test_exporter_on_a_port_in_use_says_so_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CXR_MLFLOW_URI", "http://127.0.0.1:9")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = CliRunner().invoke(app, ["mlflow-exporter", "--port", str(port)])
    assert result.exit_code == 1, result.output  # was OSError: [Errno 98] with a traceback
    assert f"cannot listen on 127.0.0.1:{port}" in _text(result.output), result.output
    assert isinstance(result.exception, SystemExit), result.exception


@pytest.mark.parametrize("command", [["report"], ["check-dashboards"]])
def test_prometheus_defaults_to_the_stacks_setting(
    command: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both asked 127.0.0.1:9090 whatever CXR_PROMETHEUS_URL said (``cxr canary`` reads it)."""
    asked: list[str] = []

    class Recording(_AnsweringPrometheus):
        def __init__(self, url: str, timeout: float = 10.0) -> None:
            asked.append(url)
            super().__init__(url, timeout)

        def query(self, expr: str) -> list[tuple[dict[str, str], float]]:
            return [({"stage": "production"}, 1.0)]

    monkeypatch.setattr("serving.observability.prometheus_api.PrometheusClient", Recording)
    monkeypatch.setenv("CXR_PROMETHEUS_URL", "http://127.0.0.1:19999")
    monkeypatch.chdir(tmp_path)
    CliRunner().invoke(app, command)
    assert asked == ["http://127.0.0.1:19999"]
    asked.clear()
    CliRunner().invoke(app, [*command, "--prometheus", "http://127.0.0.1:29999"])
    assert asked == ["http://127.0.0.1:29999"]
