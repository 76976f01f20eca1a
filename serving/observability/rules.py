"""Prometheus rule files: loading them as typed objects and wrapping them as PrometheusRule.

The one-machine Prometheus reads ``k8s/monitoring/rules/*.yaml`` directly; the
Prometheus operator in the cluster wants the same groups inside a
``monitoring.coreos.com/v1`` PrometheusRule object. Generating the second from
the first keeps one source of truth, so an alert tested with promtool is the
alert that pages in the cluster.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from serving.observability.errors import RuleFileError

# kube-prometheus-stack's default ruleSelector matches the Helm release label.
PROMETHEUS_RULE_LABELS = {
    "app.kubernetes.io/part-of": "cxr-detect",
    "app.kubernetes.io/component": "monitoring",
    "release": "kube-prometheus-stack",
}


class Rule(BaseModel):
    """One recording or alerting rule, as Prometheus' rule-file format spells it."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    record: str | None = None
    alert: str | None = None
    expr: str
    for_: str | None = Field(default=None, alias="for")
    keep_firing_for: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _one_kind(self) -> Rule:
        if (self.record is None) == (self.alert is None):
            raise ValueError("a rule has exactly one of `record` or `alert`")
        return self

    @property
    def name(self) -> str:
        return self.alert or self.record or ""


class RuleGroup(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    interval: str | None = None
    rules: list[Rule]


class RuleFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    groups: list[RuleGroup]

    @property
    def alerts(self) -> list[Rule]:
        return [rule for group in self.groups for rule in group.rules if rule.alert]

    @property
    def records(self) -> list[Rule]:
        return [rule for group in self.groups for rule in group.rules if rule.record]


def load_rule_file(path: Path) -> RuleFile:
    """Parse and validate one rule file; a bad file names itself and the problem."""
    if not path.is_file():
        raise RuleFileError(f"rule file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
        return RuleFile.model_validate(data)
    except yaml.YAMLError as exc:
        raise RuleFileError(f"{path} is not valid YAML: {exc}") from exc
    except ValidationError as exc:
        raise RuleFileError(f"{path} is not a Prometheus rule file: {exc}") from exc


def rule_files(rules_dir: Path) -> list[Path]:
    """The rule files Prometheus loads (the same glob the stack's config uses)."""
    files = sorted(rules_dir.glob("*.yaml"))
    if not files:
        raise RuleFileError(f"no rule files (*.yaml) in {rules_dir}")
    return files


def prometheus_rule(path: Path, namespace: str | None = None) -> dict[str, Any]:
    """The PrometheusRule object for one rule file, named after the file."""
    rule_file = load_rule_file(path)
    metadata: dict[str, Any] = {"name": path.stem, "labels": dict(PROMETHEUS_RULE_LABELS)}
    if namespace:
        metadata["namespace"] = namespace
    groups = [
        {
            "name": group.name,
            **({"interval": group.interval} if group.interval else {}),
            "rules": [
                rule.model_dump(by_alias=True, exclude_none=True, exclude_defaults=True)
                for rule in group.rules
            ],
        }
        for group in rule_file.groups
    ]
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": metadata,
        "spec": {"groups": groups},
    }
