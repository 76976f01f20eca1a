"""Terraform: formatted, valid, and its offline plan creates exactly the network, nodes and bucket we mean.

Everything runs in a copy under tmp_path (no .terraform/ in the repository) against the local
provider mirror; the plan uses dummy credentials and the provider's skip_* switches, so no
request leaves the machine.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hcl2
import pytest
import yaml

from tests.unit.iac.iac_tools import (
    ANSIBLE_DIR,
    REPO_ROOT,
    TERRAFORM_DIR,
    lint_tool,
    offline_tool_env,
    plugin_dir,
    require_terraform,
)

pytestmark = pytest.mark.unit

ADMIN_CIDR = "203.0.113.10/32"
PLAN_VARS = {
    "admin_cidrs": f'["{ADMIN_CIDR}"]',
    "ami_id": "ami-0123456789abcdef0",
    "ssh_public_key": "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAITestKeyOnlyForPlans test@ci",
}

# What `terraform plan` must create for 2 AZs, 2 system workers and 2 GPU workers, by resource type.
EXPECTED_RESOURCES = {
    "aws_vpc": 1,
    "aws_default_security_group": 1,
    "aws_internet_gateway": 1,
    "aws_subnet": 4,
    "aws_eip": 1,
    "aws_nat_gateway": 1,
    "aws_route_table": 2,
    "aws_route": 2,
    "aws_route_table_association": 4,
    "aws_cloudwatch_log_group": 1,
    "aws_flow_log": 1,
    "aws_security_group": 2,
    "aws_vpc_security_group_ingress_rule": 5,
    "aws_vpc_security_group_egress_rule": 8,
    "aws_key_pair": 1,
    "aws_instance": 5,
    "aws_ebs_volume": 4,
    "aws_volume_attachment": 4,
    "aws_kms_key": 1,
    "aws_kms_alias": 1,
    "aws_s3_bucket": 1,
    "aws_s3_bucket_public_access_block": 1,
    "aws_s3_bucket_ownership_controls": 1,
    "aws_s3_bucket_versioning": 1,
    "aws_s3_bucket_server_side_encryption_configuration": 1,
    "aws_s3_bucket_lifecycle_configuration": 1,
    "aws_s3_bucket_policy": 1,
    "aws_iam_role": 2,
    "aws_iam_role_policy": 2,
    "aws_iam_instance_profile": 1,
}

PROVIDER_OVERRIDE = """
provider "aws" {
  access_key                  = "offline-test"
  secret_key                  = "offline-test"
  skip_credentials_validation = true
  skip_requesting_account_id  = true
  skip_metadata_api_check     = true
  skip_region_validation      = true
}
"""
# The real root declares an S3 backend; a plan needs *some* backend, so the copy uses a local one.
BACKEND_OVERRIDE = 'terraform {\n  backend "local" {}\n}\n'


def _run(
    cmd: list[str], cwd: Path, env: dict[str, str], *, ok: bool = True
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300, check=False)
    if ok:
        assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def tf_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    require_terraform()
    return offline_tool_env(tmp_path_factory.mktemp("tf-home"))


@pytest.fixture(scope="module")
def planned_root(tmp_path_factory: pytest.TempPathFactory, tf_env: dict[str, str]) -> Path:
    """A copy of iac/terraform with envs/dev initialised for offline plans."""
    copy = tmp_path_factory.mktemp("tf") / "terraform"
    shutil.copytree(TERRAFORM_DIR, copy, ignore=shutil.ignore_patterns(".terraform", "*.tfstate*"))
    root = copy / "envs" / "dev"
    (root / "provider_override.tf").write_text(PROVIDER_OVERRIDE)
    (root / "backend_override.tf").write_text(BACKEND_OVERRIDE)
    _run(["terraform", "init", "-input=false", f"-plugin-dir={plugin_dir()}"], root, tf_env)
    return root


@pytest.fixture(scope="module")
def plan(planned_root: Path, tf_env: dict[str, str]) -> Callable[..., dict[str, Any]]:
    def make(**overrides: str) -> dict[str, Any]:
        variables = {**PLAN_VARS, **overrides}
        args = [a for k, v in variables.items() for a in ("-var", f"{k}={v}")]
        out = planned_root / f"plan-{len(list(planned_root.glob('plan-*')))}.bin"
        _run(
            ["terraform", "plan", "-input=false", "-lock=false", "-refresh=false", f"-out={out}", *args],
            planned_root,
            tf_env,
        )
        shown = _run(["terraform", "show", "-json", str(out)], planned_root, tf_env)
        return json.loads(shown.stdout)

    return make


@pytest.fixture(scope="module")
def default_plan(plan: Callable[..., dict[str, Any]]) -> dict[str, Any]:
    return plan()


def _created(plan_json: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        rc
        for rc in plan_json["resource_changes"]
        if rc["mode"] == "managed" and rc["change"]["actions"] == ["create"]
    ]


def _after(plan_json: dict[str, Any], rtype: str) -> list[dict[str, Any]]:
    return [rc["change"]["after"] for rc in _created(plan_json) if rc["type"] == rtype]


def test_terraform_files_are_formatted(tf_env: dict[str, str]) -> None:
    _run(["terraform", "fmt", "-check", "-recursive", "-diff"], TERRAFORM_DIR, tf_env)


def test_root_and_module_validate_with_the_real_s3_backend_config(
    tmp_path: Path, tf_env: dict[str, str]
) -> None:
    copy = tmp_path / "terraform"
    shutil.copytree(TERRAFORM_DIR, copy, ignore=shutil.ignore_patterns(".terraform", "*.tfstate*"))
    for folder in (copy / "envs" / "dev",):  # validating the root validates the module it calls
        _run(  # readonly: the committed lock file must already pin what the mirror holds
            [
                "terraform",
                "init",
                "-backend=false",
                "-input=false",
                "-lockfile=readonly",
                f"-plugin-dir={plugin_dir()}",
            ],
            folder,
            tf_env,
        )
        result = _run(["terraform", "validate", "-json"], folder, tf_env)
        report = json.loads(result.stdout)
        assert report["valid"] and report["warning_count"] == 0, report


def test_plan_creates_exactly_the_expected_resource_set(default_plan: dict[str, Any]) -> None:
    created = Counter(rc["type"] for rc in _created(default_plan))
    assert dict(created) == EXPECTED_RESOURCES
    assert all(
        rc["change"]["actions"] == ["create"]
        for rc in default_plan["resource_changes"]
        if rc["mode"] == "managed"
    )


def test_plan_gpu_worker_count_and_type_follow_the_variables(plan: Callable[..., dict[str, Any]]) -> None:
    scaled = plan(gpu_worker_count="3", gpu_worker_instance_type="g6.2xlarge")
    instances = _after(scaled, "aws_instance")
    gpu = [i for i in instances if i["tags"]["Role"] == "gpu-worker"]
    assert len(gpu) == 3 and {i["instance_type"] for i in gpu} == {"g6.2xlarge"}
    assert len(_after(scaled, "aws_ebs_volume")) == 3 + 2  # GPU + system workers' data disks
    assert [i["tags"]["Role"] for i in instances].count("control-plane") == 1
    cpu = plan(system_worker_count="3", system_worker_instance_type="m6i.4xlarge")
    system = [i for i in _after(cpu, "aws_instance") if i["tags"]["Role"] == "system-worker"]
    assert len(system) == 3 and {i["instance_type"] for i in system} == {"m6i.4xlarge"}
    assert all(not i["associate_public_ip_address"] for i in system)


def test_only_ssh_and_the_kube_api_are_open_and_only_to_the_admin_cidr(default_plan: dict[str, Any]) -> None:
    """From outside: admins reach SSH and the API; the hospital network only the gateway's HTTPS
    NodePort, and the PACS only the DIMSE SCP's NodePort."""
    ingress = _after(default_plan, "aws_vpc_security_group_ingress_rule")
    external = [r for r in ingress if r.get("cidr_ipv4")]
    clients = default_plan["variables"]["client_cidrs"]["value"]
    https = default_plan["variables"]["ingress_https_node_port"]["value"]
    pacs = default_plan["variables"]["pacs_cidrs"]["value"]
    dimse = default_plan["variables"]["dimse_node_port"]["value"]
    assert sorted((r["from_port"], r["to_port"], r["cidr_ipv4"]) for r in external) == sorted(
        [
            (22, 22, ADMIN_CIDR),
            (6443, 6443, ADMIN_CIDR),
            *[(https, https, c) for c in clients],
            *[(dimse, dimse, c) for c in pacs],
        ]
    )
    assert "0.0.0.0/0" not in clients and https == 30443  # ingress-nginx's nodePorts.https
    assert "0.0.0.0/0" not in pacs
    internal = [r for r in ingress if not r.get("cidr_ipv4")]
    assert len(internal) == 1 and internal[0]["ip_protocol"] == "-1"  # node-to-node, by security group
    egress = _after(default_plan, "aws_vpc_security_group_egress_rule")
    open_egress = {(r["from_port"], r["to_port"]) for r in egress if r.get("cidr_ipv4") == "0.0.0.0/0"}
    assert open_egress == {(80, 80), (443, 443)}
    # SSH out only to the git server (ArgoCD pulls, promotions push), never to the internet
    ssh_out = [(r["from_port"], r["to_port"], r["cidr_ipv4"]) for r in egress if r.get("from_port") == 22]
    assert ssh_out == [(22, 22, default_plan["variables"]["git_ssh_cidrs"]["value"][0])]
    assert ssh_out[0][2] != "0.0.0.0/0"


def _k8s_doc(path: str, kind: str) -> dict[str, Any]:
    return next(d for d in yaml.safe_load_all((REPO_ROOT / path).read_text()) if d and d["kind"] == kind)


def test_the_pacs_reaches_the_dimse_node_port_and_the_nodes_reach_only_the_pacs_ports(
    default_plan: dict[str, Any],
) -> None:
    """The PACS round trip leaves the VPC only through its own holes: in on the SCP's NodePort (the
    one k8s/base/dimse/service.yaml fixes), out to the PACS network on the ports the gateway's
    NetworkPolicy opens; neither to or from the whole internet."""
    variables = {k: v["value"] for k, v in default_plan["variables"].items()}
    service = _k8s_doc("k8s/base/dimse/service.yaml", "Service")
    assert service["spec"]["type"] == "NodePort"
    assert [p["nodePort"] for p in service["spec"]["ports"]] == [variables["dimse_node_port"]]
    egress = _after(default_plan, "aws_vpc_security_group_egress_rule")
    pacs_out = {(r["from_port"], r["cidr_ipv4"]) for r in egress if r["from_port"] in variables["pacs_ports"]}
    assert pacs_out == {(port, c) for port in variables["pacs_ports"] for c in variables["pacs_cidrs"]}
    assert all(r["from_port"] == r["to_port"] for r in egress)
    policy = _k8s_doc("k8s/base/network/gateway-networkpolicy.yaml", "NetworkPolicy")
    opened = {
        p["port"]
        for rule in policy["spec"]["egress"]
        if any("ipBlock" in peer for peer in rule["to"])
        for p in rule["ports"]
    }
    # every PACS port the gateway may use gets through the security group (443: open anywhere)
    assert opened - {443} == set(variables["pacs_ports"]), opened


def test_nodes_are_hardened_and_gpu_workers_stay_private(default_plan: dict[str, Any]) -> None:
    for instance in _after(default_plan, "aws_instance"):
        assert instance["metadata_options"][0]["http_tokens"] == "required"
        assert instance["root_block_device"][0]["encrypted"] is True
        public = instance["associate_public_ip_address"]
        assert public is (instance["tags"]["Role"] == "control-plane")
    sizes = sorted(volume["size"] for volume in _after(default_plan, "aws_ebs_volume"))
    assert sizes == [200, 200, 300, 300]  # GPU workers (datasets), system workers (MinIO 200Gi, Postgres)
    assert all(volume["encrypted"] is True for volume in _after(default_plan, "aws_ebs_volume"))


def test_artifact_bucket_is_versioned_encrypted_and_never_public(default_plan: dict[str, Any]) -> None:
    (block,) = _after(default_plan, "aws_s3_bucket_public_access_block")
    assert all(
        block[k]
        for k in ("block_public_acls", "block_public_policy", "ignore_public_acls", "restrict_public_buckets")
    )
    (versioning,) = _after(default_plan, "aws_s3_bucket_versioning")
    assert versioning["versioning_configuration"][0]["status"] == "Enabled"
    (sse,) = _after(default_plan, "aws_s3_bucket_server_side_encryption_configuration")
    assert sse["rule"][0]["apply_server_side_encryption_by_default"][0]["sse_algorithm"] == "aws:kms"
    (key,) = _after(default_plan, "aws_kms_key")
    assert key["enable_key_rotation"] is True


# Ansible group -> the Role tag its instances carry
POOL_ROLES = {
    "control_plane": "control-plane",
    "system_workers": "system-worker",
    "gpu_workers": "gpu-worker",
}
LOCK_FILE = TERRAFORM_DIR / "envs" / "dev" / ".terraform.lock.hcl"


def _hcl_defaults(path: Path) -> dict[str, Any]:
    """Variable defaults of a .tf file, with python-hcl2's quotes around strings removed."""

    def plain(value: Any) -> Any:
        if isinstance(value, str):
            return value.strip('"')
        if isinstance(value, list):
            return [plain(v) for v in value]
        return value

    found = {}
    for block in hcl2.load(path.open()).get("variable", []):
        for name, body in block.items():
            if "default" in body:
                found[name.strip('"')] = plain(body["default"])
    return found


def test_the_default_plan_makes_the_node_pools_the_group_vars_describe(default_plan: dict[str, Any]) -> None:
    instances = _after(default_plan, "aws_instance")
    variables = {k: v["value"] for k, v in default_plan["variables"].items()}
    for group, role in POOL_ROLES.items():
        layout = yaml.safe_load((ANSIBLE_DIR / "inventory" / "group_vars" / f"{group}.yml").read_text())
        nodes = [i for i in instances if i["tags"]["Role"] == role]
        count_variable = layout["node_terraform"]["count_variable"]
        assert len(nodes) == (1 if count_variable is None else variables[count_variable]) >= 1, group
        instance_type = variables[layout["node_terraform"]["instance_type_variable"]]
        assert {i["instance_type"] for i in nodes} == {instance_type}, group
        assert layout["node_capacity"]["instance_type"] == instance_type, group


def test_the_root_passes_the_module_defaults_on_unchanged() -> None:
    module = _hcl_defaults(TERRAFORM_DIR / "modules" / "cluster" / "variables.tf")
    root = _hcl_defaults(TERRAFORM_DIR / "envs" / "dev" / "variables.tf")
    shared = sorted(set(module) & set(root) - {"availability_zones"})
    assert "gpu_worker_count" in shared and "system_worker_instance_type" in shared
    assert {k: root[k] for k in shared} == {k: module[k] for k in shared}


def test_the_provider_lock_file_is_committed_with_the_mirrors_hashes(
    planned_root: Path, tf_env: dict[str, str]
) -> None:
    assert LOCK_FILE.is_file(), "run terraform init -backend=false -plugin-dir=<mirror> in envs/dev"
    ignored = subprocess.run(
        ["git", "check-ignore", "-q", str(LOCK_FILE)], cwd=REPO_ROOT, capture_output=True, check=False
    )
    assert ignored.returncode == 1, "envs/dev/.terraform.lock.hcl is git-ignored"
    (provider,) = hcl2.load(LOCK_FILE.open())["provider"]
    (name, pin) = next(iter(provider.items()))
    assert name.strip('"') == "registry.terraform.io/hashicorp/aws"
    version = pin["version"].strip('"')
    assert (plugin_dir() / "registry.terraform.io" / "hashicorp" / "aws" / version).is_dir()
    hashes = [h.strip('"') for h in pin["hashes"]]
    assert hashes and all(h.startswith("h1:") for h in hashes)  # what a local mirror can vouch for
    # `terraform init` against the mirror (planned_root) found nothing to add or change
    assert (planned_root / ".terraform.lock.hcl").read_text() == LOCK_FILE.read_text()


def test_outputs_carry_what_the_ansible_inventory_reads(default_plan: dict[str, Any]) -> None:
    outputs = set(default_plan["planned_values"]["outputs"])
    wanted = {"ssh_user", "control_plane", "system_workers", "gpu_workers", "kubernetes_api_endpoint"}
    assert wanted <= outputs


def test_unsafe_or_malformed_variables_are_refused_with_readable_messages(
    planned_root: Path, tf_env: dict[str, str]
) -> None:
    bad = {
        "admin_cidrs": ('["0.0.0.0/0"]', "never 0.0.0.0/0"),
        "gpu_worker_instance_type": ("m6i.large", "NVIDIA GPU family"),
        "ami_id": ("ubuntu-latest", "ami-0123456789abcdef0"),
        "system_worker_instance_type": ("g5.2xlarge", "must be a CPU instance type"),
        "system_worker_count": ("0", "need an untainted node"),
        "git_ssh_cidrs": ('["0.0.0.0/0"]', "SSH egress to the whole internet"),
        "pacs_cidrs": ('["0.0.0.0/0"]', "pacs_cidrs must be valid CIDRs of the hospital network"),
    }
    variables = {**PLAN_VARS, **{k: v for k, (v, _) in bad.items()}}
    args = [a for k, v in variables.items() for a in ("-var", f"{k}={v}")]
    proc = _run(
        ["terraform", "plan", "-input=false", "-lock=false", "-refresh=false", "-no-color", *args],
        planned_root,
        tf_env,
        ok=False,
    )
    assert proc.returncode != 0
    # messages wrap inside the diagnostic box: drop its border before joining the lines
    said = " ".join((proc.stdout + proc.stderr).replace("│", " ").split())
    for variable, (_, message) in bad.items():  # every bad variable is named, not just the first
        assert message in said, variable


def test_a_cidr_that_spells_the_internet_another_way_is_refused(
    planned_root: Path, tf_env: dict[str, str]
) -> None:
    """``!= "0.0.0.0/0"`` was the whole check: two /1 blocks are the internet too, and ``10.0.0.0/0``
    (which the provider refuses only with its own message) means the same."""
    bad = {
        "admin_cidrs": '["10.0.0.0/0"]',  # SSH and the API server open to the internet
        "git_ssh_cidrs": '["10.1.2.3/0"]',
        "client_cidrs": '["0.0.0.0/1"]',
        "pacs_cidrs": '["128.0.0.0/1"]',
    }
    for variable, value in bad.items():
        args = [a for k, v in {**PLAN_VARS, variable: value}.items() for a in ("-var", f"{k}={v}")]
        proc = _run(
            ["terraform", "plan", "-input=false", "-lock=false", "-refresh=false", "-no-color", *args],
            planned_root,
            tf_env,
            ok=False,
        )
        said = " ".join((proc.stdout + proc.stderr).replace("│", " ").split())
        assert proc.returncode != 0, f"{variable}={value} was accepted"
        assert f"{variable} must" in said and "no wider than /8" in said, said[-2000:]


@pytest.mark.slow
def test_checkov_passes_with_only_the_commented_skips(tmp_path: Path, tf_env: dict[str, str]) -> None:
    checkov = lint_tool("checkov")
    config = TERRAFORM_DIR / ".checkov.yaml"
    lines = config.read_text().splitlines()
    skips = [i for i, line in enumerate(lines) if line.strip().startswith("- CKV")]
    assert skips, "no skip list?"
    for i in skips:  # each skipped check is explained right above it
        assert lines[i - 1].strip().startswith("#"), f"skip {lines[i].strip()} has no reason"
    proc = _run([checkov, "--config-file", str(config), "-d", str(TERRAFORM_DIR)], tmp_path, tf_env, ok=False)
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert "Failed checks: 0" in proc.stdout
