"""A one-page PNG of the key series, for people without Grafana (``... report --out report.png``).

Hospitals often run the one-machine stack without Grafana; an on-call
radiographer still needs to see whether the service was healthy overnight.
The report plots the same recording rules the dashboards and alerts use.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from serving.observability.errors import ObservabilityError
from serving.observability.prometheus_api import PrometheusClient

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReportPanel:
    title: str
    expr: str
    legend_label: str
    unit: str = ""


REPORT_PANELS: tuple[ReportPanel, ...] = (
    ReportPanel("Requests per second", "stage:cxr_gateway_requests:rate5m", "stage", "req/s"),
    ReportPanel("5xx ratio", "stage:cxr_gateway_errors:ratio_rate5m", "stage"),
    ReportPanel("p95 latency", "stage:cxr_gateway_request_duration_seconds:p95_5m", "stage", "s"),
    ReportPanel("Drift score (PSI)", "max by (stage) (cxr_drift_score)", "stage"),
    ReportPanel("Detections per image", "stage:cxr_detections_per_image:ratio_rate5m", "stage"),
    ReportPanel(
        "Triton compute per request",
        "instance_model:nv_inference_compute_infer_duration_us:mean_rate5m / 1e6",
        "instance",
        "s",
    ),
)


@dataclass(frozen=True)
class ReportSummary:
    path: Path
    series_per_panel: dict[str, int]


def render_report(client: PrometheusClient, out: Path, minutes: float = 60.0) -> ReportSummary:
    """Query each panel over the last ``minutes`` and write a PNG grid; says how many series each had."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers
    import matplotlib.pyplot as plt

    end = time.time()
    start = end - minutes * 60
    step = max(minutes * 60 / 240, 5.0)
    fig, axes = plt.subplots(3, 2, figsize=(12, 10), constrained_layout=True)
    counts: dict[str, int] = {}
    for ax, panel in zip(axes.flat, REPORT_PANELS, strict=True):
        series = client.query_range(panel.expr, start, end, step)
        counts[panel.title] = len(series)
        for labels, points in series:
            if points:
                xs = [(t - end) / 60 for t, _ in points]
                ax.plot(xs, [v for _, v in points], label=labels.get(panel.legend_label, "value"))
        ax.set_title(panel.title)
        ax.set_xlabel("minutes ago")
        if panel.unit:
            ax.set_ylabel(panel.unit)
        if series:
            ax.legend(fontsize="small")
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    fig.suptitle(f"CXR Detect, last {minutes:g} min ({client.url})")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=90, format="png")  # not guessed from the name: "report" became report.png
    except OSError as exc:  # a traceback, after every query had been answered
        raise ObservabilityError(
            f"cannot write the report to {out} ({exc.strerror or exc}): pass --out a PNG file you can write"
        ) from exc
    finally:
        plt.close(fig)
    log.info(
        "report_written path=%s panels=%d empty=%d",
        out,
        len(counts),
        sum(1 for c in counts.values() if not c),
    )
    return ReportSummary(out, counts)
