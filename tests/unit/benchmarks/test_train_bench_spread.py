"""Recipes are compared over training seeds (``seed_spread`` trains each seed on ONE dataset, then sums
up), and the machine's speed is taken beside them (``pass_seconds``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from benchmarks import train_bench

pytestmark = pytest.mark.unit


def test_each_seed_trains_the_same_dataset_with_the_recipe_overrides_and_the_spread_is_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    built: list[int] = []
    trained: list[dict[str, Any]] = []
    dataset = object()
    # the seed-0/1/2/3 held-out figures of the bootstrap recipe (docs/benchmarks.md)
    figures = {0: (0.305, 0.302), 1: (0.251, 0.243), 2: (0.253, 0.257), 3: (0.317, 0.264)}

    def build(root: Path, n_images: int, size: int, max_side: int, seed: int = 0) -> object:
        built.append(seed)
        return dataset

    def train(root: Path, n_images: int, overrides: dict[str, Any], **kw: Any) -> dict[str, Any]:
        assert kw["dataset"] is dataset and kw["seed"] == 1  # the phantoms' seed, not the training one
        trained.append(overrides)
        test, held = figures[overrides["seed"]]
        return {"train_quality_map50": test, "heldout_map50": held}

    monkeypatch.setattr(train_bench, "build_synthetic_dataset", build)
    monkeypatch.setattr(train_bench, "train_quality", train)
    found = train_bench.seed_spread(
        tmp_path, 400, {"optim": {"lrf": 0.1}}, [0, 1, 2, 3], recipe="bootstrap.yaml", data_seed=1
    )
    assert built == [1]  # the dataset is built once for all seeds
    assert trained == [{"optim": {"lrf": 0.1}, "seed": s} for s in (0, 1, 2, 3)]
    assert [run["seed"] for run in found["runs"]] == [0, 1, 2, 3]
    assert found["heldout_map50_mean"] == 0.2665 and found["heldout_map50_sd"] == 0.0252
    assert found["train_quality_map50_mean"] == 0.2815


def test_one_value_has_no_spread() -> None:
    assert train_bench.mean_and_sd([0.3]) == (0.3, 0.0)


def test_the_machine_speed_probe_times_each_cpu_network_and_restores_the_thread_count() -> None:
    import torch

    threads = torch.get_num_threads()
    found = train_bench.pass_seconds(("yolo11-slim", "yolo11n"), imgsz=64, batch=1, repeats=2)
    assert torch.get_num_threads() == threads
    slim, nano = found["pass_seconds_yolo11-slim"], found["pass_seconds_yolo11n"]
    assert 0 < slim < 10 and 0 < nano < 10
    assert (found["pass_imgsz"], found["pass_batch"]) == (64, 1)


def test_the_figures_carry_each_subgroups_map_beside_its_class_matched_reference() -> None:
    from training.evaluate import EvalReport
    from training.subgroups import SubgroupMetrics

    groups = [
        SubgroupMetrics(
            attribute="vendor", value="Dunmore", images=12, instances=9, map40=0.21234, reference_map40=0.5
        ),
        SubgroupMetrics(attribute="sex", value="F", images=30, instances=0, map40=None, reference_map40=None),
    ]
    report = EvalReport(
        backend="torch", split="test", images=48, instances=60, imgsz=256, map50=0.44731, map50_95=0.2,
        map40=0.46, conf_threshold=0.25, precision=0.5, recall=0.4, per_class=[], subgroups=groups,
    )  # fmt: skip
    found = train_bench._figures("q", report)
    assert found["q_map50"] == 0.4473
    assert found["q_subgroup_map40"] == {"vendor=Dunmore": [12, 0.212, 0.5], "sex=F": [30, None, None]}
