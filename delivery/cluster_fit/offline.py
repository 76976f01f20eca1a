"""Closed network: every component that could phone home has its own switch for it turned off.

The NetworkPolicies close namespace ``cxr`` (k8s/base/network), but the platform's add-ons run in
their charts' namespaces, where nothing filters egress and the nodes' NAT lets a pod out on 443
(image pulls need it): what Grafana fetches or reports there leaves the hospital unless its own
settings say no. Inside ``cxr`` the policies still resolve the names a component looks up, so the
images that start servers themselves keep their switches too:

- Grafana (kube-prometheus-stack's ``grafana.ini``): usage reports, the version and plugin update
  checks, plugin signing keys and the news feed (all from grafana.com), snapshots published to
  snapshots.raintank.io, avatars the server fetches from gravatar.com, plugins it would preinstall;
- MinIO: its update check (``MINIO_UPDATE=off``);
- the project image: ``ray start`` under KubeRay and ``mlflow server`` do not go through the ``cxr``
  CLI that applies ``core/offline.py``, so the image's own ``ENV`` must switch Ray's usage stats,
  MLflow's telemetry and ultralytics' online checks off, and no pod may switch them back on.
"""

from __future__ import annotations

import re
from typing import Any

from delivery.cluster_fit.findings import Finding
from delivery.cluster_fit.images import PROJECT_REGISTRY
from delivery.cluster_fit.tree import Tree

CHECK = "offline"
GRAFANA_CHART = "kube-prometheus-stack"
GRAFANA_INI = ("grafana", "grafana.ini")
# grafana.ini (section, key) -> the value that keeps Grafana from calling out, and what it calls
GRAFANA_OFF: dict[tuple[str, str], tuple[bool, str]] = {
    ("analytics", "reporting_enabled"): (False, "usage reports to stats.grafana.org"),
    ("analytics", "check_for_updates"): (False, "Grafana version checks on grafana.com"),
    ("analytics", "check_for_plugin_updates"): (False, "plugin version checks on grafana.com"),
    ("plugins", "public_key_retrieval_disabled"): (True, "plugin signing keys from grafana.com"),
    ("plugins", "preinstall_disabled"): (True, "plugins downloaded from grafana.com at start"),
    ("news", "news_feed_enabled"): (False, "the news feed from grafana.com"),
    ("snapshots", "external_enabled"): (False, "dashboards published to snapshots.raintank.io"),
    ("security", "disable_gravatar"): (True, "avatars fetched from gravatar.com"),
}
# image (without its tag) -> env the container must set
IMAGE_ENV: dict[str, dict[str, str]] = {
    "quay.io/minio/minio": {"MINIO_UPDATE": "off"},
}
# what the project image's Dockerfile ENV must hold (and no pod may set otherwise)
PROJECT_ENV: dict[str, str] = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "YOLO_OFFLINE": "1",
}


def _same(value: Any, wanted: bool) -> bool:
    return str(value).strip().lower() == str(wanted).lower()


def _grafana(tree: Tree) -> list[Finding]:
    values = tree.helm_values.get(GRAFANA_CHART)
    if values is None:
        return []  # no Grafana installed (the monitoring check reports a missing Prometheus)
    ini: Any = values
    for key in GRAFANA_INI:
        ini = ini.get(key) if isinstance(ini, dict) else None
    ini = ini if isinstance(ini, dict) else {}
    out = []
    for (section, key), (wanted, what) in GRAFANA_OFF.items():
        value = (ini.get(section) or {}).get(key)
        if value is None or not _same(value, wanted):
            out.append(
                Finding(
                    CHECK,
                    f"chart {GRAFANA_CHART}",
                    f"grafana.ini [{section}] {key} is {value!r}, not {str(wanted).lower()}: {what}",
                )
            )
    return out


def _dockerfile_env(tree: Tree) -> dict[str, str]:
    """``ENV`` of the Dockerfile (``ENV A=1 \\`` continuation lines included)."""
    path = tree.root / "Dockerfile"
    text = path.read_text() if path.exists() else ""
    env: dict[str, str] = {}
    for block in re.findall(r"^ENV\s+((?:.*\\\n)*.*)$", text, flags=re.MULTILINE):
        for name, value in re.findall(r"([A-Za-z_][A-Za-z0-9_]*)=(\"[^\"]*\"|\S+)", block):
            env[name] = value.strip('"')
    return env


def _containers(tree: Tree) -> list[tuple[str, dict[str, Any]]]:
    return [(pod.owner, c) for pod in tree.pods for c in pod.containers()]


def check(tree: Tree) -> list[Finding]:
    out = _grafana(tree)
    baked = _dockerfile_env(tree)
    for name, wanted in PROJECT_ENV.items():
        if baked.get(name) != wanted:
            out.append(Finding(CHECK, "Dockerfile", f"ENV {name} is {baked.get(name)!r}, not {wanted!r}"))
    for owner, c in _containers(tree):
        image = str(c.get("image", ""))
        env = {str(e.get("name")): e for e in c.get("env") or []}
        for name, wanted in IMAGE_ENV.get(image.rsplit(":", 1)[0], {}).items():
            if str((env.get(name) or {}).get("value")) != wanted:
                out.append(Finding(CHECK, owner, f"container {c.get('name')} does not set {name}={wanted}"))
        if image.startswith(PROJECT_REGISTRY):
            for name, wanted in PROJECT_ENV.items():
                if name in env and str(env[name].get("value")) != wanted:
                    problem = f"container {c.get('name')} sets {name}={env[name].get('value')!r}"
                    out.append(Finding(CHECK, owner, f"{problem}: back on what the image turns off"))
    return out
