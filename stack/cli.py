"""``cxr stack``: bring the one-machine stack up and down, show its state and logs."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from core.progress import reporting
from stack import manager
from stack.config import StackSettings

stack_app = typer.Typer(
    help="The one-machine stack (S3, MLflow, 3 Tritons, gateway, DIMSE SCP, Orthanc, Prometheus).",
    no_args_is_help=True,
)
console = Console()


def _print_status(rows: list[manager.ComponentStatus], settings: StackSettings) -> None:
    table = Table(title=f"CXR Detect stack ({settings.state})")
    for col in ("component", "state", "pid", "healthy", "url"):
        table.add_column(col)
    for row in rows:
        mark = "[green]yes[/]" if row.healthy else "[red]no[/]"
        table.add_row(row.name, row.state, str(row.pid or ""), mark, row.url)
    console.print(table)


def audit_summary(settings: StackSettings) -> str:
    """One line on the gateway's audit log: where it is, how big, how many lines, rotated files kept."""
    from serving.config import ServingSettings

    path = ServingSettings(stack_dir=settings.state).resolved_audit_log
    if not path.exists():
        return f"audit log {path}: not written yet"
    lines = 0
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            lines += chunk.count(b"\n")
    rotated = len(list(path.parent.glob(f"{path.name}.*")))
    return f"audit log {path}: {path.stat().st_size / 1e6:.1f} MB, {lines} lines" + (
        f" (+{rotated} rotated)" if rotated else ""
    )


def retention_summary(settings: StackSettings) -> str:
    """One line on the gateway's retention job: when it last ran and what it deleted."""
    import json

    from serving.config import ServingSettings
    from serving.gateway.app import RETENTION_STATUS

    path = ServingSettings(stack_dir=settings.state).resolved_results_dir.parent / RETENTION_STATUS
    if not path.exists():
        return "retention job: has not run yet"
    run = json.loads(path.read_text())
    dead = run.get("dead_letters_deleted", 0)  # absent in a record of an older gateway
    return (
        f"retention job: last run {run['last_run']}, deleted {run['sources_deleted']} source images "
        f"(kept {run['source_retention_hours']:g} h) and {run['results_deleted']} results "
        f"(kept {run['results_retention_days']} d)"
        + (f" and {dead} PACS dead letters" if dead else "")
        + f", every {run['interval_s']:g} s"
    )


def scheduler_summary(settings: StackSettings, *, running: bool) -> Table | str:
    """The retrain schedules: each one's next run and how its last run ended (workflows/scheduler.py)."""
    from workflows.scheduler import read_status, status_path, status_table

    if not running:
        return "retrain scheduler: not running (CXR_SCHEDULER=false at `make up`); retrains only by hand"
    path = status_path(settings.state)
    status = read_status(path)
    if status is None:
        return f"retrain scheduler: no status yet ({path}); see `cxr stack logs scheduler`"
    return status_table(status)


@stack_app.command()
def up(
    bootstrap: Annotated[bool, typer.Option(help="train and promote a first model when none exists")] = True,
) -> None:
    """Start every component (idempotent) and wait until each is healthy."""
    settings = StackSettings()
    with reporting(console):  # each component as it turns healthy: live on a terminal, event lines in logs
        try:
            rows = manager.up(settings)
        except manager.StackError as exc:
            console.print(f"[red]stack up failed:[/] {escape(str(exc))}")
            raise typer.Exit(1) from exc
        if bootstrap and settings.bootstrap:
            from stack.bootstrap import BootstrapFailed, ensure_served_model

            try:
                ensure_served_model(settings)
            except (manager.StackError, BootstrapFailed) as exc:
                console.print(f"[red]bootstrap failed:[/] {escape(str(exc))}")
                raise typer.Exit(1) from exc
            rows = manager.status(settings)
    _print_status(rows, settings)
    if not any(r.name == "prometheus" for r in rows):
        console.print(
            "[yellow]prometheus is not on PATH: metrics scraping skipped (apt-get install prometheus)[/]"
        )
    orthanc_skipped = manager.orthanc_skipped(settings)
    if orthanc_skipped is not None and settings.orthanc:
        console.print(
            f"[yellow]Orthanc, the PACS twin, is not started: {orthanc_skipped}. The DIMSE SCP runs; "
            "results have no local PACS to go back to (CXR_PACS_* unset).[/]"
        )
    creds = json.loads(settings.credentials_file.read_text())
    orthanc_line = (
        f"Orthanc  http://{settings.host}:{settings.orthanc_http_port}/  DICOM ORTHANC@{settings.host}:"
        f"{settings.orthanc_dicom_port}  (user {creds['orthanc']['username']}, password in credentials)\n"
        if orthanc_skipped is None
        else ""
    )
    console.print(
        f"gateway  http://{settings.host}:{settings.gateway_port}/  (review page; API docs at /docs)\n"
        f"DIMSE    {settings.dimse_ae_title}@{settings.host}:{settings.dimse_port}  (storage SCP)\n"
        f"{orthanc_line}"
        f"MLflow   http://{settings.host}:{settings.mlflow_port}/\n"
        f"S3       http://{settings.host}:{settings.s3_port}/\n"
        f"API keys and S3 keys: {settings.credentials_file} (mode 0600): paste the radiologist key "
        "from there into the review page (a key printed here would stay in logs and scrollback)"
    )


@stack_app.command()
def down() -> None:
    """Stop every component by PID and clean Triton's leftovers."""
    settings = StackSettings()
    killed = manager.down(settings)
    console.print("stack stopped" + (f" (had to kill {killed})" if killed else ""))


@stack_app.command()
def status() -> None:
    """Show each component's process state and health."""
    settings = StackSettings()
    try:
        rows = manager.status(settings)
    except manager.StackError as exc:
        console.print(f"[red]stack status failed:[/] {escape(str(exc))}")
        raise typer.Exit(1) from exc
    if not rows:
        console.print("stack is not running (`make up` starts it)")
        raise typer.Exit(3)
    _print_status(rows, settings)
    console.print(audit_summary(settings), highlight=False)
    console.print(retention_summary(settings), highlight=False)
    console.print(scheduler_summary(settings, running=any(r.name == "scheduler" for r in rows)))
    if not all(r.healthy for r in rows):
        raise typer.Exit(1)


@stack_app.command()
def logs(
    component: Annotated[
        str | None, typer.Argument(help="s3, mlflow, triton-production, gateway, ...")
    ] = None,
    lines: Annotated[int, typer.Option("--lines", "-n", min=1, help="last lines of each log")] = 40,
) -> None:
    """Print the last lines of a component's log (all logs when none is named)."""
    settings = StackSettings()
    folder = settings.state / "logs"
    if component is None and not any(folder.glob("*.log")):  # printed nothing and exited 0
        console.print(
            f"no logs in {escape(str(folder))}: the stack has not run here "
            "(start it with `make up`, or set CXR_STACK_DIR to its folder)"
        )
        raise typer.Exit(1)
    try:
        console.print(manager.logs(settings, component, lines), markup=False, highlight=False)
    except manager.StackError as exc:
        console.print(f"[red]{escape(str(exc))}[/]")
        raise typer.Exit(2) from exc
