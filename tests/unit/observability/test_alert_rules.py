"""The rule files are valid, every alert is unit-tested both ways, and the cluster copy matches."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from serving.observability.rules import load_rule_file, prometheus_rule, rule_files

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[3]
MONITORING = REPO / "k8s" / "monitoring"
RULES = MONITORING / "rules"
RULE_TESTS = MONITORING / "rule-tests"


def _promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool is not installed: `apt-get install -y prometheus` (.ci/run does it)")
    return path


def _alerts() -> set[str]:
    return {rule.name for path in rule_files(RULES) for rule in load_rule_file(path).alerts}


def _test_cases() -> list[dict]:
    cases = []
    for path in sorted(RULE_TESTS.glob("*.test.yaml")):
        for test in yaml.safe_load(path.read_text())["tests"]:
            cases.extend(test.get("alert_rule_test", []))
    return cases


def test_promtool_check_rules_accepts_every_rule_file() -> None:
    result = subprocess.run(
        [_promtool(), "check", "rules", *map(str, rule_files(RULES))],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_unit_tests_of_all_alerts_pass() -> None:
    files = sorted(RULE_TESTS.glob("*.test.yaml"))
    assert files, f"no promtool tests in {RULE_TESTS}"
    result = subprocess.run(
        [_promtool(), "test", "rules", *map(str, files)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=RULE_TESTS,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_has_a_firing_case_and_a_silent_case() -> None:
    cases = _test_cases()
    fires = {c["alertname"] for c in cases if c.get("exp_alerts")}
    silent = {c["alertname"] for c in cases if not c.get("exp_alerts")}
    alerts = _alerts()
    assert alerts, "no alerts found"
    assert alerts - fires == set(), f"alerts never shown to fire: {sorted(alerts - fires)}"
    assert alerts - silent == set(), f"alerts never shown to stay silent: {sorted(alerts - silent)}"
    assert (fires | silent) - alerts == set(), (
        f"tests name unknown alerts: {sorted((fires | silent) - alerts)}"
    )


def test_every_alert_has_severity_summary_and_runbook_in_the_catalogue() -> None:
    catalogue = (REPO / "docs" / "metrics.md").read_text()
    for path in rule_files(RULES):
        for rule in load_rule_file(path).alerts:
            assert rule.labels.get("severity") in {"critical", "warning"}, rule.name
            assert rule.annotations.get("summary"), rule.name
            anchor = rule.annotations["runbook_url"].split("#", 1)[1]
            assert anchor == rule.name.lower(), rule.name
            assert f"### {rule.name}\n" in catalogue, f"{rule.name} has no runbook section in docs/metrics.md"


def _cluster_jobs() -> set[str]:
    """The jobs of the ServiceMonitors' targets: the operator names each after its Service."""
    suffixes = [
        yaml.safe_load(kustomization.read_text()).get("nameSuffix", "")
        for kustomization in sorted((REPO / "k8s" / "overlays").glob("*/kustomization.yaml"))
    ]
    assert suffixes, "no overlays"
    return {f"{name}{suffix}" for name in ("cxr-gateway", "triton") for suffix in suffixes} | {
        "mlflow-exporter"  # k8s/shared: no suffix
    }


def test_scrape_target_down_pages_for_every_cxr_job_and_no_other() -> None:
    alerts = [rule for path in rule_files(RULES) for rule in load_rule_file(path).alerts]
    rule = next(rule for rule in alerts if rule.name == "CxrScrapeTargetDown")
    matcher = re.search(r'up\{job=~"([^"]+)"\} == 0', rule.expr)
    assert matcher, f"CxrScrapeTargetDown must select CXR's jobs: {rule.expr}"
    compose = yaml.safe_load((REPO / "docker" / "prometheus.yml").read_text())
    local = {config["job_name"] for config in compose["scrape_configs"]}
    assert local == {"gateway", "triton", "mlflow-exporter"}  # the one-machine stack's names too
    for job in local | _cluster_jobs():
        assert re.fullmatch(matcher[1], job), f"a down {job} target would not page"
    # what a kube-prometheus-stack scrapes beside us (kubeadm's scheduler and etcd are down by default)
    for job in ("kube-scheduler", "kube-etcd", "kube-controller-manager", "kube-proxy", "node-exporter"):
        assert not re.fullmatch(matcher[1], job), job
    from serving.observability.dashboards import CXR_SCRAPE_JOBS

    assert matcher[1] == CXR_SCRAPE_JOBS, "the 'Scrape targets up' panel shows other jobs than the alert"


def test_prometheus_rule_objects_carry_exactly_the_rule_file_groups() -> None:
    for path in rule_files(RULES):
        source = yaml.safe_load(path.read_text())
        obj = prometheus_rule(path)
        assert obj["kind"] == "PrometheusRule"
        assert obj["metadata"]["labels"]["release"] == "kube-prometheus-stack"
        assert obj["spec"]["groups"] == source["groups"]
        committed = yaml.safe_load((MONITORING / "prometheusrules" / path.name).read_text())
        assert committed == obj


def test_a_rule_file_that_is_not_in_rule_group_format_is_refused_with_its_name(tmp_path: Path) -> None:
    from serving.observability.errors import RuleFileError

    bad = tmp_path / "broken.yaml"
    bad.write_text("groups:\n  - name: g\n    rules:\n      - expr: up\n")
    with pytest.raises(RuleFileError, match=r"broken\.yaml"):
        load_rule_file(bad)
