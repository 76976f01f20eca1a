"""Turning Grafana panels into the queries Prometheus receives."""

from __future__ import annotations

import pytest

from serving.observability.panel_check import PanelQuery, PanelResult, extract_queries, failures, substitute
from serving.observability.prometheus_api import PrometheusQueryError

pytestmark = pytest.mark.unit


def test_queries_are_found_in_rows_and_hidden_targets_are_skipped() -> None:
    dashboard = {
        "uid": "d",
        "panels": [
            {"title": "top", "targets": [{"refId": "A", "expr": "up"}]},
            {
                "title": "row",
                "type": "row",
                "panels": [
                    {"title": "nested", "targets": [{"refId": "A", "expr": "rate(x[$__rate_interval])"}]},
                    {"title": "hidden", "targets": [{"refId": "A", "expr": "y", "hide": True}]},
                    {"title": "text panel"},
                ],
            },
        ],
    }
    queries = extract_queries(dashboard)
    assert [(q.panel_title, q.expr) for q in queries] == [
        ("top", "up"),
        ("nested", "rate(x[$__rate_interval])"),
    ]


def test_grafana_interval_variables_are_replaced_by_the_window() -> None:
    assert (
        substitute("rate(x[$__rate_interval]) + rate(y[${__interval}])", "2m") == "rate(x[2m]) + rate(y[2m])"
    )


def test_a_dashboard_variable_the_checker_cannot_fill_is_reported() -> None:
    with pytest.raises(PrometheusQueryError, match=r"\$stage"):
        substitute('up{stage="$stage"}')


def test_failures_name_the_panel_and_the_reason() -> None:
    q = PanelQuery("cxr-triton", "Queue time", "A", "q")
    lines = failures(
        [PanelResult(q, "q", 0), PanelResult(q, "q", 3), PanelResult(q, "q", 0, "bad_data: parse error")]
    )
    assert lines == [
        "cxr-triton / Queue time [A]: no series: q",
        "cxr-triton / Queue time [A]: bad_data: parse error: q",
    ]
