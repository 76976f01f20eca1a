"""Training configuration: the YAML recipe (``TrainConfig``) and the environment (``TrainSettings``).

Two objects because they change for different reasons: the recipe is
versioned with the code and hashed into every run's lineage
(``config_sha256``), while the settings say where this machine's servers are
(S3, MLflow) and never influence the trained weights.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from core.settings import CoreSettings
from training.errors import ConfigError

ModelSize = Literal["yolo11-slim", "yolo11n", "yolo11s", "yolo11m", "yolo11l", "yolo11x"]
#: architectures kept in this package rather than picked from ultralytics' scales by name
MODEL_FILES = {"yolo11-slim": Path(__file__).parent / "models" / "yolo11-slim.yaml"}


class _Strict(BaseModel):
    """Unknown keys are typos in a recipe; refuse them instead of silently ignoring them."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class OptimConfig(_Strict):
    """Optimizer and schedule, passed through to ultralytics' own recipe."""

    optimizer: Literal["SGD", "AdamW", "Adam", "auto"] = "SGD"
    lr0: float = Field(default=0.01, gt=0)
    lrf: float = Field(default=0.01, gt=0, le=1)
    momentum: float = Field(default=0.937, ge=0, lt=1)
    weight_decay: float = Field(default=0.0005, ge=0)
    cos_lr: bool = False
    warmup_epochs: float = Field(default=3.0, ge=0)
    warmup_momentum: float = Field(default=0.8, ge=0, lt=1)
    warmup_bias_lr: float = Field(default=0.1, ge=0)
    nbs: int = Field(default=64, ge=1, description="nominal batch size: gradients accumulate up to it")
    patience: int = Field(default=100, ge=1)


class AugmentConfig(_Strict):
    """Augmentations suited to radiographs.

    Vertical flips never happen (a chest upside down is not a chest), and
    horizontal flips are off by default because they move the heart to the
    right, which is itself a finding (dextrocardia). Colour jitter is limited
    to brightness: radiographs have no hue or saturation.
    """

    mosaic: float = Field(default=1.0, ge=0, le=1)
    close_mosaic: int = Field(default=2, ge=0, description="last N epochs train without mosaic")
    fliplr: float = Field(default=0.0, ge=0, le=1)
    hsv_v: float = Field(default=0.3, ge=0, le=1)
    degrees: float = Field(default=3.0, ge=0, le=45)
    translate: float = Field(default=0.1, ge=0, le=0.5)
    scale: float = Field(default=0.3, ge=0, le=0.9)
    mixup: float = Field(default=0.0, ge=0, le=1)


class LossConfig(_Strict):
    """Ultralytics' loss gains, and its class weighting (``cls_pw``) for findings the data has few of.

    mAP is a mean over classes, so a class with few boxes counts as much as a common one;
    ``cls_pw`` weights each class's classification loss by its inverse frequency in the
    training split raised to that power (0 off, 1 full inverse frequency).
    """

    box: float = Field(default=7.5, ge=0)
    cls: float = Field(default=0.5, ge=0)
    dfl: float = Field(default=1.5, ge=0)
    cls_pw: float = Field(default=0.0, ge=0, le=1)


class ScalingConfig(_Strict):
    """Ray Train scaling: N data-parallel workers, each with its own shard."""

    num_workers: int = Field(default=2, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(default=1.0, gt=0)
    gpus_per_worker: float = Field(default=0.0, ge=0)
    torch_threads: int = Field(default=1, ge=1, description="intra-op threads per CPU worker")
    channels_last: bool = Field(
        default=True,
        description=(
            "CPU workers train the model in channels-last (NHWC) memory: oneDNN's convolutions skip "
            "their layout reorders (ultralytics does so only on CUDA; measured in docs/benchmarks.md)"
        ),
    )
    fused_optimizer: bool = Field(
        default=True,
        description=(
            "CPU workers step SGD, Adam and AdamW with torch's fused kernel instead of a Python loop over "
            "parameters (ultralytics fuses only on CUDA; measured in docs/benchmarks.md)"
        ),
    )
    cpu_bf16: bool = Field(
        default=False,
        description=(
            "CPU workers run the network's forward under bfloat16 autocast where the cores compute "
            "bfloat16 natively (AMX / AVX512-BF16; fp32 elsewhere). The loss, weights, optimizer and "
            "EMA stay fp32"
        ),
    )


class CheckpointConfig(_Strict):
    """Where Ray keeps checkpoints and how many failures a run survives."""

    s3_prefix: str = "checkpoints"
    num_to_keep: int = Field(default=2, ge=1)
    max_failures: int = Field(default=2, ge=1)
    every_epochs: int = Field(
        default=1,
        ge=1,
        description=(
            "checkpoint every N epochs and at the last (metrics are still reported every epoch): "
            "a failure redoes at most N-1 epochs, and N-1 of N epochs skip writing and uploading one"
        ),
    )

    def due(self, epoch: int, epochs: int) -> bool:
        """Whether the epoch just finished (0-based ``epoch`` of ``epochs``) leaves a checkpoint."""
        return (epoch + 1) % self.every_epochs == 0 or epoch + 1 >= epochs


class EvalConfig(_Strict):
    """Evaluation and export gates."""

    conf_threshold: float = Field(default=0.25, gt=0, lt=1, description="operating threshold for P/R")
    nms_iou: float = Field(default=0.7, gt=0, lt=1)
    parity_images: int = Field(default=8, ge=1)
    parity_max_abs_diff: float = Field(default=1e-3, gt=0)
    parity_max_map_diff: float = Field(default=0.005, ge=0)
    latency_repeats: int = Field(default=10, ge=1)
    opset: int | None = Field(default=None, description="ONNX opset; None lets ultralytics choose")
    onnx_simplify: bool = Field(
        default=False,
        description=(
            "run onnxslim over the exported graph (ultralytics' default); ONNX Runtime folds the same "
            "graph at load, and the slimmed export took 7.8 s against 2.8-3.3 s in make up "
            "(training/export.py)"
        ),
    )
    int8: bool = Field(
        default=False,
        description="also build the INT8 serving variant, measured vs fp32 (served only when promoted)",
    )
    int8_calibration_images: int = Field(default=32, ge=1, description="val images that calibrate INT8")
    # operating points and confidence calibration, chosen on the val split (training/operating_points.py)
    operating_point: Literal["sensitivity", "f1"] = Field(
        default="sensitivity", description="per-class threshold: reach target_sensitivity, or maximise F1"
    )
    target_sensitivity: float = Field(default=0.9, gt=0, le=1, description="recall at IoU 0.4 per class")
    calibration: Literal["temperature", "isotonic", "none"] = Field(
        default="isotonic",
        description=(
            "calibrator of the returned confidence, fitted on val: isotonic also corrects a biased "
            "detector (scores uniformly too low or high), which one temperature cannot"
        ),
    )
    calibration_min_conf: float = Field(
        default=0.01, ge=0, lt=1, description="detections below this raw score neither fit nor measure it"
    )
    calibration_min_samples: int = Field(
        default=30, ge=2, description="a class gets its own calibrator from this many val detections"
    )
    ece_bins: int = Field(default=10, ge=2, description="equal-width bins of the calibration error")


class TrainConfig(_Strict):
    """One training recipe, loaded from ``training/configs/*.yaml``."""

    name: str = Field(default="cxr-yolo11n", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    model: ModelSize = "yolo11n"
    imgsz: int = Field(default=320, ge=32)
    epochs: int = Field(default=30, ge=1)
    batch_per_worker: int = Field(default=8, ge=1)
    seed: int = 0
    deterministic: bool = True
    val_every_epoch: bool = True
    cache_images: Literal["ram", "disk", "none"] = Field(
        default="none",
        description=(
            "ultralytics' image cache: 'ram' keeps every image already resized to imgsz, so an "
            "epoch stops decoding full-size PNGs (mosaic reads four per sample)"
        ),
    )
    base_model_version: str | None = Field(
        default=None, description="a registered cxr-detector version to fine-tune from (e.g. on feedback)"
    )
    dataset: str | None = Field(default=None, description="dataset version or folder; --dataset overrides")
    optim: OptimConfig = OptimConfig()
    augment: AugmentConfig = AugmentConfig()
    loss: LossConfig = LossConfig()
    scaling: ScalingConfig = ScalingConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    eval: EvalConfig = EvalConfig()

    @field_validator("imgsz")
    @classmethod
    def _stride_multiple(cls, value: int) -> int:
        if value % 32:
            raise ValueError(f"imgsz must be a multiple of 32 (the model's largest stride), got {value}")
        return value

    @property
    def global_batch(self) -> int:
        """Effective batch per optimizer step: per-worker batch x number of workers."""
        return self.batch_per_worker * self.scaling.num_workers

    def with_workers(self, workers: int) -> TrainConfig:
        """The same recipe at another scale (the per-worker batch stays, so the global batch grows)."""
        return self.model_copy(update={"scaling": self.scaling.model_copy(update={"num_workers": workers})})

    def fine_tuning(self, base_architecture: str | None) -> TrainConfig:
        """The recipe for fine-tuning a model of ``base_architecture``: that architecture, not the recipe's.

        Fine-tuning continues the base model, as ultralytics does with ``YOLO("best.pt").train()``.
        Built as the recipe's ``model`` instead, ultralytics would copy only the weights whose
        shapes match (none between two widths) and the "fine-tuned" model would start from
        scratch without a word. An unrecorded or unknown base architecture keeps the recipe's.
        """
        if base_architecture in get_args(ModelSize) and base_architecture != self.model:
            return self.model_copy(update={"model": base_architecture})
        return self

    def sha256(self) -> str:
        """Content hash of the recipe, the lineage tag ``config_sha256`` (key order independent)."""
        payload = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(payload.encode()).hexdigest()

    def ultralytics_overrides(self) -> dict[str, object]:
        """Arguments for ultralytics' trainer; ``batch`` is GLOBAL: ultralytics divides it by world size."""
        aug = self.augment
        opt = self.optim
        loss = self.loss
        return {
            "model": str(MODEL_FILES.get(self.model, f"{self.model}.yaml")),
            "imgsz": self.imgsz,
            "epochs": self.epochs,
            "batch": self.global_batch,
            "seed": self.seed,
            "deterministic": self.deterministic,
            "pretrained": False,
            "optimizer": opt.optimizer,
            "lr0": opt.lr0,
            "lrf": opt.lrf,
            "momentum": opt.momentum,
            "weight_decay": opt.weight_decay,
            "cos_lr": opt.cos_lr,
            "warmup_epochs": opt.warmup_epochs,
            "warmup_momentum": opt.warmup_momentum,
            "warmup_bias_lr": opt.warmup_bias_lr,
            "nbs": opt.nbs,
            "patience": opt.patience,
            "mosaic": aug.mosaic,
            "close_mosaic": aug.close_mosaic,
            "fliplr": aug.fliplr,
            "flipud": 0.0,
            "hsv_h": 0.0,
            "hsv_s": 0.0,
            "hsv_v": aug.hsv_v,
            "degrees": aug.degrees,
            "translate": aug.translate,
            "scale": aug.scale,
            "mixup": aug.mixup,
            "box": loss.box,
            "cls": loss.cls,
            "dfl": loss.dfl,
            "cls_pw": loss.cls_pw,
            "val": self.val_every_epoch,
            "amp": self.scaling.use_gpu,
            "plots": False,
            "verbose": False,
            "workers": 0,
            "cache": False if self.cache_images == "none" else self.cache_images,
        }


def load_config(path: Path) -> TrainConfig:
    """Read a recipe YAML; a missing file or a wrong key is a :class:`ConfigError` naming the problem."""
    if not path.is_file():
        what = "is not a file" if path.exists() else "does not exist"
        raise ConfigError(f"training config {path} {what} (see training/configs/ for examples)")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"training config {path} is not valid YAML: {exc}") from exc
    except OSError as exc:
        raise ConfigError(f"training config {path} cannot be read ({exc.strerror})") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"training config {path} must be a mapping, got {type(raw).__name__}")
    try:
        return TrainConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"training config {path} is invalid:\n{exc}") from exc


class TrainSettings(CoreSettings):
    """Where this machine's servers are (the stack fields come from core); read once per command."""

    train_work_dir: Path | None = None
    dataset_cache_dir: Path | None = None
    ray_address: str | None = None
    #: checkpoints on a local/shared filesystem instead of S3 (benchmarks, laptops without the stack)
    ray_storage_dir: Path | None = None
    min_test_images: int = Field(
        default=30,
        ge=1,
        description=(
            "a dataset whose test split is smaller is refused before training (CXR_MIN_TEST_IMAGES): "
            "an mAP on a handful of images is noise, and a registered 0.000 says nothing"
        ),
    )

    @property
    def work_dir(self) -> Path:
        """Local scratch for ultralytics' run folders, exports and evaluation plots."""
        return self.train_work_dir or self.stack_dir / "training"

    @property
    def dataset_cache(self) -> Path:
        return self.dataset_cache_dir or self.stack_dir / "datasets"
