"""Canary split by weight, sticky per study, shadow only when staging serves, override, hot reload."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from serving.inference.routing import Router, bucket_of
from tests.unit.serving.serving_support import write_stage_files

pytestmark = pytest.mark.unit


def _router(tmp_path: Path, **kwargs: object) -> Router:
    return Router(tmp_path, poll_s=0.0, **kwargs)  # type: ignore[arg-type]


def test_same_study_always_gets_the_same_stage(tmp_path: Path) -> None:
    write_stage_files(tmp_path, production="3", canary="4", weight=50)
    router = _router(tmp_path)
    for i in range(50):
        key = f"1.2.840.{i}"
        stages = {router.decide(key).stage for _ in range(20)}
        assert len(stages) == 1
        assert Router(tmp_path).decide(key).stage in stages  # stable across processes / restarts


@pytest.mark.parametrize("weight", [0, 10, 50, 100])
def test_canary_share_follows_the_weight(tmp_path: Path, weight: int) -> None:
    write_stage_files(tmp_path, production="3", canary="4", weight=weight)
    router = _router(tmp_path)
    n = 4000
    canary = sum(router.decide(f"study-{i}").stage == "canary" for i in range(n))
    assert abs(canary / n - weight / 100) < 0.03


def test_canary_without_a_model_gets_no_traffic(tmp_path: Path) -> None:
    write_stage_files(tmp_path, production="3", canary="", weight=80)
    router = _router(tmp_path)
    assert router.table.canary_weight == 0
    assert all(router.decide(f"s{i}").stage == "production" for i in range(200))


def test_operator_override_wins_over_weight(tmp_path: Path) -> None:
    write_stage_files(tmp_path, production="3", canary="4", weight=0, staging="5")
    decision = _router(tmp_path).decide("any", forced="staging")
    assert decision.stage == "staging" and decision.reason == "override" and not decision.shadow


def test_shadow_fraction_applies_only_when_staging_serves(tmp_path: Path) -> None:
    write_stage_files(tmp_path, production="3", staging="")
    assert not any(_router(tmp_path, shadow_fraction=1.0).decide(f"s{i}").shadow for i in range(100))
    write_stage_files(tmp_path, production="3", staging="5")
    router = _router(tmp_path, shadow_fraction=0.25)
    share = sum(router.decide(f"s{i}").shadow for i in range(4000)) / 4000
    assert abs(share - 0.25) < 0.03


def test_routing_file_change_is_picked_up_without_restart(tmp_path: Path) -> None:
    write_stage_files(tmp_path, production="3", canary="4", weight=0)
    router = _router(tmp_path)
    assert router.table.canary_weight == 0
    write_stage_files(tmp_path, production="3", canary="4", weight=100)
    canary_file = tmp_path / "k8s" / "overlays" / "canary" / "model.yaml"
    stat = canary_file.stat()
    os.utime(canary_file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert router.maybe_reload()
    assert router.table.canary_weight == 100
    assert router.decide("x").stage == "canary"


def test_bucket_is_uniform_over_0_to_99() -> None:
    buckets = [bucket_of(f"k{i}") for i in range(10000)]
    assert min(buckets) == 0 and max(buckets) == 99
    assert max(buckets.count(b) for b in range(100)) < 150
