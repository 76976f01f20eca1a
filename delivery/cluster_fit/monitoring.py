"""Every ServiceMonitor is selected by the Prometheus the platform installs.

The cluster's own monitors (k8s/monitoring) and the ones the platform charts create (Argo
Workflows, the GPU operator's DCGM exporter, External Secrets) must carry the labels of the
kube-prometheus-stack Prometheus' ``serviceMonitorSelector``, or their metrics (the training
alert's among them) are never scraped.
"""

from __future__ import annotations

from typing import Any

from delivery.cluster_fit.findings import Finding
from delivery.cluster_fit.tree import Tree

CHECK = "monitoring"
PROMETHEUS_CHART = "kube-prometheus-stack"
# chart -> (path to its ServiceMonitor switch, path to the labels it puts on the monitor)
CHART_MONITORS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "argo-workflows": (
        ("controller", "serviceMonitor", "enabled"),
        ("controller", "serviceMonitor", "additionalLabels"),
    ),
    "gpu-operator": (
        ("dcgmExporter", "serviceMonitor", "enabled"),
        ("dcgmExporter", "serviceMonitor", "additionalLabels"),
    ),
    "external-secrets": (("serviceMonitor", "enabled"), ("serviceMonitor", "additionalLabels")),
    "ingress-nginx": (
        ("controller", "metrics", "serviceMonitor", "enabled"),
        ("controller", "metrics", "serviceMonitor", "additionalLabels"),
    ),
}


def _get(values: dict[str, Any], path: tuple[str, ...]) -> Any:
    node: Any = values
    for key in path:
        node = node.get(key) if isinstance(node, dict) else None
    return node


def selector(tree: Tree) -> dict[str, str] | None:
    """matchLabels of the Prometheus' serviceMonitorSelector; None when it selects every monitor."""
    spec = _get(tree.helm_values.get(PROMETHEUS_CHART, {}), ("prometheus", "prometheusSpec")) or {}
    sel = spec.get("serviceMonitorSelector")
    if sel == {} and spec.get("serviceMonitorSelectorNilUsesHelmValues") is False:
        return None
    # the chart's default selects its own release label
    return dict((sel or {}).get("matchLabels") or {"release": PROMETHEUS_CHART})


def check(tree: Tree) -> list[Finding]:
    if PROMETHEUS_CHART not in tree.helm_values:
        return [Finding(CHECK, "k8s/platform", "no kube-prometheus-stack Application installs Prometheus")]
    wanted = selector(tree)
    if wanted is None:
        return []
    out = []
    for monitor in tree.of_kind("ServiceMonitor", "PodMonitor"):
        labels = monitor.doc.get("metadata", {}).get("labels") or {}
        if any(labels.get(k) != v for k, v in wanted.items()):
            out.append(Finding(CHECK, monitor.ref(), f"lacks {wanted}: Prometheus never scrapes it"))
    for chart, (switch, label_path) in CHART_MONITORS.items():
        values = tree.helm_values.get(chart, {})
        if not _get(values, switch):
            continue
        labels = _get(values, label_path) or {}
        if any(labels.get(k) != v for k, v in wanted.items()):
            out.append(Finding(CHECK, f"chart {chart}", f"its ServiceMonitor lacks {wanted}: never scraped"))
    return out
