"""Settings of the one-machine stack: where its state lives and which loopback ports it uses.

The stack is its own package (orchestration on one machine), so it owns this one
settings object (the stack fields every package shares come from ``core``); every
port in DESIGN.md's stack contract is a field here and can be overridden with a
``CXR_`` environment variable.
"""

from __future__ import annotations

import sys
from pathlib import Path

from pydantic import Field

from core.credentials import credentials_path
from core.settings import CoreSettings
from core.stages import STAGES


class StackSettings(CoreSettings):
    """Ports, folders and names of the one-machine stack (all bound to loopback)."""

    host: str = "127.0.0.1"
    s3_port: int = 8333
    # SeaweedFS' own internal servers (master, volume, filer) each need a port; kept
    # away from the gateway's 8080 which the volume server would otherwise take.
    weed_master_port: int = 9333
    weed_volume_port: int = 9340
    weed_filer_port: int = 8888
    mlflow_port: int = 5000
    gateway_port: int = 8080
    prometheus_port: int = 9090
    mlflow_exporter_port: int = 9105
    triton_production_port: int = 8000
    triton_canary_port: int = 8100
    triton_staging_port: int = 8200
    # our storage SCP (serving.dimse); the same CXR_DIMSE_* variables configure the SCP itself
    dimse_port: int = 11112
    dimse_ae_title: str = "CXR"
    # Orthanc, the PACS twin: started when installed (Debian's orthanc + orthanc-dicomweb)
    orthanc: bool = Field(default=True, description="start Orthanc, the PACS twin, when it is installed")
    orthanc_http_port: int = 8042
    orthanc_dicom_port: int = 4242
    mlflow_bucket: str = "mlflow"
    triton_venv: Path = Field(default=Path(".venv-triton"), description="Triton's own env (numpy<2)")
    python: Path = Field(default=Path(sys.executable), description="interpreter of the main env")
    health_timeout_s: float = 90.0
    bootstrap: bool = Field(default=True, description="train and promote a first model when none exists")

    def triton_http_port(self, stage: str) -> int:
        """HTTP port of a stage's Triton; gRPC is +1 and metrics +2 (DESIGN.md)."""
        ports = {
            "production": self.triton_production_port,
            "canary": self.triton_canary_port,
            "staging": self.triton_staging_port,
        }
        if stage not in ports:
            raise ValueError(f"unknown stage {stage!r}; expected one of {', '.join(STAGES)}")
        return ports[stage]

    @property
    def state(self) -> Path:
        return self.stack_dir.resolve()

    @property
    def credentials_file(self) -> Path:
        return credentials_path(self.state)

    @property
    def env_file(self) -> Path:
        return self.state / "stack.env"

    @property
    def gitops_checkout(self) -> Path:
        """The stack's own clone of the GitOps repository (see gitops_checkout.py)."""
        return self.state / "gitops-checkout"

    @property
    def api_keys_file(self) -> Path:
        return self.state / "api_keys.json"
