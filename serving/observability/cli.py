"""``python -m serving.observability``: render monitoring manifests, check dashboards, export MLflow.

Commands fail with the tool's own message (exit code 1), never a traceback.
"""

from __future__ import annotations

import logging
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from serving.observability.errors import ObservabilityError

app = typer.Typer(help="Observability as code: rules, dashboards, checks.", no_args_is_help=True)
console = Console(stderr=True)

REPO_ROOT_OPTION = typer.Option(
    Path("."), "--repo-root", help="Root of the repository holding k8s/monitoring."
)


def _fail(exc: Exception) -> typer.Exit:
    console.print(f"[red]error:[/red] {escape(str(exc))}")
    return typer.Exit(code=1)


@app.command()
def render(
    repo_root: Path = REPO_ROOT_OPTION,
    check: bool = typer.Option(False, "--check", help="Only verify the committed files are up to date."),
) -> None:
    """Write PrometheusRules, dashboard JSON, ServiceMonitors and the kustomization under k8s/monitoring."""
    from serving.observability.render import check_all, write_all

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s %(message)s")
    try:
        if check:
            check_all(repo_root)
            console.print("monitoring files are up to date")
            return
        written = write_all(repo_root)
    except ObservabilityError as exc:
        raise _fail(exc) from exc
    console.print(f"{len(written)} file(s) rewritten" if written else "nothing to do: files are up to date")


def _prometheus_url(given: str) -> str:
    """``--prometheus``, else the stack's CXR_PROMETHEUS_URL (as ``cxr canary`` reads it); both commands
    asked 127.0.0.1:9090 whatever the setting said."""
    from serving.config import ServingSettings

    return given or ServingSettings().prometheus_url


@app.command("check-dashboards")
def check_dashboards(
    prometheus: str = typer.Option(
        "", "--prometheus", help="Prometheus base URL (default: CXR_PROMETHEUS_URL)."
    ),
    rate_interval: str = typer.Option("1m", help="Window standing in for Grafana's $__rate_interval."),
    include_cluster_only: bool = typer.Option(
        False, help="Also require data for panels that only a cluster can fill (GPU, Argo)."
    ),
) -> None:
    """Run every dashboard panel's query against Prometheus; exit 1 if any errors or is empty."""
    from serving.observability.dashboards import DASHBOARDS, dashboard_json
    from serving.observability.panel_check import extract_queries, failures, run_queries
    from serving.observability.prometheus_api import PrometheusClient

    skip = set() if include_cluster_only else cluster_only_panels()
    queries = [q for spec in DASHBOARDS for q in extract_queries(dashboard_json(spec)) if q.key not in skip]
    try:
        with PrometheusClient(_prometheus_url(prometheus)) as client:
            results = run_queries(client, queries, rate_interval)
    except ObservabilityError as exc:
        raise _fail(exc) from exc
    table = Table("dashboard", "panel", "ref", "series", "error")
    for r in results:
        table.add_row(
            r.query.dashboard_uid, r.query.panel_title, r.query.ref_id, str(r.series), r.error or ""
        )
    Console().print(table)
    bad = failures(results)
    if bad:
        console.print(f"[red]{len(bad)} of {len(results)} queries failed[/red]")
        raise typer.Exit(code=1)
    console.print(f"all {len(results)} panel queries returned data")


def cluster_only_panels() -> set[tuple[str, str]]:
    """(dashboard uid, panel title) of panels whose data exists only on a cluster (GPU, Argo)."""
    from serving.observability.dashboards import DASHBOARDS

    return {(spec.uid, p.title) for spec in DASHBOARDS for p in spec.panels if p.availability != "everywhere"}


@app.command("mlflow-exporter")
def mlflow_exporter(
    host: str = typer.Option("127.0.0.1", help="Address to listen on."),
    port: int = typer.Option(9105, min=1, max=65535, help="Port of /metrics."),
    mlflow_uri: str = typer.Option("", help="MLflow tracking URI (default: CXR_MLFLOW_URI)."),
    experiment: str = typer.Option(
        "", help="MLflow experiment of the training runs (default: CXR_MLFLOW_EXPERIMENT)."
    ),
    model_name: str = typer.Option("", help="Registered model name (default: CXR_REGISTERED_MODEL)."),
) -> None:
    """Expose training runs and registry versions from MLflow as Prometheus metrics.

    The model and the experiment are those training uses (``CXR_REGISTERED_MODEL`` and
    ``CXR_MLFLOW_EXPERIMENT``, core's settings): fixed names read nothing once a setting changed,
    exported no versions or runs while reporting MLflow up, and CxrProductionModelStale and the
    training alerts could not fire.
    """
    from core.offline import apply_offline_env
    from serving.config import ServingSettings
    from serving.observability.mlflow_exporter import serve

    settings = ServingSettings()
    apply_offline_env(settings.stack_dir)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s %(message)s")
    try:
        serve(
            mlflow_uri or settings.mlflow_uri,
            host,
            port,
            experiment or settings.mlflow_experiment,
            model_name or settings.registered_model,
        )
    except ObservabilityError as exc:
        raise _fail(exc) from exc


def _png_file(value: Path) -> Path:
    """Checked before any query: matplotlib took the format from the name, so ``report.txt`` was a
    ``ValueError`` traceback, and ``report`` or a folder ``DIR`` became ``report.png``/``DIR.png`` while
    the command said it wrote ``report``/``DIR``."""
    if value.is_dir():
        raise typer.BadParameter(
            f"{value} is a folder: pass the PNG file to write, e.g. {value / 'report.png'}"
        )
    if value.suffix.lower() != ".png":
        raise typer.BadParameter(f"{value} does not end in .png: pass the PNG file to write, e.g. report.png")
    return value


def _positive_minutes(value: float) -> float:
    """0 or less asked Prometheus for a range that ends before it starts."""
    if not value > 0:
        raise typer.BadParameter(f"must be above 0 minutes, got {value:g}")
    return value


@app.command()
def report(
    out: Path = typer.Option(Path("cxr-report.png"), "--out", callback=_png_file, help="PNG file to write."),
    prometheus: str = typer.Option(
        "", "--prometheus", help="Prometheus base URL (default: CXR_PROMETHEUS_URL)."
    ),
    minutes: float = typer.Option(60.0, callback=_positive_minutes, help="How far back to plot."),
) -> None:
    """Plot the key series (traffic, errors, latency, drift, Triton) into one PNG, for use without Grafana."""
    from serving.observability.prometheus_api import PrometheusClient
    from serving.observability.report import render_report

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s %(message)s")
    try:
        with PrometheusClient(_prometheus_url(prometheus)) as client:
            summary = render_report(client, out, minutes)
    except ObservabilityError as exc:
        raise _fail(exc) from exc
    empty = [title for title, n in summary.series_per_panel.items() if not n]
    console.print(f"wrote {summary.path}" + (f" (no data for: {', '.join(empty)})" if empty else ""))
