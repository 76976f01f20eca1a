"""Everything one gateway instance holds, built once at start-up.

Kept on ``app.state.cxr`` and reached through the dependencies in
:mod:`serving.gateway.deps`, so tests can build an app with a different backend or
store without patching modules.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from core.install_secret import resolve_install_secret
from serving.config import ServingSettings
from serving.dicom.stow import StowService
from serving.feedback.service import FeedbackService, FeedbackSpool
from serving.gateway.audit import AuditLog
from serving.gateway.auth import KeyStore
from serving.inference.backend import InferenceBackend
from serving.inference.cpu_pool import CpuPool
from serving.inference.detector import DetectionService
from serving.inference.drift import DriftMonitor
from serving.inference.routing import Router
from serving.limits import RateLimiter
from serving.metrics import GatewayMetrics
from serving.pacs.sendback import SendBack
from serving.results import BlobStore, ResultStore, Retention
from serving.triage.worklist import WorklistStore
from serving.triage.worklist_db import PostgresWorklistDb

log = logging.getLogger(__name__)


@dataclass
class GatewayState:
    settings: ServingSettings
    keys: KeyStore | None
    backend: InferenceBackend
    store: BlobStore | None
    metrics: GatewayMetrics
    router: Router
    results: ResultStore
    detector: DetectionService
    # the one worker pool for blocking work (decode, parsing, SR, disk): routes await ``cpu.run``
    cpu: CpuPool
    stow: StowService
    feedback: FeedbackService
    limiter: RateLimiter
    audit: AuditLog
    # the install's secret behind feedback pseudonyms and audit hashes (core/install_secret.py)
    secret: str
    # failed authentications per client address (CXR_AUTH_FAIL_*): guessing keys costs time
    auth_failures: RateLimiter = field(default_factory=lambda: RateLimiter(1.0, 20))
    # analysed studies with their triage (GET /v1/worklist); None in a state built without one
    worklist: WorklistStore | None = None
    # SR + presentation states back to the PACS through the durable outbox (serving/pacs)
    sendback: SendBack | None = None
    # handed-off PACS items seen incomplete, and since when (serving/pacs/handoff.py ``adopt``)
    handoff_unclaimed: dict[str, float] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)


def make_store(settings: ServingSettings) -> BlobStore | None:
    """The S3 store named by the settings (keys from credentials.json when unset), or None if unconfigured."""
    from data_pipeline.store import ObjectStore

    access, secret = settings.s3_keys()
    return ObjectStore(
        settings.s3_endpoint, access, secret, settings.s3_bucket, settings.s3_region, timeout_s=5.0, retries=0
    )


def make_backend(settings: ServingSettings) -> InferenceBackend:
    if settings.backend == "onnx":
        from serving.inference.backend_onnx import OnnxBackend

        if settings.onnx_model is None:
            raise ValueError("the onnx backend needs a model: pass --model PATH or set CXR_ONNX_MODEL")
        return OnnxBackend(
            settings.onnx_model,
            name=settings.model_name,
            threads=settings.onnx_threads,
            workers=settings.onnx_workers,
        )
    from serving.inference.backend_triton import TritonBackend

    return TritonBackend(settings)


def build_state(
    settings: ServingSettings,
    *,
    backend: InferenceBackend | None = None,
    store: BlobStore | None = None,
    use_store: bool = True,
) -> GatewayState:
    metrics = GatewayMetrics()
    keys = KeyStore.from_file(settings.resolved_api_keys_file) if settings.auth_enabled else None
    backend = backend or make_backend(settings)
    if store is None and use_store:
        store = make_store(settings)
    router = Router(
        settings.gitops_dir, shadow_fraction=settings.shadow_fraction, poll_s=settings.routing_poll_s
    )
    results = ResultStore(
        store,
        local_dir=settings.resolved_results_dir,
        cache_items=settings.results_cache_items,
        cache_bytes=settings.results_cache_bytes,
        retention=Retention(
            results=timedelta(days=settings.results_retention_days),
            sources=timedelta(hours=settings.source_retention_hours),
        ),
        local_until_stored=settings.ephemeral_disk,
    )

    def load_reference(dataset_version: str) -> dict[str, Any] | None:
        if store is None:
            return None
        return dict(json.loads(store.get_bytes(f"datasets/{dataset_version}/reference_stats.json")))

    drift = DriftMonitor(
        window=settings.drift_window,
        min_samples=settings.drift_min_samples,
        on_score=lambda stage, score: metrics.drift.labels(stage).set(score),
        reference_file=settings.reference_stats,
        reference_loader=load_reference,
    )
    cpu = CpuPool(settings.worker_threads)
    worklist = WorklistStore(
        PostgresWorklistDb(
            settings.worklist_url,
            timeout_s=settings.worklist_timeout_s,
            # every worklist call runs on a worker thread, plus the retention job's: no call waits
            # for a connection, and 12 replicas stay well inside PostgreSQL's 100 beside MLflow
            max_connections=settings.worker_threads + 1,
        )
        if settings.worklist_url
        else settings.resolved_worklist_db
    )
    detector = DetectionService(
        settings, backend, router, metrics, results, drift, cpu=cpu, worklist=worklist
    )
    secret = resolve_install_secret(settings.deid_secret, settings.stack_dir)
    feedback = FeedbackService(
        store,
        FeedbackSpool(settings.resolved_spool_dir),
        secret,
        allow_burned_in=settings.feedback_allow_burned_in,
    )
    return GatewayState(
        settings=settings,
        keys=keys,
        backend=backend,
        store=store,
        metrics=metrics,
        router=router,
        results=results,
        detector=detector,
        cpu=cpu,
        stow=StowService(detector, cpu),
        feedback=feedback,
        limiter=RateLimiter(settings.rate_limit_per_s, settings.rate_limit_burst),
        audit=AuditLog(
            settings.resolved_audit_log,
            max_bytes=settings.audit_max_bytes,
            backups=settings.audit_backups,
            on_lost=metrics.audit_lost.inc,
        ),
        secret=secret,
        auth_failures=RateLimiter(settings.auth_fail_rate_per_s, settings.auth_fail_burst),
        worklist=worklist,
        sendback=SendBack(settings, metrics, cpu),
    )
