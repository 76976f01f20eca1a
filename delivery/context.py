"""Where delivery finds things: built once from the serving package's settings.

Delivery is part of ``serving`` and so reads ``serving.config.ServingSettings`` (the package's one
settings object) instead of its own environment.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from core.stage_file import DEFAULT_MODEL_NAME
from core.stages import PROMOTION_ORDER, Stage
from serving.config import ServingSettings


@dataclass(frozen=True)
class DeliveryContext:
    """Addresses and folders one delivery command works with."""

    gitops_dir: Path
    mlflow_uri: str
    prometheus_url: str
    stack_dir: Path
    model_name: str = DEFAULT_MODEL_NAME
    triton_urls: tuple[tuple[Stage, str], ...] = ()

    @classmethod
    def from_settings(cls, settings: ServingSettings | None = None, **overrides: object) -> DeliveryContext:
        s = settings or ServingSettings()
        values: dict[str, object] = {
            "gitops_dir": Path(s.gitops_dir),
            "mlflow_uri": s.mlflow_uri,
            "prometheus_url": s.prometheus_url,
            "stack_dir": Path(s.stack_dir),
            "model_name": s.model_name,
            "triton_urls": tuple((stage, s.triton_url(stage)) for stage in PROMOTION_ORDER),
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)  # type: ignore[arg-type]

    def triton_url(self, stage: Stage) -> str | None:
        return dict(self.triton_urls).get(stage)

    @property
    def local_repo_root(self) -> Path:
        """The one-machine stack's Triton repositories: ``<stack>/triton/<stage>`` (stack)."""
        return self.stack_dir.resolve() / "triton"

    @property
    def onnx_cache(self) -> Path:
        return self.stack_dir.resolve() / "gitops" / "onnx"

    @property
    def golden_cache(self) -> Path:
        """The fetched golden set and each model's per-image results on it (delivery/golden_gate.py)."""
        return self.stack_dir.resolve() / "gitops" / "golden"
