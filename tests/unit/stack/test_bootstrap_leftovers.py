"""What a failed first ``make up`` leaves must not stop the next one from serving a model.

Before: a version left marked incomplete (a training run that failed after registering, MLflow
down for its withdrawal) counted as "the registry has versions", so every later ``make up`` skipped
the bootstrap and served nothing; and a version whose promotion failed was reported only by number.
"""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from rich.console import Console

from core.progress import reporting
from core.stage_file import StageFile, write_stage_file
from stack import bootstrap
from stack.config import StackSettings

pytestmark = pytest.mark.unit


@pytest.fixture
def settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> StackSettings:
    monkeypatch.setenv("CXR_STACK_DIR", str(tmp_path / "stack"))
    monkeypatch.setenv("CXR_MLFLOW_URI", "http://127.0.0.1:9")
    return StackSettings()


def test_a_version_left_marked_incomplete_is_not_counted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow.tracking import MlflowClient

    from training.registry import INCOMPLETE, INCOMPLETE_TAG

    monkeypatch.chdir(tmp_path)  # MLflow's defaults write ./mlruns
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    client.create_registered_model(bootstrap.MODEL_NAME)
    left = client.create_model_version(
        bootstrap.MODEL_NAME, source=str(tmp_path), tags={INCOMPLETE_TAG: INCOMPLETE}
    )
    assert bootstrap.registered_versions(uri) == [], "a leftover the registry refuses skipped the bootstrap"
    usable = client.create_model_version(bootstrap.MODEL_NAME, source=str(tmp_path))
    assert bootstrap.registered_versions(uri) == [usable.version]
    assert left.version != usable.version


def _skip_line(settings: StackSettings, monkeypatch: pytest.MonkeyPatch, live: bool) -> str:
    monkeypatch.setattr(bootstrap, "registered_versions", lambda uri: ["1", "2", "10"])
    out = io.StringIO()
    with reporting(Console(file=out, width=300), live=live):
        assert bootstrap.ensure_served_model(settings) is None
    return out.getvalue()


def test_versions_but_no_production_model_names_the_command_that_serves_one(
    settings: StackSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    shown = _skip_line(settings, monkeypatch, live=True)
    assert "production serves none" in shown
    assert "cxr promote 10 --to production --through --force" in shown, shown
    logged = _skip_line(settings, monkeypatch, live=False)
    assert "event=bootstrap_skipped" in logged and "production=none" in logged, logged


def test_versions_and_a_production_model_are_only_listed(
    settings: StackSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_stage_file(settings.gitops_checkout, StageFile(stage="production", model_version="2"))
    shown = _skip_line(settings, monkeypatch, live=True)
    assert "bootstrap skipped" in shown and "cxr promote" not in shown, shown
    assert "production=2" in _skip_line(settings, monkeypatch, live=False)
