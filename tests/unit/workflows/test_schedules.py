"""The one-machine scheduler reads its schedules from the rendered CronWorkflows, not from settings:
cron, timezone (daylight saving included), concurrency policy, deadline, feedback threshold and the
arguments the retrain is submitted with all come from the YAML ArgoCD syncs."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml

from workflows.config import WorkflowSettings
from workflows.render import ARGO_DIR, write_all
from workflows.scheduler import configured_schedules, pipeline_run_command
from workflows.schedules import Schedule, ScheduleError, load_schedules, parse_cron_workflow

pytestmark = pytest.mark.unit


def _by_name(folder: Path) -> dict[str, Schedule]:
    return {s.name: s for s in load_schedules(folder)}


def test_committed_cron_workflows_read_back_with_cron_timezone_policy_and_trigger() -> None:
    weekly, feedback = load_schedules(ARGO_DIR)[::-1]  # sorted by name: on-feedback, weekly
    assert weekly.name == "cxr-retrain-weekly"
    assert (weekly.crons, weekly.timezone, weekly.concurrency_policy) == (
        ("0 3 * * 1",),
        "Europe/Berlin",
        "Forbid",
    )
    assert (weekly.feedback_threshold, weekly.run_args, weekly.starting_deadline_s) == (None, (), 3600.0)
    assert feedback.name == "cxr-retrain-on-feedback"
    assert (feedback.crons, feedback.concurrency_policy) == (("17 * * * *",), "Forbid")
    # threshold followed from the check step's --threshold through its task to the workflow's argument
    assert feedback.feedback_threshold == 50
    # the Workflow the CronWorkflow creates passes include-feedback=true: `cxr pipeline run --feedback`
    assert feedback.run_args == ("--feedback",)
    command = pipeline_run_command(feedback, "r1")
    assert command[1:] == ["-m", "cxr.cli", "pipeline", "run", "--run-name", "r1", "--feedback"]


def test_weekly_fire_time_is_monday_0300_berlin_on_both_sides_of_daylight_saving() -> None:
    weekly = _by_name(ARGO_DIR)["cxr-retrain-weekly"]
    summer = weekly.next_fire(datetime(2026, 3, 25, 12, tzinfo=UTC))  # DST starts Sunday 29 March
    winter = weekly.next_fire(datetime(2026, 10, 21, 12, tzinfo=UTC))  # DST ends Sunday 25 October
    assert summer.astimezone(UTC) == datetime(2026, 3, 30, 1, tzinfo=UTC)
    assert winter.astimezone(UTC) == datetime(2026, 10, 26, 2, tzinfo=UTC)
    assert (summer.hour, winter.hour, summer.weekday()) == (3, 3, 0)
    # strictly after: at the fire time itself, the next one is a week later
    assert weekly.next_fire(summer) == datetime(2026, 4, 6, 1, tzinfo=UTC)


def test_schedules_follow_what_render_writes_not_the_current_settings(
    settings: WorkflowSettings, tmp_path: Path
) -> None:
    rendered = settings.model_copy(
        update={"feedback_threshold": 7, "feedback_check_schedule": "*/5 * * * *", "schedule_timezone": "UTC"}
    )
    write_all(rendered, tmp_path)
    feedback = _by_name(tmp_path)["cxr-retrain-on-feedback"]
    assert (feedback.feedback_threshold, feedback.crons, feedback.timezone) == (7, ("*/5 * * * *",), "UTC")
    assert feedback.next_fire(datetime(2026, 1, 1, 10, 3, tzinfo=UTC)) == datetime(
        2026, 1, 1, 10, 5, tzinfo=UTC
    )


def test_cron_override_applies_by_name_then_star_and_refuses_unknown_names(
    settings: WorkflowSettings,
) -> None:
    overridden = settings.model_copy(
        update={"scheduler_cron": {"*": "* * * * * */2", "cxr-retrain-on-feedback": "0 0 1 1 *"}}
    )
    crons = {s.name: s.crons for s in configured_schedules(overridden)}
    assert crons == {"cxr-retrain-on-feedback": ("0 0 1 1 *",), "cxr-retrain-weekly": ("* * * * * */2",)}
    with pytest.raises(ScheduleError, match="cxr-retrain-daily"):
        configured_schedules(
            settings.model_copy(update={"scheduler_cron": {"cxr-retrain-daily": "0 1 * * *"}})
        )
    with pytest.raises(ScheduleError, match="invalid cron"):
        configured_schedules(settings.model_copy(update={"scheduler_cron": {"*": "every monday"}}))


def _weekly_doc() -> dict[str, object]:
    return yaml.safe_load((ARGO_DIR / "cxr-retrain-weekly.yaml").read_text())


def test_a_cron_workflow_the_scheduler_cannot_keep_is_refused_not_skipped(tmp_path: Path) -> None:
    other = _weekly_doc()
    other["spec"]["workflowSpec"]["workflowTemplateRef"]["name"] = "cxr-cleanup"  # type: ignore[index]
    with pytest.raises(ScheduleError, match="only knows those two shapes"):
        parse_cron_workflow(other, tmp_path / "x.yaml")

    unknown_param = _weekly_doc()
    unknown_param["spec"]["workflowSpec"]["arguments"] = {  # type: ignore[index]
        "parameters": [{"name": "gpu-type", "value": "h100"}]
    }
    with pytest.raises(ScheduleError, match="gpu-type"):
        parse_cron_workflow(unknown_param, tmp_path / "x.yaml")

    passed = _weekly_doc()
    passed["spec"]["workflowSpec"]["arguments"] = {  # type: ignore[index]
        "parameters": [{"name": "include-feedback", "value": "false"}, {"name": "epochs", "value": "3"}]
    }
    assert parse_cron_workflow(passed, tmp_path / "x.yaml").run_args == ("--epochs", "3", "--no-feedback")

    with pytest.raises(ScheduleError, match="no CronWorkflow"):
        load_schedules(tmp_path)
