"""The node layout, GPU sharing and node setup are data that agree with each other.

- every inventory group has its pool's labels, taints and capacity in group_vars, and the
  kubeadm template Ansible renders for a node carries exactly those;
- some untainted worker pool exists for everything that asks for no GPU, the control plane
  keeps its taint, and the GPU pool has the taint and label Triton and the Ray workers expect;
- containerd keeps SystemdCgroup and the pinned pause image on every node, GPU workers included;
- the GPU operator leaves driver and toolkit to the host and advertises the number of
  ``nvidia.com/gpu`` per node that group_vars state;
- ArgoCD's repository credential is an SSH key for an SSH URL.

The templates are rendered by ``ansible-playbook`` itself (local connection, the real
inventory script and group_vars), so the test sees what a node would get.
"""

from __future__ import annotations

import json
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.unit.iac.iac_tools import ANSIBLE_DIR, REPO_ROOT, TF_OUTPUTS, offline_tool_env, venv_tool

pytestmark = pytest.mark.unit

GROUP_VARS = ANSIBLE_DIR / "inventory" / "group_vars"
GPU_OPERATOR = REPO_ROOT / "k8s" / "platform" / "gpu-operator.yaml"
POOL_GROUPS = ("control_plane", "system_workers", "gpu_workers")
GPU_TAINT = {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}
CONTROL_PLANE_TAINT = {"key": "node-role.kubernetes.io/control-plane", "effect": "NoSchedule"}
SSH_URL_PREFIXES = ("git@", "ssh://")
CRI = "io.containerd.grpc.v1.cri"

RENDER_PLAYBOOK = """
- name: Render the node templates the way the roles do
  hosts: k8s_cluster
  connection: local
  gather_facts: false
  vars:
    ansible_python_interpreter: "{{{{ ansible_playbook_python }}}}"
    kubernetes_join_endpoint: "10.42.0.10:6443"
    kubernetes_join_token: "abcdef.0123456789abcdef"
    kubernetes_join_ca_cert_hash: "sha256:0123"
  tasks:
    - name: Render the kubeadm configuration
      ansible.builtin.template:
        src: {roles}/kubernetes/templates/kubeadm-config.yaml.j2
        dest: "{out}/{{{{ inventory_hostname }}}}.kubeadm.yaml"
        mode: "0600"
    - name: Render the containerd configuration
      ansible.builtin.template:
        src: {roles}/common/templates/containerd-config.toml.j2
        dest: "{out}/{{{{ inventory_hostname }}}}.containerd.toml"
        mode: "0600"
    - name: Render ArgoCD's repository secret
      ansible.builtin.template:
        src: {roles}/argocd/templates/repository-secret.yaml.j2
        dest: "{out}/{{{{ inventory_hostname }}}}.repo-secret.yaml"
        mode: "0600"
      when: inventory_hostname in groups['control_plane']
"""


def _group_vars(group: str) -> dict[str, Any]:
    return yaml.safe_load((GROUP_VARS / f"{group}.yml").read_text()) or {}


def _gpu_operator_values() -> dict[str, Any]:
    app = yaml.safe_load(GPU_OPERATOR.read_text())
    return app["spec"]["source"]["helm"]["valuesObject"]


def _time_slicing_replicas(values: dict[str, Any]) -> int:
    config = values["devicePlugin"]["config"]
    sharing = yaml.safe_load(config["data"][config["default"]])["sharing"]["timeSlicing"]
    (gpu,) = [r for r in sharing["resources"] if r["name"] == "nvidia.com/gpu"]
    return int(gpu["replicas"])


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, str]]:
    """Per host: its group and the files Ansible renders for it (repo-secret on the control plane)."""
    home = tmp_path_factory.mktemp("render-home")
    out = tmp_path_factory.mktemp("rendered")
    outputs = home / "tf-outputs.json"
    outputs.write_text(json.dumps(TF_OUTPUTS))
    key = home / "deploy-key"
    key.write_text("-----BEGIN OPENSSH PRIVATE KEY-----\nnot-a-real-key\n-----END OPENSSH PRIVATE KEY-----\n")
    playbook = home / "render.yml"
    playbook.write_text(RENDER_PLAYBOOK.format(roles=ANSIBLE_DIR / "roles", out=out))
    env = offline_tool_env(home)
    env["CXR_TF_OUTPUTS_JSON"] = str(outputs)
    proc = subprocess.run(
        [venv_tool("ansible-playbook"), str(playbook), "-e", f"argocd_repo_ssh_key_file={key}"],
        cwd=ANSIBLE_DIR,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    hosts: dict[str, dict[str, str]] = {}
    group_of = {TF_OUTPUTS["control_plane"]["value"]["name"]: "control_plane"}
    for group in ("system_workers", "gpu_workers"):
        group_of.update({w["name"]: group for w in TF_OUTPUTS[group]["value"]})
    for host, group in group_of.items():
        hosts[host] = {"group": group}
        for kind in ("kubeadm.yaml", "containerd.toml", "repo-secret.yaml"):
            path = out / f"{host}.{kind}"
            if path.exists():
                hosts[host][kind.split(".")[0]] = path.read_text()
    return hosts


def test_every_pool_states_its_labels_taints_and_capacity_as_data() -> None:
    pools = set()
    for group in POOL_GROUPS:
        gv = _group_vars(group)
        pools.add(gv["node_pool"])
        assert isinstance(gv["node_labels"], dict), group
        assert gv["node_labels"]["cxr.io/node-pool"] == gv["node_pool"], group
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in gv["node_labels"].items()), group
        for label in gv["node_labels"]:  # the kubelet may not set these on itself (NodeRestriction)
            prefix = label.split("/")[0] if "/" in label else ""
            assert not prefix.endswith(("kubernetes.io", "k8s.io")), f"{group}: {label}"
        assert isinstance(gv["node_taints"], list), group
        for taint in gv["node_taints"]:
            assert set(taint) <= {"key", "value", "effect"} and taint["effect"] in (
                "NoSchedule",
                "PreferNoSchedule",
                "NoExecute",
            ), taint
        capacity = gv["node_capacity"]
        assert {"instance_type", "cpu", "memory_gib", "physical_gpus", "nvidia_gpu"} <= set(capacity), group
        assert capacity["cpu"] > 0 and capacity["memory_gib"] > 0
        assert set(gv["node_terraform"]) == {"count_variable", "instance_type_variable"}, group
    assert len(pools) == len(POOL_GROUPS)


def test_the_layout_has_a_home_for_cpu_pods_and_gpu_pods() -> None:
    control, system, gpu = (_group_vars(g) for g in POOL_GROUPS)
    assert control["node_taints"] == [CONTROL_PLANE_TAINT]  # kubeadm's, kept: nothing else runs there
    assert system["node_taints"] == [] and system["node_capacity"]["nvidia_gpu"] == 0
    assert gpu["node_taints"] == [GPU_TAINT]
    assert gpu["node_labels"]["nvidia.com/gpu.present"] == "true"  # Triton's nodeSelector
    assert gpu["node_capacity"]["nvidia_gpu"] >= gpu["node_capacity"]["physical_gpus"] >= 1


def test_the_inventory_puts_every_node_in_a_group_with_a_layout(rendered: dict[str, dict[str, str]]) -> None:
    assert {h["group"] for h in rendered.values()} == set(POOL_GROUPS)


def test_the_kubeadm_config_carries_the_groups_labels_and_taints(rendered: dict[str, dict[str, str]]) -> None:
    for host, files in rendered.items():
        gv = _group_vars(files["group"])
        docs = [d for d in yaml.safe_load_all(files["kubeadm"]) if d]
        kinds = [d["kind"] for d in docs]
        if files["group"] == "control_plane":
            assert kinds == ["InitConfiguration", "ClusterConfiguration", "KubeletConfiguration"], host
        else:
            assert kinds == ["JoinConfiguration"], host
            bootstrap = docs[0]["discovery"]["bootstrapToken"]
            assert bootstrap["apiServerEndpoint"] == "10.42.0.10:6443" and bootstrap["caCertHashes"]
        registration = docs[0]["nodeRegistration"]
        # an explicit list: [] means no taint (kubeadm's default for a control plane would be one)
        assert registration["taints"] == gv["node_taints"], host
        (labels_arg,) = [a["value"] for a in registration["kubeletExtraArgs"] if a["name"] == "node-labels"]
        assert dict(pair.split("=", 1) for pair in labels_arg.split(",")) == gv["node_labels"], host


def test_containerd_keeps_systemd_cgroups_and_the_pause_pin_on_every_node(
    rendered: dict[str, dict[str, str]],
) -> None:
    pause = yaml.safe_load((GROUP_VARS / "all.yml").read_text())["common_containerd_sandbox_image"]
    for host, files in rendered.items():
        cri = tomllib.loads(files["containerd"])["plugins"][CRI]
        assert cri["sandbox_image"] == pause, host
        runtimes = cri["containerd"]["runtimes"]
        assert runtimes["runc"]["options"]["SystemdCgroup"] is True, host
        if files["group"] == "gpu_workers":
            assert cri["containerd"]["default_runtime_name"] == "nvidia", host
            nvidia = runtimes["nvidia"]
            assert nvidia["options"]["SystemdCgroup"] is True, host
            assert nvidia["options"]["BinaryName"] == "/usr/bin/nvidia-container-runtime"
        else:
            assert "nvidia" not in runtimes and "default_runtime_name" not in cri.get("containerd", {}), host


def test_no_role_writes_a_containerd_drop_in_that_replaces_the_cri_section() -> None:
    # containerd 1.x replaces a plugin's whole section with an imported file's: one config.toml only
    writers = [
        p.relative_to(ANSIBLE_DIR)
        for p in ANSIBLE_DIR.glob("roles/*/templates/*")
        if CRI in p.read_text() and p.parent.parent.name != "common"
    ]
    assert writers == []
    tasks = "\n".join(p.read_text() for p in ANSIBLE_DIR.glob("roles/*/tasks/*.yml"))
    assert "dest: /etc/containerd/conf.d" not in tasks


def test_the_gpu_operator_leaves_driver_and_toolkit_to_the_host() -> None:
    values = _gpu_operator_values()
    assert values["driver"]["enabled"] is False and values["toolkit"]["enabled"] is False
    for component in ("devicePlugin", "gfd", "dcgmExporter"):
        assert values[component]["enabled"] is True, component
    nvidia_tasks = (ANSIBLE_DIR / "roles" / "nvidia" / "tasks" / "main.yml").read_text()
    assert "nvidia-driver-" in nvidia_tasks and "nvidia-container-toolkit=" in nvidia_tasks


def test_gpu_workers_advertise_the_time_sliced_gpus_group_vars_state() -> None:
    values = _gpu_operator_values()
    replicas = _time_slicing_replicas(values)
    assert replicas > 1  # shared: more GPU pods than physical GPUs by default
    capacity = _group_vars("gpu_workers")["node_capacity"]
    assert capacity["nvidia_gpu"] == capacity["physical_gpus"] * replicas
    assert values["migManager"]["enabled"] is False


def test_argocd_gets_an_ssh_key_only_with_an_ssh_url(rendered: dict[str, dict[str, str]]) -> None:
    url = yaml.safe_load((GROUP_VARS / "all.yml").read_text())["argocd_repo_url"]
    assert url.startswith(SSH_URL_PREFIXES), url
    (secret,) = [yaml.safe_load(f["repo-secret"]) for f in rendered.values() if "repo-secret" in f]
    data = secret["stringData"]
    assert data["url"] == url and "BEGIN OPENSSH PRIVATE KEY" in data["sshPrivateKey"]
    assert data["url"].startswith(SSH_URL_PREFIXES)
    # and the role refuses an https URL with a key before it applies anything
    first = yaml.safe_load((ANSIBLE_DIR / "roles" / "argocd" / "tasks" / "main.yml").read_text())[0]
    assert "ansible.builtin.assert" in first and "argocd_repo_url is match" in str(first)


def test_the_argocd_role_refuses_an_https_url_with_a_deploy_key(tmp_path: Path) -> None:
    key = tmp_path / "deploy-key"
    key.write_text("not-a-real-key\n")
    playbook = tmp_path / "argocd.yml"
    playbook.write_text(
        "- name: Only the argocd role's first checks can run here\n"
        "  hosts: localhost\n  connection: local\n  gather_facts: false\n"
        "  roles:\n    - role: argocd\n"
    )
    env = offline_tool_env(tmp_path)
    env["ANSIBLE_ROLES_PATH"] = str(ANSIBLE_DIR / "roles")
    proc = subprocess.run(
        [
            venv_tool("ansible-playbook"),
            "-i",
            "localhost,",
            str(playbook),
            "-e",
            "argocd_repo_url=https://git.hospital.example/radiology/cxr-detect.git",
            "-e",
            f"argocd_repo_ssh_key_file={key}",
            "-e",
            f"argocd_repo_ssh_known_hosts_file={key}",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode != 0
    assert "needs an SSH repository URL" in proc.stdout + proc.stderr
