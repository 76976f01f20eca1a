"""``cxr stack up`` reports each component as it turns healthy (no servers: components answer a probe)."""

from __future__ import annotations

import io
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from rich.console import Console
from typer.testing import CliRunner

from core.progress import reporting
from stack import manager
from stack.cli import stack_app
from stack.components import Component
from stack.config import StackSettings
from stack.credentials import load_or_create

pytestmark = pytest.mark.unit


class _Supervisor:
    """supervisord's answer for each program: RUNNING, or EXITED for the ones named ``dead``."""

    def __init__(self, dead: set[str]) -> None:
        self.dead = dead

    def process_state(self, name: str) -> SimpleNamespace:
        return SimpleNamespace(state="EXITED" if name in self.dead else "RUNNING")


def _components(broken: str | None = None) -> list[Component]:
    def probe(name: str) -> Component:
        return Component(name, ["true"], f"probe://{name}", probe=lambda: name != broken)

    return [probe("mlflow"), probe("gateway"), Component("reconcile", ["true"], None), probe("prometheus")]


@pytest.fixture
def settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> StackSettings:
    monkeypatch.setenv("CXR_STACK_DIR", str(tmp_path / "stack"))
    monkeypatch.setenv("CXR_HEALTH_TIMEOUT_S", "5")
    return StackSettings()


def _fake_up(broken: str | None) -> object:
    """``manager.up`` without supervisord: the same waiting and reporting, on probe components."""

    def up(settings: StackSettings) -> list[manager.ComponentStatus]:
        creds = load_or_create(settings.credentials_file, settings.api_keys_file)
        comps = _components(broken)
        manager.wait_in_order(settings, comps, _Supervisor({broken} if broken else set()), creds)  # type: ignore[arg-type]
        return [manager.ComponentStatus(c.name, "RUNNING", 1, True, c.health_url or "") for c in comps]

    return up


def test_stack_up_logs_each_component_as_it_turns_healthy(
    settings: StackSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(manager, "up", _fake_up(None))
    result = CliRunner().invoke(stack_app, ["up", "--no-bootstrap"])
    assert result.exit_code == 0, result.output
    done = [line for line in result.stdout.splitlines() if line.startswith("event=stack_component_done")]
    assert [re.search(r"component=(\S+) state=(\S+)", line).groups() for line in done] == [  # type: ignore[union-attr]
        ("mlflow", "healthy"),
        ("gateway", "healthy"),
        ("reconcile", "started"),
        ("prometheus", "healthy"),
    ]
    assert re.match(
        r"event=stack_component_done component=mlflow state=healthy seconds=\d+\.\d url=probe://mlflow ",
        done[0],
    )
    assert "event=stack_component_start component=mlflow" in result.stdout


def test_stack_up_logs_the_component_that_failed_and_stops_there(
    settings: StackSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(manager, "up", _fake_up("gateway"))
    result = CliRunner().invoke(stack_app, ["up", "--no-bootstrap"])
    assert result.exit_code == 1
    assert "stack up failed" in result.stdout
    failed = next(line for line in result.stdout.splitlines() if "state=failed" in line)
    assert failed.startswith("event=stack_component_done component=gateway state=failed seconds=")
    assert 'detail="gateway exited before becoming healthy (probe://gateway)."' in failed
    assert "component=prometheus" not in result.stdout  # nothing after the first failure


def test_on_a_terminal_each_component_gets_a_mark_and_its_time(settings: StackSettings) -> None:
    out = io.StringIO()
    creds = load_or_create(settings.credentials_file, settings.api_keys_file)
    with reporting(Console(file=out, force_terminal=True, width=120)):
        manager.wait_in_order(settings, _components(), _Supervisor(set()), creds)  # type: ignore[arg-type]
    shown = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", out.getvalue())
    assert "event=" not in shown
    for name in ("mlflow", "gateway", "reconcile", "prometheus"):
        assert re.search(rf"✓ {name} \(\d+\.\d s\)", shown), shown


def test_each_bootstrap_step_is_reported_with_its_outcome(
    settings: StackSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    from stack import bootstrap

    codes = iter([0, 3])
    monkeypatch.setattr(bootstrap.subprocess, "run", lambda *a, **k: SimpleNamespace(returncode=next(codes)))
    out = io.StringIO()
    with reporting(Console(file=out), live=False):
        bootstrap._cxr(settings, "synth", "data", "synth", "--out", "x")
        with pytest.raises(bootstrap.BootstrapFailed, match="rerun it with: cxr data golden build"):
            bootstrap._cxr(settings, "golden-build", "data", "golden", "build")
    lines = out.getvalue().splitlines()
    assert lines[0] == "event=bootstrap_step_start step=synth"
    assert re.fullmatch(r"event=bootstrap_step_done step=synth state=ok seconds=\d+\.\d", lines[1])
    assert re.fullmatch(
        r"event=bootstrap_step_done step=golden-build state=failed seconds=\d+\.\d exit_code=3", lines[3]
    )


def test_a_step_run_beside_another_writes_its_output_to_its_log_and_names_it_when_it_fails(
    settings: StackSettings, tmp_path: Path
) -> None:
    """The golden set is built while the phantoms are drawn: its output must not cover theirs."""
    from stack import bootstrap

    log = tmp_path / "logs" / "golden.log"
    out = io.StringIO()
    failed = pytest.raises(bootstrap.BootstrapFailed, match=rf"its output is in {re.escape(str(log))}")
    with reporting(Console(file=out), live=False), failed:
        bootstrap._cxr(settings, "golden-synth", "data", "synth", "--n-images", "not-a-number", log=log)
    assert "Usage: python -m cxr.cli data synth" in log.read_text()  # the real `cxr` process's own error
    assert out.getvalue() == ""  # nothing over the other step's progress


def test_when_the_phantoms_fail_the_golden_set_is_waited_for_and_both_errors_are_kept(
    settings: StackSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    from stack import bootstrap

    monkeypatch.setenv("CXR_MLFLOW_URI", "http://127.0.0.1:9")
    monkeypatch.setattr(bootstrap, "registered_versions", lambda uri: [])
    golden_ran: list[str] = []

    def golden(*args: object) -> None:
        golden_ran.append("done")
        raise bootstrap.BootstrapFailed("bootstrap step 'golden-build' failed (exit 1)")

    def phantoms(*args: object) -> None:
        raise bootstrap.BootstrapFailed("bootstrap step 'synth' failed (exit 2)")

    monkeypatch.setattr(bootstrap, "ensure_golden_set", golden)
    monkeypatch.setattr(bootstrap, "_phantoms", phantoms)
    out = io.StringIO()
    with reporting(Console(file=out), live=False), pytest.raises(bootstrap.BootstrapFailed) as failed:
        bootstrap.ensure_served_model(settings)
    assert "'synth' failed" in str(failed.value)  # the step that failed first is the one reported
    assert failed.value.__notes__ == [
        "the golden set failed too: bootstrap step 'golden-build' failed (exit 1)"
    ]
    assert golden_ran == ["done"]
    assert "event=bootstrap_step_done step=golden state=failed" in out.getvalue()


REAL_POPEN = subprocess.Popen  # bootstrap.subprocess is this module: patched below, kept here


def _fake_pipeline(monkeypatch: pytest.MonkeyPatch, code: str) -> list[subprocess.Popen[bytes]]:
    """``cxr pipeline run`` stood in for by a Python process running ``code``."""
    from stack import bootstrap

    started: list[subprocess.Popen[bytes]] = []

    def popen(command: list[str], **kwargs: object) -> subprocess.Popen[bytes]:
        assert command[1:3] == ["-m", "cxr.cli"] and "--golden-wait" in command
        started.append(REAL_POPEN([sys.executable, "-c", code]))
        return started[-1]

    monkeypatch.setattr(bootstrap.subprocess, "Popen", popen)
    return started


def test_a_golden_set_that_fails_interrupts_the_pipeline_started_beside_it(
    settings: StackSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    from stack import bootstrap

    # a pipeline that would wait a minute for the pin, as the real one would wait for GOLDEN_WAIT_S
    started = _fake_pipeline(monkeypatch, "import time; time.sleep(60)")
    golden_error = bootstrap.BootstrapFailed("bootstrap step 'golden-build' failed (exit 1)")
    args = ("pipeline", "run", "--golden-wait", "600")
    out = io.StringIO()
    with (
        reporting(Console(file=out), live=False),
        pytest.raises(bootstrap.BootstrapFailed, match="golden-build"),
    ):
        bootstrap._run_pipeline_beside(settings, args, lambda: golden_error)
    assert started[0].returncode is not None  # interrupted (Ctrl-C), not left waiting
    assert re.search(r"event=bootstrap_step_done step=pipeline state=failed", out.getvalue())


def test_the_pipeline_beside_the_golden_set_reports_its_own_failure(
    settings: StackSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    from stack import bootstrap

    _fake_pipeline(monkeypatch, "raise SystemExit(4)")
    args = ("pipeline", "run", "--golden-wait", "600")
    with (
        reporting(Console(file=io.StringIO()), live=False),
        pytest.raises(
            bootstrap.BootstrapFailed, match=r"'pipeline' failed \(exit 4\); rerun it with: cxr pipeline"
        ),
    ):
        bootstrap._run_pipeline_beside(settings, args, lambda: None)
    _fake_pipeline(monkeypatch, "pass")
    with reporting(Console(file=io.StringIO()), live=False):
        bootstrap._run_pipeline_beside(settings, args, lambda: None)


def test_the_promotion_runs_in_this_process_with_the_stack_env_and_names_its_command_when_refused(
    settings: StackSettings, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """No sub-process start for a light step; the stack's settings reach it, and leave with it."""
    import os

    from stack import bootstrap

    gitops = tmp_path / "not-a-checkout"
    settings.env_file.parent.mkdir(parents=True, exist_ok=True)
    settings.env_file.write_text(f"CXR_GITOPS_DIR={gitops}\nCXR_MLFLOW_URI=http://127.0.0.1:9\n")
    before = dict(os.environ)
    out = io.StringIO()
    refused = pytest.raises(bootstrap.BootstrapFailed, match=r"rerun it with: cxr promote 7 --to production")
    with reporting(Console(file=out), live=False), refused:
        bootstrap._promote(settings, "7")
    shown = "".join(capsys.readouterr().out.split())  # rich wraps (and folds a long path) at 80
    assert f"{gitops}isnotinsideagitrepository" in shown  # the env file's setting reached it
    assert dict(os.environ) == before  # the stack's env was this call's only
    assert re.search(
        r"event=bootstrap_step_done step=promote state=failed seconds=\S+ exit_code=1", out.getvalue()
    )


def test_an_unexpected_error_in_the_promotion_is_a_bootstrap_failure_with_the_rerun_command(
    settings: StackSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In a sub-process any crash was an exit code; in this process it must not escape as a traceback."""
    from delivery import cli as delivery_cli
    from stack import bootstrap

    def crash(*args: object, **kwargs: object) -> None:
        raise OSError("stage file not writable")

    monkeypatch.setattr(delivery_cli, "promote", crash)
    out = io.StringIO()
    with reporting(Console(file=out), live=False), pytest.raises(bootstrap.BootstrapFailed) as failed:
        bootstrap._promote(settings, "3")
    assert "OSError: stage file not writable" in str(failed.value)
    assert "rerun it with: cxr promote 3 --to production --through" in str(failed.value)
    assert "event=bootstrap_step_done step=promote state=failed" in out.getvalue()
