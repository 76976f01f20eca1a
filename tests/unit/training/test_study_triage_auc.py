"""The study-level triage AUC: the gateway's score (max over a study's images) vs "has a finding"."""

from __future__ import annotations

import numpy as np
import pytest

from training.evaluate import no_finding_auc, study_triage_auc
from training.paired import ImageResult

pytestmark = pytest.mark.unit


def _image(name: str, confs: list[float], findings: int) -> ImageResult:
    n = len(confs)
    return ImageResult(name, np.zeros(n, bool), np.array(confs), np.zeros(n), np.zeros(findings, int))


def test_a_study_is_scored_by_its_best_image_and_is_abnormal_when_any_image_is() -> None:
    # study s1: the readers' box is on the PA (scored 0.1), the model is confident on the lateral (0.8)
    images = [
        _image("s1-pa", [0.1], 1),
        _image("s1-lat", [0.8, 0.2], 0),
        _image("s2-pa", [0.5], 0),
        _image("s3-pa", [], 0),
    ]
    studies = {"s1-pa": "s1", "s1-lat": "s1", "s2-pa": "s2", "s3-pa": "s3"}
    assert study_triage_auc(images, studies) == 1.0  # s1 scores 0.8 > 0.5 > 0
    # per image, s1's PA (0.1) ranks below every box-free image but s3: the image-level AUC is 1/3
    assert no_finding_auc(images) == pytest.approx(1 / 3)


def test_without_a_study_map_each_image_is_its_own_study_like_the_image_auc() -> None:
    images = [_image("a", [0.5], 1), _image("b", [0.2], 1), _image("n", [0.4], 0), _image("m", [], 0)]
    assert study_triage_auc(images) == pytest.approx(no_finding_auc(images))
    assert study_triage_auc(images) == pytest.approx(0.75)


def test_study_auc_is_undefined_when_every_study_is_of_one_kind() -> None:
    images = [_image("a", [0.1], 0), _image("b", [0.3], 1)]
    assert study_triage_auc(images, {"a": "s", "b": "s"}) is None  # one study, abnormal
    assert study_triage_auc([_image("n", [0.4], 0)]) is None
