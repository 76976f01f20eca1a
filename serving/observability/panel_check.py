"""Run every dashboard panel's query against a real Prometheus and report empty or broken ones.

A dashboard that renders "No data" during an incident is worse than none: it
looks like an answer. This module turns each panel target into the query
Grafana would send, runs it, and says which panel errored or came back empty.
The integration tests and ``python -m serving.observability check-dashboards``
both use it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from serving.observability.prometheus_api import PrometheusClient, PrometheusQueryError

log = logging.getLogger(__name__)

#: Grafana's global variables that a query may carry, and what stands in for them.
GRAFANA_VARIABLES = (
    "$__rate_interval",
    "${__rate_interval}",
    "$__interval",
    "${__interval}",
    "$__range",
    "${__range}",
)


@dataclass(frozen=True)
class PanelQuery:
    dashboard_uid: str
    panel_title: str
    ref_id: str
    expr: str

    @property
    def key(self) -> tuple[str, str]:
        return (self.dashboard_uid, self.panel_title)


@dataclass(frozen=True)
class PanelResult:
    query: PanelQuery
    executed: str
    series: int
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.series > 0


def _panels(container: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Panels at any depth: rows in new dashboards nest their panels under ``panels``."""
    for panel in container.get("panels", []) or []:
        yield panel
        yield from _panels(panel)


def extract_queries(dashboard: dict[str, Any]) -> list[PanelQuery]:
    """Every Prometheus target of every visible panel of one dashboard's JSON."""
    uid = str(dashboard.get("uid", ""))
    queries = []
    for panel in _panels(dashboard):
        for target in panel.get("targets", []) or []:
            expr = (target.get("expr") or "").strip()
            if expr and not target.get("hide"):
                queries.append(
                    PanelQuery(uid, str(panel.get("title", "")), str(target.get("refId", "")), expr)
                )
    return queries


def substitute(expr: str, rate_interval: str = "1m") -> str:
    """Replace Grafana's interval variables by a fixed window, as Grafana would before sending."""
    for variable in GRAFANA_VARIABLES:
        expr = expr.replace(variable, rate_interval)
    if "$" in expr:
        raise PrometheusQueryError(f"query uses a template variable this checker cannot fill: {expr}")
    return expr


def run_queries(
    client: PrometheusClient, queries: Iterable[PanelQuery], rate_interval: str = "1m"
) -> list[PanelResult]:
    results = []
    for query in queries:
        try:
            executed = substitute(query.expr, rate_interval)
            count = len(client.query(executed))
            results.append(PanelResult(query, executed, count))
        except PrometheusQueryError as exc:
            results.append(PanelResult(query, query.expr, 0, str(exc)))
        result = results[-1]
        log.info(
            "panel_query dashboard=%s panel=%r ref=%s series=%d error=%s",
            query.dashboard_uid,
            query.panel_title,
            query.ref_id,
            result.series,
            result.error,
        )
    return results


def failures(results: Iterable[PanelResult]) -> list[str]:
    """One line per failing query: which panel, what ran, what went wrong."""
    lines = []
    for result in results:
        if result.ok:
            continue
        why = result.error or "no series"
        where = f"{result.query.dashboard_uid} / {result.query.panel_title} [{result.query.ref_id}]"
        lines.append(f"{where}: {why}: {result.executed}")
    return lines
