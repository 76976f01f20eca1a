"""The MLflow model registry entry of each trained model: ``cxr-detector`` versions with lineage tags.

Training only ever CREATES versions. Aliases (``staging``, ``canary``,
``production``) are the delivery pipeline's decision (``cxr promote``), made
after gates and review; a training job that set them would bypass both.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from training.config import TrainSettings
from training.errors import RegistryError

log = logging.getLogger(__name__)

ONNX_ARTIFACT_DIR = "onnx"
ONNX_FILE = "model.onnx"
WEIGHTS_ARTIFACT = "weights/best.pt"


class LineageTags(BaseModel):
    """Tags on every registered version; promotion gates and the gateway read them by these names."""

    dataset_version: str
    git_commit: str
    config_sha256: str
    onnx_sha256: str
    map50: float
    map40: float
    parity_max_abs_diff: float
    imgsz: int
    classes: int

    def as_tags(self) -> dict[str, str]:
        return {key: str(value) for key, value in self.model_dump().items()}


def _client(settings: TrainSettings) -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=settings.mlflow_uri)


def register_version(
    settings: TrainSettings,
    run_id: str,
    tags: LineageTags,
    model_card: str,
    run_tags: dict[str, str] | None = None,
) -> str:
    """Register the run's ONNX artifact as a new version of ``cxr-detector``; returns the version number."""
    from mlflow.exceptions import MlflowException

    client = _client(settings)
    name = settings.registered_model
    try:
        if not client.search_registered_models(filter_string=f"name='{name}'"):
            client.create_registered_model(
                name,
                description="Chest X-ray finding detector (YOLO11, 14 VinDr-CXR classes), ONNX for Triton.",
            )
    except MlflowException as exc:
        if "RESOURCE_ALREADY_EXISTS" not in str(exc):  # a parallel run created it first: fine
            raise RegistryError(f"cannot create registered model {name}: {exc}") from exc
    try:
        run = client.get_run(run_id)
        source = f"{run.info.artifact_uri}/{ONNX_ARTIFACT_DIR}"
        version = client.create_model_version(
            name,
            source=source,
            run_id=run_id,
            tags={**tags.as_tags(), **(run_tags or {})},
            description=model_card,
        )
    except MlflowException as exc:
        raise RegistryError(f"cannot register a version of {name} from run {run_id}: {exc}") from exc
    log.info("event=model_registered name=%s version=%s run_id=%s", name, version.version, run_id)
    return str(version.version)


def get_version(settings: TrainSettings, version: str) -> Any:
    """The MLflow ModelVersion, or a :class:`RegistryError` naming what exists."""
    from mlflow.exceptions import MlflowException

    try:
        return _client(settings).get_model_version(settings.registered_model, str(version))
    except MlflowException as exc:
        raise RegistryError(
            f"{settings.registered_model} version {version} not found at {settings.mlflow_uri}: {exc}"
        ) from exc


def _download(settings: TrainSettings, version: str, artifact: str, dest: Path) -> Path:
    import mlflow.artifacts

    mv = get_version(settings, version)
    dest.mkdir(parents=True, exist_ok=True)
    try:
        local = mlflow.artifacts.download_artifacts(
            run_id=mv.run_id, artifact_path=artifact, dst_path=str(dest), tracking_uri=settings.mlflow_uri
        )
    except Exception as exc:  # MlflowException or an S3 error behind the proxy
        raise RegistryError(
            f"cannot download {artifact} of {settings.registered_model} v{version}: {exc}"
        ) from exc
    return Path(local)


def download_onnx(version: str, dest: Path, settings: TrainSettings | None = None) -> Path:
    """The ONNX file of a registered version (artifact ``onnx/model.onnx`` of its run) under ``dest``."""
    return _download(settings or TrainSettings(), version, f"{ONNX_ARTIFACT_DIR}/{ONNX_FILE}", dest)


def download_weights(version: str, dest: Path, settings: TrainSettings | None = None) -> Path:
    """The PyTorch checkpoint of a registered version, the starting point for fine-tuning."""
    return _download(settings or TrainSettings(), version, WEIGHTS_ARTIFACT, dest)
