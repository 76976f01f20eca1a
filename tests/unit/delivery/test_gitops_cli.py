"""The delivery CLI answers bad input with one actionable line and an exit code, never a traceback."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from delivery.cli import app, canary_app, promote, rollback

pytestmark = pytest.mark.unit

runner = CliRunner()


@pytest.fixture
def repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    subprocess.run(["git", "init", "-q", "-b", "main", str(tmp_path)], check=True)
    monkeypatch.setenv("CXR_STACK_DIR", str(tmp_path / ".stack"))
    return tmp_path


def test_force_without_reason_is_refused_before_anything_happens(repo: Path) -> None:
    result = runner.invoke(app, ["promote", "3", "--to", "canary", "--force", "--gitops-dir", str(repo)])
    assert result.exit_code == 1
    assert "--force needs --reason" in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_unknown_stage_lists_the_valid_ones(repo: Path) -> None:
    result = runner.invoke(app, ["promote", "3", "--to", "prod", "--gitops-dir", str(repo)])
    assert result.exit_code == 1
    assert "staging, canary, production" in result.output


def test_rollback_of_an_empty_stage_explains_there_is_nothing_to_roll_back(repo: Path) -> None:
    result = runner.invoke(
        app, ["rollback", "--stage", "production", "--gitops-dir", str(repo), "--no-apply"]
    )
    assert result.exit_code == 1
    assert "serves nothing" in result.output


def test_analyze_with_prometheus_down_says_where_it_looked(repo: Path) -> None:
    result = runner.invoke(
        app, ["canary", "analyze", "--prometheus-url", "http://127.0.0.1:9", "--gitops-dir", str(repo)]
    )
    assert result.exit_code == 1
    assert "Prometheus at http://127.0.0.1:9 is unreachable" in result.output


def test_contract_names_can_be_mounted_by_the_root_command() -> None:
    root = typer.Typer()
    root.command("promote")(promote)
    root.command("rollback")(rollback)
    root.add_typer(canary_app, name="canary")
    for args in (["promote", "--help"], ["rollback", "--help"], ["canary", "step", "--help"]):
        result = runner.invoke(root, args)
        assert result.exit_code == 0, result.output
    assert "--force" in runner.invoke(root, ["promote", "--help"]).output
