"""A small client for Prometheus' HTTP query API (``/api/v1/query``).

Why not a library: the maintained Python clients for the query side
(prometheus-api-client) pull in pandas/matplotlib-era extras and lag the API;
the two calls needed here are a GET each, done with httpx, which the project
already depends on.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import httpx

from serving.observability.errors import ObservabilityError, PrometheusUnavailable

log = logging.getLogger(__name__)


class PrometheusQueryError(ObservabilityError):
    """Prometheus rejected a query (syntax, unknown function, ...); the message is Prometheus'."""


@dataclass(frozen=True)
class Series:
    labels: dict[str, str]
    value: float


class PrometheusClient:
    """Instant queries and target health against one Prometheus server."""

    def __init__(self, url: str, timeout: float = 10.0) -> None:
        self.url = url.rstrip("/")
        # trust_env=False: never route loopback traffic through a proxy from the environment.
        self._http = httpx.Client(base_url=self.url, timeout=timeout, trust_env=False)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> PrometheusClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _get(self, path: str, params: dict[str, str] | None = None) -> Any:
        try:
            response = self._http.get(path, params=params)
        except httpx.HTTPError as exc:
            raise PrometheusUnavailable(f"Prometheus at {self.url} did not answer {path}: {exc}") from exc
        try:
            body = response.json()
        except ValueError as exc:
            raise PrometheusUnavailable(
                f"Prometheus at {self.url} answered {path} with HTTP {response.status_code}, not JSON"
            ) from exc
        if body.get("status") != "success":
            raise PrometheusQueryError(f"{body.get('errorType', 'error')}: {body.get('error', body)}")
        return body["data"]

    def query(self, expr: str, at: float | None = None) -> list[Series]:
        """Evaluate ``expr`` now (or at ``at``); scalars come back as one unlabelled series."""
        params = {"query": expr}
        if at is not None:
            params["time"] = f"{at:.3f}"
        data = self._get("/api/v1/query", params)
        kind, result = data["resultType"], data["result"]
        if kind == "vector":
            return [Series(dict(item["metric"]), float(item["value"][1])) for item in result]
        if kind == "matrix":
            return [
                Series(dict(item["metric"]), float(item["values"][-1][1]))
                for item in result
                if item["values"]
            ]
        if kind in ("scalar", "string"):
            return [Series({}, float(result[1]))] if kind == "scalar" else []
        raise PrometheusQueryError(f"unexpected result type {kind!r} for {expr!r}")

    def query_range(
        self, expr: str, start: float, end: float, step: float
    ) -> list[tuple[dict[str, str], list[tuple[float, float]]]]:
        """Each series of ``expr`` over [start, end] as (labels, [(unix time, value), ...])."""
        params = {"query": expr, "start": f"{start:.3f}", "end": f"{end:.3f}", "step": f"{step:g}"}
        data = self._get("/api/v1/query_range", params)
        return [
            (dict(item["metric"]), [(float(t), float(v)) for t, v in item["values"]])
            for item in data["result"]
        ]

    def active_targets(self) -> list[dict[str, Any]]:
        data = self._get("/api/v1/targets", {"state": "active"})
        targets: list[dict[str, Any]] = data["activeTargets"]
        return targets

    def rule_groups(self) -> list[dict[str, Any]]:
        data = self._get("/api/v1/rules")
        groups: list[dict[str, Any]] = data["groups"]
        return groups

    def wait_for(self, expr: str, *, timeout: float, poll: float = 1.0) -> list[Series]:
        """Poll until ``expr`` returns at least one series (scrapes and rule evaluations take time)."""
        deadline = time.monotonic() + timeout
        while True:
            series = self.query(expr)
            if series:
                return series
            if time.monotonic() > deadline:
                raise TimeoutError(f"{expr!r} returned no series within {timeout:.0f} s at {self.url}")
            time.sleep(poll)
