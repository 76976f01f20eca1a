"""Where the IaC checks find their tools, as settings (env) with the locations used on these machines."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest

REPO_ROOT = Path(__file__).resolve().parents[3]
TERRAFORM_DIR = REPO_ROOT / "iac" / "terraform"
ANSIBLE_DIR = REPO_ROOT / "iac" / "ansible"

# The shape `terraform output -json` prints for iac/terraform/envs/dev (see its outputs.tf).
TF_OUTPUTS: dict[str, Any] = {
    "ssh_user": {"value": "ubuntu", "type": "string", "sensitive": False},
    "control_plane": {
        "value": {"name": "cxr-dev-control-plane", "public_ip": "203.0.113.20", "private_ip": "10.42.0.10"}
    },
    "system_workers": {
        "value": [
            {"name": "cxr-dev-system-worker-0", "private_ip": "10.42.128.21", "instance_type": "m6i.2xlarge"},
            {"name": "cxr-dev-system-worker-1", "private_ip": "10.42.144.22", "instance_type": "m6i.2xlarge"},
        ]
    },
    "gpu_workers": {
        "value": [
            {"name": "cxr-dev-gpu-worker-0", "private_ip": "10.42.128.11", "instance_type": "g5.2xlarge"},
            {"name": "cxr-dev-gpu-worker-1", "private_ip": "10.42.144.12", "instance_type": "g5.2xlarge"},
        ]
    },
    "kubernetes_api_endpoint": {"value": "https://203.0.113.20:6443"},
    "artifact_bucket": {"value": "cxr-dev-artifacts-20260101"},
    "region": {"value": "eu-central-1"},
}


def plugin_dir() -> Path:
    """Filesystem mirror holding registry.terraform.io/hashicorp/aws/<version>/ (CXR_TF_PLUGIN_DIR)."""
    return Path(os.environ.get("CXR_TF_PLUGIN_DIR", "/opt/tf-plugins"))


def require_terraform() -> str:
    """The terraform binary, or skip saying what to install."""
    found = shutil.which("terraform")
    if found is None:
        pytest.skip("terraform is not on PATH: install Terraform >= 1.5 (1.11.4 is what CI uses)")
    if not (plugin_dir() / "registry.terraform.io" / "hashicorp" / "aws").is_dir():
        pytest.skip(
            f"no hashicorp/aws provider mirror under {plugin_dir()}: set CXR_TF_PLUGIN_DIR to a folder "
            "made by `terraform providers mirror`"
        )
    return found


def lint_tool(name: str) -> str:
    """ansible-lint / checkov: on PATH, else in the separate lint venv (CXR_LINT_VENV, default .venv-lint).

    They live in their own venv because their pins (boto3, networkx, packaging) clash with the
    project's environment.
    """
    found = shutil.which(name)
    if found:
        return found
    venv = Path(os.environ.get("CXR_LINT_VENV", str(REPO_ROOT / ".venv-lint")))
    candidate = venv / "bin" / name
    if candidate.exists():
        return str(candidate)
    pytest.skip(
        f"{name} not found: python -m venv .venv-lint && .venv-lint/bin/pip install ansible-lint checkov"
    )


def venv_tool(name: str) -> str:
    """A console script of the project's own environment (ansible-playbook, yamllint)."""
    candidate = REPO_ROOT / ".venv" / "bin" / name
    found = str(candidate) if candidate.exists() else shutil.which(name)
    if found is None:
        pytest.skip(f"{name} not found: pip install -e '.[dev]'")
    return found


def offline_tool_env(home: Path) -> dict[str, str]:
    """Environment for terraform/ansible runs: no update checks, state and caches under ``home``."""
    env = dict(os.environ)
    cli_config = home / "terraformrc"
    cli_config.write_text("disable_checkpoint = true\n")
    env.update(
        {
            "CHECKPOINT_DISABLE": "1",  # terraform's version check calls home otherwise
            "TF_CLI_CONFIG_FILE": str(cli_config),
            "TF_IN_AUTOMATION": "1",
            "TF_INPUT": "0",
            "ANSIBLE_HOME": str(home / "ansible"),
            "ANSIBLE_LOCAL_TEMP": str(home / "ansible-tmp"),
            "ANSIBLE_NOCOLOR": "1",
            "NO_COLOR": "1",
        }
    )
    # The project's ansible-playbook/yamllint first; ansible-lint puts its own venv ahead itself.
    env["PATH"] = os.pathsep.join([str(REPO_ROOT / ".venv" / "bin"), env.get("PATH", "")])
    return env
