"""The stack's generated files: supervisord config, secrets, closed-network env."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import pytest

from core.offline import offline_env
from stack.components import Component, prometheus_config
from stack.config import StackSettings
from stack.credentials import ROLES, hash_key, load_or_create
from stack.supervisor import render_config

pytestmark = pytest.mark.unit


def test_supervisord_config_restarts_children_and_escapes_percent_signs(tmp_path: Path) -> None:
    comp = Component("gateway", ["/bin/echo", "50%", "two words"], "http://x", env={"K": "a%b"})
    text = render_config(tmp_path, [comp])
    assert "[program:gateway]" in text
    assert "autorestart=true" in text and "killasgroup=true" in text
    assert 'command=/bin/echo 50%% "two words"' in text
    assert 'environment=K="a%%b"' in text


def test_json_settings_reach_the_child_exactly_as_supervisord_parses_them(tmp_path: Path) -> None:
    """CXR_PACS_DESTINATIONS is JSON: supervisord's own parser must give it back unchanged."""
    from supervisor.options import ServerOptions

    destinations = json.dumps([{"name": "orthanc", "headers": {"Authorization": "Basic eA=="}}])
    comp = Component("gateway", ["/bin/true"], None, env={"CXR_PACS_DESTINATIONS": destinations, "P": "5%"})
    conf = tmp_path / "supervisord.conf"
    conf.write_text(render_config(tmp_path, [comp]))
    options = ServerOptions()
    options.configfile = str(conf)
    options.process_config(do_usage=False)
    [group] = options.process_group_configs
    [program] = group.process_configs
    assert program.environment == {"CXR_PACS_DESTINATIONS": destinations, "P": "5%"}
    with pytest.raises(ValueError, match="cannot carry"):
        render_config(tmp_path, [Component("x", ["/bin/true"], None, env={"K": "'\"both\"'"})])


def test_credentials_are_private_stable_and_only_hashes_reach_the_gateway(tmp_path: Path) -> None:
    creds_file, keys_file = tmp_path / "credentials.json", tmp_path / "api_keys.json"
    first = load_or_create(creds_file, keys_file)
    second = load_or_create(creds_file, keys_file)
    assert first == second
    assert set(first.api_keys) == set(ROLES)
    assert os.stat(creds_file).st_mode & 0o777 == 0o600
    assert os.stat(keys_file).st_mode & 0o777 == 0o600
    hashed = json.loads(keys_file.read_text())["keys"]
    assert {k["role"]: k["sha256"] for k in hashed} == {r: hash_key(k) for r, k in first.api_keys.items()}
    assert first.api_keys["pacs"] not in keys_file.read_text()


def test_offline_env_switches_off_every_known_phone_home(tmp_path: Path) -> None:
    env = offline_env(tmp_path)
    assert env["YOLO_OFFLINE"] == "1"
    assert env["RAY_USAGE_STATS_ENABLED"] == "0"
    assert env["MLFLOW_DISABLE_TELEMETRY"] == "true"
    assert env["AWS_EC2_METADATA_DISABLED"] == "true"  # no probe of the cloud's metadata address
    font_dir = Path(env["YOLO_CONFIG_DIR"]) / "Ultralytics"
    assert (font_dir / "Arial.ttf").stat().st_size > 10_000  # a real TTF, so no download
    assert json.loads((font_dir / "settings.json").read_text())["sync"] is False


def test_a_fastapi_app_under_the_stacks_environment_sets_up_no_telemetry_export(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """An inherited FASTAPI_OTEL_AUTO_CONFIGURE=true is overridden for the stack's processes.

    MLflow's server is a plain ``FastAPI()`` app: with "true" and an endpoint in its environment,
    its startup would set up OTLP export (here it logs that it failed: the exporter is absent).
    """
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    monkeypatch.setenv("FASTAPI_OTEL_AUTO_CONFIGURE", "true")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://203.0.113.9:4318")
    for key, value in offline_env(tmp_path).items():  # as a component's env is laid over os.environ
        monkeypatch.setenv(key, value)
    app = FastAPI()
    app.get("/ping")(lambda: "pong")
    with caplog.at_level(logging.WARNING), TestClient(app) as client:
        assert client.get("/ping").json() == "pong"
    assert not [r for r in caplog.records if "telemetry" in r.getMessage().lower()]


def test_triton_ports_follow_the_design_contract() -> None:
    settings = StackSettings()
    assert [settings.triton_http_port(s) for s in ("production", "canary", "staging")] == [8000, 8100, 8200]
    with pytest.raises(ValueError, match="unknown stage"):
        settings.triton_http_port("prod")


def test_prometheus_config_scrapes_each_job_and_loads_rules(tmp_path: Path) -> None:
    rules = tmp_path / "r.yaml"
    config = json.loads(prometheus_config({"gateway": ["127.0.0.1:8080"]}, [rules]))
    assert config["scrape_configs"][0]["static_configs"][0]["targets"] == ["127.0.0.1:8080"]
    assert config["rule_files"] == [str(rules)]


def test_a_component_is_up_only_when_its_later_endpoints_listen_too() -> None:
    """Triton reports live before its metrics service listens: waiting returns only once both answer."""
    import http.server
    import threading
    import time

    from stack.components import ComponentFailed, wait_component
    from tests.fixtures.servers import HOST, free_port

    class Ok(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    live_port, metrics_port = free_port(), free_port()
    servers = [http.server.ThreadingHTTPServer((HOST, live_port), Ok)]
    threading.Thread(target=servers[0].serve_forever, daemon=True).start()
    comp = Component(
        "late",
        ["true"],
        f"http://{HOST}:{live_port}/",
        also_listening=(f"http://{HOST}:{metrics_port}/metrics",),
    )
    try:
        with pytest.raises(ComponentFailed, match="not healthy"):
            wait_component(comp, timeout=0.3, alive=lambda: True)

        def start_metrics_later() -> None:
            time.sleep(0.5)
            servers.append(http.server.ThreadingHTTPServer((HOST, metrics_port), Ok))
            servers[-1].serve_forever()

        threading.Thread(target=start_metrics_later, daemon=True).start()
        waited = wait_component(comp, timeout=10, alive=lambda: True)
        assert waited >= 0.4
    finally:
        for server in servers:
            server.shutdown()
            server.server_close()


def test_secret_files_are_private_from_their_first_byte_and_replaced_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """credentials.json holds the de-identification secret: written in place it was world-readable
    for a moment (write_text, then chmod) and, cut short, left empty or garbled."""
    import os

    from core import durable
    from stack import credentials

    target = tmp_path / "state" / "credentials.json"
    modes: list[int] = []
    real_replace = os.replace

    def watch(src: Any, dst: Any) -> None:
        modes.append(os.stat(src).st_mode & 0o777)  # the file as it is before it takes the name
        real_replace(src, dst)

    monkeypatch.setattr(durable.os, "replace", watch)
    credentials.write_private(target, '{"a": 1}\n')
    assert modes == [0o600] and (target.stat().st_mode & 0o777) == 0o600
    credentials.write_private(target, '{"a": 1}\n')
    assert modes == [0o600], "unchanged: not written again"

    def full_disk(src: Any, dst: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(durable.os, "replace", full_disk)
    with pytest.raises(OSError):
        credentials.write_private(target, '{"a": 2}\n')
    assert target.read_text() == '{"a": 1}\n'  # the old file whole, and no temp file left
    assert [p.name for p in target.parent.iterdir()] == ["credentials.json"]
