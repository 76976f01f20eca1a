"""The RayJob can run what it is given: the training config's resources, files and stage file.

- each GPU worker pod has what the cluster training config asks per Ray worker (CPU, memory, GPU),
  so Ray can place every rank (a worker asking more than its pod has waits forever);
- the config the train step names exists in the image, relative to its working directory;
- the Ray pods can write CXR_STACK_DIR, and the head (where the entrypoint resolves "fine-tune
  from production") reads production's live stage file, optional so a first install trains.
"""

from __future__ import annotations

import re
from pathlib import Path, PurePosixPath
from typing import Any

import pytest

from core.stage_file import stage_file_path
from delivery.cluster_fit.tree import parse_manifest, rayjob_pod_templates
from training.config import TrainConfig, load_config
from workflows.config import WorkflowSettings
from workflows.retrain import rayjob_manifest

pytestmark = pytest.mark.unit

REPO_ROOT = Path(__file__).resolve().parents[3]
GIB = 1024**3
# Host memory one GPU rank needs besides what it hands to the GPU: the model with its EMA and
# optimizer state copied to the CPU at every checkpoint, decoded 1024 px images, CUDA's context.
MIN_WORKER_MEMORY = 8 * GIB
MIN_MEMORY_BESIDE_SHM = 4 * GIB  # /dev/shm is a tmpfs: it counts against the container's limit


def _cpu(quantity: str) -> float:
    return int(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)


def _bytes(quantity: str) -> int:
    units = {"Ki": 1024, "Mi": 1024**2, "Gi": 1024**3, "Ti": 1024**4, "K": 10**3, "M": 10**6, "G": 10**9}
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([KMGT]i?)?", quantity)
    assert match, quantity
    return int(float(match.group(1)) * units.get(match.group(2) or "", 1))


def _pods(settings: WorkflowSettings) -> dict[str, dict[str, Any]]:
    return rayjob_pod_templates(parse_manifest(rayjob_manifest(settings)))


def _cluster_config(settings: WorkflowSettings) -> TrainConfig:
    return load_config(REPO_ROOT / settings.cluster_training_config)


def test_gpu_worker_pods_have_what_the_cluster_config_asks_per_ray_worker(
    settings: WorkflowSettings,
) -> None:
    scaling = _cluster_config(settings).scaling
    pod = _pods(settings)["worker gpu"]["spec"]
    (container,) = pod["containers"]
    requests, limits = container["resources"]["requests"], container["resources"]["limits"]
    # Ray schedules a rank on {"CPU": cpus_per_worker, "GPU": gpus_per_worker}; KubeRay gives the
    # node the pod's CPUs and GPUs: the request is what the pod is sure to get
    assert _cpu(requests["cpu"]) >= scaling.cpus_per_worker, (requests, scaling)
    assert _cpu(limits["cpu"]) >= scaling.torch_threads, "more torch threads than the pod's CPUs"
    assert scaling.use_gpu
    assert float(requests["nvidia.com/gpu"]) == float(limits["nvidia.com/gpu"]) == scaling.gpus_per_worker
    # memory: guaranteed (request == limit), enough for a rank, and enough beside the /dev/shm tmpfs
    assert _bytes(requests["memory"]) == _bytes(limits["memory"]) >= MIN_WORKER_MEMORY
    shm = next(v for v in pod["volumes"] if v["name"] == "dshm")["emptyDir"]
    assert shm["medium"] == "Memory"
    assert _bytes(limits["memory"]) - _bytes(shm["sizeLimit"]) >= MIN_MEMORY_BESIDE_SHM


def test_the_agreement_check_catches_a_config_asking_more_than_the_pod(settings: WorkflowSettings) -> None:
    scaling = _cluster_config(settings).scaling
    too_big = scaling.model_copy(update={"cpus_per_worker": 8})
    (container,) = _pods(settings)["worker gpu"]["spec"]["containers"]
    assert _cpu(container["resources"]["requests"]["cpu"]) < too_big.cpus_per_worker


def _runtime_stage(dockerfile: str) -> list[str]:
    """The instructions of the Dockerfile's last stage (the image that runs), continuation lines joined."""
    lines = dockerfile.replace("\\\n", " ").splitlines()
    start = max(i for i, line in enumerate(lines) if line.upper().startswith("FROM "))
    return [line.strip() for line in lines[start:] if line.strip() and not line.startswith("#")]


def test_the_config_the_train_step_names_is_in_the_image_under_its_workdir(
    settings: WorkflowSettings,
) -> None:
    stage = _runtime_stage((REPO_ROOT / "Dockerfile").read_text())
    workdir = PurePosixPath([line.split()[1] for line in stage if line.upper().startswith("WORKDIR ")][-1])
    config = PurePosixPath(settings.cluster_training_config)
    assert not config.is_absolute(), "the entrypoint passes it as is: relative to the image's WORKDIR"
    in_image = workdir / config
    copied = [
        (PurePosixPath(parts[-2]), PurePosixPath(parts[-1].rstrip("/")))
        for line in stage
        if line.upper().startswith("COPY ") and "--from" not in line
        for parts in [line.split()]
    ]
    sources = [src for src, dest in copied if in_image.is_relative_to(dest)]
    assert sources, f"{in_image} is not copied into the runtime image (only {[str(d) for _, d in copied]})"
    # ... and copied from where the repository keeps it
    src = sources[0]
    dest = next(d for s, d in copied if s == src)
    assert (REPO_ROOT / str(src).rstrip("/") / in_image.relative_to(dest)).is_file()


def _env(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in container.get("env", [])}


def test_ray_pods_can_write_the_stack_dir(settings: WorkflowSettings) -> None:
    for name, pod in _pods(settings).items():
        volumes = {v["name"]: v for v in pod["spec"].get("volumes", [])}
        for container in pod["spec"]["containers"]:
            stack_dir = _env(container).get("CXR_STACK_DIR")
            if not stack_dir:
                continue
            mounts = [
                m
                for m in container.get("volumeMounts", [])
                if PurePosixPath(stack_dir).is_relative_to(m["mountPath"])
            ]
            assert mounts, f"{name}: nothing writable is mounted at {stack_dir}"
            assert "emptyDir" in volumes[mounts[-1]["name"]], name
            assert not mounts[-1].get("readOnly"), name
    assert {"head", "worker gpu"} <= {
        n for n, p in _pods(settings).items() if any(_env(c) for c in p["spec"]["containers"])
    }


def test_the_head_reads_productions_live_stage_file_and_trains_without_one(
    settings: WorkflowSettings,
) -> None:
    head = _pods(settings)["head"]["spec"]
    (container,) = head["containers"]
    gitops = _env(container)["CXR_GITOPS_DIR"]
    wanted = PurePosixPath(stage_file_path(Path(gitops), "production").as_posix())
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == str(wanted.parent))
    assert mount["readOnly"] is True
    volume = next(v for v in head["volumes"] if v["name"] == mount["name"])
    config_map = volume["configMap"]
    assert config_map["name"] == "cxr-model-production"  # k8s/overlays/production's generator
    assert config_map["optional"] is True, "a cluster without production yet must still train"
    assert {"key": "model.yaml", "path": wanted.name} in config_map["items"]
    # the workers do not resolve the base model: they keep the image's defaults
    (worker,) = _pods(settings)["worker gpu"]["spec"]["containers"]
    assert "CXR_GITOPS_DIR" not in _env(worker)
