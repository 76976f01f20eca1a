"""Binding ultralytics to a Ray rank reaches the constants its modules copied at import."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.unit


def test_bind_rank_rebinds_constants_copied_by_ultralytics_modules() -> None:
    import ultralytics.data.build as build
    import ultralytics.engine.trainer as trainer
    import ultralytics.utils as utils

    from training.ultralytics_ddp import bind_ultralytics_rank

    before = (utils.RANK, utils.LOCAL_RANK, utils.WORLD_SIZE)
    try:
        bind_ultralytics_rank(1, 1, 2)
        assert (trainer.RANK, trainer.LOCAL_RANK) == (1, 1)
        assert build.RANK == 1 and utils.WORLD_SIZE == 2
    finally:
        bind_ultralytics_rank(*before)
    restored = trainer.RANK
    assert restored == before[0]


def test_ray_metric_names_are_mlflow_safe() -> None:
    from training.ray_trainer import metric_name

    assert metric_name("metrics/mAP50-95(B)") == "val/mAP50-95"
    assert metric_name("train/box_loss") == "train/box_loss"
