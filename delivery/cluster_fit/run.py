"""All checks over one tree, in the order a first deploy meets them."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from delivery.cluster_fit import (
    images,
    monitoring,
    network,
    offline,
    pod_security,
    rbac,
    references,
    scheduling,
    sync,
)
from delivery.cluster_fit.findings import Finding
from delivery.cluster_fit.tree import Tree, load_tree

CHECKS: dict[str, Callable[[Tree], list[Finding]]] = {
    "sync": sync.check,
    "references": references.check,
    "rbac": rbac.check,
    "pod-security": pod_security.check,
    "scheduling": scheduling.check,
    "network": network.check,
    "images": images.check,
    "monitoring": monitoring.check,
    "offline": offline.check,
}


def run_checks(tree: Tree, only: list[str] | None = None) -> list[Finding]:
    found: list[Finding] = []
    for name, check in CHECKS.items():
        if not only or name in only:
            found.extend(check(tree))
    return found


def report_lines(tree: Tree, findings: list[Finding]) -> list[str]:
    """What ``cxr cluster check`` prints: capacity per pool, each misfit, and a count line."""
    from delivery.cluster_fit.scheduling import capacity

    return [
        *(f"capacity {load.line()}" for load in capacity(tree)),
        *(finding.line() for finding in findings),
        f"{len(tree.pods)} pod templates, {len(tree.objects)} objects, {len(findings)} misfits",
    ]


def check_tree(root: Path, only: list[str] | None = None) -> tuple[Tree, list[Finding]]:
    tree = load_tree(root)
    return tree, run_checks(tree, only)
