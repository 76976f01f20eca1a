"""The MLflow model registry as delivery sees it: version facts, stage aliases, the ONNX file.

An alias per stage (``staging``, ``canary``, ``production``) mirrors the overlay files so the
MLflow UI shows what serves where; the files stay the truth (a ``git revert`` wins, and the
next promote/rollback or reconcile re-points the alias).
"""

from __future__ import annotations

import logging
from pathlib import Path

import httpx
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from delivery.errors import RegistryError
from delivery.gates import VersionFacts

log = logging.getLogger(__name__)


class ModelRegistry:
    """Registry calls against one tracking server (the URI is explicit: no global MLflow state)."""

    def __init__(self, tracking_uri: str, model_name: str) -> None:
        self.tracking_uri = tracking_uri
        self.model_name = model_name
        self._client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
        self._reachable = False

    def _ensure_reachable(self, what: str) -> None:
        """Fail in seconds, not after MLflow's client has retried with backoff for minutes."""
        if self._reachable or not self.tracking_uri.startswith("http"):
            return
        try:
            httpx.get(f"{self.tracking_uri.rstrip('/')}/health", timeout=5.0).raise_for_status()
        except httpx.HTTPError as exc:
            raise self._unreachable(exc, what) from exc
        self._reachable = True

    def _unreachable(self, exc: Exception, what: str) -> RegistryError:
        return RegistryError(
            f"MLflow at {self.tracking_uri} failed while {what}: {exc}. "
            "Is the stack up (`cxr stack status`) and CXR_MLFLOW_URI right?"
        )

    def facts(self, version: str) -> VersionFacts:
        """Lineage tags of a registered version; an unknown version is a clear error."""
        self._ensure_reachable(f"reading version {version}")
        try:
            mv = self._client.get_model_version(self.model_name, version)
        except MlflowException as exc:
            if "RESOURCE_DOES_NOT_EXIST" in str(exc.error_code) or "not found" in str(exc).lower():
                raise RegistryError(
                    f"{self.model_name} version {version} is not registered in MLflow at "
                    f"{self.tracking_uri}; "
                    "list versions in the MLflow UI or with `cxr train evaluate`"
                ) from exc
            raise self._unreachable(exc, f"reading version {version}") from exc
        except Exception as exc:  # connection errors surface as requests/urllib3 exceptions
            raise self._unreachable(exc, f"reading version {version}") from exc
        return VersionFacts(version=str(mv.version), tags=dict(mv.tags or {}))

    def set_alias(self, stage: str, version: str) -> None:
        """Point the stage's alias at ``version``, or remove it when the stage serves nothing."""
        self._ensure_reachable(f"setting alias {stage}")
        try:
            if version:
                self._client.set_registered_model_alias(self.model_name, stage, version)
            else:
                self._client.delete_registered_model_alias(self.model_name, stage)
        except MlflowException as exc:
            if not version and "RESOURCE_DOES_NOT_EXIST" in str(exc.error_code):
                return
            raise self._unreachable(exc, f"setting alias {stage}") from exc
        except Exception as exc:
            raise self._unreachable(exc, f"setting alias {stage}") from exc
        log.info("registry_alias model=%s alias=%s version=%s", self.model_name, stage, version or "none")

    def alias_version(self, stage: str) -> str:
        """Version the alias points at, "" if none."""
        try:
            return str(self._client.get_model_version_by_alias(self.model_name, stage).version)
        except MlflowException:
            return ""

    def download_onnx(self, version: str, dest_dir: Path) -> Path:
        """Fetch a version's ONNX into ``dest_dir`` through training's registry helper (one code path).

        Training's settings object is built with this registry's URI and model name, so the
        delivery CLI's ``--mlflow-uri`` and the stage file's ``model_name`` are honoured.
        """
        from training.config import TrainSettings
        from training.errors import RegistryError as TrainingRegistryError
        from training.registry import download_onnx

        settings = TrainSettings(mlflow_uri=self.tracking_uri, registered_model=self.model_name)
        try:
            return download_onnx(version, dest_dir, settings)
        except TrainingRegistryError as exc:
            raise RegistryError(f"{exc} (MLflow at {self.tracking_uri})") from exc
