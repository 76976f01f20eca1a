"""The ``cxr`` command: one Typer app assembled from each package's own CLI.

Before any sub-command runs, the stack's ``CXR_*`` variables (``.stack/stack.env``,
written by ``cxr stack up``) are loaded without overriding the caller's
environment, and the closed-network defaults are applied, so every command talks
to the local stack and nothing phones home.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import typer
from dotenv import dotenv_values
from pydantic import ValidationError

from core.offline import apply_offline_env
from cxr.demo import demo
from cxr.exit import exit_process
from data_pipeline.cli import app as data_app
from delivery import cli as gitops_cli
from delivery.cluster_fit.cli import app as cluster_app
from serving.cli import serve
from serving.observability.cli import app as observability_app
from serving.pacs.cli import app as pacs_app
from stack.cli import stack_app
from training.cli import app as train_app
from workflows.pipeline_cli import app as pipeline_app

app = typer.Typer(help="CXR Detect: chest X-ray detection platform.", no_args_is_help=True)
app.add_typer(stack_app, name="stack")
app.add_typer(data_app, name="data")
app.add_typer(train_app, name="train")
app.command("serve")(serve)
app.add_typer(observability_app, name="observability")
app.add_typer(pipeline_app, name="pipeline")
app.command("demo")(demo)
app.command("promote")(gitops_cli.promote)
app.command("rollback")(gitops_cli.rollback)
app.add_typer(gitops_cli.canary_app, name="canary")
app.add_typer(gitops_cli.app, name="gitops")
app.add_typer(cluster_app, name="cluster")
app.add_typer(pacs_app, name="pacs")


@app.callback()
def _setup(verbose: bool = typer.Option(False, "--verbose", "-v", help="debug logging")) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s level=%(levelname)s logger=%(name)s %(message)s",
    )
    stack_dir = Path(os.environ.get("CXR_STACK_DIR", ".stack"))
    env_file = stack_dir / "stack.env"
    if env_file.is_file():
        try:
            values = dotenv_values(env_file)
        except (OSError, UnicodeDecodeError) as exc:  # every command read it: a traceback before each
            typer.echo(
                f"error: the stack's settings file {env_file} cannot be read ({exc}): "
                "run `cxr stack up` to write it again, or delete it",
                err=True,
            )
            raise typer.Exit(2) from exc
        for key, value in values.items():
            if value is not None:
                os.environ.setdefault(key, value)
    apply_offline_env(stack_dir)


def settings_error(exc: ValidationError) -> str | None:
    """One line naming each bad ``CXR_*`` variable, when ``exc`` is a settings class's; else None."""
    if not exc.title.endswith("Settings"):
        return None
    problems = "; ".join(
        f"CXR_{'__'.join(str(p) for p in e['loc']).upper()}: {e['msg']}" for e in exc.errors()
    )
    return f"error: invalid setting (CXR_* variable or the stack's stack.env): {problems}"


def main() -> None:
    try:
        app()
    except SystemExit as done:  # how Typer ends every command, successful or not
        exit_process(done.code)
    except ValidationError as exc:  # a settings class read a bad CXR_* value: no traceback for that
        line = settings_error(exc)
        if line is None:  # a model inside a command: a bug, keep its traceback
            raise
        print(line, file=sys.stderr)
        exit_process(2)


if __name__ == "__main__":
    main()
