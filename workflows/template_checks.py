"""Structural checks of rendered Argo objects that neither Hera nor a schema catch.

Argo accepts a WorkflowTemplate whose DAG names a missing template or reads
an output nobody declares, and fails only when that node runs (hours into a
retrain). These checks find such mistakes at render time: every object is
parsed back through Hera's generated models, then its references are
resolved by hand. The namespace enforces Pod Security "restricted", which
Argo learns of only when a pod is refused at creation: every pod a template
makes (steps, and the RayJob's head, workers and submitter) is checked for it
too. The default artifact repository ConfigMap is checked for a repository
under the key its annotation names.
"""

from __future__ import annotations

import re
from typing import Any

import yaml
from hera.workflows import models as m

from delivery.cluster_fit.pod_security import restricted_problems
from delivery.cluster_fit.tree import workflow_pod_templates

_MODELS: dict[str, Any] = {
    "WorkflowTemplate": m.WorkflowTemplate,
    "CronWorkflow": m.CronWorkflow,
    "Workflow": m.Workflow,
}
# Argo accepts spaces inside the braces ("{{ inputs.parameters.x }}"): a misspelt reference written
# so must be caught too
_INPUT_REF = re.compile(r"\{\{\s*inputs\.parameters\.([A-Za-z0-9_-]+)\s*\}\}")
_WF_PARAM_REF = re.compile(r"\{\{\s*workflow\.parameters\.([A-Za-z0-9_-]+)\s*\}\}")
_TASK_OUT_REF = re.compile(
    r"\{\{\s*tasks\.([A-Za-z0-9_-]+)\.outputs\.(parameters|artifacts)\.([A-Za-z0-9_-]+)\s*\}\}"
)
DEFAULT_REPOSITORY_ANNOTATION = "workflows.argoproj.io/default-artifact-repository"
_REPOSITORY_KINDS = {"s3", "gcs", "azure", "oss", "hdfs", "artifactory", "http", "git", "raw"}


def _names(items: list[dict[str, Any]] | None) -> set[str]:
    return {i["name"] for i in items or []}


def check_object(obj: dict[str, Any]) -> list[str]:
    """Problems of one rendered object (empty when it is sound)."""
    kind = obj.get("kind", "")
    if kind == "ConfigMap":
        return _check_artifact_repositories(obj)
    model = _MODELS.get(kind)
    if model is None:
        return [f"unexpected kind {kind!r}"]
    problems: list[str] = []
    try:
        model.model_validate(obj)
    except ValueError as exc:  # pydantic's ValidationError is a ValueError
        problems.append(f"does not parse as Argo {kind}: {exc}")
    name = obj.get("metadata", {}).get("name")
    if not name:
        problems.append("metadata.name is missing")
    spec = obj.get("spec", {})
    spec = spec.get("workflowSpec", {}) if kind == "CronWorkflow" else spec
    if kind == "CronWorkflow" and not (obj["spec"].get("schedules") or obj["spec"].get("schedule")):
        problems.append("CronWorkflow has no schedule")
    if "workflowTemplateRef" in spec:
        return problems  # everything else lives in the referenced template
    templates = {t["name"]: t for t in spec.get("templates", [])}
    if not templates:
        return [*problems, "spec.templates is empty"]
    for field in ("entrypoint", "onExit"):
        if field in spec and spec[field] not in templates:
            problems.append(f"{field} names a missing template {spec[field]!r}")
    if "entrypoint" not in spec:
        problems.append("spec.entrypoint is missing")
    wf_params = _names(spec.get("arguments", {}).get("parameters"))
    for tname, template in templates.items():
        problems += _check_template(tname, template, templates, wf_params)
    problems += _check_pod_security(obj)
    return problems


def _check_artifact_repositories(obj: dict[str, Any]) -> list[str]:
    """A ConfigMap is rendered only as the artifact repository: its default key must hold one."""
    annotations = obj.get("metadata", {}).get("annotations") or {}
    key = annotations.get(DEFAULT_REPOSITORY_ANNOTATION)
    if not key:
        return [f"ConfigMap lacks the {DEFAULT_REPOSITORY_ANNOTATION} annotation"]
    text = (obj.get("data") or {}).get(key)
    if text is None:
        return [f"ConfigMap has no data key {key!r} (named by its annotation)"]
    repo = yaml.safe_load(text)
    if not isinstance(repo, dict) or not set(repo) & _REPOSITORY_KINDS:
        return [f"data key {key!r} holds no artifact repository"]
    return []


def _check_pod_security(obj: dict[str, Any]) -> list[str]:
    """Pod Security "restricted" of each pod the templates make (but the executor's containers)."""
    try:
        pods = workflow_pod_templates(obj)
    except yaml.YAMLError as exc:
        return [f"a resource manifest does not parse once its parameters are filled in: {exc}"]
    problems = []
    for name, pod in pods.items():
        spec = pod.get("spec") or {}
        if not spec.get("containers") and " RayJob " not in name:
            continue  # a resource template's pod: only the executor, which the controller configures
        problems += [f"pod {name!r}: {problem}" for problem in restricted_problems(spec)]
    return problems


def _check_template(
    tname: str, template: dict[str, Any], templates: dict[str, dict[str, Any]], wf_params: set[str]
) -> list[str]:
    problems: list[str] = []
    declared_inputs = _names(template.get("inputs", {}).get("parameters"))
    body = {k: v for k, v in template.items() if k not in ("inputs", "outputs", "dag")}
    text = yaml.safe_dump(body)
    for ref in sorted(set(_INPUT_REF.findall(text)) - declared_inputs):
        problems.append(f"template {tname!r} reads input {ref!r} it does not declare")
    for ref in sorted(set(_WF_PARAM_REF.findall(yaml.safe_dump(template))) - wf_params):
        problems.append(f"template {tname!r} reads workflow parameter {ref!r} that is not declared")
    kinds = [k for k in ("container", "script", "resource", "dag", "steps", "suspend") if k in template]
    if len(kinds) != 1:
        problems.append(f"template {tname!r} must have exactly one body, has {kinds or 'none'}")
    if "container" in template and not template["container"].get("image"):
        problems.append(f"template {tname!r} has no image")
    if "dag" in template:
        problems += _check_dag(tname, template["dag"].get("tasks", []), templates)
    return problems


def _check_dag(tname: str, tasks: list[dict[str, Any]], templates: dict[str, dict[str, Any]]) -> list[str]:
    problems: list[str] = []
    by_name = {t["name"]: t for t in tasks}
    deps = {t["name"]: set(re.findall(r"[A-Za-z0-9_-]+", t.get("depends", ""))) for t in tasks}

    def ancestors(name: str, seen: frozenset[str] = frozenset()) -> set[str]:
        direct = deps.get(name, set()) - seen
        found = set(direct)
        for parent in direct:
            found |= ancestors(parent, seen | {name})
        return found

    for task in tasks:
        target = templates.get(task.get("template", ""))
        if target is None:
            problems.append(f"dag {tname!r}: task {task['name']!r} names a missing template")
            continue
        for dep in sorted(deps[task["name"]]):
            if dep not in by_name:
                problems.append(f"dag {tname!r}: task {task['name']!r} depends on unknown task {dep!r}")
        args = task.get("arguments", {})
        wanted = _names(target.get("inputs", {}).get("parameters"))
        given = _names(args.get("parameters"))
        defaults = {
            p["name"]
            for p in target.get("inputs", {}).get("parameters", [])
            if "value" in p or "default" in p
        }
        for missing in sorted(wanted - given - defaults):
            problems.append(f"dag {tname!r}: task {task['name']!r} does not pass input {missing!r}")
        wanted_art = _names(target.get("inputs", {}).get("artifacts"))
        for missing in sorted(wanted_art - _names(args.get("artifacts"))):
            problems.append(f"dag {tname!r}: task {task['name']!r} does not pass artifact {missing!r}")
        text = yaml.safe_dump({"arguments": args, "when": task.get("when", "")})
        for src, kind, out in _TASK_OUT_REF.findall(text):
            src_task = by_name.get(src)
            src_template = templates.get(src_task["template"], {}) if src_task else {}
            if out not in _names(src_template.get("outputs", {}).get(kind)):
                problems.append(
                    f"dag {tname!r}: task {task['name']!r} reads {src}.{kind}.{out}, never produced"
                )
            elif src not in ancestors(task["name"]):
                problems.append(f"dag {tname!r}: task {task['name']!r} reads {src}'s output before {src} ran")
    return problems
