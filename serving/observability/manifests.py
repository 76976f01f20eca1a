"""Kubernetes objects for monitoring: PrometheusRules, ServiceMonitors, the kustomization.

Everything is produced from the rule files and :mod:`serving.observability.dashboards`
so the cluster runs exactly what the one-machine stack and the tests run.
Targets a kube-prometheus-stack install: its operator picks PrometheusRule and
ServiceMonitor objects labelled ``release: kube-prometheus-stack`` and its
Grafana sidecar loads ConfigMaps labelled ``grafana_dashboard: "1"``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from serving.observability.dashboards import DASHBOARDS

NAMESPACE = "monitoring"
GRAFANA_FOLDER = "CXR Detect"
COMMON_LABELS = {"app.kubernetes.io/part-of": "cxr-detect", "release": "kube-prometheus-stack"}

#: Labels the delivery manifests (k8s/base) put on the Services to be scraped.
GATEWAY_SELECTOR = {"app.kubernetes.io/name": "cxr-gateway"}
TRITON_SELECTOR = {"app.kubernetes.io/name": "triton"}
MLFLOW_EXPORTER_SELECTOR = {"app.kubernetes.io/name": "mlflow-exporter"}
#: Service label carrying the stage of a Triton; copied into the ``stage`` label of its series.
STAGE_SERVICE_LABEL = "cxr.io/stage"


class _BlockDumper(yaml.SafeDumper):
    """PyYAML dumper that writes multi-line strings (PromQL) as literal blocks, readable in review,
    and indents list items under their key, as yamllint's default style and kubectl do."""

    def increase_indent(self, flow: bool = False, indentless: bool = False) -> None:
        super().increase_indent(flow, False)


def _str_presenter(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    if "\n" in value:
        value = "\n".join(line.rstrip() for line in value.splitlines()) + "\n"
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|")
    return dumper.represent_scalar("tag:yaml.org,2002:str", value)


_BlockDumper.add_representer(str, _str_presenter)


def dump_yaml(documents: list[dict[str, Any]], header: str) -> str:
    body = yaml.dump_all(documents, Dumper=_BlockDumper, sort_keys=False, width=100, default_flow_style=False)
    return header + body


def _sanitize(label: str) -> str:
    return "".join(ch if ch.isalnum() else "_" for ch in label)


def _service_monitor(
    name: str, selector: dict[str, str], port: str, endpoint: dict[str, Any]
) -> dict[str, Any]:
    """A ServiceMonitor of ours: the labels the Prometheus selects, Services in any namespace."""
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "ServiceMonitor",
        "metadata": {"name": name, "labels": dict(COMMON_LABELS)},
        "spec": {
            "selector": {"matchLabels": dict(selector)},
            "namespaceSelector": {"any": True},
            "endpoints": [{"port": port, "path": "/metrics", **endpoint}],
        },
    }


def service_monitors() -> list[dict[str, Any]]:
    """ServiceMonitors: the gateway(s), the Triton servers of all stages, the MLflow exporter."""
    stage_label = f"__meta_kubernetes_service_label_{_sanitize(STAGE_SERVICE_LABEL)}"
    return [
        # The gateway labels its own series with `stage` (the routing decision);
        # honorLabels keeps them rather than renaming them exported_stage.
        _service_monitor("cxr-gateway", GATEWAY_SELECTOR, "http", {"interval": "15s", "honorLabels": True}),
        _service_monitor(
            "cxr-triton",
            TRITON_SELECTOR,
            "metrics",
            {
                "interval": "15s",
                "relabelings": [{"sourceLabels": [stage_label], "targetLabel": "stage"}],
            },
        ),
        # training runs and registry versions (k8s/base/mlflow/exporter.yaml): the training alerts,
        # CxrProductionModelStale and the training dashboard read these series; each scrape reads
        # MLflow (runs, versions), and its series change per run, not per second
        _service_monitor("cxr-mlflow-exporter", MLFLOW_EXPORTER_SELECTOR, "metrics", {"interval": "60s"}),
    ]


def kustomization(rule_names: list[str]) -> dict[str, Any]:
    """Rules and monitors as resources; dashboards through a ConfigMap generator with the sidecar label."""
    return {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "namespace": NAMESPACE,
        "resources": [f"prometheusrules/{name}.yaml" for name in rule_names] + ["servicemonitors.yaml"],
        "configMapGenerator": [
            {
                "name": f"{spec.uid}-dashboard",
                "files": [f"dashboards/{spec.uid}.json"],
                "options": {
                    "disableNameSuffixHash": True,
                    "labels": {"grafana_dashboard": "1", **COMMON_LABELS},
                    "annotations": {"grafana_folder": GRAFANA_FOLDER},
                },
            }
            for spec in DASHBOARDS
        ],
    }


def relative(path: Path, root: Path) -> str:
    return str(path.relative_to(root))
