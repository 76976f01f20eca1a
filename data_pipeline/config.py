"""Settings of the data pipeline, read once from ``CXR_*`` environment variables.

One object so that a dataset version can hash "the pipeline's own config"
(see :meth:`DataSettings.version_config`): every knob that changes the bytes
of a dataset lives here and nowhere else.
"""

from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, model_validator
from pydantic_settings import SettingsConfigDict

from core.install_secret import resolve_install_secret
from core.settings import CoreSettings
from data_pipeline.dicom_guard import DicomLimits


class QualityThresholds(BaseModel):
    """Limits for the image and label checks of :mod:`data_pipeline.quality`."""

    min_std: float = Field(
        default=0.01, description="below this pixel std (0..1 scale) an image is blank/constant"
    )
    max_saturated_fraction: float = Field(
        default=0.5, description="share of pixels at 0 or 1 above which it fails"
    )
    min_side: int = Field(default=256, description="shorter side in pixels below which an image is too small")
    max_aspect_ratio: float = Field(default=3.0, description="longer/shorter side above which it fails")
    duplicate_max_distance: int = Field(
        default=12, description="Hamming distance of 256-bit perceptual hashes counting as near duplicate"
    )
    min_box_side_px: float = Field(
        default=4.0, description="boxes with a side below this (original pixels) are tiny"
    )


class DataSettings(CoreSettings):
    """Every setting of ``data_pipeline``; env prefix ``CXR_``; the stack fields come from core.

    Examples: ``CXR_MAX_SIDE=768``; nested thresholds use ``__``: ``CXR_QUALITY__MIN_SIDE=512``.
    """

    model_config = SettingsConfigDict(env_prefix="CXR_", env_nested_delimiter="__", extra="ignore")

    # --- privacy ---------------------------------------------------------------
    patient_salt: str = Field(
        default="",
        description="secret for hashing PatientID (CXR_PATIENT_SALT); empty: the install's own "
        "(credentials.json 'deid_secret', else generated into <stack_dir>/install_secret); never a default",
    )

    # --- the guarded DICOM reader (data_pipeline/dicom_guard.py) -------------------
    dicom_max_depth: int = Field(default=8, ge=1, description="deepest sequence nesting accepted")
    dicom_max_elements: int = Field(default=10_000, ge=16, description="elements in one DICOM, all levels")
    dicom_max_text_bytes: int = Field(default=1 << 20, ge=64, description="largest non-bulk element value")
    dicom_max_pixels: int = Field(default=50_000_000, ge=64, description="declared Rows x Columns")
    dicom_max_pixel_bytes: int = Field(
        default=200 * 1024 * 1024, ge=1024, description="declared decoded pixel bytes, before decoding"
    )
    dicom_max_inflated_bytes: int = Field(
        default=128 * 1024 * 1024, ge=1024, description="output cap when inflating deflated datasets"
    )

    # --- export ------------------------------------------------------------------
    max_side: int = Field(default=1024, ge=32, description="longer side of exported PNGs")
    png_compression: int = Field(
        default=1, ge=0, le=9, description="zlib level; 1 is 3x faster than 6, 10% larger"
    )

    # --- annotations / fusion -------------------------------------------------------
    max_bad_row_fraction: float = Field(default=0.05, ge=0, le=1, description="fail the run above this share")
    wbf_iou_thr: float = Field(default=0.4, gt=0, le=1)
    wbf_skip_box_thr: float = Field(default=0.0, ge=0, le=1)
    min_readers: int = Field(default=1, ge=1, description="fused boxes drawn by fewer readers are dropped")
    min_reader_share: float = Field(
        default=0.5,
        ge=0,
        le=1,
        description="fused boxes drawn by less than this share of the image's readers are dropped",
    )

    # --- split ------------------------------------------------------------------------
    split_seed: int = 42
    val_fraction: float = Field(default=0.15, ge=0, lt=1)
    test_fraction: float = Field(default=0.15, ge=0, lt=1)

    # --- checks -----------------------------------------------------------------------------
    quality: QualityThresholds = QualityThresholds()
    exclude_failed_images: bool = Field(
        default=True, description="drop blank/saturated/tiny images from the dataset"
    )

    # --- execution ---------------------------------------------------------------------------
    workers: int = Field(default=0, ge=0, description="process-pool size; 0 = number of CPUs")
    executor: Literal["process", "ray"] = Field(
        default="process", description="where per-image work runs: a local process pool or Ray Data"
    )
    golden_min_images: int = Field(
        default=100, ge=1, description="a golden set smaller than this is refused (CXR_GOLDEN_MIN_IMAGES)"
    )
    dataset_cache_dir: Path | None = Field(
        default=None, description="where fetched datasets go; default <stack>/datasets"
    )

    @model_validator(mode="after")
    def _fractions_leave_a_train_split(self) -> DataSettings:
        if self.val_fraction + self.test_fraction >= 0.9:
            raise ValueError("val_fraction + test_fraction must stay below 0.9 so a train split remains")
        return self

    def dicom_limits(self) -> DicomLimits:
        """The bounds every DICOM from outside is read under (gateway, CLI, ingest)."""
        return DicomLimits(
            max_depth=self.dicom_max_depth,
            max_elements=self.dicom_max_elements,
            max_text_bytes=self.dicom_max_text_bytes,
            max_pixels=self.dicom_max_pixels,
            max_pixel_bytes=self.dicom_max_pixel_bytes,
            max_inflated_bytes=self.dicom_max_inflated_bytes,
        )

    def resolved_patient_salt(self) -> str:
        """``patient_salt``, else the install's secret: stable for one install, so are dataset versions."""
        return _install_secret(self.patient_salt, self.stack_dir)

    def cache_dir(self) -> Path:
        """Local cache for fetched dataset versions."""
        return self.dataset_cache_dir or (self.stack_dir / "datasets")

    def version_config(self) -> dict[str, Any]:
        """The settings that change a dataset's bytes; hashed into its version.

        Credentials, paths and worker counts are left out on purpose: the same
        inputs built on another machine must give the same version.
        """
        keys = (
            "max_side",
            "max_bad_row_fraction",
            "wbf_iou_thr",
            "wbf_skip_box_thr",
            "min_readers",
            "min_reader_share",
            "split_seed",
            "val_fraction",
            "test_fraction",
            "exclude_failed_images",
            "patient_salt",
        )
        cfg = {k: getattr(self, k) for k in keys}
        cfg["quality"] = self.quality.model_dump()
        # the salt changes patient grouping, so it counts, but only as a hash
        cfg["patient_salt"] = _short_hash(self.resolved_patient_salt())
        return json.loads(json.dumps(cfg, sort_keys=True))


@lru_cache(maxsize=16)
def _install_secret(explicit: str, stack_dir: Path) -> str:
    return resolve_install_secret(explicit, stack_dir)


def _short_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:12]


@lru_cache(maxsize=1)
def get_settings() -> DataSettings:
    """The process-wide settings, read from the environment on first use."""
    return DataSettings()
