"""``cxr pacs analyze``: a bad gateway address, timeout or key is one usage line, a stopped stack says so."""

from __future__ import annotations

import pytest
import typer
from typer.testing import CliRunner

from serving.pacs.cli import app as pacs_app

pytestmark = pytest.mark.unit

app = typer.Typer()  # mounted as the root `cxr` mounts it: a one-command app alone would drop the name
app.add_typer(pacs_app, name="pacs")

STUDY = "1.2.840.113619.2.55.3"


def _text(output: str) -> str:
    return " ".join(output.replace("│", " ").split())


@pytest.mark.parametrize(
    ("gateway", "why"),
    [
        ("http://[::1", "Invalid IPv6 URL"),  # httpx.InvalidURL: no HTTPError, was a traceback
        ("http://127.0.0.1:99999", "out of range"),
        ("ftp://127.0.0.1:8080", "must start with http:// or https://"),
        ("127.0.0.1:8080", "must start with http:// or https://"),
    ],
)
def test_a_gateway_that_is_no_http_address_is_a_usage_error(
    gateway: str, why: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CXR_API_KEY", "k")
    result = CliRunner().invoke(app, ["pacs", "analyze", STUDY, "--gateway", gateway])
    assert result.exit_code == 2, result.output
    assert why in _text(result.output), result.output
    assert isinstance(result.exception, SystemExit), result.exception


def test_a_timeout_past_what_a_socket_takes_is_a_usage_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CXR_API_KEY", "k")
    result = CliRunner().invoke(
        app, ["pacs", "analyze", STUDY, "--gateway", "http://127.0.0.1:9", "--timeout-s", "1e308"]
    )
    assert result.exit_code == 2, result.output  # was OverflowError from sock.settimeout
    assert "--timeout-s" in result.output


def test_a_key_no_http_header_can_carry_is_named_not_a_unicode_traceback(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CXR_API_KEY", "clé")
    result = CliRunner().invoke(app, ["pacs", "analyze", STUDY, "--gateway", "http://127.0.0.1:9"])
    assert result.exit_code == 2, result.output
    assert "CXR_API_KEY holds characters" in _text(result.output)
    assert isinstance(result.exception, SystemExit), result.exception


def test_a_gateway_that_refuses_the_connection_says_to_start_the_stack(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CXR_API_KEY", "k")
    result = CliRunner().invoke(app, ["pacs", "analyze", STUDY, "--gateway", "http://127.0.0.1:9"])
    assert result.exit_code == 1, result.output
    assert "start the stack with `make up`" in _text(result.output)


def test_a_200_that_is_no_analysis_names_the_gateway_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    import httpx

    monkeypatch.setenv("CXR_API_KEY", "k")
    answer = httpx.Response(200, text="<html>not the gateway</html>")
    monkeypatch.setattr(httpx, "post", lambda *args, **kwargs: answer)
    result = CliRunner().invoke(app, ["pacs", "analyze", STUDY, "--gateway", "http://127.0.0.1:9"])
    assert result.exit_code == 1, result.output
    assert "not with a study analysis" in _text(result.output)
    assert isinstance(result.exception, SystemExit), result.exception
