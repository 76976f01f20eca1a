"""Policy checks on the rendered manifests: what a cluster admission policy would insist on."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[3]
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


def test_only_the_workflow_executor_gets_kubernetes_api_rights(
    all_objects: list[tuple[str, dict[str, Any]]],
) -> None:
    roles = [o for _, o in all_objects if o["kind"] in ("Role", "ClusterRole")]
    assert [r["metadata"]["name"] for r in roles] == ["cxr-workflow-executor"]
    for rule in roles[0]["rules"]:
        assert "*" not in rule["verbs"] and "*" not in rule["resources"]
        assert set(rule["verbs"]) <= {"create", "patch", "get", "list", "watch"}
