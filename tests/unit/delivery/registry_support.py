"""A model registry answered from memory: each version's files and the lineage tags recording their sha256.

The slice of :class:`training.registry.ModelRegistry` the ONNX cache uses (``delivery/onnx_cache.py``).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from core.variants import DEFAULT_VARIANT, variant_tag
from training.registry import VersionFacts

MODEL = "cxr-detector"
MLFLOW = "http://mlflow.invalid"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class TaggedRegistry:
    """``files[(version, variant)]`` is what the artifact store holds; ``tags[version]`` what MLflow says."""

    def __init__(self, model_name: str = MODEL, tracking_uri: str = MLFLOW) -> None:
        self.model_name = model_name
        self.tracking_uri = tracking_uri
        self.files: dict[tuple[str, str], bytes] = {}
        self.tags: dict[str, dict[str, str]] = {}
        self.downloads: list[tuple[str, str]] = []
        self.offline = False  # MLflow down: every question raises RegistryUnreachable

    def register(
        self, version: str, data: bytes, variant: str = DEFAULT_VARIANT, *, tagged: bool = True
    ) -> TaggedRegistry:
        """The version's ``variant`` file, its sha256 tagged as training does (unless ``tagged`` is off)."""
        self.files[(version, variant)] = data
        if tagged:
            key = "onnx_sha256" if variant == DEFAULT_VARIANT else variant_tag(variant, "sha256")
            self.tags.setdefault(version, {})[key] = sha256(data)
        return self

    def swap(self, version: str, data: bytes, variant: str = DEFAULT_VARIANT) -> None:
        """Replace the stored artifact behind the registry's back (its tag keeps the registered hash)."""
        self.files[(version, variant)] = data

    def facts(self, version: str) -> VersionFacts:
        if self.offline:
            from training.errors import RegistryUnreachable

            raise RegistryUnreachable(f"MLflow at {self.tracking_uri} failed while reading version {version}")
        return VersionFacts(version, dict(self.tags.get(version, {})))

    def download_onnx(self, version: str, dest: Path, variant: str = DEFAULT_VARIANT) -> Path:
        self.downloads.append((version, variant))
        out = dest / "onnx" / "model.onnx"  # MLflow keeps the artifact's folder under dest
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(self.files[(version, variant)])
        return out

    def download_operating_points(self, version: str, dest: Path, variant: str = DEFAULT_VARIANT) -> None:
        return None
