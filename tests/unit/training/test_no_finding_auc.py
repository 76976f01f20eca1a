"""The image-level "finding vs No finding" AUC from the boxes: right order, undefined when one-sided."""

from __future__ import annotations

import numpy as np
import pytest

from training.evaluate import no_finding_auc
from training.paired import ImageResult

pytestmark = pytest.mark.unit


def _image(name: str, confs: list[float], findings: int) -> ImageResult:
    n = len(confs)
    return ImageResult(name, np.zeros(n, bool), np.array(confs), np.zeros(n), np.zeros(findings, int))


def test_auc_is_one_when_every_abnormal_image_outscores_every_normal_one() -> None:
    images = [_image("a", [0.9, 0.2], 1), _image("b", [0.7], 2), _image("n1", [0.3], 0), _image("n2", [], 0)]
    assert no_finding_auc(images) == 1.0


def test_auc_counts_misordered_pairs_and_is_undefined_for_one_kind_of_image() -> None:
    images = [_image("a", [0.5], 1), _image("b", [0.2], 1), _image("n", [0.4], 0)]
    assert no_finding_auc(images) == pytest.approx(0.5)  # one of the two (abnormal, normal) pairs in order
    assert no_finding_auc([_image("a", [0.5], 1)]) is None
    assert no_finding_auc([_image("n", [0.5], 0)]) is None
