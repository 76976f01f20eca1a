"""Checkov's Kubernetes security checks pass on every rendered kustomization, with k8s/.checkov.yaml's skips.

Checkov pins versions of boto3/networkx/packaging that clash with the project's environment, so it
lives in its own virtualenv (.venv-lint, made by `make venv`, or CXR_CHECKOV=/path/to/checkov).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[3]


def checkov_binary() -> str:
    candidates = [
        os.environ.get("CXR_CHECKOV", ""),
        str(Path(os.environ.get("CXR_LINT_VENV", str(REPO / ".venv-lint"))) / "bin" / "checkov"),
        shutil.which("checkov") or "",
    ]
    for candidate in candidates:
        if candidate and Path(candidate).exists():
            return candidate
    pytest.skip("checkov not installed: `make venv` puts it in .venv-lint (it conflicts with the main env)")


def test_skip_list_is_explicit_and_every_skip_is_commented() -> None:
    text = (REPO / "k8s/.checkov.yaml").read_text()
    skips = yaml.safe_load(text)["skip-check"]
    assert skips, "an empty skip list would make the comments below meaningless"
    lines = text.splitlines()
    for check in skips:
        index = next(i for i, line in enumerate(lines) if line.strip() == f"- {check}")
        assert lines[index - 1].strip().startswith("#"), f"{check} needs a comment saying why it is skipped"


def test_checkov_kubernetes_checks_pass_on_rendered_manifests(
    rendered: dict[str, list[dict[str, Any]]], tmp_path: Path
) -> None:
    binary = checkov_binary()
    for path, objects in rendered.items():
        (tmp_path / (path.replace("/", "_") + ".yaml")).write_text(yaml.safe_dump_all(objects))
    proc = subprocess.run(
        [binary, "--config-file", str(REPO / "k8s/.checkov.yaml"), "-d", str(tmp_path), "-o", "json"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    reports = json.loads(proc.stdout)
    reports = reports if isinstance(reports, list) else [reports]
    failed = [
        f"{f['check_id']} {f['check_name']}: {f['resource']}"
        for r in reports
        for f in r["results"]["failed_checks"]
    ]
    passed = sum(r["summary"]["passed"] for r in reports)
    assert not failed, "\n".join(failed)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert passed > 100  # the scan really looked at the workloads
