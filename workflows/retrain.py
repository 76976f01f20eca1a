"""The retrain pipeline as Argo Workflows objects, written with Hera.

Three objects, rendered to ``k8s/workflows/`` by :mod:`workflows.render` and
synced into the cluster by ArgoCD:

- WorkflowTemplate ``cxr-retrain``: the DAG ``check-parameters >> ingest >> validate >>
  build-dataset >> train >> evaluate >> export >> register >> promote-to-staging``.
  Every step is the project image running ``cxr pipeline step <name>``, i.e. the
  same function of :mod:`workflows.steps` that ``cxr pipeline run`` calls on one
  machine. ``train`` is a KubeRay ``RayJob`` created as a resource template (N
  GPU workers) that Argo watches until it succeeds or fails. Argo pastes parameters into
  that manifest as text, so it gets only what ``check-parameters`` checked and handed on
  (:mod:`workflows.parameters`), and its entrypoint is a fixed command reading them from
  the head's environment: no value is ever part of a shell string.
- CronWorkflow ``cxr-retrain-weekly``: submits the template every week.
- CronWorkflow ``cxr-retrain-on-feedback``: every hour counts radiologists'
  feedback items newer than the last dataset version and submits the template
  when there are at least N.

Plus the ConfigMap ``artifact-repositories``: the namespace's default Argo artifact
repository (the in-cluster MinIO), which the S3 artifacts below need.

Hand-offs: the staged raw data travels as an S3 artifact (that artifact
repository); the dataset version and model version as parameters; the
train step's result (the RayJob cannot write Argo output files) as a small JSON
record in the store under ``pipelines/<workflow name>/``.

Cluster fit (docs/cluster.md): every pod runs as ServiceAccount ``cxr-pipeline``
(k8s/base/rbac, its rights listed in workflows/permissions.yaml), meets Pod
Security "restricted", and carries the labels the NetworkPolicies of
k8s/base/network select (:data:`POD_LABELS`, :data:`RAY_LABELS`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, NamedTuple
from urllib.parse import urlsplit

import yaml
from hera.workflows import (
    DAG,
    Artifact,
    Container,
    CronWorkflow,
    EmptyDirVolume,
    Env,
    Parameter,
    Resource,
    Resources,
    RetryStrategy,
    SecretEnv,
    SecretVolume,
    Task,
    WorkflowTemplate,
)
from hera.workflows import models as m

from workflows.config import WorkflowSettings
from workflows.parameters import CHECKED_PARAMETERS, MAX_WORKERS, TRAIN_STEP_ENV

TEMPLATE_NAME = "cxr-retrain"
WEEKLY_NAME = "cxr-retrain-weekly"
FEEDBACK_NAME = "cxr-retrain-on-feedback"
OUTPUTS_DIR = "/tmp/outputs"
STAGED_DIR = "/work/staged"
DEPLOY_KEY_MOUNT = "/etc/cxr/git"
LABELS = {"app.kubernetes.io/part-of": "cxr-detect", "app.kubernetes.io/component": "retrain"}
ARTIFACT_REPOSITORIES = "artifact-repositories"  # the ConfigMap name Argo looks up by default
ARTIFACT_REPOSITORY_KEY = "minio"
# Labels of every workflow pod (podMetadata). k8s/base/network selects them: part-of cxr-training may
# reach MinIO and MLflow, name cxr-pipeline the API server (the executor's WorkflowTaskResults).
POD_LABELS = {
    "app.kubernetes.io/name": "cxr-pipeline",
    "app.kubernetes.io/part-of": "cxr-training",
    "app.kubernetes.io/component": "retrain-step",
}
# ... and the one step that pushes to git gets SSH egress to the git server (NetworkPolicy cxr-pipeline-git)
GIT_EGRESS_LABELS = {"cxr.io/egress": "git"}
# Labels of the RayJob's pods (plus app.kubernetes.io/component: ray-head|ray-worker|ray-submitter):
# they talk to each other on any TCP port (NetworkPolicy cxr-ray) and to MinIO and MLflow.
RAY_LABELS = {"app.kubernetes.io/name": "cxr-ray", "app.kubernetes.io/part-of": "cxr-training"}
RUN_AS = 10001  # the image's user (Dockerfile: useradd --uid 10001)
# Pod Security "restricted" (namespace cxr enforces it): these at pod level, and per container
# allowPrivilegeEscalation: false + capabilities.drop [ALL]; the Argo executor's containers get the
# same from the controller's `executor.securityContext` (k8s/platform/argo-workflows.yaml).
POD_SECURITY: dict[str, Any] = {
    "runAsNonRoot": True,
    "runAsUser": RUN_AS,
    "runAsGroup": RUN_AS,
    "fsGroup": RUN_AS,
    "seccompProfile": {"type": "RuntimeDefault"},
}
CONTAINER_SECURITY: dict[str, Any] = {
    "runAsNonRoot": True,
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
    "seccompProfile": {"type": "RuntimeDefault"},
}
# The RayJob: fail on either status (a job KubeRay gave up on, e.g. past its deadline or with a
# failed submitter, has jobDeploymentStatus Failed while jobStatus may never reach FAILED).
# Argo fails the step when ANY comma-separated failure requirement holds.
RAYJOB_SUCCESS = "status.jobStatus == SUCCEEDED"
RAYJOB_FAILURE = "status.jobStatus in (FAILED,STOPPED),status.jobDeploymentStatus == Failed"
# the train step outlives the RayJob's own deadline by this much, so KubeRay's DeadlineExceeded
# (which also tears the Ray cluster down) is what normally ends an overlong training
TRAIN_STEP_GRACE_S = 1800
GPU_NODE_SELECTOR = {"nvidia.com/gpu.present": "true"}
GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
# The Ray pods' writable scratch: CXR_STACK_DIR (/work/state: dataset cache, ultralytics' run folders)
# lies under /work, which the image does not have and its user cannot create.
RAY_WORK_VOLUME = {"name": "work", "emptyDir": {"sizeLimit": "100Gi"}}
RAY_WORK_MOUNT = {"name": "work", "mountPath": "/work"}
# "Fine-tune from production" reads production's stage file on the Ray head (the RayJob's entrypoint,
# `cxr pipeline step train`, runs there): the live one, from the ConfigMap k8s/overlays/production
# generates, mounted where the GitOps repository keeps it (as the gateway does), not the image's copy.
GITOPS_MOUNT = "/etc/cxr/gitops"
PRODUCTION_STAGE_CONFIGMAP = "cxr-model-production"
PRODUCTION_STAGE_DIR = f"{GITOPS_MOUNT}/k8s/overlays/production"

# The cluster DAG's first step: it refuses bad training parameters before hours of data steps, and
# hands the train step the checked values (the local runner passes them as Python values: no check).
CHECK_STEP = "check-parameters"
# The order of the DAG after CHECK_STEP; the local runner (workflows.pipeline_cli) walks the same list.
STEP_ORDER = (
    "ingest",
    "validate",
    "build-dataset",
    "train",
    "evaluate",
    "export",
    "register",
    "promote-to-staging",
)


def _infra_retry(limit: int = 3) -> RetryStrategy:
    """Retries for steps that only fail for infrastructure reasons (store, MLflow, git remote).

    ``Always`` because a store outage surfaces as a non-zero exit, not a pod error;
    exponential backoff so a restarting MinIO gets minutes, not a burst of retries.
    """
    return RetryStrategy(
        limit=limit,
        retry_policy="Always",
        backoff=m.Backoff(duration="30s", factor=m.IntOrString(2), max_duration="15m"),
    )


def _retrain_mutex() -> m.Synchronization:
    """The mutex ``cxr-retrain``: one retrain at a time in the namespace, the others queue behind it.

    The feedback CronWorkflow holds it too: a retrain counts its feedback as consumed only once its
    build-dataset step has published a version (hours in), so a check beside it would count the same
    items again and queue a second full training on the same data. Holding the mutex, the check waits
    for the running retrain (and ``concurrencyPolicy: Forbid`` skips the fires meanwhile), as the
    one-machine scheduler skips a fire while a retrain runs; the retrain it submits waits the seconds
    until the check workflow ends.
    """
    return m.Synchronization(mutexes=[m.Mutex(name=TEMPLATE_NAME)])


def _pod_error_retry() -> RetryStrategy:
    """Retry only when the pod itself was lost (node gone, eviction): a real failure must stay failed."""
    return RetryStrategy(
        limit=2, retry_policy="OnError", backoff=m.Backoff(duration="1m", factor=m.IntOrString(2))
    )


def _env(settings: WorkflowSettings) -> list[Env | SecretEnv]:
    """What every step needs to find the store and MLflow in the cluster."""
    return [
        Env(name="CXR_S3_ENDPOINT", value=settings.cluster_s3_endpoint),
        Env(name="CXR_S3_BUCKET", value=settings.s3_bucket),
        Env(name="CXR_MLFLOW_URI", value=settings.cluster_mlflow_uri),
        Env(name="CXR_STACK_DIR", value="/work/state"),
        SecretEnv(
            name="CXR_S3_ACCESS_KEY", secret_name=settings.s3_credentials_secret, secret_key="access_key"
        ),
        SecretEnv(
            name="CXR_S3_SECRET_KEY", secret_name=settings.s3_credentials_secret, secret_key="secret_key"
        ),
        # the PatientID hash that keeps a patient in one split: one value per install, every run
        SecretEnv(
            name="CXR_PATIENT_SALT", secret_name=settings.install_secret, secret_key="CXR_PATIENT_SALT"
        ),
    ]


def _env_models(settings: WorkflowSettings) -> list[dict[str, Any]]:
    """The same environment as plain Kubernetes dicts, for the RayJob's pods."""
    return [e.build().model_dump(by_alias=True, exclude_none=True) for e in _env(settings)]


def _step(
    settings: WorkflowSettings,
    name: str,
    args: list[str],
    *,
    inputs: list[Parameter | Artifact] | None = None,
    outputs: list[Parameter | Artifact] | None = None,
    retry: RetryStrategy | None = None,
    deadline_s: int,
    cpu: str = "1",
    memory: str = "2Gi",
    volume_mounts: list[m.VolumeMount] | None = None,
    extra_env: list[Env] | None = None,
    labels: dict[str, str] | None = None,
) -> Container:
    """One DAG step: the project image running ``cxr pipeline step <name> ...``.

    Requests are what the step needs to make progress (the capacity check sums them); the CPU
    limit lets it burst to twice that, memory is capped at the request (no overcommit).
    """
    return Container(
        name=name,
        image=settings.image,
        command=["cxr", "pipeline", "step", name],
        args=args,
        inputs=inputs or [],
        outputs=outputs or [],
        env=[*_env(settings), *(extra_env or [])],
        resources=Resources(
            cpu_request=cpu, cpu_limit=_twice(cpu), memory_request=memory, memory_limit=memory
        ),
        retry_strategy=retry,
        active_deadline_seconds=deadline_s,
        volume_mounts=[*_SCRATCH_MOUNTS, *(volume_mounts or [])],
        labels=labels,
        security_context=m.SecurityContext(
            run_as_non_root=True,
            read_only_root_filesystem=True,
            allow_privilege_escalation=False,
            capabilities=m.Capabilities(drop=["ALL"]),
            seccomp_profile=m.SeccompProfile(type="RuntimeDefault"),
        ),
    )


def _twice(cpu: str) -> str:
    """Twice a CPU quantity ("500m" -> "1", "1" -> "2")."""
    millis = int(cpu[:-1]) if cpu.endswith("m") else int(float(cpu) * 1000)
    return f"{millis * 2 // 1000}" if millis * 2 % 1000 == 0 else f"{millis * 2}m"


def _pod_security() -> m.PodSecurityContext:
    """:data:`POD_SECURITY` as Hera's model, for the workflow-level ``securityContext``."""
    return m.PodSecurityContext.model_validate(POD_SECURITY)


def _pod_metadata() -> m.Metadata:
    """Every workflow pod's labels (:data:`POD_LABELS`): the NetworkPolicies' selectors."""
    return m.Metadata(labels=dict(POD_LABELS))


# Writable scratch for a read-only root filesystem: staged data and datasets
# under /work, Argo output files and library caches under /tmp.
_SCRATCH_MOUNTS = [
    m.VolumeMount(name="work", mount_path="/work"),
    m.VolumeMount(name="tmp", mount_path="/tmp"),
]


def _scratch_volumes() -> list[EmptyDirVolume]:
    """Per-pod emptyDir volumes backing :data:`_SCRATCH_MOUNTS`."""
    return [
        EmptyDirVolume(name="work", size_limit=m.Quantity("100Gi")),
        EmptyDirVolume(name="tmp", size_limit=m.Quantity("10Gi")),
    ]


def _task(template: Container | Resource, **kwargs: Any) -> Task:
    """Call ``template`` inside a DAG context; Hera types that as ``Step | Task | None``."""
    task = template(**kwargs)
    if not isinstance(task, Task):
        raise TypeError(f"{template.name} must be called inside a DAG context")
    return task


def _out(name: str) -> Parameter:
    """An output parameter read from the file the step wrote under OUTPUTS_DIR."""
    return Parameter(name=name, value_from=m.ValueFrom(path=f"{OUTPUTS_DIR}/{name}"))


def _ray_pod(
    settings: WorkflowSettings,
    component: str,
    containers: list[dict[str, Any]],
    security: dict[str, Any],
    **spec: Any,
) -> dict[str, Any]:
    """A pod template of the RayJob: labelled for the NetworkPolicies, restricted, without an API token.

    The Ray pods never call the Kubernetes API (no autoscaler), so the ServiceAccount's token is
    not mounted; ``security`` is the pod-level context shared by every Ray pod (one YAML anchor).
    """
    return {
        "metadata": {"labels": {**RAY_LABELS, "app.kubernetes.io/component": component}},
        "spec": {
            "serviceAccountName": settings.service_account,
            "automountServiceAccountToken": False,
            "securityContext": security,
            **spec,
            "containers": containers,
        },
    }


def _ray_head_group(
    settings: WorkflowSettings, env: list[dict[str, Any]], pod: dict[str, Any], container: dict[str, Any]
) -> dict[str, Any]:
    """The CPU-only head: it schedules the job and must never take a GPU (nor tolerate the GPU taint).

    It runs the job's entrypoint, so it also gets production's stage file (the base model of a
    fine-tune) under ``CXR_GITOPS_DIR``; the ConfigMap is optional: without a production release
    yet the folder is empty, the stage serves nothing and training starts from scratch. And the
    entrypoint's options, each in its own quoted env value (:func:`_train_step_env`).
    """
    head = {
        "name": "ray-head",
        "image": settings.image,
        "env": [
            *copy.deepcopy(env),
            {"name": "CXR_GITOPS_DIR", "value": GITOPS_MOUNT},
            *_train_step_env(),
        ],
        "resources": {"requests": {"cpu": "1", "memory": "4Gi"}, "limits": {"cpu": "2", "memory": "4Gi"}},
        "securityContext": container,
        "volumeMounts": [
            dict(RAY_WORK_MOUNT),
            {"name": "production-stage-file", "mountPath": PRODUCTION_STAGE_DIR, "readOnly": True},
        ],
    }
    volumes = [
        copy.deepcopy(RAY_WORK_VOLUME),
        {
            "name": "production-stage-file",
            "configMap": {
                "name": PRODUCTION_STAGE_CONFIGMAP,
                "optional": True,
                "items": [{"key": "model.yaml", "path": "model.yaml"}],
            },
        },
    ]
    return {
        "rayStartParams": {"num-gpus": "0"},
        "template": _ray_pod(settings, "ray-head", [head], pod, volumes=volumes),
    }


def _ray_worker_group(
    settings: WorkflowSettings, env: list[dict[str, Any]], pod: dict[str, Any], container: dict[str, Any]
) -> dict[str, Any]:
    """The GPU workers, one DDP rank each; ``replicas`` is a placeholder Argo fills from ``workers``."""
    worker = {
        "name": "ray-worker",
        "image": settings.image,
        "env": env,
        "resources": {
            "requests": {"cpu": "2", "memory": "8Gi", "nvidia.com/gpu": "1"},
            "limits": {"cpu": "3", "memory": "8Gi", "nvidia.com/gpu": "1"},
        },
        "securityContext": container,
        "volumeMounts": [dict(RAY_WORK_MOUNT), {"name": "dshm", "mountPath": "/dev/shm"}],
    }
    template = _ray_pod(
        settings,
        "ray-worker",
        [worker],
        pod,
        # only the GPU nodes, whose NoSchedule taint only these pods tolerate
        nodeSelector=dict(GPU_NODE_SELECTOR),
        tolerations=[dict(GPU_TOLERATION)],
        # PyTorch DataLoader workers and NCCL need more than 64 MiB of shm.
        volumes=[
            copy.deepcopy(RAY_WORK_VOLUME),
            {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "4Gi"}},
        ],
    )
    return {
        "groupName": "gpu",
        "replicas": "__WORKERS__",
        "minReplicas": 1,
        "maxReplicas": MAX_WORKERS,
        "rayStartParams": {},
        "template": template,
    }


def _ray_submitter(
    settings: WorkflowSettings, pod: dict[str, Any], container: dict[str, Any]
) -> dict[str, Any]:
    """The pod of KubeRay's submitter Job (K8sJobMode): without it KubeRay's default is not restricted.

    No command: KubeRay fills in ``ray job submit ...`` against the head's dashboard (8265).
    """
    submitter = {
        "name": "ray-job-submitter",
        "image": settings.image,
        "resources": {
            "requests": {"cpu": "200m", "memory": "256Mi"},
            "limits": {"cpu": "500m", "memory": "512Mi"},
        },
        "securityContext": container,
    }
    return _ray_pod(settings, "ray-submitter", [submitter], pod, restartPolicy="Never")


# The RayJob's entrypoint (a shell command line on the head): fixed, its options come from the
# head's environment (TRAIN_STEP_ENV), so no parameter value is ever parsed by a shell.
TRAIN_ENTRYPOINT = "cxr pipeline step train"


def _train_step_env() -> list[dict[str, str]]:
    """The train step's inputs (and the workflow's name) as the head's env, one quoted scalar each.

    Argo pastes the values in as text: the DAG passes this step only values ``check-parameters``
    checked (plain tokens, no quote, no newline) and the dataset version build-dataset computed.
    """
    return [
        {
            "name": env,
            "value": "{{workflow.name}}" if name == "run-name" else f"{{{{inputs.parameters.{name}}}}}",
        }
        for name, env in TRAIN_STEP_ENV.items()
    ]


def rayjob_manifest(settings: WorkflowSettings) -> str:
    """The KubeRay RayJob the ``train`` step creates: one CPU head, N GPU workers, a submitter pod.

    Returned as text because Argo substitutes ``{{...}}`` in the manifest before
    parsing it. Every placeholder is a quoted scalar but ``replicas``, which must end
    up an integer, so is written unquoted (invalid YAML until Argo fills it in, by
    design): it is ``check-parameters``' ``workers`` output, a number it checked.
    The entrypoint is :data:`TRAIN_ENTRYPOINT`, the same whatever the parameters.
    """
    # One pod and one container securityContext shared by every pod: the dump writes each once (as
    # YAML anchors). The env is the steps' (the head's copy adds CXR_GITOPS_DIR).
    env = _env_models(settings)
    pod_security = copy.deepcopy(POD_SECURITY)
    container_security = copy.deepcopy(CONTAINER_SECURITY)
    manifest = {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": {
            "generateName": "cxr-train-",
            "namespace": settings.namespace,
            "labels": {**LABELS, "workflows.argoproj.io/workflow": "{{workflow.name}}"},
        },
        "spec": {
            "entrypoint": TRAIN_ENTRYPOINT,
            "submissionMode": "K8sJobMode",
            "shutdownAfterJobFinishes": True,
            "ttlSecondsAfterFinished": 3600,
            # KubeRay marks the job Failed (reason DeadlineExceeded) and deletes its cluster after this
            "activeDeadlineSeconds": settings.train_deadline_s,
            "backoffLimit": 0,
            "submitterPodTemplate": _ray_submitter(settings, pod_security, container_security),
            "rayClusterSpec": {
                "rayVersion": settings.ray_version,
                "headGroupSpec": _ray_head_group(settings, env, pod_security, container_security),
                "workerGroupSpecs": [_ray_worker_group(settings, env, pod_security, container_security)],
            },
        },
    }
    text = yaml.safe_dump(manifest, sort_keys=False, width=1000)
    return text.replace("__WORKERS__", "{{inputs.parameters.workers}}")


def _parameters(settings: WorkflowSettings) -> list[Parameter]:
    """The template's parameters and their defaults (what a weekly run uses)."""
    return [
        Parameter(
            name="dataset-source",
            value=f"s3://{settings.s3_bucket}/{settings.incoming_prefix}",
            description="new studies (dicom/ + annotations.csv): s3://bucket/prefix or a path",
        ),
        Parameter(
            name="training-config",
            value=settings.cluster_training_config,
            description="training config file inside the image (a repository-relative .yaml path)",
        ),
        Parameter(
            name="base-model",
            value=settings.base_model,
            description="fine-tune from: 'production' (its version), 'none', or a registered version",
        ),
        Parameter(
            name="epochs", value="0", description="override the config's epochs (0 = keep the config's)"
        ),
        Parameter(
            name="workers",
            value=str(settings.ray_gpu_workers),
            description=f"Ray GPU workers (1-{MAX_WORKERS})",
        ),
        Parameter(name="include-feedback", value="true", description="merge radiologists' feedback"),
    ]


class _RetrainSteps(NamedTuple):
    """The DAG's step templates (:data:`CHECK_STEP`, then :data:`STEP_ORDER`), so the wiring can name each."""

    check: Container
    ingest: Container
    validate: Container
    build: Container
    train: Resource
    evaluate: Container
    export: Container
    register: Container
    promote: Container


def _retrain_workflow(settings: WorkflowSettings) -> WorkflowTemplate:
    """The workflow-level spec: parameters, one run at a time, deadline, pod GC, TTL, volumes, and
    what every pod gets (ServiceAccount, labels, Pod Security context, the artifact repository)."""
    return WorkflowTemplate(
        name=TEMPLATE_NAME,
        namespace=settings.namespace,
        labels=LABELS,
        annotations={
            "workflows.argoproj.io/description": (
                "Retrain the CXR detector on new data + feedback and promote it to staging."
            ),
            "cxr-detect/generated-by": "workflows/retrain.py (cxr pipeline render)",
        },
        entrypoint="retrain",
        on_exit="exit-handler",
        service_account_name=settings.service_account,
        pod_metadata=_pod_metadata(),
        artifact_repository_ref=m.ArtifactRepositoryRef(
            config_map=ARTIFACT_REPOSITORIES, key=ARTIFACT_REPOSITORY_KEY
        ),
        arguments=_parameters(settings),
        active_deadline_seconds=36 * 3600,
        synchronization=_retrain_mutex(),
        pod_gc=m.PodGC(strategy="OnPodSuccess"),
        ttl_strategy=m.TTLStrategy(seconds_after_success=7 * 24 * 3600, seconds_after_failure=14 * 24 * 3600),
        volumes=[
            *_scratch_volumes(),
            SecretVolume(
                name="git-deploy-key", secret_name=settings.gitops_deploy_key_secret, default_mode=0o400
            ),
        ],
        security_context=_pod_security(),
    )


def _check_parameters_step(settings: WorkflowSettings) -> Container:
    """Refuse training parameters the RayJob must not receive; hand on the checked values.

    Each parameter is a separate argument (as every step gets them); a refused one fails the
    workflow at once with a message naming it, never retried (only a lost pod is).
    """
    names = CHECKED_PARAMETERS
    args = [arg for name in names for arg in (f"--{name}", f"{{{{inputs.parameters.{name}}}}}")]
    return _step(
        settings,
        CHECK_STEP,
        [*args, "--outputs", OUTPUTS_DIR],
        inputs=[Parameter(name=name) for name in names],
        outputs=[_out(name) for name in names],
        retry=_pod_error_retry(),
        deadline_s=300,
        cpu="500m",
        memory="1Gi",
    )


def _ingest_step(settings: WorkflowSettings) -> Container:
    """Stage the new studies (+ feedback) and hand them on as the ``staged`` S3 artifact."""
    return _step(
        settings,
        "ingest",
        [
            "--source",
            "{{inputs.parameters.dataset-source}}",
            "--include-feedback",
            "{{inputs.parameters.include-feedback}}",
            "--dest",
            STAGED_DIR,
            "--outputs",
            OUTPUTS_DIR,
        ],
        inputs=[Parameter(name="dataset-source"), Parameter(name="include-feedback")],
        outputs=[_out("n-images"), _out("n-feedback-rows"), Artifact(name="staged", path=STAGED_DIR)],
        retry=_infra_retry(),
        deadline_s=2 * 3600,
    )


def _validate_step(settings: WorkflowSettings) -> Container:
    """Check the staged annotations; only a lost pod is retried, bad data must stay failed."""
    return _step(
        settings,
        "validate",
        ["--staged", STAGED_DIR, "--outputs", OUTPUTS_DIR],
        inputs=[Artifact(name="staged", path=STAGED_DIR)],
        outputs=[_out("bad-rows")],
        retry=_pod_error_retry(),
        deadline_s=3600,
    )


def _build_dataset_step(settings: WorkflowSettings) -> Container:
    """Build and publish the versioned dataset; its version is the ``train`` step's input."""
    return _step(
        settings,
        "build-dataset",
        [
            "--staged",
            STAGED_DIR,
            "--out",
            "/work/datasets",
            "--include-feedback",
            "{{inputs.parameters.include-feedback}}",
            "--outputs",
            OUTPUTS_DIR,
        ],
        inputs=[Parameter(name="include-feedback"), Artifact(name="staged", path=STAGED_DIR)],
        outputs=[_out("dataset-version"), _out("n-images")],
        retry=_infra_retry(),
        deadline_s=4 * 3600,
        cpu="2",  # decodes every DICOM of the version in a process pool
        memory="8Gi",
    )


def _train_step(settings: WorkflowSettings) -> Resource:
    """Create the RayJob (see :func:`rayjob_manifest`) and let Argo watch it to success or failure."""
    return Resource(
        name="train",
        action="create",
        set_owner_reference=True,
        manifest=rayjob_manifest(settings),
        success_condition=RAYJOB_SUCCESS,
        failure_condition=RAYJOB_FAILURE,
        inputs=[
            Parameter(name="dataset-version"),
            Parameter(name="training-config"),
            Parameter(name="base-model"),
            Parameter(name="epochs"),
            Parameter(name="workers"),
        ],
        outputs=[Parameter(name="rayjob-name", value_from=m.ValueFrom(json_path="{.metadata.name}"))],
        # no retry: the RayJob is created under a generated name, so a retry after its watcher pod
        # was lost would start a second training beside the first, both writing the run's train.json
        # and each registering a model version. A lost watcher fails the run; it is started again.
        active_deadline_seconds=settings.train_deadline_s + TRAIN_STEP_GRACE_S,
    )


def _post_train_steps(settings: WorkflowSettings) -> tuple[Container, Container, Container]:
    """Evaluate, export and register: each finds the train result by the workflow's name."""
    run_args = ["--run-name", "{{workflow.name}}", "--outputs", OUTPUTS_DIR]
    evaluate = _step(
        settings,
        "evaluate",
        run_args,
        outputs=[
            _out("map50"),
            _out("map40"),
            Artifact(name="evaluation", path=f"{OUTPUTS_DIR}/evaluation.json"),
        ],
        retry=_infra_retry(2),
        deadline_s=3600,
    )
    export = _step(
        settings,
        "export",
        run_args,
        outputs=[_out("onnx-sha256"), _out("parity-max-abs-diff")],
        retry=_infra_retry(2),
        deadline_s=3600,
    )
    register = _step(
        settings,
        "register",
        run_args,
        outputs=[_out("model-version")],
        retry=_infra_retry(),
        deadline_s=900,
        cpu="500m",
        memory="1Gi",
    )
    return evaluate, export, register


def _git_env() -> list[Env]:
    """SSH with the mounted deploy key (pinned host keys) and a bot identity for the promotion commit."""
    return [
        Env(
            name="GIT_SSH_COMMAND",
            value=(
                f"ssh -i {DEPLOY_KEY_MOUNT}/ssh-privatekey"
                f" -o UserKnownHostsFile={DEPLOY_KEY_MOUNT}/known_hosts -o StrictHostKeyChecking=yes"
            ),
        ),
        Env(name="GIT_AUTHOR_NAME", value="cxr-retrain"),
        Env(name="GIT_AUTHOR_EMAIL", value="cxr-retrain@cxr-detect.invalid"),
        Env(name="GIT_COMMITTER_NAME", value="cxr-retrain"),
        Env(name="GIT_COMMITTER_EMAIL", value="cxr-retrain@cxr-detect.invalid"),
    ]


def _promote_step(settings: WorkflowSettings) -> Container:
    """Push the new version to the GitOps repo's staging overlay; the only step that writes to git."""
    return _step(
        settings,
        "promote-to-staging",
        [
            "--model-version",
            "{{inputs.parameters.model-version}}",
            "--stage",
            "staging",
            "--git-url",
            settings.gitops_repo_url,
            "--push",
            "--outputs",
            OUTPUTS_DIR,
        ],
        inputs=[Parameter(name="model-version")],
        outputs=[_out("promoted"), _out("reason")],
        retry=_infra_retry(),
        deadline_s=900,
        cpu="500m",
        memory="1Gi",
        volume_mounts=[m.VolumeMount(name="git-deploy-key", mount_path=DEPLOY_KEY_MOUNT, read_only=True)],
        extra_env=_git_env(),
        labels=dict(GIT_EGRESS_LABELS),
    )


def _exit_handler(settings: WorkflowSettings) -> None:
    """The onExit DAG: record how the run ended (and what failed) whatever happened."""
    record_exit = _step(
        settings,
        "record-exit",
        [
            "--run-name",
            "{{workflow.name}}",
            "--status",
            "{{inputs.parameters.status}}",
            "--failures",
            "{{inputs.parameters.failures}}",
        ],
        inputs=[Parameter(name="status"), Parameter(name="failures", default="[]")],
        retry=_infra_retry(2),
        deadline_s=300,
        cpu="500m",
        memory="1Gi",
    )
    # {{workflow.failures}} exists only when something failed, so it is read only then.
    with DAG(name="exit-handler"):
        _task(
            record_exit,
            name="record-failure",
            arguments={"status": "{{workflow.status}}", "failures": "{{workflow.failures}}"},
            when="{{workflow.status}} != Succeeded",
        )
        _task(
            record_exit,
            name="record-success",
            arguments={"status": "{{workflow.status}}"},
            when="{{workflow.status}} == Succeeded",
        )


def _retrain_dag(steps: _RetrainSteps) -> None:
    """The ``retrain`` DAG: call each step with its hand-offs, chain CHECK_STEP and :data:`STEP_ORDER`.

    The train step gets its parameters from ``check-parameters``' outputs, never the workflow's.
    """
    with DAG(name="retrain"):
        t_check = _task(
            steps.check,
            arguments={name: f"{{{{workflow.parameters.{name}}}}}" for name in CHECKED_PARAMETERS},
        )
        t_ingest = _task(
            steps.ingest,
            arguments={
                "dataset-source": "{{workflow.parameters.dataset-source}}",
                "include-feedback": "{{workflow.parameters.include-feedback}}",
            },
        )
        t_validate = _task(steps.validate, arguments=[t_ingest.get_artifact("staged").with_name("staged")])
        t_build = _task(
            steps.build,
            arguments=[
                t_ingest.get_artifact("staged").with_name("staged"),
                Parameter(name="include-feedback", value="{{workflow.parameters.include-feedback}}"),
            ],
        )
        t_train = _task(
            steps.train,
            arguments={
                "dataset-version": t_build.get_parameter("dataset-version").value,
                **{name: t_check.get_parameter(name).value for name in CHECKED_PARAMETERS},
            },
        )
        t_evaluate = _task(steps.evaluate)
        t_export = _task(steps.export)
        t_register = _task(steps.register)
        t_promote = _task(
            steps.promote, arguments={"model-version": t_register.get_parameter("model-version").value}
        )
        t_check >> t_ingest
        # Hera types `a >> b` as `Task | list[Task]`, which mypy will not chain.
        t_ingest >> t_validate >> t_build >> t_train >> t_evaluate >> t_export >> t_register >> t_promote  # type: ignore[operator]


def build_retrain_template(settings: WorkflowSettings) -> WorkflowTemplate:
    """WorkflowTemplate ``cxr-retrain``: the whole retrain DAG."""
    # [1] the workflow-level spec; each template made inside it registers itself, in this order
    with _retrain_workflow(settings) as wt:
        # [2] the step templates: the parameter check, then STEP_ORDER: data, train (a KubeRay RayJob),
        # model, promotion
        steps = _RetrainSteps(
            _check_parameters_step(settings),
            _ingest_step(settings),
            _validate_step(settings),
            _build_dataset_step(settings),
            _train_step(settings),
            *_post_train_steps(settings),
            _promote_step(settings),
        )
        # [3] the onExit handler that records how the run ended
        _exit_handler(settings)
        # [4] the retrain DAG: each step's hand-offs, chained: CHECK_STEP, then STEP_ORDER
        _retrain_dag(steps)
    return wt


def build_weekly_cron(settings: WorkflowSettings) -> CronWorkflow:
    """CronWorkflow ``cxr-retrain-weekly``: the template with its defaults, once a week."""
    return CronWorkflow(
        name=WEEKLY_NAME,
        namespace=settings.namespace,
        labels=LABELS,
        schedules=[settings.weekly_schedule],
        timezone=settings.schedule_timezone,
        concurrency_policy="Forbid",
        starting_deadline_seconds=3600,
        successful_jobs_history_limit=4,
        failed_jobs_history_limit=4,
        workflow_template_ref=m.WorkflowTemplateRef(name=TEMPLATE_NAME),
    )


def submitted_workflow_manifest(settings: WorkflowSettings) -> str:
    """The Workflow object the feedback trigger creates: the retrain template, by reference."""
    manifest = {
        "apiVersion": "argoproj.io/v1alpha1",
        "kind": "Workflow",
        "metadata": {
            "generateName": f"{TEMPLATE_NAME}-feedback-",
            "namespace": settings.namespace,
            "labels": {**LABELS, "cxr-detect/trigger": "feedback"},
        },
        "spec": {
            "workflowTemplateRef": {"name": TEMPLATE_NAME},
            "arguments": {"parameters": [{"name": "include-feedback", "value": "true"}]},
        },
    }
    return yaml.safe_dump(manifest, sort_keys=False)


def build_feedback_cron(settings: WorkflowSettings) -> CronWorkflow:
    """CronWorkflow ``cxr-retrain-on-feedback``: hourly, submit a retrain once N feedback items waited."""
    with CronWorkflow(
        name=FEEDBACK_NAME,
        namespace=settings.namespace,
        labels=LABELS,
        schedules=[settings.feedback_check_schedule],
        timezone=settings.schedule_timezone,
        concurrency_policy="Forbid",
        starting_deadline_seconds=600,
        successful_jobs_history_limit=3,
        failed_jobs_history_limit=3,
        entrypoint="check-and-submit",
        service_account_name=settings.service_account,
        pod_metadata=_pod_metadata(),
        # counts from the start, not while it waits for the mutex (a Pending workflow has not started)
        active_deadline_seconds=1800,
        synchronization=_retrain_mutex(),
        arguments=[
            Parameter(
                name="threshold",
                value=str(settings.feedback_threshold),
                description="feedback items since the last dataset version that trigger a retrain",
            )
        ],
        volumes=_scratch_volumes(),
        security_context=_pod_security(),
    ) as cw:
        check = _step(
            settings,
            "check-feedback",
            ["--threshold", "{{inputs.parameters.threshold}}", "--outputs", OUTPUTS_DIR],
            inputs=[Parameter(name="threshold")],
            outputs=[_out("new-feedback"), _out("should-retrain")],
            retry=_infra_retry(2),
            deadline_s=600,
            cpu="500m",
            memory="1Gi",
        )
        submit = Resource(
            name="submit-retrain",
            action="create",
            manifest=submitted_workflow_manifest(settings),
            outputs=[Parameter(name="workflow-name", value_from=m.ValueFrom(json_path="{.metadata.name}"))],
        )
        with DAG(name="check-and-submit"):
            t_check = _task(check, arguments={"threshold": "{{workflow.parameters.threshold}}"})
            t_submit = _task(submit, when=f"{t_check.get_parameter('should-retrain').value} == true")
            t_check >> t_submit
    return cw


class _LiteralDumper(yaml.SafeDumper):
    """Writes multi-line strings as ``|`` blocks, so a ConfigMap's embedded YAML reads as YAML."""


def _str_presenter(dumper: yaml.SafeDumper, data: str) -> yaml.ScalarNode:
    style = "|" if "\n" in data else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", data, style=style)


_LiteralDumper.add_representer(str, _str_presenter)


@dataclass(frozen=True)
class PlainObject:
    """A plain Kubernetes object rendered beside the Argo ones, with Hera's ``to_dict``/``to_yaml``."""

    manifest: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return copy.deepcopy(self.manifest)

    def to_yaml(self) -> str:
        return yaml.dump(self.manifest, Dumper=_LiteralDumper, sort_keys=False)


def artifact_repository(settings: WorkflowSettings) -> dict[str, Any]:
    """Argo's S3 artifact repository on the in-cluster MinIO, with the keys the steps use for S3."""
    endpoint = urlsplit(settings.cluster_s3_endpoint)
    prefix = settings.artifact_key_prefix.strip("/")
    return {
        "s3": {
            "endpoint": endpoint.netloc,
            "bucket": settings.s3_bucket,
            "insecure": endpoint.scheme == "http",  # in-cluster MinIO speaks plain HTTP
            "keyFormat": f"{prefix}/{{{{workflow.name}}}}/{{{{pod.name}}}}",
            "accessKeySecret": {"name": settings.s3_credentials_secret, "key": "access_key"},
            "secretKeySecret": {"name": settings.s3_credentials_secret, "key": "secret_key"},
        }
    }


def build_artifact_repositories(settings: WorkflowSettings) -> PlainObject:
    """ConfigMap ``artifact-repositories``: the namespace's default artifact repository.

    The annotation makes it the default for every workflow in the namespace; the retrain template
    also names it (``artifactRepositoryRef``). The executor reads the S3 keys from the Secret,
    which Argo mounts into the pod: no Secret access for the ServiceAccount.
    """
    return PlainObject(
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {
                "name": ARTIFACT_REPOSITORIES,
                "namespace": settings.namespace,
                "labels": dict(LABELS),
                "annotations": {"workflows.argoproj.io/default-artifact-repository": ARTIFACT_REPOSITORY_KEY},
            },
            "data": {ARTIFACT_REPOSITORY_KEY: yaml.safe_dump(artifact_repository(settings), sort_keys=False)},
        }
    )


def build_all(settings: WorkflowSettings) -> dict[str, WorkflowTemplate | CronWorkflow | PlainObject]:
    """Every object to render, keyed by the file name it is committed under."""
    return {
        f"{TEMPLATE_NAME}.yaml": build_retrain_template(settings),
        f"{WEEKLY_NAME}.yaml": build_weekly_cron(settings),
        f"{FEEDBACK_NAME}.yaml": build_feedback_cron(settings),
        f"{ARTIFACT_REPOSITORIES}.yaml": build_artifact_repositories(settings),
    }
