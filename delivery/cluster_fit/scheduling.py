"""Every pod lands on some node the provisioning makes, and the default deployment fits.

Nodes are what Terraform creates (pools, counts, instance sizes) with the labels and taints
Ansible gives them and the GPUs the device plugin advertises (time-slicing included). A pod
fits a pool when it tolerates the pool's taints, its nodeSelector is among the pool's labels
and its requests fit one node. The capacity sum places every long-running pod of all stages
plus one training run (the RayJob) on its pools and compares with what the pools hold after
a reserve for the platform add-ons and the kubelet.
"""

from __future__ import annotations

from dataclasses import dataclass

from delivery.cluster_fit.findings import Finding
from delivery.cluster_fit.nodes import NodePool
from delivery.cluster_fit.quantities import requests
from delivery.cluster_fit.tree import NAMESPACE, PodTemplate, Tree

CHECK = "scheduling"
# kept free on every node for the kubelet, the CNI, kube-proxy and the GPU operator's daemons
NODE_RESERVE_CPU = 0.5
NODE_RESERVE_GIB = 1.5
# the add-ons k8s/platform installs (Argo CD, Argo Workflows, KubeRay, ESO, Prometheus stack,
# storage provisioner) on the untainted pools, by their charts' default requests, rounded up
PLATFORM_CPU = 2.0
PLATFORM_GIB = 6.0


def tolerates(pod: PodTemplate, pool: NodePool) -> bool:
    tolerations = pod.spec.get("tolerations") or []
    for taint in pool.taints:
        if taint.effect not in ("NoSchedule", "NoExecute"):
            continue
        if not any(
            (t.get("operator") == "Exists" and t.get("key") in (None, "", taint.key))
            or (t.get("key") == taint.key and t.get("value", "") == taint.value)
            for t in tolerations
            if t.get("effect") in (None, "", taint.effect)
        ):
            return False
    return True


def pod_requests(pod: PodTemplate) -> tuple[float, float, int]:
    """Requests of the pod: its containers summed (init containers run before, so the larger)."""
    main = [requests(c) for c in pod.spec.get("containers", [])]
    init = [requests(c) for c in pod.spec.get("initContainers", [])]
    total = tuple(sum(v[i] for v in main) for i in range(3))
    peak = tuple(max([v[i] for v in init] or [0]) for i in range(3))
    return max(total[0], peak[0]), max(total[1], peak[1]), int(max(total[2], peak[2]))


def fits(pod: PodTemplate, pool: NodePool) -> bool:
    selector = pod.spec.get("nodeSelector") or {}
    if any(pool.labels.get(k) != v for k, v in selector.items()):
        return False
    cpu, mem, gpus = pod_requests(pod)
    return (
        tolerates(pod, pool)
        and cpu <= pool.cpu - NODE_RESERVE_CPU
        and mem <= pool.memory_gib - NODE_RESERVE_GIB
        and gpus <= pool.gpus
    )


@dataclass
class PoolLoad:
    pool: NodePool
    cpu: float = 0.0
    memory_gib: float = 0.0
    gpus: int = 0

    @property
    def cpu_capacity(self) -> float:
        platform = PLATFORM_CPU if not self.pool.taints else 0.0
        return self.pool.count * (self.pool.cpu - NODE_RESERVE_CPU) - platform

    @property
    def memory_capacity(self) -> float:
        platform = PLATFORM_GIB if not self.pool.taints else 0.0
        return self.pool.count * (self.pool.memory_gib - NODE_RESERVE_GIB) - platform

    @property
    def gpu_capacity(self) -> int:
        return self.pool.count * self.pool.gpus

    def line(self) -> str:
        return (
            f"{self.pool.name}: CPU {self.cpu:.1f}/{self.cpu_capacity:.1f}, "
            f"memory {self.memory_gib:.1f}/{self.memory_capacity:.1f} GiB, "
            f"GPU {self.gpus}/{self.gpu_capacity}"
        )


def _counted(pod: PodTemplate) -> bool:
    """Long-running pods, plus the training run's Ray pods (they overlap with serving)."""
    return pod.namespace == NAMESPACE and (pod.long_running or "RayJob" in pod.owner)


def capacity(tree: Tree) -> list[PoolLoad]:
    """The default deployment placed on the pools (CPU-only pods prefer pools without GPUs)."""
    loads = {pool.name: PoolLoad(pool) for pool in tree.node_pools}
    for pod in tree.pods:
        if not _counted(pod):
            continue
        cpu, mem, gpus = pod_requests(pod)
        candidates = sorted(
            (p for p in tree.node_pools if fits(pod, p)), key=lambda p: (p.gpus > 0) != (gpus > 0)
        )
        if not candidates:
            continue  # reported by check()
        load = loads[candidates[0].name]
        load.cpu += cpu * pod.replicas
        load.memory_gib += mem * pod.replicas
        load.gpus += gpus * pod.replicas
    return list(loads.values())


def check(tree: Tree) -> list[Finding]:
    if not tree.node_pools:
        return [
            Finding(CHECK, "iac/", "no node pools found in the Terraform variables and Ansible group_vars")
        ]
    out = [
        Finding(
            CHECK,
            f"node pool {pool.name}",
            f"sized for {pool.instance_type}, but Terraform creates {pool.terraform_instance_type}",
        )
        for pool in tree.node_pools
        if pool.terraform_instance_type and pool.instance_type != pool.terraform_instance_type
    ]
    for pod in tree.pods:
        if pod.namespace == NAMESPACE and not any(fits(pod, pool) for pool in tree.node_pools):
            cpu, mem, gpus = pod_requests(pod)
            out.append(
                Finding(
                    CHECK,
                    pod.owner,
                    f"fits no node pool (requests CPU {cpu:g}, memory {mem:.1f} GiB, GPU {gpus}; "
                    f"nodeSelector {pod.spec.get('nodeSelector') or {}}, "
                    f"tolerations {[t.get('key') for t in pod.spec.get('tolerations') or []]})",
                )
            )
    for load in capacity(tree):
        if (
            load.cpu > load.cpu_capacity
            or load.memory_gib > load.memory_capacity
            or load.gpus > load.gpu_capacity
        ):
            out.append(
                Finding(
                    CHECK,
                    f"node pool {load.pool.name}",
                    f"the default deployment does not fit: {load.line()}",
                )
            )
    return out
