"""Delivery policy: gate floors and canary thresholds, read from ``k8s/delivery-policy.yaml``.

The thresholds that decide whether a model reaches patients are reviewed like code: they live
in the GitOps repository beside the overlays, not in an environment variable someone set on one
machine; ``cxr canary step`` (the CronJob in k8s/base/canary) reads the canary section.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from delivery.errors import DeliveryError
from training.subgroups import DEFAULT_MAX_GAP, DEFAULT_MIN_BOXES, DEFAULT_MIN_IMAGES

POLICY_FILE = Path("k8s") / "delivery-policy.yaml"


class GatePolicy(BaseModel):
    """Floors a model version must clear before each stage."""

    model_config = ConfigDict(extra="forbid")

    max_parity_abs_diff: float = Field(1e-3, gt=0, description="ONNX vs PyTorch max |diff|")
    min_map50: float = Field(0.0, ge=0, le=1, description="mAP@0.5 floor on the held-out test set")
    min_map40: float = Field(0.0, ge=0, le=1, description="VinDr mAP@0.4 floor")
    max_map50_drop: float = Field(0.02, ge=0, le=1, description="delta: allowed mAP@0.5 loss vs production")
    latency_budget_ms: float = Field(250.0, gt=0, description="p95 of one batch-1 ONNX Runtime call")
    latency_runs: int = Field(20, ge=3, le=1000)
    max_subgroup_gap: float = Field(
        DEFAULT_MAX_GAP, ge=0, le=1, description="a subgroup's mAP@0.4 at most this far below overall"
    )
    min_subgroup_images: int = Field(
        DEFAULT_MIN_IMAGES, ge=1, description="subgroups with fewer test images are reported, not judged"
    )
    # 50: judged on groups of 20 images alone, a model with no real subgroup gap was refused by
    # chance in 40 % of simulated promotions (a 20-image group holds ~30 boxes, 1-3 a class, each
    # class's AP 0 or 1 by luck); from 50 boxes in 7.5 %, with a real gap still caught as often
    # (87.5 %); 80 boxes: 0 % by chance, but 22.5 % caught (docs/evaluation.md has the command).
    min_subgroup_boxes: int = Field(
        DEFAULT_MIN_BOXES,
        ge=0,
        description="subgroups with fewer ground-truth boxes are reported, not judged (their mAP is noise)",
    )
    subgroup_action: Literal["fail", "warn"] = Field(
        "fail", description="a subgroup beyond the gap refuses the promotion, or passes it with a warning"
    )


class CanaryPolicy(BaseModel):
    """How canary traffic is judged against production, and how its weight grows."""

    model_config = ConfigDict(extra="forbid")

    window: str = Field("5m", pattern=r"^[0-9]+[smh]$", description="PromQL range of the comparison")
    min_requests: int = Field(
        50,
        ge=1,
        description="fewer canary requests in the window: inconclusive, unless their 5xx already fail it",
    )
    max_error_rate: float = Field(0.02, ge=0, le=1, description="5xx share of canary requests")
    max_p95_ratio: float = Field(1.5, gt=0, description="canary p95 latency / production p95 latency")
    max_detection_shift: float = Field(0.5, ge=0, description="relative change of detections per image")
    max_confidence_shift: float = Field(0.15, ge=0, le=1, description="absolute change of mean confidence")
    min_agreement: float = Field(
        0.5,
        ge=0,
        le=1,
        description="mean agreement (F1) of the canary's answers with production's on the same images "
        "(cxr_shadow_agreement{stage=canary}); not judged when the gateway mirrors none "
        "(CXR_SHADOW_FRACTION 0)",
    )
    weights: list[int] = Field(default_factory=lambda: [10, 50, 100])

    @field_validator("window")
    @classmethod
    def _positive(cls, value: str) -> str:
        # Prometheus refuses a zero range ("duration must be greater than 0") at every analysis:
        # said here, where the policy is read, instead of by each `canary step` against Prometheus
        if int(value[:-1]) == 0:
            raise ValueError("window must be longer than 0, e.g. 5m")
        return value

    @field_validator("weights")
    @classmethod
    def _increasing(cls, value: list[int]) -> list[int]:
        if not value or value != sorted(set(value)) or value[0] <= 0 or value[-1] != 100:
            raise ValueError("weights must increase strictly from above 0 up to 100, e.g. [10, 50, 100]")
        return value


class GoldenPolicy(BaseModel):
    """The paired golden-set comparison with production (canary and production promotions)."""

    model_config = ConfigDict(extra="forbid")

    required: bool = Field(
        True, description="no golden set pinned: fail (true) or fall back to the mAP tag comparison (false)"
    )
    # The default is issue 18's 0.0; the committed policy (k8s/delivery-policy.yaml) sets 0.05. At 0,
    # "CI low >= 0" asks the candidate to be proven at least as good, a superiority test that
    # refused every candidate whose results differed at all from production's (all simulated equal
    # retrains at 0, 5 % at 0.03, none at 0.05: docs/evaluation.md has the command); only an
    # identical model passes it.
    margin: float = Field(0.0, ge=0, le=1, description="non-inferiority margin: CI low >= -margin")
    min_class_instances: int = Field(10, ge=1, description="classes with fewer golden boxes are not judged")
    resamples: int = Field(1000, ge=100, le=100_000, description="bootstrap resamples over patients")
    seed: int = 0
    confidence: float = Field(0.95, gt=0.5, lt=1)


class VariantPolicy(BaseModel):
    """When a serving variant other than fp32 (INT8, FP16-TensorRT) may be served: it must stay
    within these of the fp32 export it was built from, on the same test images."""

    model_config = ConfigDict(extra="forbid")

    max_map_drop: float = Field(
        0.01, ge=0, le=1, description="mAP@0.5 and mAP@0.4 may each drop at most this much vs fp32"
    )
    # 0.2: twice what INT8 of the first real model moved one score (0.10-0.12) while reporting
    # the same findings and losing no mAP (docs/benchmarks.md): a check for a broken conversion
    max_score_abs_diff: float = Field(
        0.2, gt=0, le=1, description="parity: max |fp32 - variant| class score (0..1) on test images"
    )
    min_finding_agreement: float = Field(
        0.9, ge=0, le=1, description="parity: share of findings both report at conf_threshold, on test images"
    )


class DeliveryPolicy(BaseModel):
    """The whole policy file."""

    model_config = ConfigDict(extra="forbid")

    gates: GatePolicy = Field(default_factory=GatePolicy)  # type: ignore[arg-type]
    golden: GoldenPolicy = Field(default_factory=GoldenPolicy)  # type: ignore[arg-type]
    canary: CanaryPolicy = Field(default_factory=CanaryPolicy)  # type: ignore[arg-type]
    variants: VariantPolicy = Field(default_factory=VariantPolicy)  # type: ignore[arg-type]


def load_policy(gitops_dir: Path) -> DeliveryPolicy:
    """The policy committed in the GitOps repo; defaults when the file does not exist."""
    path = Path(gitops_dir) / POLICY_FILE
    if not path.exists():
        return DeliveryPolicy()
    try:
        return DeliveryPolicy.model_validate(yaml.safe_load(path.read_text(encoding="utf-8")) or {})
    except (yaml.YAMLError, ValidationError, UnicodeDecodeError) as exc:  # not UTF-8: no traceback either
        raise DeliveryError(f"{path} is invalid, fix it before promoting: {exc}") from exc
