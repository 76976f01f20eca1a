"""``cxr cluster check``: the cluster-fit check on this checkout, one line per misfit."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from delivery.cluster_fit.inputs import RenderError
from delivery.cluster_fit.run import CHECKS, check_tree, report_lines

app = typer.Typer(help="Check the cluster path's parts against each other", no_args_is_help=True)
console = Console()


@app.command("check")
def check_cmd(
    root: Annotated[Path, typer.Option(help="repository checkout to check")] = Path("."),
    only: Annotated[
        list[str] | None, typer.Option(help=f"run only these checks: {', '.join(CHECKS)}")
    ] = None,
) -> None:
    """Render k8s/, read iac/ and the tables, and report every part that does not fit another."""
    unknown = sorted(set(only or []) - set(CHECKS))
    if unknown:  # else nothing would run and the command would report "0 misfits"
        raise typer.BadParameter(
            f"unknown check(s) {', '.join(unknown)}; use {', '.join(CHECKS)}", param_hint="'--only'"
        )
    try:
        tree, findings = check_tree(root.resolve(), only)
    except RenderError as exc:
        console.print(f"error: {exc}", style="bold red", markup=False)
        raise typer.Exit(2) from exc
    for line in report_lines(tree, findings):
        console.print(line, style="red" if line.startswith("[") else None, markup=False)
    if findings:
        raise typer.Exit(1)
