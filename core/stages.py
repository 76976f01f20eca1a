"""The three serving stages: the one definition every package uses.

A model moves ``staging -> canary -> production`` (:data:`PROMOTION_ORDER`, also the order
messages list stage files in); the gateway, ``/v1/models`` and the one-machine stack list them
production first (:data:`STAGES`), the stage that must never be missed.
"""

from __future__ import annotations

from typing import Literal

from core.errors import StageFileError

Stage = Literal["staging", "canary", "production"]
PROMOTION_ORDER: tuple[Stage, ...] = ("staging", "canary", "production")
STAGES: tuple[Stage, ...] = ("production", "canary", "staging")


def as_stage(text: str) -> Stage:
    """Validate a stage name typed by a person (CLI option, header) into a :data:`Stage`.

    Raises :class:`core.errors.StageFileError` naming the stages.
    """
    for stage in PROMOTION_ORDER:
        if text == stage:
            return stage
    raise StageFileError(f"unknown stage {text!r}; use one of {', '.join(PROMOTION_ORDER)}")
