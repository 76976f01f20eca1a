"""Policy checks on the rendered manifests: what a cluster admission policy would insist on."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[3]
PERMISSIONS = REPO / "workflows" / "permissions.yaml"
REACHABILITY = REPO / "k8s" / "base" / "network" / "reachability.yaml"
SECRETISH = re.compile(r"(PASSWORD|SECRET|TOKEN|_KEY$|ACCESS_KEY|PRIVATE)", re.IGNORECASE)
PINNED_IMAGE = re.compile(r"^[\w.\-/:]+:(?!latest$)[\w.\-]+(@sha256:[0-9a-f]{64})?$")


def pod_specs(all_objects: list[tuple[str, dict[str, Any]]]) -> Iterator[tuple[str, dict[str, Any]]]:
    for _, obj in all_objects:
        spec = obj.get("spec", {})
        if obj["kind"] in ("Deployment", "StatefulSet", "Job"):
            yield f"{obj['kind']}/{obj['metadata']['name']}", spec["template"]["spec"]
        elif obj["kind"] == "CronJob":
            yield f"CronJob/{obj['metadata']['name']}", spec["jobTemplate"]["spec"]["template"]["spec"]


def containers(pod: dict[str, Any]) -> list[dict[str, Any]]:
    return [*pod.get("initContainers", []), *pod["containers"]]


def test_workloads_exist_to_be_checked(all_objects: list[tuple[str, dict[str, Any]]]) -> None:
    assert len(list(pod_specs(all_objects))) >= 10


def test_every_container_has_cpu_and_memory_requests_and_limits(
    all_objects: list[tuple[str, dict[str, Any]]],
) -> None:
    missing = [
        f"{name}/{c['name']}: {kind}.{res}"
        for name, pod in pod_specs(all_objects)
        for c in containers(pod)
        for kind in ("requests", "limits")
        for res in ("cpu", "memory")
        if res not in c.get("resources", {}).get(kind, {})
    ]
    assert not missing, missing


def test_long_running_containers_have_readiness_and_liveness_probes(
    all_objects: list[tuple[str, dict[str, Any]]],
) -> None:
    missing = [
        f"{name}/{c['name']}: {probe}"
        for name, pod in pod_specs(all_objects)
        if name.split("/")[0] in ("Deployment", "StatefulSet")
        for c in pod["containers"]
        for probe in ("readinessProbe", "livenessProbe")
        if probe not in c
    ]
    assert not missing, missing


def test_gateway_and_triton_probe_the_endpoints_that_mean_ready(
    all_objects: list[tuple[str, dict[str, Any]]],
) -> None:
    pods = dict(pod_specs(all_objects))
    gateway = pods["Deployment/cxr-gateway-production"]["containers"][0]
    assert gateway["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert gateway["livenessProbe"]["httpGet"]["path"] == "/healthz"
    for stage in ("staging", "canary", "production"):
        triton = pods[f"Deployment/triton-{stage}"]["containers"][0]
        assert triton["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
        assert triton["resources"]["limits"]["nvidia.com/gpu"] == 1


def test_pods_run_as_non_root_with_read_only_root_and_no_escalation(
    all_objects: list[tuple[str, dict[str, Any]]],
) -> None:
    problems = []
    for name, pod in pod_specs(all_objects):
        security = pod.get("securityContext", {})
        if security.get("runAsNonRoot") is not True:
            problems.append(f"{name}: runAsNonRoot")
        if security.get("seccompProfile", {}).get("type") != "RuntimeDefault":
            problems.append(f"{name}: seccompProfile")
        if pod.get("automountServiceAccountToken") is not False:
            problems.append(f"{name}: automountServiceAccountToken")
        for c in containers(pod):
            sc = c.get("securityContext", {})
            if sc.get("allowPrivilegeEscalation") is not False:
                problems.append(f"{name}/{c['name']}: allowPrivilegeEscalation")
            if sc.get("readOnlyRootFilesystem") is not True:
                problems.append(f"{name}/{c['name']}: readOnlyRootFilesystem")
            if sc.get("capabilities", {}).get("drop") != ["ALL"]:
                problems.append(f"{name}/{c['name']}: capabilities.drop ALL")
            if sc.get("privileged"):
                problems.append(f"{name}/{c['name']}: privileged")
    assert not problems, problems


def test_images_are_pinned_to_a_version_never_latest(all_objects: list[tuple[str, dict[str, Any]]]) -> None:
    images = [(name, c["image"]) for name, pod in pod_specs(all_objects) for c in containers(pod)]
    unpinned = [f"{name}: {image}" for name, image in images if not PINNED_IMAGE.match(image)]
    assert not unpinned, unpinned
    assert len(images) >= 10


def test_no_secret_values_in_git(all_objects: list[tuple[str, dict[str, Any]]]) -> None:
    assert not [o for _, o in all_objects if o["kind"] == "Secret"], "Secrets belong in the secret manager"
    literal = [
        f"{name}/{c['name']}: {e['name']}"
        for name, pod in pod_specs(all_objects)
        for c in containers(pod)
        for e in c.get("env", [])
        if SECRETISH.search(e["name"]) and "value" in e
    ]
    assert not literal, f"secret-like env vars with literal values: {literal}"
    for _, obj in all_objects:
        if obj["kind"] == "ConfigMap":
            for key, value in obj.get("data", {}).items():
                assert not SECRETISH.search(key), f"{obj['metadata']['name']}: {key} looks like a secret"
                assert "PRIVATE KEY" not in str(value)


def test_namespace_default_denies_and_every_workload_has_an_allow_rule(
    all_objects: list[tuple[str, dict[str, Any]]],
) -> None:
    policies = [o for _, o in all_objects if o["kind"] == "NetworkPolicy"]
    deny = [
        p
        for p in policies
        if p["spec"]["podSelector"] == {} and "ingress" not in p["spec"] and "egress" not in p["spec"]
    ]
    assert deny and set(deny[0]["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    selected = {
        p["spec"]["podSelector"].get("matchLabels", {}).get("app.kubernetes.io/name") for p in policies
    }
    workload_names = {
        o["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/name"]
        for _, o in all_objects
        if o["kind"] in ("Deployment", "StatefulSet", "Job")
    }
    assert workload_names <= selected, workload_names - selected


def test_only_the_pipeline_gets_kubernetes_api_rights_and_exactly_its_table(
    all_objects: list[tuple[str, dict[str, Any]]],
) -> None:
    """Namespace cxr: one Role, for ServiceAccount cxr-pipeline, granting exactly workflows/permissions.yaml.

    (The platform's own roles, e.g. External Secrets' reader, live in their namespaces.)
    """
    cxr = [o for _, o in all_objects if o["metadata"].get("namespace", "cxr") == "cxr"]
    roles = [o for o in cxr if o["kind"] in ("Role", "ClusterRole")]
    assert [r["metadata"]["name"] for r in roles] == ["cxr-pipeline"]
    granted = set()
    for rule in roles[0]["rules"]:
        assert "*" not in rule["verbs"] and "*" not in rule["resources"] and "*" not in rule["apiGroups"]
        granted |= {(g, r, v) for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}
    table = yaml.safe_load(PERMISSIONS.read_text())["serviceAccounts"]
    wanted = {(row["apiGroup"], row["resource"], v) for row in table["cxr-pipeline"] for v in row["verbs"]}
    assert granted == wanted, {"not granted": wanted - granted, "not in the table": granted - wanted}
    bindings = [o for o in cxr if o["kind"] in ("RoleBinding", "ClusterRoleBinding")]
    assert [(b["roleRef"]["name"], [s["name"] for s in b["subjects"]]) for b in bindings] == [
        ("cxr-pipeline", ["cxr-pipeline"])
    ]
    accounts = {o["metadata"]["name"]: o for o in cxr if o["kind"] == "ServiceAccount"}
    assert set(table) <= set(accounts)
    # the delivery jobs need no API: no token, no row
    assert table["cxr-delivery"] == [] and accounts["cxr-delivery"]["automountServiceAccountToken"] is False


def _policies(all_objects: list[tuple[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for _, o in all_objects if o["kind"] == "NetworkPolicy"}


def _ip_blocks(policy: dict[str, Any], port: int) -> list[dict[str, Any]]:
    return [
        peer["ipBlock"]
        for rule in policy["spec"].get("egress", [])
        if any(p.get("port") == port for p in rule.get("ports", []))
        for peer in rule.get("to", [])
        if "ipBlock" in peer
    ]


def test_promotions_reach_the_git_server_over_ssh_from_one_configured_block(
    all_objects: list[tuple[str, dict[str, Any]]],
) -> None:
    """The on-prem git server sits in a private range: both pushers reach the same block on 22."""
    policies = _policies(all_objects)
    delivery, promote = _ip_blocks(policies["cxr-delivery"], 22), _ip_blocks(policies["cxr-pipeline-git"], 22)
    assert delivery and delivery == promote
    git_server = ipaddress.ip_address("10.20.30.40")  # reachability.yaml's stand-in
    assert all(git_server in ipaddress.ip_network(b["cidr"]) for b in delivery)
    assert policies["cxr-pipeline-git"]["spec"]["podSelector"]["matchLabels"]["cxr.io/egress"] == "git"


def test_workflow_pods_reach_the_api_server(all_objects: list[tuple[str, dict[str, Any]]]) -> None:
    policy = _policies(all_objects)["cxr-pipeline-api"]
    assert policy["spec"]["podSelector"] == {"matchLabels": {"app.kubernetes.io/name": "cxr-pipeline"}}
    assert _ip_blocks(policy, 443) and _ip_blocks(policy, 6443)


def _workflow_pod_labels() -> list[dict[str, str]]:
    from delivery.cluster_fit.tree import workflow_pod_templates
    from workflows.render import ARGO_DIR

    docs = [yaml.safe_load(p.read_text()) for p in sorted(ARGO_DIR.glob("*.yaml"))]
    return [
        pod["metadata"]["labels"]
        for doc in docs
        if doc["kind"] in ("WorkflowTemplate", "CronWorkflow")
        for pod in workflow_pod_templates(doc).values()
    ]


def _pod_labels(all_objects: list[tuple[str, dict[str, Any]]]) -> list[dict[str, str]]:
    labels = []
    for _, obj in all_objects:
        spec = obj.get("spec", {})
        if obj["kind"] in ("Deployment", "StatefulSet", "Job"):
            labels.append(spec["template"]["metadata"]["labels"])
        elif obj["kind"] == "CronJob":
            labels.append(spec["jobTemplate"]["spec"]["template"]["metadata"]["labels"])
    return labels + _workflow_pod_labels()


def test_every_pod_selector_of_the_policies_selects_some_pod(
    all_objects: list[tuple[str, dict[str, Any]]],
) -> None:
    """A rule whose labels no pod carries (issue 17: part-of cxr-training) opens nothing."""
    pods = _pod_labels(all_objects)
    selectors = []
    for policy in _policies(all_objects).values():
        selectors.append(policy["spec"]["podSelector"])
        for rule in [*policy["spec"].get("ingress", []), *policy["spec"].get("egress", [])]:
            for peer in [*rule.get("from", []), *rule.get("to", [])]:
                if "podSelector" in peer and "namespaceSelector" not in peer:
                    selectors.append(peer["podSelector"])
    dead = [
        sel
        for sel in selectors
        if not any(sel.get("matchLabels", {}).items() <= labels.items() for labels in pods)
    ]
    assert not dead, dead


def test_the_reachability_table_names_pods_that_render(all_objects: list[tuple[str, dict[str, Any]]]) -> None:
    table = yaml.safe_load(REACHABILITY.read_text())
    pods = _pod_labels(all_objects)
    assert len(table["must_allow"]) >= 10 and len(table["must_deny"]) >= 3
    for edge in [*table["must_allow"], *table["must_deny"]]:
        assert {"name", "from", "to", "port"} <= set(edge), edge
        for end in (edge["from"], edge["to"]):
            if "ip" in end:
                ipaddress.ip_address(end["ip"])
            elif end["namespace"] == "cxr":
                assert any(end["labels"].items() <= labels.items() for labels in pods), (edge["name"], end)
    kustomization = yaml.safe_load((REACHABILITY.parent / "kustomization.yaml").read_text())
    assert REACHABILITY.name not in kustomization["resources"]


# The per-site stand-ins of reachability.yaml and the blocks the PACS rules must keep out
PACS = ipaddress.ip_address("10.20.30.50")
VPC = ipaddress.ip_network("10.42.0.0/16")  # Terraform's vpc_cidr: the nodes
SERVICES = ipaddress.ip_network("10.96.0.0/12")  # kubeadm's serviceSubnet: 10.96.0.1 is the API server


def _pacs_blocks(rules: list[dict[str, Any]], peers: str) -> list[dict[str, Any]]:
    return [peer["ipBlock"] for rule in rules for peer in rule.get(peers, []) if "ipBlock" in peer]


def _admits(block: dict[str, Any], addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    return addr in ipaddress.ip_network(block["cidr"]) and not any(
        addr in ipaddress.ip_network(e) for e in block.get("except", [])
    )


def test_the_dimse_scp_takes_dicom_only_from_the_pacs_and_calls_only_the_gateway(
    all_objects: list[tuple[str, dict[str, Any]]],
) -> None:
    policy = _policies(all_objects)["cxr-dimse"]
    assert policy["spec"]["podSelector"] == {"matchLabels": {"app.kubernetes.io/name": "cxr-dimse"}}
    assert set(policy["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    (ingress,) = policy["spec"]["ingress"]
    assert [p["port"] for p in ingress["ports"]] == [11112]
    assert [list(peer) for peer in ingress["from"]] == [["ipBlock"]], "only the PACS network calls in"
    (egress,) = policy["spec"]["egress"]
    assert egress["to"] == [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "cxr-gateway"}}}]
    assert [p["port"] for p in egress["ports"]] == [8080]
    gateway = _policies(all_objects)["cxr-gateway"]
    callers = [peer for rule in gateway["spec"]["ingress"] for peer in rule["from"]]
    assert {"podSelector": {"matchLabels": {"app.kubernetes.io/name": "cxr-dimse"}}} in callers


def test_the_pacs_blocks_admit_the_pacs_and_neither_the_cluster_nor_the_api_server(
    all_objects: list[tuple[str, dict[str, Any]]],
) -> None:
    """Both per-site PACS rules (C-STORE in to the SCP, results out of the gateway) name the hospital
    network: not the VPC (the nodes), not the Service subnet (10.96.0.1:443 is the Kubernetes API)."""
    policies = _policies(all_objects)
    scp_in = _pacs_blocks(policies["cxr-dimse"]["spec"]["ingress"], "from")
    gateway_out = _pacs_blocks(policies["cxr-gateway"]["spec"]["egress"], "to")
    assert scp_in and gateway_out
    for block in [*scp_in, *gateway_out]:
        assert _admits(block, PACS), block
        assert ipaddress.ip_network(block["cidr"]) != ipaddress.ip_network("0.0.0.0/0"), block
        for inside in (VPC, SERVICES):
            assert any(inside.subnet_of(ipaddress.ip_network(e)) for e in block.get("except", [])), (
                block,
                inside,
            )
    assert scp_in == gateway_out, "keep the two PACS blocks equal (docs/cluster.md), or say why not"


def test_the_reachability_table_holds_the_pacs_round_trip() -> None:
    """The cluster-fit check proves what the table asks: here, that the PACS round trip is asked for."""
    table = yaml.safe_load(REACHABILITY.read_text())

    def edges(verdict: str) -> set[tuple[str, str, int]]:
        def end(e: dict[str, Any]) -> str:
            return str(e["ip"]) if "ip" in e else str(e["labels"].get("app.kubernetes.io/name"))

        return {(end(e["from"]), end(e["to"]), int(e["port"])) for e in table[verdict]}

    allowed, denied = edges("must_allow"), edges("must_deny")
    assert {
        (str(PACS), "cxr-dimse", 11112),
        ("cxr-dimse", "cxr-gateway", 8080),
        ("cxr-gateway", str(PACS), 443),
        ("cxr-gateway", str(PACS), 104),
    } <= allowed
    assert {
        ("cxr-dimse", "1.1.1.1", 443),
        ("cxr-dimse", "postgres", 5432),
        ("cxr-dimse", "minio", 9000),
        ("1.1.1.1", "cxr-dimse", 11112),
        ("cxr-gateway", "10.96.0.1", 443),
    } <= denied
