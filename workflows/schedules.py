"""The CronWorkflows of ``k8s/workflows/``, read back as schedules one machine can keep.

The stack's scheduler (:mod:`workflows.scheduler`) reads the committed, rendered
YAML rather than :class:`~workflows.config.WorkflowSettings`, so there is one source
of truth: whatever ArgoCD would sync (cron, timezone, ``concurrencyPolicy``,
``startingDeadlineSeconds``, the feedback threshold, the arguments the retrain is
submitted with) is what runs on one machine, and a schedule changed in
``workflows/retrain.py`` but not rendered changes neither.

Two shapes are understood, the two :mod:`workflows.retrain` renders:

- a CronWorkflow that submits the retrain template directly
  (``workflowSpec.workflowTemplateRef``): every fire time starts a run;
- a CronWorkflow whose DAG runs ``cxr pipeline step check-feedback`` and then
  creates a retrain Workflow: every fire time counts waiting feedback with that
  step's own function and starts a run only when the step would say ``should-retrain``.

Anything else is refused with a message (never silently skipped), so a new
CronWorkflow shape cannot go unscheduled on one machine without anyone noticing.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime, tzinfo
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from croniter import croniter

from workflows.errors import PipelineError
from workflows.retrain import TEMPLATE_NAME
from workflows.steps import parse_bool

FEEDBACK_STEP = ["cxr", "pipeline", "step", "check-feedback"]
THRESHOLD_FLAG = "--threshold"

# The retrain template's parameters and the `cxr pipeline run` options that mean the same locally.
RUN_OPTIONS: dict[str, Callable[[str], list[str]]] = {
    "include-feedback": lambda v: ["--feedback" if parse_bool(v) else "--no-feedback"],
    "base-model": lambda v: ["--base-model", v],
    "epochs": lambda v: ["--epochs", v],
    "workers": lambda v: ["--workers", v],
    "dataset-source": lambda v: ["--source", v],
    "training-config": lambda v: ["--config", v],
}

_PARAM_REF = re.compile(r"^\{\{\s*(inputs|workflow)\.parameters\.([\w-]+)\s*\}\}$")


class ScheduleError(PipelineError):
    """A rendered CronWorkflow this machine cannot keep; the message names the file and the part."""


@dataclass(frozen=True)
class Schedule:
    """One CronWorkflow as the local scheduler keeps it."""

    name: str
    crons: tuple[str, ...]
    timezone: str  # IANA name; "" = this machine's local time (Argo: the controller's)
    concurrency_policy: str
    starting_deadline_s: float | None
    run_args: tuple[str, ...]  # `cxr pipeline run` options for the arguments the retrain is submitted with
    feedback_threshold: int | None  # None: every fire runs; else only at >= this many waiting items
    source: Path

    @property
    def trigger(self) -> str:
        """What a fire time does, in words (for ``make status`` and the logs)."""
        if self.feedback_threshold is None:
            return "run"
        return f"run if >= {self.feedback_threshold} new feedback"

    def zone(self) -> tzinfo:
        """The CronWorkflow's timezone, or this machine's when it names none."""
        if not self.timezone:
            local = datetime.now().astimezone().tzinfo
            assert local is not None  # astimezone() always attaches one
            return local
        return ZoneInfo(self.timezone)

    def next_fire(self, after: datetime) -> datetime:
        """The first fire time strictly after ``after`` (aware), over every cron of the schedule.

        The crons are read in the schedule's timezone, so ``0 3 * * 1`` is 03:00 Berlin time on
        both sides of a daylight-saving change, as Argo reads it.
        """
        local = after.astimezone(self.zone())
        return min(croniter(cron, local).get_next(datetime) for cron in self.crons)

    def with_crons(self, crons: tuple[str, ...]) -> Schedule:
        """The same schedule fired by other crons (``CXR_SCHEDULER_CRON``: tests, a demo)."""
        _check_crons(self.name, crons, self.source)
        return replace(self, crons=crons)


def load_schedules(folder: Path) -> list[Schedule]:
    """Every CronWorkflow in ``folder``'s YAML files, sorted by name; :class:`ScheduleError` if one
    cannot be kept here or the folder holds none."""
    schedules = []
    for path in sorted(folder.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if isinstance(doc, dict) and doc.get("kind") == "CronWorkflow":
                schedules.append(parse_cron_workflow(doc, path))
    if not schedules:
        raise ScheduleError(f"no CronWorkflow in {folder}; `cxr pipeline render` writes them")
    return sorted(schedules, key=lambda s: s.name)


def parse_cron_workflow(doc: dict[str, Any], source: Path) -> Schedule:
    """One rendered CronWorkflow as a :class:`Schedule`."""
    name = str(doc.get("metadata", {}).get("name", ""))
    spec = doc.get("spec") or {}
    crons = tuple(
        str(c) for c in spec.get("schedules") or ([spec["schedule"]] if spec.get("schedule") else [])
    )
    _check_crons(name, crons, source)
    timezone = str(spec.get("timezone") or "")
    if timezone:
        try:
            ZoneInfo(timezone)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ScheduleError(f"{source}: {name} names an unknown timezone {timezone!r}") from exc
    deadline = spec.get("startingDeadlineSeconds")
    workflow_spec = spec.get("workflowSpec") or {}
    check = _feedback_check_template(workflow_spec)
    if check is None:
        arguments = _direct_submission(name, workflow_spec, source)
        threshold = None
    else:
        arguments = _created_submission(name, workflow_spec, source)
        threshold = _threshold(name, check, workflow_spec, source)
    return Schedule(
        name=name,
        crons=crons,
        timezone=timezone,
        concurrency_policy=str(spec.get("concurrencyPolicy") or "Allow"),
        starting_deadline_s=float(deadline) if deadline is not None else None,
        run_args=_run_args(name, arguments, source),
        feedback_threshold=threshold,
        source=source,
    )


def _check_crons(name: str, crons: tuple[str, ...], source: Path) -> None:
    if not crons:
        raise ScheduleError(f"{source}: {name} has no schedule")
    bad = [c for c in crons if not croniter.is_valid(c)]
    if bad:
        raise ScheduleError(f"{source}: {name} has an invalid cron {bad[0]!r}")


def _templates(workflow_spec: dict[str, Any]) -> list[dict[str, Any]]:
    return list(workflow_spec.get("templates") or [])


def _feedback_check_template(workflow_spec: dict[str, Any]) -> dict[str, Any] | None:
    """The template that runs ``cxr pipeline step check-feedback``, if the CronWorkflow has one."""
    for template in _templates(workflow_spec):
        if (template.get("container") or {}).get("command") == FEEDBACK_STEP:
            return template
    return None


def _parameters(holder: dict[str, Any]) -> dict[str, str]:
    """``arguments.parameters`` as name -> value."""
    params = (holder.get("arguments") or {}).get("parameters") or []
    return {str(p["name"]): str(p["value"]) for p in params if "value" in p}


def _direct_submission(name: str, workflow_spec: dict[str, Any], source: Path) -> dict[str, str]:
    """Arguments of a CronWorkflow that runs the retrain template itself."""
    ref = (workflow_spec.get("workflowTemplateRef") or {}).get("name")
    if ref != TEMPLATE_NAME:
        raise ScheduleError(
            f"{source}: {name} neither runs WorkflowTemplate {TEMPLATE_NAME!r} nor checks feedback first; "
            "the one-machine scheduler only knows those two shapes (workflows/schedules.py)"
        )
    return _parameters(workflow_spec)


def _created_submission(name: str, workflow_spec: dict[str, Any], source: Path) -> dict[str, str]:
    """Arguments of the retrain Workflow a resource template creates after the feedback check."""
    for template in _templates(workflow_spec):
        resource = template.get("resource") or {}
        if resource.get("action") != "create":
            continue
        manifest = yaml.safe_load(resource.get("manifest") or "") or {}
        spec = manifest.get("spec") or {}
        if manifest.get("kind") == "Workflow" and (spec.get("workflowTemplateRef") or {}).get("name") == (
            TEMPLATE_NAME
        ):
            return _parameters(spec)
    raise ScheduleError(f"{source}: {name} checks feedback but creates no {TEMPLATE_NAME!r} Workflow")


def _threshold(name: str, check: dict[str, Any], workflow_spec: dict[str, Any], source: Path) -> int:
    """The ``--threshold`` the check step is given, followed through its task and the workflow arguments."""
    args = [str(a) for a in (check.get("container") or {}).get("args") or []]
    if THRESHOLD_FLAG not in args[:-1]:
        raise ScheduleError(f"{source}: {name}'s check-feedback step has no {THRESHOLD_FLAG}")
    value = args[args.index(THRESHOLD_FLAG) + 1]
    for _ in range(3):  # literal <- {{inputs.parameters.x}} <- {{workflow.parameters.y}}
        match = _PARAM_REF.match(value)
        if match is None:
            break
        scope, param = match.groups()
        found = (
            _task_argument(workflow_spec, str(check.get("name")), param)
            if scope == "inputs"
            else _parameters(workflow_spec).get(param)
        )
        if found is None:
            raise ScheduleError(f"{source}: {name}: cannot resolve {value} for the feedback threshold")
        value = found
    try:
        return int(value)
    except ValueError as exc:
        raise ScheduleError(f"{source}: {name}: feedback threshold {value!r} is not a number") from exc


def _task_argument(workflow_spec: dict[str, Any], template: str, param: str) -> str | None:
    """The value a DAG task calling ``template`` passes for ``param``."""
    for holder in _templates(workflow_spec):
        for task in (holder.get("dag") or {}).get("tasks") or []:
            if task.get("template") == template:
                value = _parameters(task).get(param)
                if value is not None:
                    return value
    return None


def _run_args(name: str, arguments: dict[str, str], source: Path) -> tuple[str, ...]:
    """``cxr pipeline run`` options for the arguments the retrain is submitted with.

    Parameters left at the template's defaults are not passed: locally ``cxr pipeline run``'s own
    defaults (``CXR_TRAINING_CONFIG``, source ``latest``) stand for the cluster's.
    """
    unknown = sorted(set(arguments) - set(RUN_OPTIONS))
    if unknown:
        raise ScheduleError(
            f"{source}: {name} submits the retrain with {', '.join(unknown)}, which `cxr pipeline run` "
            "has no option for (workflows/schedules.py RUN_OPTIONS)"
        )
    return tuple(arg for param, value in sorted(arguments.items()) for arg in RUN_OPTIONS[param](value))
