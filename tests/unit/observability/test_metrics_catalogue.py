"""The metrics catalogue, the gateway's registry, the rules and the dashboards agree on names."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from serving.observability.dashboards import DASHBOARDS, dashboard_json
from serving.observability.panel_check import extract_queries
from serving.observability.rules import load_rule_file, rule_files

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[3]
CATALOGUE = (REPO / "docs" / "metrics.md").read_text()
METRIC = re.compile(r"\b((?:cxr|nv|argo_workflows)_[a-z0-9_]+|[a-z_]+:[a-z0-9_]+:[a-z0-9_]+)\b")
SUFFIXES = ("_bucket", "_count", "_sum")


def _base(name: str) -> str:
    for suffix in SUFFIXES:
        if name.endswith(suffix) and not name.startswith(("nv_inference_", "argo_")):
            return name[: -len(suffix)]
    return name


def _names_in(expr: str) -> set[str]:
    return {_base(m) for m in METRIC.findall(expr)}


def _recorded() -> set[str]:
    return {
        r.name for path in rule_files(REPO / "k8s/monitoring/rules") for r in load_rule_file(path).records
    }


def _all_rules(path: Path) -> list:
    return [rule for group in load_rule_file(path).groups for rule in group.rules]


def test_every_metric_in_rules_and_dashboards_is_in_the_catalogue() -> None:
    exprs = [q.expr for spec in DASHBOARDS for q in extract_queries(dashboard_json(spec))]
    exprs += [r.expr for path in rule_files(REPO / "k8s/monitoring/rules") for r in _all_rules(path)]
    used = set().union(*(_names_in(e) for e in exprs))
    missing = sorted(name for name in used if f"`{name}`" not in CATALOGUE and name not in _recorded())
    assert not missing, f"used but not documented in docs/metrics.md: {missing}"
    undocumented_records = sorted(r for r in _recorded() if r.split(":")[1] not in CATALOGUE)
    assert not undocumented_records, undocumented_records


def test_the_gateway_registers_exactly_the_catalogued_gateway_metrics() -> None:
    from serving.metrics import GatewayMetrics

    registered = {family.name for family in GatewayMetrics().registry.collect()}
    # prometheus-client drops the _total suffix from counter family names
    section = CATALOGUE.split("## Gateway", 1)[1].split("\n## ", 1)[0]
    documented = {re.sub(r"_total$", "", n) for n in re.findall(r"^\| `(cxr_[a-z_]+)`", section, re.M)}
    assert registered == documented, {
        "not documented": registered - documented,
        "not exported": documented - registered,
    }
