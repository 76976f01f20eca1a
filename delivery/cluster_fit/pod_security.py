"""Pod Security Standard "restricted" for every pod the ``cxr`` namespace would admit.

The namespace enforces it (k8s/shared/namespace.yaml), so a pod that misses one field is
rejected at creation: the check reads the same fields the admission controller does.
"""

from __future__ import annotations

from typing import Any

from delivery.cluster_fit.findings import Finding
from delivery.cluster_fit.tree import NAMESPACE, Tree

CHECK = "pod-security"
_ALLOWED_VOLUMES = {
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
}
_SECCOMP_OK = {"RuntimeDefault", "Localhost"}


def restricted_problems(
    pod_spec: dict[str, Any], containers: list[dict[str, Any]] | None = None
) -> list[str]:
    """What keeps a pod from Pod Security "restricted" (the fields the admission controller reads).

    ``containers`` defaults to the pod's own (init and regular) containers; the retrain render
    (workflows/template_checks.py) passes the executor's beside a step's own.
    """
    pod_ctx: dict[str, Any] = pod_spec.get("securityContext") or {}
    problems = [f"{flag} is set" for flag in ("hostNetwork", "hostPID", "hostIPC") if pod_spec.get(flag)]
    for vol in pod_spec.get("volumes", []):
        kinds = set(vol) - {"name"}
        if not kinds <= _ALLOWED_VOLUMES:
            problems.append(f"volume {vol.get('name')} is of a kind restricted forbids ({sorted(kinds)})")
    if containers is None:
        containers = [*pod_spec.get("initContainers", []), *pod_spec.get("containers", [])]
    if not containers:
        problems.append("has no containers")
    for c in containers:
        ctx: dict[str, Any] = c.get("securityContext") or {}
        name = c.get("name", "?")
        if ctx.get("privileged"):
            problems.append(f"container {name} is privileged")
        if ctx.get("allowPrivilegeEscalation") is not False:
            problems.append(f"container {name} does not set allowPrivilegeEscalation: false")
        caps = ctx.get("capabilities") or {}
        if "ALL" not in (caps.get("drop") or []):
            problems.append(f"container {name} does not drop ALL capabilities")
        if set(caps.get("add") or []) - {"NET_BIND_SERVICE"}:
            problems.append(f"container {name} adds capabilities {caps.get('add')}")
        if ctx.get("runAsNonRoot", pod_ctx.get("runAsNonRoot")) is not True:
            problems.append(f"container {name} may run as root (runAsNonRoot unset)")
        if ctx.get("runAsUser", pod_ctx.get("runAsUser")) == 0:
            problems.append(f"container {name} runs as UID 0")
        seccomp = (ctx.get("seccompProfile") or pod_ctx.get("seccompProfile") or {}).get("type")
        if seccomp not in _SECCOMP_OK:
            problems.append(f"container {name} has no RuntimeDefault seccompProfile")
    return problems


def check(tree: Tree) -> list[Finding]:
    return [
        Finding(CHECK, pod.owner, problem)
        for pod in tree.pods
        if pod.namespace == NAMESPACE
        for problem in restricted_problems(pod.spec)
    ]
