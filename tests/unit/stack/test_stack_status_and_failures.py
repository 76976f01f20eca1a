"""``cxr stack status`` believes supervisord before a port, and stack commands fail with a message.

No servers: supervisord's answers and the components' probes are stand-ins.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console
from typer.testing import CliRunner

from core.progress import reporting
from stack import manager
from stack.cli import stack_app
from stack.components import Component, ComponentFailed
from stack.config import StackSettings
from stack.credentials import load_or_create
from stack.supervisor import ProcessState

pytestmark = pytest.mark.unit


@pytest.fixture
def settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> StackSettings:
    monkeypatch.setenv("CXR_STACK_DIR", str(tmp_path / "stack"))
    monkeypatch.setenv("CXR_HEALTH_TIMEOUT_S", "5")
    return StackSettings()


class _Supervisor:
    """A running supervisord whose programs are in the given states."""

    states: dict[str, str] = {}

    def __init__(self, state: Path) -> None:
        self.state = state

    def running(self) -> bool:
        return True

    def processes(self) -> list[ProcessState]:
        return [ProcessState(name, st, 100 if st == "RUNNING" else 0, "") for name, st in self.states.items()]

    def process_state(self, name: str) -> ProcessState | None:
        return next((p for p in self.processes() if p.name == name), None)


def _answers(name: str) -> Component:
    return Component(name, ["true"], f"probe://{name}", probe=lambda: True)


def test_a_component_supervisord_gave_up_on_is_not_healthy_even_if_its_port_answers(
    settings: StackSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The gateway crash-looped into FATAL (its port taken by a stray process that answers /healthz)."""
    states = {"gateway": "FATAL", "mlflow": "RUNNING", "reconcile": "EXITED"}
    monkeypatch.setattr(_Supervisor, "states", states)
    monkeypatch.setattr(manager, "Supervisor", _Supervisor)
    components = [_answers("gateway"), _answers("mlflow"), Component("reconcile", ["true"], None)]
    monkeypatch.setattr(manager, "build_components", lambda s, c: components)
    rows = {row.name: row for row in manager.status(settings)}
    assert rows["mlflow"].healthy
    assert not rows["gateway"].healthy, "supervisord says FATAL: not running, whoever answers the port"
    assert not rows["reconcile"].healthy

    result = CliRunner().invoke(stack_app, ["status"])
    assert result.exit_code == 1, result.output


def test_buckets_the_object_store_refuses_end_stack_up_with_a_message_not_a_traceback(
    settings: StackSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise ComponentFailed("s3 did not accept bucket creation within 60 s: SignatureDoesNotMatch")

    monkeypatch.setattr(manager, "ensure_buckets", refuse)
    monkeypatch.setattr(_Supervisor, "states", {"s3": "RUNNING"})
    creds = load_or_create(settings.credentials_file, settings.api_keys_file)
    supervisor: Any = _Supervisor(settings.state)
    out = io.StringIO()
    with (
        reporting(Console(file=out), live=False),
        pytest.raises(manager.StackError, match="bucket creation"),
    ):
        manager.wait_in_order(settings, [_answers("s3")], supervisor, creds)
    assert "component=s3 state=failed" in out.getvalue()


def test_stack_status_names_a_missing_triton_environment_instead_of_a_traceback(
    settings: StackSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``cxr stack status`` from another folder: ``.venv-triton`` (relative) is not found there."""

    def missing(*args: object) -> list[Component]:
        raise ComponentFailed("Triton's environment is missing at .venv-triton: run `make venv`")

    monkeypatch.setattr(_Supervisor, "states", {"gateway": "RUNNING"})
    monkeypatch.setattr(manager, "Supervisor", _Supervisor)
    monkeypatch.setattr(manager, "build_components", missing)
    result = CliRunner().invoke(stack_app, ["status"])
    assert result.exit_code == 1
    assert not isinstance(result.exception, ComponentFailed), result.exception
    assert "Triton's environment is missing" in result.output


def test_logs_refuses_a_line_count_below_one(settings: StackSettings) -> None:
    """-n 0 printed the whole log and -n -5 all but its first 5 lines, exit 0."""
    logs = settings.state / "logs"
    logs.mkdir(parents=True)
    (logs / "gateway.log").write_text("".join(f"{i}\n" for i in range(100)))
    for lines in ("0", "-5"):
        result = CliRunner().invoke(stack_app, ["logs", "gateway", "-n", lines])
        assert result.exit_code == 2, (lines, result.output)
        assert "--lines" in result.output
    result = CliRunner().invoke(stack_app, ["logs", "gateway", "-n", "2"])
    assert result.exit_code == 0 and result.output.split()[-2:] == ["98", "99"]


def test_logs_of_a_stack_that_never_ran_says_so_instead_of_printing_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CXR_STACK_DIR", str(tmp_path / "stack"))
    result = CliRunner().invoke(stack_app, ["logs"])
    assert result.exit_code == 1, result.output  # was 0 with empty output
    text = " ".join(result.output.split())
    assert "the stack has not run here" in text and "make up" in text


def test_a_credentials_file_the_stack_cannot_read_ends_up_and_status_with_one_line(
    settings: StackSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The file holds the install's de-identification secret: refused, never replaced (stack/credentials.py),
    and said in one line, not a CredentialsError traceback."""
    settings.state.mkdir(parents=True)
    settings.credentials_file.write_text("[]")
    monkeypatch.setattr(_Supervisor, "states", {"gateway": "RUNNING"})
    monkeypatch.setattr(manager, "Supervisor", _Supervisor)
    for command in (["up", "--no-bootstrap"], ["status"]):
        result = CliRunner().invoke(stack_app, command)
        assert result.exit_code == 1, (command, result.output)
        assert isinstance(result.exception, SystemExit), (command, result.exception)
        assert "holds no JSON object" in " ".join(result.output.split()), result.output
    assert settings.credentials_file.read_text() == "[]"
