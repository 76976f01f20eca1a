"""Prometheus metrics of the gateway, under the exact names observability builds on.

Each app owns its registry (not prometheus-client's global one) so several
apps in one test process never collide and ``/metrics`` shows only this gateway.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0)
_PHASE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0)
_UNIT_BUCKETS = tuple(round(i / 20, 2) for i in range(1, 21))


class ClassDriftFigures(Protocol):
    """One class of a prediction drift report (``serving.inference.prediction_drift.ClassDrift``).

    A protocol, not an import: metrics sit below the inference package in the import map.
    """

    @property
    def class_name(self) -> str: ...
    @property
    def count_psi(self) -> float: ...
    @property
    def confidence_psi(self) -> float | None: ...
    @property
    def detection_rate(self) -> float: ...
    @property
    def reference_rate(self) -> float: ...


class DriftReportFigures(Protocol):
    """A stage's prediction drift report (``serving.inference.prediction_drift.PredictionDriftReport``)."""

    @property
    def stage(self) -> str: ...
    @property
    def images(self) -> int: ...
    @property
    def classes(self) -> Sequence[ClassDriftFigures]: ...


@dataclass
class GatewayMetrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.requests = Counter(
            "cxr_gateway_requests_total",
            "Requests by route, status and stage",
            ["route", "status", "stage"],
            registry=r,
        )
        self.request_duration = Histogram(
            "cxr_gateway_request_duration_seconds",
            "End-to-end request latency",
            ["route", "stage"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.phase_duration = Histogram(
            "cxr_gateway_phase_duration_seconds",
            "Latency of one pipeline phase (decode|preprocess|infer|postprocess)",
            ["phase", "stage"],
            buckets=_PHASE_BUCKETS,
            registry=r,
        )
        self.inflight = Gauge("cxr_gateway_inflight_requests", "Inferences in flight", ["stage"], registry=r)
        self.rejected = Counter(
            "cxr_gateway_rejected_total", "Requests refused before inference", ["stage", "reason"], registry=r
        )
        self.input_refused = Counter(
            "cxr_gateway_input_refused_total",
            "Uploads refused by a limit of the guarded DICOM reader, by the setting that bounds it",
            ["limit"],
            registry=r,
        )
        self.housekeeping_runs = Counter(
            "cxr_gateway_retention_purged_total",
            "Results, identified source images and PACS dead letters deleted by the retention job",
            ["kind"],
            registry=r,
        )
        self.images = Counter(
            "cxr_images_processed_total", "Images run through a model", ["stage", "model_version"], registry=r
        )
        self.detections = Counter(
            "cxr_detections_total",
            "Detections returned",
            ["stage", "model_version", "class_name"],
            registry=r,
        )
        self.confidence = Histogram(
            "cxr_detection_confidence",
            "Confidence of returned detections",
            ["stage"],
            buckets=_UNIT_BUCKETS,
            registry=r,
        )
        self.intensity = Histogram(
            "cxr_input_intensity_mean",
            "Mean input intensity (0..1) per image",
            ["stage"],
            buckets=_UNIT_BUCKETS,
            registry=r,
        )
        self.drift = Gauge(
            "cxr_drift_score", "Input drift vs the model's training data", ["stage"], registry=r
        )
        self.prediction_drift = Gauge(
            "cxr_prediction_drift_psi",
            "PSI of the stage's recent answers vs the served version's validation split, per class "
            "(kind: count = detections per image, confidence = returned confidences)",
            ["stage", "class_name", "kind"],
            registry=r,
        )
        self.prediction_rate = Gauge(
            "cxr_prediction_detection_rate",
            "Detections per image of each class in the stage's recent answers at the operating points",
            ["stage", "class_name"],
            registry=r,
        )
        self.prediction_reference_rate = Gauge(
            "cxr_prediction_reference_detection_rate",
            "Detections per image of each class on the served version's validation split",
            ["stage", "class_name"],
            registry=r,
        )
        self.prediction_window = Gauge(
            "cxr_prediction_drift_window_images",
            "Images in the stage's prediction drift window when it was last scored",
            ["stage"],
            registry=r,
        )
        self.shadow_agreement = Histogram(
            "cxr_shadow_agreement",
            "Agreement (F1 at IoU 0.5) of a mirrored answer with the served one: stage=staging, "
            "staging's shadow; stage=canary, production's answer to an image the canary served",
            ["stage"],
            buckets=_UNIT_BUCKETS,
            registry=r,
        )
        self.feedback = Counter(
            "cxr_feedback_total", "Feedback submissions by outcome", ["action"], registry=r
        )
        self.spool_depth = Gauge(
            "cxr_feedback_spool_depth", "Feedback items waiting on local disk", registry=r
        )
        self.audit_lost = Counter(
            "cxr_gateway_audit_lines_lost_total",
            "Audit log lines the file could not take (a full or failing disk)",
            registry=r,
        )
        self.outbox_depth = Gauge(
            "cxr_pacs_outbox_depth",
            "Result objects waiting to be sent to a PACS",
            ["destination"],
            registry=r,
        )
        self.outbox_sent = Counter(
            "cxr_pacs_outbox_sent_total",
            "Result objects sent to a PACS, by outcome (delivered|retry|refused)",
            ["destination", "outcome"],
            registry=r,
        )
        self.outbox_dead_letters = Gauge(
            "cxr_pacs_outbox_dead_letters",
            "Result objects a PACS refused for good, kept in the outbox's dead-letter folder",
            ["destination"],
            registry=r,
        )
        self.triage_score = Histogram(
            "cxr_triage_study_score",
            "Abnormality score of analysed studies",
            ["stage"],
            buckets=_UNIT_BUCKETS,
            registry=r,
        )
        self.triage_studies = Counter(
            "cxr_triage_studies_total", "Analysed studies by priority flag", ["priority"], registry=r
        )
        self._model_info_set: dict[str, tuple[str, str, str, str]] = {}
        self.model_info = Gauge(
            "cxr_model_info",
            "Model each stage serves (value 1), with its serving variant (fp32, int8, fp16-trt)",
            ["stage", "model_name", "model_version", "variant"],
            registry=r,
        )
        self.stage_ready = Gauge(
            "cxr_stage_ready", "1 when the stage's backend has its model loaded", ["stage"], registry=r
        )
        self.canary_weight = Gauge(
            "cxr_routing_canary_weight", "Percent of production traffic sent to canary", registry=r
        )

    def set_prediction_drift(self, report: DriftReportFigures) -> None:
        """Publish one prediction drift report; a class without a confidence score loses that series."""
        stage = report.stage
        self.prediction_window.labels(stage).set(report.images)
        for c in report.classes:
            self.prediction_drift.labels(stage, c.class_name, "count").set(c.count_psi)
            if c.confidence_psi is None:
                _remove(self.prediction_drift, stage, c.class_name, "confidence")
            else:
                self.prediction_drift.labels(stage, c.class_name, "confidence").set(c.confidence_psi)
            self.prediction_rate.labels(stage, c.class_name).set(c.detection_rate)
            self.prediction_reference_rate.labels(stage, c.class_name).set(c.reference_rate)

    def clear_prediction_drift(self, stage: str) -> None:
        """Drop a stage's prediction drift series (new version, or one without a reference)."""
        for gauge in (
            self.prediction_drift,
            self.prediction_rate,
            self.prediction_reference_rate,
            self.prediction_window,
        ):
            for sample in next(iter(gauge.collect())).samples:
                if sample.labels.get("stage") == stage:
                    _remove(gauge, *sample.labels.values())

    def set_model_info(self, stage: str, name: str, version: str, variant: str = "fp32") -> None:
        """One series per stage: the previous version's (or variant's) is removed.

        Called for every request: the label set it last set per stage is kept, so an unchanged
        model costs a dict lookup instead of a walk over the gauge's samples.
        """
        keep = (stage, name, version, variant)
        if self._model_info_set.get(stage) == keep:
            return
        self._model_info_set[stage] = keep
        for sample in next(iter(self.model_info.collect())).samples:
            labels = tuple(sample.labels[k] for k in ("stage", "model_name", "model_version", "variant"))
            if labels[0] == stage and labels != keep:
                self.model_info.remove(*labels)
        self.model_info.labels(*keep).set(1)


def _remove(gauge: Gauge, *labels: str) -> None:
    with contextlib.suppress(KeyError):  # never set
        gauge.remove(*labels)
