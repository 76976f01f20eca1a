"""The stack fields every package's settings share, read from ``CXR_*`` variables.

``DataSettings``, ``TrainSettings``, ``ServingSettings``, ``WorkflowSettings`` and the
stack's ``StackSettings`` inherit from :class:`CoreSettings`, so ``CXR_STACK_DIR``,
``CXR_S3_*``, ``CXR_MLFLOW_URI``, ``CXR_REGISTERED_MODEL`` and ``CXR_GITOPS_DIR`` are
declared once and mean the same in every command.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from core.credentials import resolve_s3_keys


class CoreSettings(BaseSettings):
    """Where the stack's state and servers are (env prefix ``CXR_``)."""

    # A refused value is never quoted in the error: pydantic echoes ``input_value`` by default, and
    # a wrong CXR_WORKLIST_URL (its password), CXR_PACS_DESTINATIONS (their Authorization headers)
    # or any other secret-bearing setting would reach the console and the component's log in clear.
    # Subclasses' own ``model_config`` is merged with this one, so every package's settings keep it.
    model_config = SettingsConfigDict(env_prefix="CXR_", extra="ignore", hide_input_in_errors=True)

    stack_dir: Path = Path(".stack")
    s3_endpoint: str = "http://127.0.0.1:8333"
    s3_access_key: str = ""
    s3_secret_key: str = ""
    s3_region: str = "us-east-1"
    s3_bucket: str = "cxr"
    mlflow_uri: str = "http://127.0.0.1:5000"
    registered_model: str = Field(default="cxr-detector", description="MLflow model training registers into")
    mlflow_experiment: str = Field(
        default="cxr-detector", description="MLflow experiment of the training runs (the exporter reads it)"
    )
    gitops_dir: Path = Field(
        default=Path("."),
        description="git checkout holding k8s/overlays (promote commits, the gateway reads)",
    )

    def s3_keys(self) -> tuple[str, str]:
        """``CXR_S3_ACCESS_KEY``/``_SECRET_KEY``, else the stack's ``credentials.json``.

        Raises :class:`core.errors.CredentialsError` when that file is garbled.
        """
        return resolve_s3_keys(self.s3_access_key, self.s3_secret_key, self.stack_dir)
