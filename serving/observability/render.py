"""Render everything under ``k8s/monitoring/`` that is generated, or check it is up to date.

Sources: ``k8s/monitoring/rules/*.yaml`` (hand-written, promtool-tested) and
:mod:`serving.observability.dashboards`. Outputs: ``prometheusrules/``,
``dashboards/*.json``, ``servicemonitors.yaml`` and ``kustomization.yaml``.
The outputs are committed (ArgoCD syncs git, not a build step), so a check mode
tells CI when someone edited a source and forgot to render.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from serving.observability.dashboards import DASHBOARDS, dashboard_json
from serving.observability.errors import RenderedFilesOutdated
from serving.observability.manifests import dump_yaml, kustomization, service_monitors
from serving.observability.rules import prometheus_rule, rule_files

log = logging.getLogger(__name__)

GENERATED = (
    "# GENERATED from {source}\n"
    "# by `python -m serving.observability render`: edit the source, not this file.\n"
)


@dataclass(frozen=True)
class RenderedFile:
    path: Path
    content: str


def monitoring_dir(repo_root: Path) -> Path:
    return repo_root / "k8s" / "monitoring"


def render_all(repo_root: Path) -> list[RenderedFile]:
    """Every generated file with its content, without writing anything."""
    root = monitoring_dir(repo_root)
    files: list[RenderedFile] = []
    sources = rule_files(root / "rules")
    for source in sources:
        header = GENERATED.format(source=f"k8s/monitoring/rules/{source.name}")
        files.append(
            RenderedFile(root / "prometheusrules" / source.name, dump_yaml([prometheus_rule(source)], header))
        )
    for spec in DASHBOARDS:
        text = json.dumps(dashboard_json(spec), indent=2, sort_keys=True) + "\n"
        files.append(RenderedFile(root / "dashboards" / f"{spec.uid}.json", text))
    dashboards_src = "serving/observability/dashboards.py"
    files.append(
        RenderedFile(
            root / "servicemonitors.yaml",
            dump_yaml(service_monitors(), GENERATED.format(source="serving/observability/manifests.py")),
        )
    )
    files.append(
        RenderedFile(
            root / "kustomization.yaml",
            dump_yaml(
                [kustomization([s.stem for s in sources])],
                GENERATED.format(source=f"serving/observability/manifests.py, {dashboards_src}"),
            ),
        )
    )
    return files


def write_all(repo_root: Path) -> list[Path]:
    written = []
    for item in render_all(repo_root):
        item.path.parent.mkdir(parents=True, exist_ok=True)
        if not item.path.exists() or item.path.read_text() != item.content:
            item.path.write_text(item.content)
            written.append(item.path)
            log.info("rendered path=%s bytes=%d", item.path, len(item.content))
    return written


def check_all(repo_root: Path) -> None:
    """Raise :class:`RenderedFilesOutdated` naming every generated file that differs from its source."""
    stale = [
        str(item.path.relative_to(repo_root))
        for item in render_all(repo_root)
        if not item.path.exists() or item.path.read_text() != item.content
    ]
    if stale:
        raise RenderedFilesOutdated(
            "generated monitoring files are out of date: "
            + ", ".join(stale)
            + ". Run `python -m serving.observability render` and commit the result."
        )
