"""Ansible: the Terraform-fed inventory, playbook syntax, ansible-lint (production profile), yamllint."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import yaml

from tests.unit.iac.iac_tools import ANSIBLE_DIR, TF_OUTPUTS, lint_tool, offline_tool_env, venv_tool

pytestmark = pytest.mark.unit

INVENTORY_SCRIPT = ANSIBLE_DIR / "inventory" / "terraform_inventory.py"
PLAYBOOKS = sorted(p.name for p in ANSIBLE_DIR.glob("*.yml"))


@pytest.fixture(scope="module")
def inventory_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("terraform_inventory", INVENTORY_SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def ansible_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    home = tmp_path_factory.mktemp("ansible-home")
    outputs = home / "tf-outputs.json"
    outputs.write_text(json.dumps(TF_OUTPUTS))
    env = offline_tool_env(home)
    env["CXR_TF_OUTPUTS_JSON"] = str(outputs)
    return env


def _run(cmd: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cmd, cwd=ANSIBLE_DIR, env=env, capture_output=True, text=True, timeout=300, check=False
    )


def test_inventory_groups_nodes_and_reaches_workers_through_the_control_plane(
    inventory_module: ModuleType,
) -> None:
    inv = inventory_module.build_inventory(TF_OUTPUTS)
    assert inv["control_plane"]["hosts"] == ["cxr-dev-control-plane"]
    assert inv["system_workers"]["hosts"] == ["cxr-dev-system-worker-0", "cxr-dev-system-worker-1"]
    assert inv["gpu_workers"]["hosts"] == ["cxr-dev-gpu-worker-0", "cxr-dev-gpu-worker-1"]
    assert inv["k8s_cluster"]["children"] == ["control_plane", "system_workers", "gpu_workers"]
    cp = inv["_meta"]["hostvars"]["cxr-dev-control-plane"]
    assert (cp["ansible_host"], cp["node_private_ip"]) == ("203.0.113.20", "10.42.0.10")
    worker = inv["_meta"]["hostvars"]["cxr-dev-gpu-worker-1"]
    assert worker["ansible_host"] == "10.42.144.12"
    assert worker["ansible_ssh_common_args"] == "-o ProxyJump=ubuntu@203.0.113.20"
    assert worker["node_instance_type"] == "g5.2xlarge"
    system = inv["_meta"]["hostvars"]["cxr-dev-system-worker-0"]
    assert system["ansible_host"] == "10.42.128.21" and "ProxyJump" in system["ansible_ssh_common_args"]
    assert inv["all"]["vars"]["kubernetes_api_endpoint"] == "https://203.0.113.20:6443"


def test_inventory_without_outputs_says_to_run_terraform_apply(
    inventory_module: ModuleType, tmp_path: Path
) -> None:
    with pytest.raises(inventory_module.InventoryError, match="terraform apply"):
        inventory_module.build_inventory({"ssh_user": {"value": "ubuntu"}})
    empty = tmp_path / "outputs.json"
    empty.write_text("{}")
    proc = subprocess.run(
        [sys.executable, str(INVENTORY_SCRIPT), "--list"],
        env={"CXR_TF_OUTPUTS_JSON": str(empty), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 1
    assert "terraform apply" in proc.stderr and "Traceback" not in proc.stderr


def test_ansible_reads_the_script_and_the_group_vars(ansible_env: dict[str, str]) -> None:
    proc = _run([venv_tool("ansible-inventory"), "--list"], ansible_env)
    assert proc.returncode == 0, proc.stderr
    inv = json.loads(proc.stdout)
    worker = inv["_meta"]["hostvars"]["cxr-dev-gpu-worker-0"]
    assert worker["kubernetes_role"] == "worker" and worker["nvidia_driver_branch"]
    assert worker["node_pool"] == "gpu" and worker["common_containerd_nvidia_runtime"] is True
    system = inv["_meta"]["hostvars"]["cxr-dev-system-worker-1"]
    assert system["kubernetes_role"] == "worker" and system["node_pool"] == "system"
    assert "nvidia_driver_branch" not in system and system["node_taints"] == []
    control = inv["_meta"]["hostvars"]["cxr-dev-control-plane"]
    assert control["kubernetes_role"] == "control-plane"
    assert control["kubernetes_package_version"].startswith(control["kubernetes_minor"])


@pytest.mark.parametrize("playbook", PLAYBOOKS)
def test_playbook_passes_syntax_check(playbook: str, ansible_env: dict[str, str]) -> None:
    proc = _run([venv_tool("ansible-playbook"), "--syntax-check", playbook], ansible_env)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_playbooks_cover_cluster_and_reset_with_every_role() -> None:
    assert {"cluster.yml", "reset.yml"} <= set(PLAYBOOKS)
    plays = yaml.safe_load((ANSIBLE_DIR / "cluster.yml").read_text())
    roles = [r["role"] for play in plays for r in play.get("roles", [])]
    assert roles == ["common", "nvidia", "kubernetes", "kubernetes", "argocd"]
    assert all(play.get("name") for play in plays)


def test_every_task_and_handler_has_a_name() -> None:
    files = [
        *ANSIBLE_DIR.glob("roles/*/tasks/*.yml"),
        *ANSIBLE_DIR.glob("roles/*/handlers/*.yml"),
        *ANSIBLE_DIR.glob("tasks/*.yml"),
    ]
    for playbook in PLAYBOOKS:
        for play in yaml.safe_load((ANSIBLE_DIR / playbook).read_text()):
            for task in play.get("tasks", []):
                assert task.get("name"), f"{playbook}: unnamed task {task}"
    assert files
    for path in files:
        for task in yaml.safe_load(path.read_text()) or []:
            assert task.get("name"), f"{path.relative_to(ANSIBLE_DIR)}: unnamed task {task}"


def test_yamllint_passes(ansible_env: dict[str, str]) -> None:
    proc = _run([venv_tool("yamllint"), "--strict", "."], ansible_env)
    assert proc.returncode == 0, proc.stdout


@pytest.mark.slow
def test_ansible_lint_production_profile_passes_without_skips(ansible_env: dict[str, str]) -> None:
    config = yaml.safe_load((ANSIBLE_DIR / ".ansible-lint").read_text())
    assert config["profile"] == "production"
    assert not config.get("skip_list") and not config.get("warn_list")
    proc = _run([lint_tool("ansible-lint"), "--offline"], ansible_env)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "Profile 'production' was required, and it passed" in proc.stdout + proc.stderr
