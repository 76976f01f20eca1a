"""The cluster path fits together (delivery/cluster_fit), and each check catches a defect seeded into a copy.

The clean-tree test is the gate: every manifest, role, table and image of this checkout must
fit the others. The seeded tests break one thing in a copy of the tree, the way a real
change would, and expect the one check that owns it to say so (a check that cannot fail
proves nothing).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from delivery.cluster_fit.findings import Finding
from delivery.cluster_fit.run import check_tree, report_lines
from delivery.cluster_fit.scheduling import capacity

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[3]
# what the check reads; copied for the seeded defects
TREE_PARTS = (
    "k8s",
    "iac/ansible",
    "iac/terraform/modules",
    "iac/terraform/envs",
    "workflows/permissions.yaml",
    "Makefile",
    "Dockerfile",
    "pyproject.toml",
    "docker-compose.yaml",
    ".github",
)


@pytest.fixture(scope="session")
def clean() -> tuple[object, list[Finding]]:
    return check_tree(REPO)


def test_the_tree_fits_together(clean: tuple[object, list[Finding]]) -> None:
    _, findings = clean
    assert [f.line() for f in findings] == []


def test_the_default_deployment_fits_its_node_pools_with_headroom(
    clean: tuple[object, list[Finding]],
) -> None:
    tree, _ = clean
    loads = capacity(tree)  # type: ignore[arg-type]
    assert loads, "no node pools read from iac/"
    for load in loads:
        assert load.cpu <= load.cpu_capacity and load.memory_gib <= load.memory_capacity, load.line()
        assert load.gpus <= load.gpu_capacity, load.line()
    assert sum(load.gpus for load in loads) > 0, "the default deployment should use GPUs (Triton, Ray)"


def test_docs_cluster_quotes_what_the_check_prints(clean: tuple[object, list[Finding]]) -> None:
    """docs/cluster.md shows the command's output; it must be today's, not an old run's."""
    tree, findings = clean
    doc = (REPO / "docs" / "cluster.md").read_text()
    for line in report_lines(tree, findings):  # type: ignore[arg-type]
        assert line in doc, f"docs/cluster.md does not quote `cxr cluster check`'s line {line!r}"


def _copy_tree(dest: Path) -> Path:
    for part in TREE_PARTS:
        src = REPO / part
        if src.is_dir():
            shutil.copytree(src, dest / part, ignore=shutil.ignore_patterns(".terraform", "__pycache__"))
        elif src.exists():
            (dest / part).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / part)
    return dest


def _edit(root: Path, path: str, old: str, new: str, count: int = 1) -> None:
    target = root / path
    text = target.read_text()
    assert old in text, f"the seed no longer applies: {old!r} is not in {path}"
    target.write_text(text.replace(old, new, count))


Seed = Callable[[Path], None]


def _switch_on_pacs_credentials(root: Path, source_key: str = "cxr-pacs-credentials") -> None:
    """What a site whose PACS needs credentials does: list the opt-in ExternalSecret (dataFrom)."""
    _edit(
        root,
        "k8s/overlays/production/kustomization.yaml",
        "  # - pacs-credentials.yaml",
        "  - pacs-credentials.yaml",
    )
    _edit(
        root,
        "k8s/overlays/production/pacs-credentials.yaml",
        "key: cxr-pacs-credentials",
        f"key: {source_key}",
    )


SEEDS: dict[str, tuple[Seed, str, str]] = {
    "an-unsynced-folder": (
        lambda r: _edit(
            r, "k8s/argocd/applicationset.yaml", "- {name: workflows, path: k8s/workflows", "# -"
        ),
        "sync",
        "k8s/workflows: is deployed by nothing",
    ),
    "an-https-repository-with-an-ssh-key": (
        lambda r: _edit(
            r,
            "k8s/argocd/platform-app.yaml",
            "git@git.hospital.example:radiology/cxr-detect.git",
            "https://git.hospital.example/radiology/cxr-detect.git",
        ),
        "sync",
        "but Ansible gives Argo CD credentials for git@",
    ),
    "an-add-on-in-argo-cds-open-default-project": (
        lambda r: _edit(
            r, "k8s/platform/ingress-nginx.yaml", "project: cxr-platform-charts", "project: default"
        ),
        "sync",
        "Application/ingress-nginx (k8s/platform): is in Argo CD's default project",
    ),
    "an-add-on-from-a-repository-its-project-does-not-allow": (
        lambda r: _edit(
            r,
            "k8s/platform/ingress-nginx.yaml",
            "https://kubernetes.github.io/ingress-nginx",
            "https://charts.example.org/ingress-nginx",
        ),
        "sync",
        "which its project cxr-platform-charts does not allow",
    ),
    "waves-without-rolling-sync": (
        lambda r: _edit(r, "k8s/argocd/applicationset.yaml", "type: RollingSync", "type: AllAtOnce"),
        "sync",
        "no RollingSync",
    ),
    "a-missing-secret-store": (
        lambda r: _edit(r, "k8s/platform/kustomization.yaml", "  - secret-store.yaml\n", ""),
        "references",
        "ClusterSecretStore cxr-secrets is defined nowhere",
    ),
    "a-secret-source-ansible-never-writes": (
        lambda r: _edit(
            r,
            "iac/ansible/roles/argocd/tasks/secrets.yml",
            "metadata: {name: cxr-worklist-db}",
            "metadata: {}",
        ),
        "references",
        "reads source key cxr-worklist-db, which iac/ansible/roles/argocd/tasks/secrets.yml never writes",
    ),
    "a-dimse-key-ansible-never-writes": (
        lambda r: _edit(
            r, "iac/ansible/roles/argocd/tasks/secrets.yml", "metadata: {name: cxr-dimse}", "metadata: {}"
        ),
        "references",
        "reads source key cxr-dimse, which iac/ansible/roles/argocd/tasks/secrets.yml never writes",
    ),
    "a-dimse-scp-pointed-at-a-gateway-port-that-does-not-exist": (
        lambda r: _edit(
            r,
            "k8s/base/dimse/statefulset.yaml",
            "cxr-gateway-production.cxr.svc.cluster.local:8080",
            "cxr-gateway-production.cxr.svc.cluster.local:80",
        ),
        "references",
        "Service cxr-gateway-production port 80 does not exist",
    ),
    "a-whole-source-key-nobody-writes": (
        lambda r: _switch_on_pacs_credentials(r, "cxr-pacs-creds"),
        "references",
        "reads source key cxr-pacs-creds, which iac/ansible/roles/argocd/tasks/secrets.yml never writes",
    ),
    "a-worklist-url-without-its-pool": (
        lambda r: _edit(r, "pyproject.toml", '"psycopg-pool"]', "]"),
        "images",
        "the gateway's worklist URL needs psycopg-pool, not in the image",
    ),
    "a-claim-without-storage-class": (
        lambda r: _edit(
            r, "k8s/base/minio/statefulset.yaml", "storageClassName: cxr-local", "volumeMode: Filesystem"
        ),
        "references",
        "names no StorageClass",
    ),
    "a-renamed-service-account": (
        lambda r: _edit(r, "k8s/base/gateway/serviceaccount.yaml", "name: cxr-gateway", "name: cxr-gw"),
        "references",
        "ServiceAccount cxr-gateway",
    ),
    "an-ingress-to-a-wrong-port": (
        lambda r: _edit(r, "k8s/overlays/production/ingress.yaml", "number: 8080", "number: 8081"),
        "references",
        "routes to Service cxr-gateway-production port 8081",
    ),
    "a-pod-without-seccomp": (
        lambda r: _edit(r, "k8s/base/triton/deployment.yaml", "type: RuntimeDefault", "type: Unconfined"),
        "pod-security",
        "seccompProfile",
    ),
    "a-gpu-pod-without-its-toleration": (
        lambda r: _edit(r, "k8s/base/triton/deployment.yaml", "effect: NoSchedule", "effect: NoExecute"),
        "scheduling",
        "fits no node pool",
    ),
    "an-image-this-repo-does-not-build": (
        lambda r: _edit(
            r,
            "k8s/base/gateway/deployment.yaml",
            "ghcr.io/cxr-detect/cxr-detect:0.1.0",
            "ghcr.io/cxr-detect/cxr:0.1.0",
        ),
        "images",
        "but this repository builds",
    ),
    "ssh-in-an-image-without-our-user": (
        lambda r: _edit(
            r,
            "k8s/base/canary/cronjob.yaml",
            "image: ghcr.io/cxr-detect/cxr-detect:0.1.0",
            "image: alpine/git:v2.45.2",
        ),
        "images",
        "whose passwd lacks the pod's UID",
    ),
    "no-image-target": (
        lambda r: _edit(r, "Makefile", "IMAGE_TAG ?=", "IMAGE_VERSION ?="),
        "images",
        "no `image` target",
    ),
    "a-role-without-rayjobs": (
        lambda r: _edit(
            r, "k8s/base/rbac/workflow-rbac.yaml", 'resources: ["rayjobs"]', 'resources: ["rayclusters"]'
        ),
        "rbac",
        "may not create,get rayjobs.ray.io",
    ),
    "a-policy-that-blocks-the-gateway": (
        lambda r: _edit(r, "k8s/base/network/triton-networkpolicy.yaml", "        - port: 8001\n", ""),
        "network",
        "blocked by the NetworkPolicies (port 8001)",
    ),
    "a-gateway-that-cannot-send-back-over-dimse": (
        lambda r: _edit(
            r,
            "k8s/base/network/gateway-networkpolicy.yaml",
            "        - port: 104\n          protocol: TCP\n",
            "",
        ),
        "network",
        "blocked by the NetworkPolicies (port 104)",
    ),
    "a-dimse-scp-the-pacs-cannot-reach": (
        lambda r: _edit(r, "k8s/base/network/dimse-networkpolicy.yaml", "- port: 11112", "- port: 104"),
        "network",
        "blocked by the NetworkPolicies (port 11112)",
    ),
    "a-pacs-rule-that-opens-the-api-server": (
        lambda r: _edit(
            r,
            "k8s/base/network/gateway-networkpolicy.yaml",
            "except: [10.42.0.0/16, 10.96.0.0/12]",
            "except: [10.42.0.0/16]",
        ),
        "network",
        "gateway to the api server through the pacs rule (the service subnet is no pacs): allowed",
    ),
    "one-gpu-node-too-few": (
        lambda r: _edit(
            r,
            "iac/terraform/envs/dev/variables.tf",
            'Number of GPU workers (pool \\"gpu\\")."\n  type        = number\n  default     = 2',
            'Number of GPU workers (pool \\"gpu\\")."\n  type        = number\n  default     = 1',
        ),
        "scheduling",
        "the default deployment does not fit",
    ),
    "a-tainted-system-pool": (
        lambda r: _edit(
            r,
            "iac/ansible/inventory/group_vars/system_workers.yml",
            "node_taints: []",
            "node_taints: [{key: dedicated, value: infra, effect: NoSchedule}]",
        ),
        "scheduling",
        "fits no node pool",
    ),
    "an-instance-type-the-capacity-does-not-describe": (
        lambda r: _edit(r, "iac/terraform/envs/dev/variables.tf", '"g5.2xlarge"', '"g5.xlarge"'),
        "scheduling",
        "sized for g5.2xlarge, but Terraform creates g5.xlarge",
    ),
    "an-unselected-service-monitor": (
        lambda r: _edit(
            r, "k8s/monitoring/servicemonitors.yaml", "release: kube-prometheus-stack", "release: other"
        ),
        "monitoring",
        "Prometheus never scrapes it",
    ),
    "a-gateway-any-monitoring-pod-may-call": (
        lambda r: _edit(
            r,
            "k8s/base/network/gateway-networkpolicy.yaml",
            "          podSelector:\n            matchLabels:\n"
            "              app.kubernetes.io/name: prometheus\n",
            "",
        ),
        "network",
        "grafana to the gateway (its api port; only prometheus scrapes /metrics there): allowed",
    ),
    "a-grafana-that-checks-for-plugin-updates": (
        lambda r: _edit(
            r,
            "k8s/platform/kube-prometheus-stack.yaml",
            "check_for_plugin_updates: false",
            "check_for_plugin_updates: true",
        ),
        "offline",
        "grafana.ini [analytics] check_for_plugin_updates is True, not false",
    ),
    "a-grafana-that-publishes-snapshots": (
        lambda r: _edit(
            r, "k8s/platform/kube-prometheus-stack.yaml", "            snapshots:\n", "            other:\n"
        ),
        "offline",
        "grafana.ini [snapshots] external_enabled is None, not false",
    ),
    "a-minio-that-checks-for-updates": (
        lambda r: _edit(r, "k8s/base/minio/statefulset.yaml", 'value: "off"', 'value: "on"'),
        "offline",
        "container minio does not set MINIO_UPDATE=off",
    ),
    "an-image-with-ray-usage-stats-on": (
        lambda r: _edit(r, "Dockerfile", "RAY_USAGE_STATS_ENABLED=0", "RAY_USAGE_STATS_ENABLED=1"),
        "offline",
        "ENV RAY_USAGE_STATS_ENABLED is '1', not '0'",
    ),
    "a-chart-monitor-without-the-label": (
        lambda r: _edit(
            r,
            "k8s/platform/external-secrets.yaml",
            "release: kube-prometheus-stack # the label",
            "team: x # the",
        ),
        "monitoring",
        "chart external-secrets",
    ),
}


@pytest.mark.parametrize("seed", sorted(SEEDS))
def test_a_seeded_defect_is_caught_by_its_check(seed: str, tmp_path: Path) -> None:
    break_it, check, expected = SEEDS[seed]
    root = _copy_tree(tmp_path / "tree")
    break_it(root)
    _, findings = check_tree(root)
    caught = [f.line() for f in findings if f.check == check and expected in f.line()]
    others = [f.line() for f in findings if f.check == check]
    assert caught, f"[{check}] did not catch {seed}; it reported: {others}"


def test_a_site_that_switches_on_its_pacs_credentials_still_fits(tmp_path: Path) -> None:
    """pacs-credentials.yaml ships commented out of the production overlay; a site whose PACS needs
    credentials uncomments it, and the tree must fit then too (its source key is the site's own)."""
    root = _copy_tree(tmp_path / "tree")
    _switch_on_pacs_credentials(root)
    tree, findings = check_tree(root)
    assert [f.line() for f in findings] == []
    names = {o.doc["spec"]["target"]["name"] for o in tree.of_kind("ExternalSecret")}
    assert "cxr-pacs-credentials" in names
