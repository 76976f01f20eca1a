"""Grafana dashboards as code: five dashboards an operator of CXR Detect watches.

Each panel is declared as a :class:`PanelSpec` (title, why it exists, PromQL,
unit) and built into a Grafana dashboard with ``grafanalib``. The JSON is
rendered into sidecar ConfigMaps under ``k8s/monitoring/dashboards/`` and every
query is run against a real Prometheus by the integration tests, so a panel
that shows "No data" is a failing test, not a surprise during an incident.

Queries use ``$__rate_interval`` (Grafana picks a window of at least four
scrapes) and the recording rules of ``k8s/monitoring/rules/``; no other
template variable, so a query runs unchanged against Prometheus' API once
``$__rate_interval`` is substituted.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from grafanalib import core as g
from grafanalib._gen import DashboardEncoder

DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
RATE = "$__rate_interval"

PanelKind = Literal["timeseries", "stat", "table"]
#: Where a panel can show data: everywhere, or only on a cluster with GPUs / Argo.
Availability = Literal["everywhere", "gpu", "argo"]

#: the Prometheus jobs of CXR's own targets: one-machine configs name them gateway, triton and
#: mlflow-exporter; in the cluster a job is the Service's name with the overlay's suffix. The alert
#: CxrScrapeTargetDown selects the same (tests/unit/observability/test_alert_rules.py holds them equal)
CXR_SCRAPE_JOBS = "(cxr-)?gateway(-.+)?|triton(-.+)?|mlflow-exporter(-.+)?"


@dataclass(frozen=True)
class Query:
    expr: str
    legend: str = ""


@dataclass(frozen=True)
class PanelSpec:
    title: str
    description: str
    queries: tuple[Query, ...]
    unit: str = "short"
    kind: PanelKind = "timeseries"
    availability: Availability = "everywhere"


@dataclass(frozen=True)
class DashboardSpec:
    uid: str
    title: str
    description: str
    panels: tuple[PanelSpec, ...]
    tags: tuple[str, ...] = field(default=("cxr",))


def _q(expr: str, legend: str = "") -> Query:
    return Query(" ".join(expr.split()), legend)


# ------------------------------------------------------------------------ service overview
SERVICE_OVERVIEW = DashboardSpec(
    uid="cxr-service-overview",
    title="CXR / Service overview",
    description="Traffic, errors and latency of the gateway by stage: the first page during an incident.",
    panels=(
        PanelSpec(
            "Requests per second by stage",
            "All gateway routes. A drop to zero with clients still sending means the gateway is down.",
            (_q(f"sum by (stage) (rate(cxr_gateway_requests_total[{RATE}]))", "{{stage}}"),),
            unit="reqps",
        ),
        PanelSpec(
            "Requests per second by route and status",
            "4xx are client mistakes (bad image, missing key); 5xx are ours.",
            (
                _q(
                    f"sum by (route, status) (rate(cxr_gateway_requests_total[{RATE}]))",
                    "{{route}} {{status}}",
                ),
            ),
            unit="reqps",
        ),
        PanelSpec(
            "5xx ratio by stage",
            "Share of requests the gateway failed (5 min window). Alert CxrGatewayHighErrorRatio above 5 %.",
            (_q("stage:cxr_gateway_errors:ratio_rate5m", "{{stage}}"),),
            unit="percentunit",
        ),
        PanelSpec(
            "4xx ratio by stage",
            "Share of requests refused as bad input or unauthorised: a rise after a PACS change is theirs.",
            (_q("stage:cxr_gateway_client_errors:ratio_rate5m", "{{stage}}"),),
            unit="percentunit",
        ),
        PanelSpec(
            "Latency quantiles by stage",
            "End-to-end request latency (5 min window). The SLO: 95 % of requests within 1 s.",
            (
                _q("stage:cxr_gateway_request_duration_seconds:p50_5m", "p50 {{stage}}"),
                _q("stage:cxr_gateway_request_duration_seconds:p95_5m", "p95 {{stage}}"),
                _q("stage:cxr_gateway_request_duration_seconds:p99_5m", "p99 {{stage}}"),
            ),
            unit="s",
        ),
        PanelSpec(
            "Latency SLO: share of requests slower than 1 s",
            "The error budget is 5 %. The burn-rate alerts compare the 5 m / 1 h windows "
            "with 14.4x the budget.",
            (
                _q("stage:cxr_gateway_slow_requests:ratio_rate5m", "5m {{stage}}"),
                _q("stage:cxr_gateway_slow_requests:ratio_rate1h", "1h {{stage}}"),
            ),
            unit="percentunit",
        ),
        PanelSpec(
            "p95 of each pipeline phase",
            "decode / preprocess / infer / postprocess: where a slow request spends its time.",
            (_q("stage_phase:cxr_gateway_phase_duration_seconds:p95_5m", "{{stage}} {{phase}}"),),
            unit="s",
        ),
        PanelSpec(
            "In-flight inferences by stage",
            "Requests inside the pipeline now; near CXR_MAX_INFLIGHT_PER_STAGE the gateway starts shedding.",
            (_q("sum by (stage) (cxr_gateway_inflight_requests)", "{{stage}}"),),
        ),
        PanelSpec(
            "Rejected requests by reason",
            "Requests turned away before inference (overload, rate limit, too large).",
            (
                _q(
                    f"sum by (stage, reason) (rate(cxr_gateway_rejected_total[{RATE}]))",
                    "{{stage}} {{reason}}",
                ),
            ),
            unit="reqps",
        ),
        PanelSpec(
            "Stage readiness",
            "1 when the stage's backend has its model loaded. A stage with no model assigned is 0 by design.",
            (_q("max by (stage) (cxr_stage_ready)", "{{stage}}"),),
            kind="stat",
        ),
        PanelSpec(
            "Scrape targets up",
            "Every gateway, Triton and MLflow exporter scraped; 0 means it is down or unreachable.",
            # CXR's jobs only, as CxrScrapeTargetDown selects them: in the cluster the shared
            # Prometheus scrapes every other target too
            (_q(f'up{{job=~"{CXR_SCRAPE_JOBS}"}}', "{{job}} {{instance}}"),),
            kind="stat",
        ),
    ),
)

# ---------------------------------------------------------------------------- model & drift
MODEL_DRIFT = DashboardSpec(
    uid="cxr-model-drift",
    title="CXR / Model & drift",
    description="What the models see and answer: inputs vs the training data, detections, "
    "confidence, feedback.",
    panels=(
        PanelSpec(
            "Model served by each stage",
            "From the routing file in git (k8s/overlays/<stage>/model.yaml) as the gateway loaded it.",
            (
                _q(
                    "max by (stage, model_name, model_version) (cxr_model_info)",
                    "{{stage}} v{{model_version}}",
                ),
            ),
            kind="table",
        ),
        PanelSpec(
            "Images per second by stage and model version",
            "Images that reached a model (a batch request counts each image).",
            (
                _q(
                    f"sum by (stage, model_version) (rate(cxr_images_processed_total[{RATE}]))",
                    "{{stage}} v{{model_version}}",
                ),
            ),
            unit="ops",
        ),
        PanelSpec(
            "Detections per second by class",
            "A class that vanishes or floods after a promotion is a model problem before any metric says so.",
            (_q(f"sum by (class_name) (rate(cxr_detections_total[{RATE}]))", "{{class_name}}"),),
            unit="ops",
        ),
        PanelSpec(
            "Detections per image by stage",
            "Average number of boxes returned per image (5 min window).",
            (_q("stage:cxr_detections_per_image:ratio_rate5m", "{{stage}}"),),
        ),
        PanelSpec(
            "Detection confidence by stage",
            "Mean and median confidence of returned boxes; a falling median often precedes drift alerts.",
            (
                _q("stage:cxr_detection_confidence:mean5m", "mean {{stage}}"),
                _q(
                    "histogram_quantile(0.5, sum by (stage, le) "
                    f"(rate(cxr_detection_confidence_bucket[{RATE}])))",
                    "p50 {{stage}}",
                ),
            ),
            unit="percentunit",
        ),
        PanelSpec(
            "Input intensity by stage",
            "Quartiles of each image's mean intensity (0..1 after VOI). "
            "Inverted or over-exposed inputs move it.",
            (
                _q(
                    "histogram_quantile(0.25, sum by (stage, le) "
                    f"(rate(cxr_input_intensity_mean_bucket[{RATE}])))",
                    "p25 {{stage}}",
                ),
                _q(
                    "histogram_quantile(0.5, sum by (stage, le) "
                    f"(rate(cxr_input_intensity_mean_bucket[{RATE}])))",
                    "p50 {{stage}}",
                ),
                _q(
                    "histogram_quantile(0.75, sum by (stage, le) "
                    f"(rate(cxr_input_intensity_mean_bucket[{RATE}])))",
                    "p75 {{stage}}",
                ),
            ),
            unit="percentunit",
        ),
        PanelSpec(
            "Drift score by stage",
            "Largest PSI of the input window vs the model's dataset reference: < 0.1 stable, > 0.25 drifted "
            "(alert CxrInputDriftHigh).",
            (_q("max by (stage) (cxr_drift_score)", "{{stage}}"),),
        ),
        PanelSpec(
            "Prediction drift by class (PSI)",
            "Per stage and class, PSI of the recent answers (detections per image, returned confidences) "
            "vs the served version's validation split: < 0.1 stable, > 0.25 drifted "
            "(alert CxrPredictionDriftHigh). No series: the version has no prediction reference.",
            (_q("max by (stage, class_name) (cxr_prediction_drift_psi)", "{{stage}} {{class_name}}"),),
        ),
        PanelSpec(
            "Detection rate vs validation split",
            "Detections per image of each class in the recent window, beside the same model's rate on "
            "its validation split at the operating points.",
            (
                _q("max by (stage, class_name) (cxr_prediction_detection_rate)", "{{stage}} {{class_name}}"),
                _q(
                    "max by (stage, class_name) (cxr_prediction_reference_detection_rate)",
                    "{{stage}} {{class_name}} (val)",
                ),
            ),
        ),
        PanelSpec(
            "Shadow agreement with the served answer",
            "F1 at IoU 0.5 of a mirrored answer against what the client received, for a "
            "CXR_SHADOW_FRACTION share of requests. staging: its shadow answer; canary: production's "
            "answer to an image the canary served (the agreement `cxr canary analyze` judges).",
            (
                _q(
                    "histogram_quantile(0.5, sum by (stage, le) "
                    f"(rate(cxr_shadow_agreement_bucket[{RATE}])))",
                    "p50 {{stage}}",
                ),
            ),
            unit="percentunit",
        ),
        PanelSpec(
            "Radiologist feedback by action",
            "Corrections feed the next dataset version; none for weeks means nobody reviews.",
            (_q(f"sum by (action) (rate(cxr_feedback_total[{RATE}]))", "{{action}}"),),
            unit="ops",
        ),
        PanelSpec(
            "Feedback waiting in the spool",
            "Items the gateway could not upload to S3 yet (alert CxrFeedbackBacklog above 50).",
            (_q("sum(cxr_feedback_spool_depth)", "spool"),),
            kind="stat",
        ),
        PanelSpec(
            "Results waiting for the PACS",
            "SR and presentation states in the outbox per destination (alert CxrPacsOutboxBacklog above 20).",
            (_q("max by (destination) (cxr_pacs_outbox_depth)", "{{destination}}"),),
        ),
        PanelSpec(
            "Priority studies",
            "Analysed studies per hour by triage flag (score >= CXR_TRIAGE_THRESHOLD is priority).",
            (_q("sum by (priority) (increase(cxr_triage_studies_total[1h]))", "priority={{priority}}"),),
        ),
    ),
)

# ------------------------------------------------------------------------ canary vs production
CANARY = DashboardSpec(
    uid="cxr-canary",
    title="CXR / Canary vs production",
    description="The evidence `cxr canary analyze` acts on, side by side: errors, latency, model output.",
    panels=(
        PanelSpec(
            "Canary weight",
            "Percent of production traffic routed to the canary (k8s/overlays/canary/model.yaml).",
            (_q("max(cxr_routing_canary_weight)", "weight"),),
            unit="percent",
            kind="stat",
        ),
        PanelSpec(
            "Model versions",
            "Which version each side serves.",
            (
                _q(
                    'max by (stage, model_version) (cxr_model_info{stage=~"canary|production"})',
                    "{{stage}} v{{model_version}}",
                ),
            ),
            kind="table",
        ),
        PanelSpec(
            "Requests per second",
            "The split should follow the canary weight.",
            (
                _q(
                    "sum by (stage) "
                    f'(rate(cxr_gateway_requests_total{{stage=~"canary|production"}}[{RATE}]))',
                    "{{stage}}",
                ),
            ),
            unit="reqps",
        ),
        PanelSpec(
            "5xx ratio",
            "Alert CxrCanaryErrorsWorseThanProduction when the canary is 2 points worse.",
            (_q('stage:cxr_gateway_errors:ratio_rate5m{stage=~"canary|production"}', "{{stage}}"),),
            unit="percentunit",
        ),
        PanelSpec(
            "p95 latency",
            "End-to-end p95 of each side (5 min window).",
            (
                _q(
                    'stage:cxr_gateway_request_duration_seconds:p95_5m{stage=~"canary|production"}',
                    "{{stage}}",
                ),
            ),
            unit="s",
        ),
        PanelSpec(
            "Canary p95 / production p95",
            "Above 1.5 (and 100 ms slower) for 10 min fires CxrCanaryLatencyWorseThanProduction.",
            (
                _q(
                    'stage:cxr_gateway_request_duration_seconds:p95_5m{stage="canary"} / ignoring (stage) '
                    'stage:cxr_gateway_request_duration_seconds:p95_5m{stage="production"}',
                    "ratio",
                ),
            ),
        ),
        PanelSpec(
            "Detections per image",
            "A new model that finds far more or far fewer boxes deserves a look before promotion.",
            (_q('stage:cxr_detections_per_image:ratio_rate5m{stage=~"canary|production"}', "{{stage}}"),),
        ),
        PanelSpec(
            "Mean detection confidence",
            "Calibration differences between the two models show here first.",
            (_q('stage:cxr_detection_confidence:mean5m{stage=~"canary|production"}', "{{stage}}"),),
            unit="percentunit",
        ),
        PanelSpec(
            "Canary agreement with production",
            "Mean F1 at IoU 0.5 of the canary's served answer against production's on the same image, "
            "for a CXR_SHADOW_FRACTION share of the canary's requests: the figure `cxr canary analyze` "
            "judges against policy min_agreement.",
            (
                _q(
                    f'sum(rate(cxr_shadow_agreement_sum{{stage="canary"}}[{RATE}])) / '
                    f'sum(rate(cxr_shadow_agreement_count{{stage="canary"}}[{RATE}]))',
                    "agreement",
                ),
            ),
            unit="percentunit",
        ),
    ),
)

# -------------------------------------------------------------------------------------- Triton
TRITON = DashboardSpec(
    uid="cxr-triton",
    title="CXR / Triton",
    description="The inference servers behind the gateway (one per stage): throughput, queue, "
    "batching, compute.",
    panels=(
        PanelSpec(
            "Successful inferences per second",
            "Per Triton instance (one per stage) and model.",
            (
                _q(
                    f"sum by (instance, model) (rate(nv_inference_request_success[{RATE}]))",
                    "{{instance}} {{model}}",
                ),
            ),
            unit="reqps",
        ),
        PanelSpec(
            "Failed inferences per second by reason",
            "REJECTED = queue full (alert CxrTritonQueueRejections); BACKEND = the model raised.",
            (
                _q(
                    f"sum by (instance, model, reason) (rate(nv_inference_request_failure[{RATE}]))",
                    "{{instance}} {{model}} {{reason}}",
                ),
            ),
            unit="reqps",
        ),
        PanelSpec(
            "Queue time per request",
            "Time a request waits for a model instance (5 min mean): grows before rejections start.",
            (
                _q(
                    "instance_model:nv_inference_queue_duration_us:mean_rate5m / 1e6",
                    "{{instance}} {{model}}",
                ),
            ),
            unit="s",
        ),
        PanelSpec(
            "Compute time per request",
            "Model execution time per request (5 min mean), without queueing.",
            (
                _q(
                    "instance_model:nv_inference_compute_infer_duration_us:mean_rate5m / 1e6",
                    "{{instance}} {{model}}",
                ),
            ),
            unit="s",
        ),
        PanelSpec(
            "Average batch size",
            "Inferences per model execution; 1 means dynamic batching never had two requests to merge.",
            (_q("instance_model:nv_inference_batch_size:mean_rate5m", "{{instance}} {{model}}"),),
        ),
        PanelSpec(
            "Executions per second",
            "Model executions (batches) per second.",
            (
                _q(
                    f"sum by (instance, model) (rate(nv_inference_exec_count[{RATE}]))",
                    "{{instance}} {{model}}",
                ),
            ),
            unit="ops",
        ),
        PanelSpec(
            "Pending requests",
            "Requests queued in Triton right now.",
            (_q("sum by (instance, model) (nv_inference_pending_request_count)", "{{instance}} {{model}}"),),
        ),
        PanelSpec(
            "GPU utilisation",
            "Only where Triton runs on a GPU (the cluster); a CPU-only machine exports no GPU series.",
            (_q("avg by (instance, gpu_uuid) (nv_gpu_utilization)", "{{instance}} {{gpu_uuid}}"),),
            unit="percentunit",
            availability="gpu",
        ),
        PanelSpec(
            "GPU memory used",
            "Only where Triton runs on a GPU (the cluster).",
            (_q("sum by (instance, gpu_uuid) (nv_gpu_memory_used_bytes)", "{{instance}} {{gpu_uuid}}"),),
            unit="bytes",
            availability="gpu",
        ),
    ),
)

# ------------------------------------------------------------------------------------ training
TRAINING = DashboardSpec(
    uid="cxr-training",
    title="CXR / Training",
    description="Training runs and registered models, read from MLflow by the registry exporter, "
    "and the retraining workflows from Argo.",
    panels=(
        PanelSpec(
            "Training runs by status",
            "Runs in the MLflow experiment. A growing FAILED count fires CxrTrainingRunFailed.",
            (_q("sum by (experiment, status) (cxr_training_runs)", "{{experiment}} {{status}}"),),
            kind="stat",
        ),
        PanelSpec(
            "Time since the last successful run",
            "The retrain CronWorkflow should keep this under its schedule period.",
            (
                _q(
                    "time() - max by (experiment) (cxr_training_last_success_timestamp_seconds)",
                    "{{experiment}}",
                ),
            ),
            unit="s",
            kind="stat",
        ),
        PanelSpec(
            "Epoch time of the latest run",
            "Seconds per epoch (Ray Train, all workers): a jump means fewer workers or a slower node.",
            (_q('cxr_training_last_run_metric{metric="epoch_seconds"}', "{{experiment}}"),),
            unit="s",
        ),
        PanelSpec(
            "Test metrics of the latest finished run",
            "mAP@0.5 and VinDr's mAP@0.4 on the test split, as the promotion gate reads them.",
            (_q('cxr_training_last_run_metric{metric=~"test/map50|test/map40"}', "{{metric}}"),),
            unit="percentunit",
        ),
        PanelSpec(
            "Validation mAP@0.5 of the latest run",
            "Last epoch's validation mAP (ultralytics' own validator).",
            (_q('cxr_training_last_run_metric{metric="val/mAP50"}', "{{experiment}}"),),
            unit="percentunit",
        ),
        PanelSpec(
            "Age of registered model versions",
            "Days since each recent version of cxr-detector was registered (alert CxrProductionModelStale "
            "when production's passes 30).",
            (
                _q(
                    "(time() - max by (model_version) "
                    "(cxr_registry_model_version_created_timestamp_seconds)) / 86400",
                    "v{{model_version}}",
                ),
            ),
            unit="d",
        ),
        PanelSpec(
            "Registry aliases",
            "Model version behind each MLflow alias (set by `cxr promote`).",
            (_q("max by (alias) (cxr_registry_alias_version)", "{{alias}}"),),
            kind="stat",
        ),
        PanelSpec(
            "Retraining workflows by phase (Argo)",
            "Workflows from cxr-* templates entering each phase per day (alert CxrTrainingWorkflowFailed).",
            (
                _q(
                    "sum by (name, phase) "
                    '(increase(argo_workflows_workflowtemplate_triggered_total{name=~"cxr.*"}[1d]))',
                    "{{name}} {{phase}}",
                ),
            ),
            availability="argo",
        ),
    ),
)

DASHBOARDS: tuple[DashboardSpec, ...] = (SERVICE_OVERVIEW, MODEL_DRIFT, CANARY, TRITON, TRAINING)


# --------------------------------------------------------------------------------- building
_SIZES: dict[PanelKind, tuple[int, int]] = {"timeseries": (12, 8), "stat": (6, 5), "table": (12, 6)}


def _targets(panel: PanelSpec) -> list[g.Target]:
    refs = "ABCDEFGHIJ"
    return [
        g.Target(
            expr=q.expr,
            legendFormat=q.legend,
            refId=refs[i],
            datasource=DATASOURCE,
            instant=panel.kind == "table",
        )
        for i, q in enumerate(panel.queries)
    ]


def _panel(panel: PanelSpec, pos: g.GridPos) -> g.Panel:
    common: dict[str, Any] = {
        "title": panel.title,
        "description": panel.description,
        "dataSource": DATASOURCE,
        "targets": _targets(panel),
        "gridPos": pos,
    }
    if panel.kind == "stat":
        return g.Stat(format=panel.unit, reduceCalc="lastNotNull", **common)
    if panel.kind == "table":
        return g.Table(**common)
    return g.TimeSeries(unit=panel.unit, legendDisplayMode="list", **common)


def _layout(panels: tuple[PanelSpec, ...]) -> list[g.Panel]:
    """Left to right, wrapping at Grafana's 24 columns; a row is as tall as its tallest panel."""
    built: list[g.Panel] = []
    x = y = row_height = 0
    for panel in panels:
        w, h = _SIZES[panel.kind]
        if x + w > 24:
            x, y, row_height = 0, y + row_height, 0
        built.append(_panel(panel, g.GridPos(h=h, w=w, x=x, y=y)))
        x += w
        row_height = max(row_height, h)
    return built


def build_dashboard(spec: DashboardSpec) -> g.Dashboard:
    datasource = g.Template(
        name="datasource", label="Prometheus", query="prometheus", type="datasource", default="Prometheus"
    )
    return g.Dashboard(
        title=spec.title,
        uid=spec.uid,
        description=spec.description,
        tags=list(spec.tags),
        timezone="browser",
        refresh="30s",
        time=g.Time("now-3h", "now"),
        templating=g.Templating(list=[datasource]),
        panels=_layout(spec.panels),
    ).auto_panel_ids()


def dashboard_json(spec: DashboardSpec) -> dict[str, Any]:
    """The dashboard as the plain JSON Grafana imports (grafanalib's encoder, then a dict)."""
    import json

    data: dict[str, Any] = json.loads(json.dumps(build_dashboard(spec).to_json_data(), cls=DashboardEncoder))
    return data
