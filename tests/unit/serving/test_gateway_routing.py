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


def test_canary_requests_are_sampled_for_the_production_mirror_at_the_shadow_fraction(tmp_path: Path) -> None:
    """Staging or not: the canary's agreement with production is what the canary analysis judges."""
    write_stage_files(tmp_path, production="3", canary="4", weight=50, staging="")
    router = _router(tmp_path, shadow_fraction=0.25)
    decisions = [router.decide(f"s{i}") for i in range(8000)]
    assert not any(d.canary_mirror for d in decisions if d.stage == "production")
    canary = [d for d in decisions if d.stage == "canary"]
    assert abs(sum(d.canary_mirror for d in canary) / len(canary) - 0.25) < 0.03
    assert not any(d.shadow for d in decisions)  # no staging version: no staging shadow
    assert not _router(tmp_path, shadow_fraction=1.0).decide("s1", forced="canary").canary_mirror
    assert not any(_router(tmp_path).decide(f"s{i}").canary_mirror for i in range(200))  # fraction 0


@pytest.mark.parametrize("fraction", [0.004, 0.025])
def test_shadow_share_is_the_configured_fraction_not_a_rounded_percent(
    tmp_path: Path, fraction: float
) -> None:
    write_stage_files(tmp_path, production="3", staging="5")
    router = _router(tmp_path, shadow_fraction=fraction)
    n = 40_000
    share = sum(router.decide(f"s{i}").shadow for i in range(n)) / n
    assert share == pytest.approx(fraction, rel=0.15)  # was 0 and 0.02


def test_routing_file_change_is_picked_up_without_restart(tmp_path: Path) -> None:
    write_stage_files(tmp_path, production="3", canary="4", weight=0)
    router = _router(tmp_path)
    assert router.table.canary_weight == 0
    assert not router.maybe_reload()  # nothing changed: nothing re-parsed
    write_stage_files(tmp_path, production="3", canary="4", weight=100)
    assert router.maybe_reload()
    assert router.table.canary_weight == 100
    assert router.decide("x").stage == "canary"


def test_a_change_that_keeps_the_files_mtime_is_still_seen(tmp_path: Path) -> None:
    """Two writes within one tick of the kernel's coarse clock share an mtime."""
    write_stage_files(tmp_path, production="3")
    router = _router(tmp_path)
    files = sorted((tmp_path / "k8s" / "overlays").glob("*/model.yaml"))
    before = [f.stat() for f in files]
    write_stage_files(tmp_path, production="4")
    for f, stat in zip(files, before, strict=True):
        os.utime(f, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert router.maybe_reload()
    assert router.table.version("production") == "4"


def test_a_promotion_written_while_the_gateway_reads_the_files_is_seen_at_the_next_poll(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The e2e loop once kept answering with the old version for minutes after a promotion.

    The promotion's files landed between the gateway's read of the production file and its
    note of what it had read; the note then matched the new files, so the gateway never read
    them again. Here the promotion is written from inside the first file's parse.
    """
    import core.stage_file

    write_stage_files(tmp_path, production="3", canary="4", weight=50)
    router = _router(tmp_path)
    real_load = core.stage_file.yaml.safe_load
    promoted: list[bool] = []

    def load_then_promote(text: str) -> object:
        data = real_load(text)
        if not promoted:  # a `cxr canary step` promoting v4, as the gateway parses v3's file
            promoted.append(True)
            write_stage_files(tmp_path, production="4", canary="", weight=0)
        return data

    monkeypatch.setattr(core.stage_file.yaml, "safe_load", load_then_promote)
    router.reload()
    assert promoted and router.table.version("production") == "3"  # what it read, before the write
    assert router.maybe_reload()
    assert router.table.version("production") == "4" and router.table.canary_weight == 0


def test_an_invalid_stage_file_keeps_the_last_entry_and_is_read_again(tmp_path: Path) -> None:
    write_stage_files(tmp_path, production="3")
    router = _router(tmp_path)
    production = tmp_path / "k8s" / "overlays" / "production" / "model.yaml"
    production.write_text("stage: [unclosed\n")
    assert router.maybe_reload()
    assert router.table.version("production") == "3"
    assert not router.maybe_reload()  # the same broken text is not parsed again
    write_stage_files(tmp_path, production="5")
    assert router.maybe_reload()
    assert router.table.version("production") == "5"


@pytest.mark.parametrize("damage", ["not utf-8", "a folder"])
def test_a_stage_file_that_cannot_be_read_keeps_the_gateway_serving(tmp_path: Path, damage: str) -> None:
    """Bytes that are not UTF-8, or a folder where the file belongs: a warning, not a failed request."""
    write_stage_files(tmp_path, production="3", canary="4", weight=10)
    router = _router(tmp_path)
    canary = tmp_path / "k8s" / "overlays" / "canary" / "model.yaml"
    canary.unlink()
    if damage == "not utf-8":
        canary.write_bytes(b"stage: canary\nmodel_version: '\xff\xfe'\n")
    else:
        canary.mkdir()
    assert router.maybe_reload()
    assert router.table.version("canary") == "4" and router.table.canary_weight == 10
    assert not router.maybe_reload()  # the same error is the same stamp: not parsed again
    assert Router(tmp_path).table.version("production") == "3"  # a gateway still starts


def test_bucket_is_uniform_over_0_to_99() -> None:
    buckets = [bucket_of(f"k{i}") for i in range(10000)]
    assert min(buckets) == 0 and max(buckets) == 99
    assert max(buckets.count(b) for b in range(100)) < 150
