"""Observability as code: alert and recording rules, Grafana dashboards, scrape targets.

The rule files in ``k8s/monitoring/rules/`` and the dashboards defined in
:mod:`serving.observability.dashboards` are the single source; everything under
``k8s/monitoring/`` that Kubernetes consumes is rendered from them
(``python -m serving.observability render``) and committed, and a test fails
when the committed files drift from the source.
"""
