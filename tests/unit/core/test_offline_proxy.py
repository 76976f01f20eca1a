"""A proxy in the environment never stands between this stack's processes and their loopback servers.

Hospital machines often carry ``http_proxy`` (and a ``no_proxy`` of their own) for the few
things allowed out. Without loopback in the exclusion list each client library reads, a call
to MLflow, the gateway or Triton on 127.0.0.1 travels to that proxy: off this machine, with a
patient's image in it. The "proxy" here is a recording server on loopback, so nothing leaves.
"""

from __future__ import annotations

import http.server
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from core.offline import apply_offline_env, offline_env
from tests.fixtures.servers import HOST, REPO_ROOT

pytestmark = pytest.mark.unit

PROXY_VARS = ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY")
EXCLUSION_VARS = ("NO_PROXY", "no_proxy", "no_grpc_proxy")
#: the caller's own exclusion lists, as a hospital's login scripts might set them
CALLER_LISTS = [
    pytest.param({"no_proxy": ".hospital.example"}, id="lowercase-list"),
    pytest.param({"NO_PROXY": ".hospital.example"}, id="uppercase-list"),
    pytest.param({}, id="no-list"),
]


class _Answer(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


class _RecordingServer(http.server.ThreadingHTTPServer):
    """Notes who connected and the first line they sent (a GET, a proxy's CONNECT, gRPC's HTTP/2
    preface), whatever they then send."""

    def __init__(self) -> None:
        super().__init__((HOST, 0), _Answer)
        self.seen: list[str] = []

    def verify_request(self, request: Any, client_address: object) -> bool:
        request.settimeout(2.0)
        try:
            first = request.recv(256, socket.MSG_PEEK).split(b"\r\n", 1)[0].decode("latin-1")
        except OSError:
            first = "(nothing sent)"
        finally:
            request.settimeout(None)
        self.seen.append(f"{client_address!r} {first}")
        return True


def _through(proxy_seen: list[str], target: str) -> list[str]:
    """What the proxy was asked for ``target`` (a CONNECT or a GET naming it).

    Not every connection the proxy saw: a gRPC subchannel of an earlier test in this process,
    closed but still reconnecting in the background, dials its old port, which the OS may have
    given this test's proxy (seen once in CI: gRPC "went through the proxy" with the env right).
    """
    return [line for line in proxy_seen if target in line]


@contextmanager
def _recording_server() -> Iterator[tuple[str, list[str]]]:
    server = _RecordingServer()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"{HOST}:{server.server_address[1]}", server.seen
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def proxy_and_target(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[list[str], str, list[str]]]:
    """(what the proxy saw, the target's host:port, what the target saw); the proxy is in the env."""
    with _recording_server() as (proxy, proxy_seen), _recording_server() as (target, target_seen):
        for var in PROXY_VARS:
            monkeypatch.setenv(var, f"http://{proxy}")
        for var in EXCLUSION_VARS:
            monkeypatch.delenv(var, raising=False)
        yield proxy_seen, target, target_seen


def _until(seen: list[str], timeout: float = 5.0) -> list[str]:
    """Poll until a server noted a request (gRPC connects in the background)."""
    deadline = time.monotonic() + timeout
    while not seen and time.monotonic() < deadline:
        time.sleep(0.02)
    return seen


def _grpc_dial(target: str) -> None:
    import grpc

    channel = grpc.insecure_channel(target)
    try:
        grpc.channel_ready_future(channel).result(timeout=0.5)  # the target speaks no HTTP/2: never ready
    except grpc.FutureTimeoutError:
        pass
    finally:
        channel.close()


def _requests_get(target: str) -> None:
    import requests

    assert requests.get(f"http://{target}/health", timeout=5).status_code == 200


def _httpx_get(target: str) -> None:
    import httpx

    assert httpx.get(f"http://{target}/health", timeout=5).status_code == 200


def _urllib_get(target: str) -> None:
    with urllib.request.urlopen(f"http://{target}/health", timeout=5) as response:
        assert response.status == 200


CLIENTS: dict[str, Callable[[str], None]] = {
    "requests (MLflow's client)": _requests_get,
    "httpx (the gateway, training's health check)": _httpx_get,
    "urllib": _urllib_get,
    "gRPC (tritonclient.grpc)": _grpc_dial,
}


@pytest.mark.parametrize("caller_lists", CALLER_LISTS)
@pytest.mark.parametrize("client", list(CLIENTS))
def test_a_cli_process_reaches_loopback_servers_directly_whatever_proxy_the_environment_names(
    proxy_and_target: tuple[list[str], str, list[str]],
    caller_lists: dict[str, str],
    client: str,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """Each ``cxr`` command applies the closed-network env to itself, then talks to the stack."""
    proxy_seen, target, target_seen = proxy_and_target
    for var, value in caller_lists.items():
        monkeypatch.setenv(var, value)
    apply_offline_env(tmp_path)
    CLIENTS[client](target)
    assert _until(target_seen), f"{client} never reached the loopback server"
    assert _through(proxy_seen, target) == [], f"{client} went through the proxy: {proxy_seen}"
    for var, value in caller_lists.items():  # the caller's own exclusions still hold
        assert value in os.environ[var].split(",")


_CHILD = """
import sys
sys.path[:0] = [{repo!r}]
from tests.unit.core.test_offline_proxy import CLIENTS
for name, client in CLIENTS.items():
    client({target!r})
"""


@pytest.mark.parametrize("caller_lists", CALLER_LISTS)
def test_a_stack_component_reaches_loopback_servers_directly_under_an_inherited_proxy(
    proxy_and_target: tuple[list[str], str, list[str]],
    caller_lists: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """A component's env is ``offline_env`` laid over what supervisord inherited from ``cxr stack up``."""
    proxy_seen, target, target_seen = proxy_and_target
    for var, value in caller_lists.items():
        monkeypatch.setenv(var, value)
    component_env = {**os.environ, **offline_env(tmp_path)}
    result = subprocess.run(
        [sys.executable, "-c", _CHILD.format(repo=str(REPO_ROOT), target=target)],
        env=component_env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert _until(target_seen)
    assert _through(proxy_seen, target) == [], f"a component went through the proxy: {proxy_seen}"


def test_the_gateways_triton_channel_ignores_any_proxy_even_without_an_exclusion_list(
    proxy_and_target: tuple[list[str], str, list[str]], tmp_path: Path
) -> None:
    """Belt and braces for the channel that carries the images: a process started without the
    offline environment (no exclusion list at all) still dials Triton directly."""
    import asyncio

    from serving.config import ServingSettings
    from serving.inference.backend_triton import TritonBackend

    proxy_seen, target, target_seen = proxy_and_target
    host, _, port = target.rpartition(":")  # the gRPC port is the HTTP one plus 1
    settings = ServingSettings(stack_dir=tmp_path, triton_production_url=f"{host}:{int(port) - 1}")
    backend = TritonBackend(settings, pool_size=1)

    async def dial() -> None:
        client = backend._client("production")
        try:
            await client.is_server_live(client_timeout=0.5)
        except Exception:
            pass  # the target speaks no gRPC: only who it reached counts
        finally:
            await client.close()

    asyncio.run(dial())
    assert _until(target_seen) and _through(proxy_seen, target) == []


def test_a_yolo_settings_file_ultralytics_wrote_first_gets_sync_and_its_loggers_turned_off(
    tmp_path: Path,
) -> None:
    """A caller's own YOLO_CONFIG_DIR often already holds ultralytics' defaults: sync and loggers on."""
    from core.offline import prepare_yolo_config_dir

    settings = tmp_path / "Ultralytics" / "settings.json"
    settings.parent.mkdir()
    defaults = {
        "settings_version": "0.0.8",
        "runs_dir": "/data/runs",
        "sync": True,
        "mlflow": True,
        "comet": True,
    }
    settings.write_text(json.dumps(defaults))
    prepare_yolo_config_dir(tmp_path)
    written = json.loads(settings.read_text())
    assert written["sync"] is False and written["mlflow"] is False and written["comet"] is False
    assert written["runs_dir"] == "/data/runs"  # the caller's own values stay
    mtime = settings.stat().st_mtime_ns
    prepare_yolo_config_dir(tmp_path)
    assert settings.stat().st_mtime_ns == mtime  # already offline: not written again
