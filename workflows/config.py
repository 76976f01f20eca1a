"""Settings of the retrain pipeline, read once from ``CXR_*`` environment variables.

Two audiences read this object: the Hera definitions (what the cluster runs:
image, namespace, schedules, resources) and the step functions (where the
local stack is: state dir, MLflow, the GitOps checkout). Keeping both here
means a rendered WorkflowTemplate and a local ``cxr pipeline run`` cannot
disagree about, say, the feedback threshold.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field

from core.settings import CoreSettings


class WorkflowSettings(CoreSettings):
    """Every setting of ``workflows``; env prefix ``CXR_`` (e.g. ``CXR_FEEDBACK_THRESHOLD=100``).

    The stack fields (state dir, S3, MLflow) come from :class:`core.settings.CoreSettings`.
    """

    # --- pipeline defaults (local runner and the WorkflowTemplate's parameters) ----
    training_config: str = Field(
        default="training/configs/cpu-small.yaml", description="training config for `cxr pipeline run`"
    )
    cluster_training_config: str = Field(
        default="training/configs/gpu-large.yaml", description="training config the Argo template defaults to"
    )
    base_model: str = Field(
        default="production",
        description="fine-tune from: 'production' (that stage's version, if any), 'none', or a version",
    )
    prelaunch_training: bool = Field(
        default=True,
        description=(
            "the local runner starts the train step's Ray workers at the start of a run, beside the data "
            "steps, where Ray is local (training/prelaunch.py); false: they start in the train step"
        ),
    )
    feedback_threshold: int = Field(
        default=50, ge=1, description="feedback items since the last dataset version that trigger a retrain"
    )
    incoming_prefix: str = Field(
        default="incoming/",
        description="store prefix where new studies (dicom/ + annotations.csv) are dropped",
    )
    pipeline_prefix: str = Field(
        default="pipelines/", description="store prefix for hand-offs between cluster steps and run records"
    )

    # --- cluster rendering (Hera) ---------------------------------------------------------
    image: str = Field(
        default="ghcr.io/cxr-detect/cxr-detect:0.1.0",
        description="project image every step runs (the one `make image` builds, as k8s/ uses)",
    )
    namespace: str = Field(default="cxr", description="namespace Argo Workflows watches (k8s/platform)")
    service_account: str = "cxr-pipeline"
    gitops_repo_url: str = "git@git.hospital.example:radiology/cxr-detect.git"
    gitops_deploy_key_secret: str = Field(
        default="cxr-gitops-deploy-key",
        description="Secret with ssh-privatekey + known_hosts for promote's push",
    )
    s3_credentials_secret: str = Field(
        default="cxr-s3",
        description="Secret with access_key/secret_key of the in-cluster MinIO (k8s/base/secrets)",
    )
    install_secret: str = Field(
        default="cxr-install-secret",
        description="Secret with CXR_PATIENT_SALT, the install secret (k8s/base/secrets/install-secret.yaml)",
    )
    cluster_s3_endpoint: str = "http://minio.cxr.svc.cluster.local:9000"
    artifact_key_prefix: str = Field(
        default="argo-artifacts/",
        description="key prefix of Argo's artifact repository in the bucket (the ingest step's `staged`)",
    )
    cluster_mlflow_uri: str = "http://mlflow.cxr.svc.cluster.local:5000"
    weekly_schedule: str = Field(
        default="0 3 * * 1", description="cron of the weekly retrain (Mondays 03:00)"
    )
    feedback_check_schedule: str = Field(
        default="17 * * * *", description="cron of the hourly feedback check"
    )
    schedule_timezone: str = "Europe/Berlin"
    ray_gpu_workers: int = Field(default=2, ge=1, description="RayJob GPU workers (Argo parameter default)")
    ray_version: str = "2.60.0"
    train_deadline_s: int = Field(
        default=12 * 3600,
        ge=600,
        description="RayJob activeDeadlineSeconds: KubeRay fails (and frees the GPUs of) a longer training",
    )

    # --- the one-machine scheduler (keeps the rendered CronWorkflows: workflows/scheduler.py) ----
    scheduler: bool = Field(
        default=True,
        description="`make up` starts the `scheduler` component (false: retrains only by hand)",
    )
    schedules_dir: Path | None = Field(
        default=None, description="rendered CronWorkflows the scheduler keeps (default: k8s/workflows)"
    )
    scheduler_cron: dict[str, str] = Field(
        default_factory=dict,
        description='override crons by CronWorkflow name, "*" for all (tests, demos); a 6th field is seconds',
    )
    scheduler_command: list[str] = Field(
        default_factory=list,
        description="run this instead of `cxr pipeline run` when a schedule fires (tests: a quick command)",
    )
    scheduler_poll_s: float = Field(
        default=5.0, gt=0, description="how often the scheduler looks at its running retrain and the clock"
    )


@lru_cache(maxsize=1)
def get_settings() -> WorkflowSettings:
    """The process-wide settings, built on first use (never at import time)."""
    return WorkflowSettings()
