"""Gateway settings: the one place the serving package reads its environment.

Every knob a hospital operator may turn lives here, validated once at start-up,
so a typo in an environment variable fails the launch instead of a request.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from core.settings import CoreSettings
from core.stages import Stage
from serving.pacs_destinations import PacsDestination


class ServingSettings(CoreSettings):
    """Configuration of the FastAPI gateway (env prefix ``CXR_``); the stack fields come from core."""

    # --- stores -----------------------------------------------------------------
    prometheus_url: str = Field(
        default="http://127.0.0.1:9090", description="Prometheus that canary analysis queries"
    )

    # --- backends ---------------------------------------------------------------
    backend: Literal["triton", "onnx"] = "triton"
    onnx_model: Path | None = Field(default=None, description="ONNX file for the in-process backend")
    onnx_threads: int = Field(
        default=0,
        description="ORT intra-op threads per run (0: all cores for a lone run, 1 for overlapping runs)",
    )
    onnx_workers: int = Field(default=0, description="concurrent ORT runs (0: one per core)")
    model_name: str = "cxr-detector"
    triton_production_url: str = "127.0.0.1:8000"
    triton_canary_url: str = "127.0.0.1:8100"
    triton_staging_url: str = "127.0.0.1:8200"
    serving_stages: list[Stage] = Field(
        default_factory=lambda: list[Stage](["production"]),
        description="stages whose Triton must hold a model before /readyz says ready",
    )
    triton_timeout_s: float = 10.0

    # --- auth and limits --------------------------------------------------------
    api_keys_file: Path | None = None
    auth_enabled: bool = True
    max_body_bytes: int = 64 * 1024 * 1024
    max_feedback_bytes: int = Field(
        default=1024 * 1024, description="largest POST /v1/feedback body (CXR_MAX_FEEDBACK_BYTES)"
    )
    request_timeout_s: float = 30.0
    rate_limit_per_s: float = 200.0
    rate_limit_burst: int = 400
    auth_fail_rate_per_s: float = Field(
        default=1.0, description="failed authentications refilled per second, per client address"
    )
    auth_fail_burst: int = Field(
        default=20, description="failed authentications a client address may make before getting 429s"
    )
    max_inflight_per_stage: int = 32
    overload_retry_after_s: int = 1
    worker_threads: int = 4
    decode_timeout_s: float = Field(
        default=10.0, gt=0, description="a DICOM that takes longer to decode is refused (422)"
    )
    max_decode_queue: int = Field(
        default=64, ge=1, description="decodes waiting for a worker beyond this get 503 + Retry-After"
    )

    # --- inference ---------------------------------------------------------------
    max_side: int = Field(
        default=1024,
        description="shrink longer images to this side first, as the dataset builder does (CXR_MAX_SIDE)",
    )
    max_backend_batch: int = Field(
        default=8, description="images per inference call (the model's max_batch_size)"
    )
    conf_threshold: float = 0.25
    iou_threshold: float = 0.7
    max_detections: int = 300
    saliency_grid: int = Field(
        default=12,
        ge=3,
        le=32,
        description="occlusion saliency: cells per image side; (grid - 1)^2 + 1 inferences per result",
    )
    saliency_timeout_s: float = Field(
        default=120.0, gt=0, description="a saliency map not computed within this is a 504"
    )
    saliency_concurrency: int = Field(
        default=1, ge=1, description="saliency maps computed at once; the others wait their turn"
    )
    saliency_cache_items: int = Field(default=128, ge=1, description="saliency maps kept in memory")

    # --- routing -----------------------------------------------------------------
    shadow_fraction: float = 0.0
    routing_poll_s: float = 2.0

    # --- results, feedback, drift --------------------------------------------------
    store_results: bool = True
    results_cache_items: int = 256
    results_cache_bytes: int = 512 * 1024 * 1024
    results_retention_days: int = 30
    source_retention_hours: float = Field(
        default=24.0,
        gt=0,
        description="identified source images (for SR and feedback) are deleted after this many hours",
    )
    results_dir: Path | None = Field(
        default=None, description="local result journal; default <stack>/serving/results"
    )
    housekeeping_interval_s: float = Field(
        default=3600.0, gt=0, description="how often the retention job runs"
    )
    spool_dir: Path | None = None
    spool_retry_s: float = 5.0
    ephemeral_disk: bool = Field(
        default=False,
        description="the gateway's disk dies with it (a cluster pod's emptyDir): when it stops, hand its "
        "queued PACS objects, spooled feedback and audit log to the object store, and adopt the PACS "
        "objects other replicas handed off (CXR_EPHEMERAL_DISK; serving/gateway/handoff.py)",
    )
    deid_secret: str = Field(
        default="",
        description="secret behind feedback pseudonyms and audit hashes (CXR_DEID_SECRET); empty: the "
        "install's own (credentials.json, else generated into <stack_dir>/install_secret)",
    )
    feedback_allow_burned_in: bool = Field(
        default=False,
        description="keep feedback on DICOMs whose pixels may identify the patient (BurnedInAnnotation or "
        "RecognizableVisualFeatures YES, Secondary Capture), labelled PatientIdentityRemoved NO "
        "(CXR_FEEDBACK_ALLOW_BURNED_IN); default: refused with 422, since no pixel data are cleaned",
    )
    drift_window: int = 200
    drift_min_samples: int = 20
    prediction_drift_window: int = Field(
        default=500, ge=1, description="answers (images) per stage compared with the version's val split"
    )
    prediction_drift_min_samples: int = Field(
        default=50, ge=1, description="prediction drift is scored once and then every this many images"
    )
    prediction_drift_min_detections: int = Field(
        default=50,
        ge=1,
        description="a class's confidence PSI needs this many of its detections in the window",
    )
    reference_stats: Path | None = None
    audit_log: Path | None = Field(
        default=None, description="audit JSON lines (CXR_AUDIT_LOG); default <stack_dir>/serving/audit.jsonl"
    )
    audit_max_bytes: int = Field(
        default=50 * 1024 * 1024,
        ge=1024,
        description="rotate the audit log at this size (CXR_AUDIT_MAX_BYTES)",
    )
    audit_backups: int = Field(
        default=10, ge=1, description="rotated audit files kept: audit.jsonl.1 ... .N (CXR_AUDIT_BACKUPS)"
    )
    public_base_url: str = ""

    # --- PACS round trip: DIMSE in, results out, DICOMweb pull, triage ------------------
    dimse_ae_title: str = Field(default="CXR", description="our storage SCP's AE title (CXR_DIMSE_AE_TITLE)")
    dimse_host: str = Field(default="127.0.0.1", description="address the storage SCP listens on")
    dimse_port: int = Field(default=11112, ge=1, le=65535, description="storage SCP port (CXR_DIMSE_PORT)")
    dimse_allowed_aes: list[str] = Field(
        default_factory=list,
        description="calling AE titles the SCP accepts (CXR_DIMSE_ALLOWED_AES, JSON list); empty: any",
    )
    dimse_spool_dir: Path | None = Field(
        default=None, description="received instances, written before C-STORE success; default <stack>/dimse"
    )
    dimse_max_associations: int = Field(default=8, ge=1, description="concurrent DIMSE associations")
    study_settle_seconds: float = Field(
        default=5.0,
        gt=0,
        description="a DIMSE study is complete (results sent back) once no instance arrived for this long",
    )
    study_max_wait_seconds: float = Field(
        default=300.0,
        gt=0,
        description="a DIMSE study that never settles is sent back once its first instance is this old "
        "(CXR_STUDY_MAX_WAIT_SECONDS); later instances form its next round",
    )
    dimse_max_study_instances: int = Field(
        default=500,
        ge=1,
        description="instances of one study the SCP spool holds; a new one beyond gets 0xA700 "
        "(CXR_DIMSE_MAX_STUDY_INSTANCES)",
    )
    dimse_max_spool_instances: int = Field(
        default=20_000,
        ge=1,
        description="instances the SCP spool holds in all; a new one beyond gets 0xA700 "
        "(CXR_DIMSE_MAX_SPOOL_INSTANCES)",
    )
    dimse_max_spool_studies: int = Field(
        default=2_000,
        ge=1,
        description="studies the SCP spool holds; an instance of a new one beyond gets 0xA700 "
        "(CXR_DIMSE_MAX_SPOOL_STUDIES)",
    )
    dimse_min_free_inodes: int = Field(
        default=20_000,
        ge=0,
        description="free inodes the SCP spool leaves on its file system: 0xA700 below "
        "(CXR_DIMSE_MIN_FREE_INODES; not checked where the file system counts none)",
    )
    dimse_forward_concurrency: int = Field(
        default=4, ge=1, le=32, description="DIMSE studies the SCP has a gateway request open for at once"
    )
    dimse_gateway_url: str = Field(
        default="http://127.0.0.1:8080",
        description="the gateway the SCP hands images (STOW-RS) and settled studies to",
    )
    dimse_api_key: str = Field(
        default="", description="the SCP's key for the gateway; empty: the pacs key of credentials.json"
    )
    pacs_destinations: list[PacsDestination] = Field(
        default_factory=list, description="where SR + presentation states go back to (CXR_PACS_DESTINATIONS)"
    )
    pacs_secondary_capture: bool = Field(
        default=False, description="also send a Secondary Capture with the boxes burned in (derived)"
    )
    pacs_dicomweb_url: str = Field(
        default="",
        description="the PACS studies are pulled from (QIDO-RS/WADO-RS root; CXR_PACS_DICOMWEB_URL)",
    )
    pacs_dicomweb_headers: dict[str, str] = Field(
        default_factory=dict, description="headers for the pull PACS, e.g. Authorization (JSON object)"
    )
    pacs_max_study_instances: int = Field(
        default=64,
        ge=1,
        description="largest study a pull analyses, and the most images (the latest) a study's worklist "
        "row, and so its send-back, covers",
    )
    outbox_dir: Path | None = Field(
        default=None, description="results waiting for a PACS; default <stack>/serving/outbox"
    )
    outbox_retry_s: float = Field(default=2.0, gt=0, description="first retry delay; doubles per failure")
    outbox_max_backoff_s: float = Field(default=300.0, gt=0, description="longest delay between retries")
    triage_threshold: float = Field(
        default=0.5, ge=0.0, le=1.0, description="a study with abnormality score >= this is flagged priority"
    )
    worklist_hours: float = Field(default=24.0, gt=0, description="GET /v1/worklist shows this many hours")
    worklist_url: str = Field(
        default="",
        repr=False,  # it holds the database password
        description="PostgreSQL the worklist lives in, shared by every gateway replica "
        "(postgresql://USER:PASSWORD@HOST:PORT/DB); empty: a SQLite file under <stack_dir>/serving",
    )
    worklist_timeout_s: float = Field(
        default=5.0, gt=0, le=60, description="longest wait for a worklist database connection"
    )

    @field_validator("worklist_url")
    @classmethod
    def _worklist_url(cls, value: str) -> str:
        if value and not value.startswith(("postgresql://", "postgres://")):
            # the value is not echoed: it may hold a password
            raise ValueError("CXR_WORKLIST_URL must be a postgresql:// URL (or empty for a SQLite file)")
        return value

    @field_validator("shadow_fraction")
    @classmethod
    def _fraction(cls, value: float) -> float:
        if not 0.0 <= value <= 1.0:
            raise ValueError("CXR_SHADOW_FRACTION must be between 0 and 1")
        return value

    def triton_url(self, stage: Stage) -> str:
        """HTTP host:port of the stage's Triton (the contract names HTTP; gRPC is port + 1)."""
        return {
            "production": self.triton_production_url,
            "canary": self.triton_canary_url,
            "staging": self.triton_staging_url,
        }[stage]

    def triton_grpc_url(self, stage: Stage) -> str:
        host, _, port = self.triton_url(stage).rpartition(":")
        return f"{host}:{int(port) + 1}"

    @property
    def resolved_results_dir(self) -> Path:
        return self.results_dir or self.stack_dir / "serving" / "results"

    @property
    def resolved_spool_dir(self) -> Path:
        return self.spool_dir or self.stack_dir / "serving" / "spool"

    @property
    def resolved_dimse_spool_dir(self) -> Path:
        return self.dimse_spool_dir or self.stack_dir / "dimse"

    @property
    def resolved_outbox_dir(self) -> Path:
        return self.outbox_dir or self.stack_dir / "serving" / "outbox"

    @property
    def resolved_worklist_db(self) -> Path:
        return self.stack_dir / "serving" / "worklist.sqlite"

    @property
    def resolved_audit_log(self) -> Path:
        return self.audit_log or self.stack_dir / "serving" / "audit.jsonl"

    @property
    def resolved_api_keys_file(self) -> Path:
        return self.api_keys_file or self.stack_dir / "api_keys.json"
