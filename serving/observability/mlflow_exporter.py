"""Prometheus exporter for the MLflow tracking server and model registry.

Training runs are batch jobs that end before any scrape, and MLflow is where
their results already live. Rather than have every run push metrics, this
collector reads MLflow on each scrape and exposes a bounded set of series:
runs per status, the latest finished run's key metrics (a fixed allow-list),
and the creation time of recent registered versions and of every aliased one.
Label values are statuses, metric names from the allow-list and version
numbers: no run ids, so cardinality stays small.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from serving.observability.errors import ObservabilityError

log = logging.getLogger(__name__)

#: Metrics of the latest finished run exported as cxr_training_last_run_metric{metric=...}:
#: names as training/run.py and training/ray_trainer.py log them.
DEFAULT_RUN_METRICS = (
    "test/map50",
    "test/map40",
    "test/map50_95",
    "val/mAP50",
    "epoch_seconds",
    "train_seconds",
    "epochs_completed",
    "parity_max_abs_diff",
    "ort_latency_ms_b1",
)
RUN_STATUSES = ("RUNNING", "SCHEDULED", "FINISHED", "FAILED", "KILLED")


@dataclass(eq=False)  # hashable by identity: the prometheus registry keys collectors in a dict
class MlflowCollector(Collector):
    """Reads one experiment and one registered model on every ``collect()``."""

    tracking_uri: str
    experiment: str = "cxr-detector"
    model_name: str = "cxr-detector"
    max_runs: int = 1000
    max_versions: int = 10
    run_metrics: tuple[str, ...] = DEFAULT_RUN_METRICS
    _client: Any = field(default=None, init=False, repr=False)

    def client(self) -> Any:
        if self._client is None:
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(tracking_uri=self.tracking_uri)
        return self._client

    def collect(self) -> Iterator[GaugeMetricFamily]:
        up = GaugeMetricFamily("cxr_mlflow_up", "1 when the exporter's last read of MLflow succeeded")
        try:
            families = list(self._runs()) + list(self._registry())
        except Exception as exc:  # any MLflow/HTTP failure must yield up=0, not a failed scrape
            log.warning("mlflow_scrape_failed uri=%s error=%s", self.tracking_uri, exc)
            up.add_metric([], 0.0)
            yield up
            return
        up.add_metric([], 1.0)
        yield up
        yield from families

    def _runs(self) -> Iterator[GaugeMetricFamily]:
        client = self.client()
        runs_family = GaugeMetricFamily(
            "cxr_training_runs", "Training runs in the experiment by status", labels=["experiment", "status"]
        )
        success = GaugeMetricFamily(
            "cxr_training_last_success_timestamp_seconds",
            "End time of the latest FINISHED training run",
            labels=["experiment"],
        )
        metrics = GaugeMetricFamily(
            "cxr_training_last_run_metric",
            "Key metrics of the latest FINISHED training run (allow-listed names)",
            labels=["experiment", "metric"],
        )
        experiment = client.get_experiment_by_name(self.experiment)
        runs = []
        if experiment is not None:
            runs = client.search_runs(
                [experiment.experiment_id], max_results=self.max_runs, order_by=["attributes.start_time DESC"]
            )
        counts = Counter(run.info.status for run in runs)
        for status in RUN_STATUSES:
            runs_family.add_metric([self.experiment, status], float(counts.get(status, 0)))
        finished = [run for run in runs if run.info.status == "FINISHED"]
        if finished:
            latest = finished[0]
            success.add_metric([self.experiment], (latest.info.end_time or latest.info.start_time) / 1000.0)
            for name in self.run_metrics:
                if name in latest.data.metrics:
                    metrics.add_metric([self.experiment, name], float(latest.data.metrics[name]))
        yield runs_family
        yield success
        yield metrics

    def _registry(self) -> Iterator[GaugeMetricFamily]:
        from mlflow.exceptions import MlflowException

        client = self.client()
        created = GaugeMetricFamily(
            "cxr_registry_model_version_created_timestamp_seconds",
            "When each recent or aliased version of the registered model was created",
            labels=["model_name", "model_version"],
        )
        aliases = GaugeMetricFamily(
            "cxr_registry_alias_version",
            "Version number each registry alias points to",
            labels=["model_name", "alias"],
        )
        try:
            model = client.get_registered_model(self.model_name)
        except MlflowException as exc:
            if getattr(exc, "error_code", "") != "RESOURCE_DOES_NOT_EXIST":
                raise
            yield created
            yield aliases
            return
        versions = {
            str(v.version): v
            for v in client.search_model_versions(
                f"name='{self.model_name}'", max_results=self.max_versions, order_by=["version_number DESC"]
            )
        }
        for alias, version in (model.aliases or {}).items():
            aliases.add_metric([self.model_name, alias], float(version))
            if str(version) not in versions:
                versions[str(version)] = client.get_model_version(self.model_name, str(version))
        for number, version in versions.items():
            created.add_metric([self.model_name, number], version.creation_timestamp / 1000.0)
        yield created
        yield aliases


def serve(tracking_uri: str, host: str, port: int, experiment: str, model_name: str) -> None:
    """Expose the collector on ``http://host:port/metrics`` until interrupted."""
    import time

    from prometheus_client import CollectorRegistry, start_http_server

    # A scrape must not hang for minutes in MLflow's client retry loop when MLflow is down.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    registry = CollectorRegistry()
    registry.register(MlflowCollector(tracking_uri, experiment=experiment, model_name=model_name))
    try:
        server, thread = start_http_server(port, addr=host, registry=registry)
    except OSError as exc:  # a port in use, an address not of this machine: was a traceback
        raise ObservabilityError(
            f"cannot listen on {host}:{port} ({exc.strerror or exc}): pass --host an address of this "
            "machine and --port a free port (is another exporter already running?)"
        ) from exc
    log.info("mlflow_exporter_started url=http://%s:%d/metrics mlflow=%s", host, port, tracking_uri)
    try:
        while thread.is_alive():
            time.sleep(1.0)
    except KeyboardInterrupt:
        pass
    finally:
        server.shutdown()
