"""Where the IaC checks find their tools, as settings (env) with the locations used on these machines."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[3]
TERRAFORM_DIR = REPO_ROOT / "iac" / "terraform"
ANSIBLE_DIR = REPO_ROOT / "iac" / "ansible"


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
