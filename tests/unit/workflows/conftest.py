"""The workflows tests' one settings fixture."""

from __future__ import annotations

import os

import pytest

from workflows.config import WorkflowSettings


@pytest.fixture
def settings(monkeypatch: pytest.MonkeyPatch) -> WorkflowSettings:
    """Repository defaults: a developer's CXR_* variables must not leak into what is rendered or checked."""
    for key in list(os.environ):
        if key.startswith("CXR_"):
            monkeypatch.delenv(key)
    return WorkflowSettings()
