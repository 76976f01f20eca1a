"""Per-subgroup mAP@0.4: grouping, class-matched reference, the registry tag, MLflow names, the card."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from mlflow.utils.validation import _validate_metric_name

from tests.unit.training.test_training_evaluate import OraclePredictor
from training.config import EvalConfig
from training.dataset import open_dataset_dir
from training.evaluate import evaluate
from training.paired import ImageResult
from training.subgroups import (
    SUBGROUP_TAG,
    SubgroupMetrics,
    card_section,
    decode_tag,
    encode_tag,
    run_metrics,
    subgroup_metrics,
    version_tags,
)

pytestmark = pytest.mark.unit


def _image(image_id: str, gt: list[int], preds: list[tuple[int, float, bool]]) -> ImageResult:
    """One image: ground-truth classes and (class, confidence, true positive) detections."""
    return ImageResult(
        image_id,
        np.array([p[2] for p in preds], dtype=bool),
        np.array([p[1] for p in preds], dtype=float),
        np.array([p[0] for p in preds], dtype=float),
        np.array(gt, dtype=int),
    )


def _by(metrics: list[SubgroupMetrics], attribute: str) -> dict[str, SubgroupMetrics]:
    return {m.value: m for m in metrics if m.attribute == attribute}


def test_a_vendor_whose_findings_are_all_missed_is_far_below_overall() -> None:
    good = [_image(f"a{i}", [0], [(0, 0.9, True)]) for i in range(4)]
    bad = [_image(f"b{i}", [0], [(0, 0.8, False)]) for i in range(4)]
    attrs = {r.image_id: {"manufacturer": "Good", "sex": "F"} for r in good}
    attrs |= {r.image_id: {"manufacturer": "Bad", "sex": "F"} for r in bad}
    metrics = subgroup_metrics([*good, *bad], attrs)
    vendors = _by(metrics, "manufacturer")
    assert vendors["Good"].images == vendors["Bad"].images == 4
    assert vendors["Good"].map40 == pytest.approx(1.0, abs=0.01)
    assert vendors["Bad"].map40 == pytest.approx(0.0, abs=1e-9)
    # half the boxes found, all before any false positive: overall AP 0.5
    assert vendors["Bad"].reference_map40 == pytest.approx(0.5, abs=0.02)
    assert vendors["Bad"].gap == pytest.approx(0.5, abs=0.02)
    assert vendors["Good"].gap == pytest.approx(-0.5, abs=0.02)
    assert vendors["Bad"].flagged(max_gap=0.1, min_images=4, min_boxes=1)
    assert not vendors["Bad"].flagged(max_gap=0.1, min_images=5, min_boxes=1)  # too few images to judge
    assert not vendors["Bad"].flagged(max_gap=0.1, min_images=4)  # nor boxes, by default (its AP is luck)
    assert not vendors["Good"].flagged(max_gap=0.1, min_images=1, min_boxes=1)
    # every image has sex F: that group is the whole set, no gap; absent attributes are "unknown"
    assert _by(metrics, "sex")["F"].gap == pytest.approx(0.0, abs=1e-9)
    assert set(_by(metrics, "view")) == {"unknown"} and _by(metrics, "view")["unknown"].images == 8


def test_the_reference_averages_only_the_classes_the_group_has() -> None:
    """A group holding only an easy class is compared with that class overall, not the headline mAP."""
    easy = [_image(f"e{i}", [1], [(1, 0.9, True)]) for i in range(3)]
    hard_found = [_image(f"f{i}", [0], [(0, 0.9, True)]) for i in range(3)]
    hard_missed = [_image(f"m{i}", [0], [(0, 0.8, False)]) for i in range(3)]
    attrs = {r.image_id: {"view": "PA"} for r in [*hard_found, *hard_missed]} | {
        r.image_id: {"view": "AP"} for r in easy
    }
    views = _by(subgroup_metrics([*easy, *hard_found, *hard_missed], attrs), "view")
    assert views["AP"].map40 == pytest.approx(1.0, abs=0.01)
    assert views["AP"].reference_map40 == pytest.approx(1.0, abs=0.01)  # class 1 overall, not mAP 0.75
    assert views["AP"].gap == pytest.approx(0.0, abs=1e-9)
    assert views["PA"].reference_map40 == pytest.approx(0.5, abs=0.02)


def test_images_without_attributes_are_left_out_and_groups_without_boxes_are_unmeasured() -> None:
    results = [
        _image("x", [0], [(0, 0.9, True)]),
        _image("y", [], [(0, 0.5, False)]),
        _image("z", [0], [(0, 0.9, False)]),
    ]
    metrics = subgroup_metrics(results, {"x": {"sex": "M"}, "y": {"sex": "F"}})
    sexes = _by(metrics, "sex")
    assert sexes["M"].images == 1 and sexes["F"].images == 1  # "z" has no attributes: not counted
    assert sexes["F"].map40 is None and sexes["F"].gap is None and not sexes["F"].flagged(0.0, 1)
    assert subgroup_metrics(results, {}) == []


def test_the_tag_round_trips_and_stays_within_mlflows_limit() -> None:
    metrics = [
        SubgroupMetrics(
            attribute="manufacturer",
            value=f"Vendor {i:03d} " + "x" * 40,
            images=200 - i,
            instances=3 * (200 - i),
            map40=0.3,
            reference_map40=0.35,
        )
        for i in range(200)
    ]
    tag = encode_tag(metrics)
    assert len(tag) <= 5000
    data = json.loads(tag)
    assert data["dropped"] > 0 and len(data["groups"]) + data["dropped"] == 200
    decoded = decode_tag(tag)
    assert decoded is not None and decoded[0].images == 200  # the largest groups are kept
    assert decoded[0].gap == pytest.approx(0.05)
    few = metrics[:3]
    assert decode_tag(encode_tag(few)) == [m.model_copy(update={"value": m.value[:64]}) for m in few]
    assert decode_tag(None) is None and decode_tag("{not json") is None and decode_tag('{"v":1}') is None
    assert version_tags([]) == {} and SUBGROUP_TAG in version_tags(few)


def test_metric_names_are_ones_mlflow_accepts() -> None:
    values = ["90+", "40-49", "Acme/Scan (v2)", "..", "unknown", "Dunmore Phantom CR"]
    metrics = [
        SubgroupMetrics(attribute="age_band", value=v, images=5, instances=5, map40=0.2, reference_map40=0.3)
        for v in values
    ]
    names = run_metrics(metrics)
    assert "test/subgroup/age_band/90_/map40" in names and "test/subgroup/age_band/40-49/gap" in names
    assert len({n.rsplit("/", 1)[0] for n in names}) == len(values)
    for name in names:
        _validate_metric_name(name)


def test_the_card_section_flags_the_subgroup_beyond_the_gap() -> None:
    metrics = [
        SubgroupMetrics(
            attribute="manufacturer", value="Bad", images=30, instances=60, map40=0.1, reference_map40=0.4
        ),
        SubgroupMetrics(
            attribute="manufacturer", value="Tiny", images=3, instances=3, map40=0.0, reference_map40=0.4
        ),
        SubgroupMetrics(
            attribute="manufacturer", value="Sparse", images=30, instances=12, map40=0.0, reference_map40=0.4
        ),
        SubgroupMetrics(
            attribute="manufacturer", value="Good", images=90, instances=99, map40=0.45, reference_map40=0.4
        ),
    ]
    section = card_section(metrics, max_gap=0.1, min_images=20)
    assert section.startswith("## Subgroups")
    assert "| manufacturer | Bad | 30 | 60 | 0.1000 | 0.4000 | +0.3000 | **yes** |" in section
    assert "| Tiny | 3 | 3 | 0.0000 | 0.4000 | +0.4000 | too few images |" in section
    assert "| Sparse | 30 | 12 | 0.0000 | 0.4000 | +0.4000 | too few boxes |" in section
    assert "| Good | 90 | 99 | 0.4500 | 0.4000 | -0.0500 | no |" in section
    assert "1 subgroup(s) more than 0.1 below overall" in section
    assert "Not measured" in card_section([])


def test_a_vendor_name_from_the_dicom_is_text_in_the_card_not_markup() -> None:
    """Manufacturer is the DICOM's (anyone's) text: a link or an HTML tag in it stays literal."""
    value = "[Acme](http://evil.example) <img src=x> *CR*|x"
    metrics = [
        SubgroupMetrics(
            attribute="manufacturer", value=value, images=30, instances=60, map40=0.1, reference_map40=0.4
        ),
        SubgroupMetrics(
            attribute="age_band", value="40-49", images=30, instances=40, map40=0.4, reference_map40=0.4
        ),
    ]
    section = card_section(metrics, max_gap=0.1, min_images=20)
    escaped = r"\[Acme\](http://evil.example) \<img src=x\> \*CR\*\|x"
    assert f"| manufacturer | {escaped} | 30 |" in section
    assert f"manufacturer={escaped} (+0.3000)" in section
    assert not re.search(r"(?<!\\)[<\[]", section.split("| --- |")[-1]), "unescaped markup in the rows"
    assert "| age_band | 40-49 |" in section


def test_evaluate_reports_the_subgroup_a_model_fails(tiny_dataset_dir: Path, tmp_path: Path) -> None:
    """The evaluation path: manifest attributes -> per-image matches -> a subgroup far below overall."""
    root = shutil.copytree(tiny_dataset_dir, tmp_path / "data")
    manifest = json.loads((root / "manifest.json").read_text())
    tests = sorted(p.stem for p in (root / "images" / "test").glob("*.png"))
    worse = set(tests[::2])
    manifest["images"] = {
        stem: {"subgroups": {"manufacturer": "Old CR" if stem in worse else "New DR", "sex": "M"}}
        for stem in tests
    }
    (root / "manifest.json").write_text(json.dumps(manifest))
    dataset = open_dataset_dir(root, tmp_path / "work")
    predictor = OraclePredictor(dataset, "test", 64)
    for i, image in enumerate(dataset.images("test")):  # boxes 60% of a width off: misses at IoU 0.4
        if image.stem in worse:
            boxes, cls = predictor.answers[i]
            shifted = boxes.copy()
            shifted[:, [0, 2]] += 0.6 * (boxes[:, 2] - boxes[:, 0])[:, None]
            predictor.answers[i] = (shifted, cls)
    report = evaluate(predictor, dataset, EvalConfig(), split="test", latency=False)
    vendors = _by(report.subgroups, "manufacturer")
    assert vendors["Old CR"].images == len(worse) and vendors["New DR"].images == len(tests) - len(worse)
    assert vendors["New DR"].map40 == pytest.approx(1.0, abs=0.02)
    assert vendors["Old CR"].map40 == pytest.approx(0.0, abs=0.02)
    assert vendors["Old CR"].gap is not None and vendors["Old CR"].gap > 0.3
    assert report.model_dump(mode="json")["subgroups"]  # evaluation.json carries them
