"""The search space of ``cxr train tune`` and the recipe a trial trains: no Ray needed to read or check it.

A search space is a YAML file of :class:`TuneSpace` fields; empty fields are derived from the recipe,
which is also the budget (a trial never trains bigger images or more epochs than the recipe).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from training.config import AugmentConfig, TrainConfig
from training.errors import ConfigError

#: upper bounds of the augmentations the strength multiplies (the recipe's own validation limits)
_AUGMENT_LIMITS = {"mosaic": 1.0, "hsv_v": 1.0, "degrees": 45.0, "translate": 0.5, "scale": 0.9, "mixup": 1.0}


class TuneSpace(BaseModel):
    """The search space and the scheduler, with defaults derived from the recipe where left empty.

    ``augment_strength`` multiplies the recipe's mosaic, brightness, rotation, translation, scale
    and mixup (each clipped to its limit); horizontal flips stay off whatever the strength, for the
    clinical reason given in :class:`training.config.AugmentConfig`.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    lr0: tuple[float, float] | None = Field(
        default=None,
        description="log-uniform range of the initial learning rate; default recipe / 10 .. x 10",
    )
    augment_strength: tuple[float, float] = Field(
        default=(0.25, 1.5), description="uniform range of the factor on the recipe's augmentations"
    )
    imgsz: list[int] | None = Field(
        default=None, description="choices (multiples of 32, <= the recipe's); default 1/2, 3/4, 1 of it"
    )
    epochs: list[int] | None = Field(
        default=None, description="choices (<= the recipe's); default 1/2, 3/4, 1 of it"
    )
    metric: str = Field(default="val/mAP50", description="reported each epoch by the Ray Train workers")
    mode: Literal["max", "min"] = "max"
    grace_period: int = Field(default=1, ge=1, description="epochs every trial gets before ASHA may stop it")
    reduction_factor: float = Field(default=2.0, gt=1, description="ASHA keeps 1/factor of trials per rung")
    seed: int | None = Field(default=0, description="seed of the random search (None: different each time)")

    @field_validator("lr0", "augment_strength")
    @classmethod
    def _ordered(cls, value: tuple[float, float] | None) -> tuple[float, float] | None:
        if value is not None and not 0 < value[0] < value[1]:
            raise ValueError(f"a range must be (low, high) with 0 < low < high, got {value}")
        return value

    @field_validator("imgsz", "epochs")
    @classmethod
    def _choices(cls, value: list[int] | None) -> list[int] | None:
        if value is not None and (not value or min(value) < 1):
            raise ValueError(f"choices must be a non-empty list of positive integers, got {value}")
        return sorted(set(value)) if value is not None else None

    @model_validator(mode="after")
    def _stride(self) -> TuneSpace:
        bad = [s for s in self.imgsz or [] if s % 32]
        if bad:
            raise ValueError(f"imgsz choices must be multiples of 32 (the model's largest stride): {bad}")
        return self

    def resolved(self, recipe: TrainConfig) -> TuneSpace:
        """Every range and choice made concrete for ``recipe``; choices above the recipe's are refused.

        The recipe is the budget: a search may try smaller images and fewer epochs, never more,
        so a tuned recipe never costs more to train than the one it came from.
        """
        lr0 = self.lr0 or (recipe.optim.lr0 / 10, recipe.optim.lr0 * 10)
        imgsz = self.imgsz or _fractions(recipe.imgsz, step=32, floor=min(64, recipe.imgsz))
        epochs = self.epochs or _fractions(recipe.epochs, step=1, floor=1)
        if max(imgsz) > recipe.imgsz:
            raise ConfigError(f"imgsz choices {imgsz} go above the recipe's imgsz {recipe.imgsz}")
        if max(epochs) > recipe.epochs:
            raise ConfigError(f"epochs choices {epochs} go above the recipe's epochs {recipe.epochs}")
        return self.model_copy(update={"lr0": lr0, "imgsz": imgsz, "epochs": epochs})

    def param_space(self) -> dict[str, Any]:
        """Tune's search space (call on a :meth:`resolved` space)."""
        from ray import tune

        if self.lr0 is None or self.imgsz is None or self.epochs is None:
            raise ConfigError("resolve the space against the recipe first (TuneSpace.resolved)")
        return {
            "lr0": tune.loguniform(*self.lr0),
            "augment_strength": tune.uniform(*self.augment_strength),
            "imgsz": tune.choice(self.imgsz),
            "epochs": tune.choice(self.epochs),
        }


def _fractions(value: int, *, step: int, floor: int) -> list[int]:
    """1/2, 3/4 and all of ``value``, rounded down to ``step`` and never below ``floor``."""
    return sorted({max(floor, int(value * f) // step * step) for f in (0.5, 0.75, 1.0)})


def load_space(path: Path) -> TuneSpace:
    """A search space from YAML (any subset of :class:`TuneSpace`'s fields)."""
    if not path.is_file():
        raise ConfigError(f"search space {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
        return TuneSpace.model_validate(raw)
    except (yaml.YAMLError, UnicodeDecodeError, ValidationError) as exc:
        raise ConfigError(f"search space {path} is invalid:\n{exc}") from exc
    except OSError as exc:
        raise ConfigError(f"search space {path} cannot be read ({exc.strerror})") from exc


def scaled_augment(augment: AugmentConfig, strength: float) -> AugmentConfig:
    """The recipe's augmentations times ``strength``, each clipped to what the recipe allows."""
    values = augment.model_dump()
    for key, limit in _AUGMENT_LIMITS.items():
        values[key] = round(min(limit, values[key] * strength), 6)
    return AugmentConfig.model_validate(values)


def apply_trial(recipe: TrainConfig, params: Mapping[str, Any]) -> TrainConfig:
    """The recipe with one trial's values; validation runs every epoch because ASHA needs the metric.

    Checkpoints fall every epoch too: ASHA or the budget may stop a trial at any epoch, and the
    trial's outcome names the checkpoint of its last reported result.
    """
    data = recipe.model_dump(mode="json")
    data["checkpoint"]["every_epochs"] = 1
    data["imgsz"] = int(params["imgsz"])
    data["epochs"] = int(params["epochs"])
    data["val_every_epoch"] = True
    data["optim"]["lr0"] = float(f"{float(params['lr0']):.6g}")
    data["augment"] = scaled_augment(recipe.augment, float(params["augment_strength"])).model_dump()
    return TrainConfig.model_validate(data)


def tuned_config(recipe: TrainConfig, params: Mapping[str, Any]) -> TrainConfig:
    """The recipe to train next: the best trial's values on the recipe's own scale, renamed ``-tuned``."""
    config = apply_trial(recipe, params)
    return config.model_copy(
        update={
            "name": f"{recipe.name}-tuned",
            "val_every_epoch": recipe.val_every_epoch,
            "checkpoint": recipe.checkpoint,
        }
    )
