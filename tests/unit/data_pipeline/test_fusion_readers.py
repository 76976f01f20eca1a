"""Weighted boxes fusion of readers: invariants, No finding handling, real-size speed."""

from __future__ import annotations

import time

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from data_pipeline.annotations import COLUMNS, parse_frame
from data_pipeline.classes import NO_FINDING, NO_FINDING_ID
from data_pipeline.fusion import FusionConfig, fuse_annotations
from data_pipeline.synth import vindr_like_annotations

pytestmark = pytest.mark.unit

W, H = 2000, 2400


@st.composite
def separated_boxes(draw: st.DrawFn) -> list[tuple[int, float, float, float, float]]:
    """Boxes in distinct cells of a 4x4 grid, so no two overlap (WBF must leave them alone)."""
    cells = draw(st.lists(st.integers(0, 15), min_size=1, max_size=6, unique=True))
    out = []
    for cell in cells:
        cx, cy = (cell % 4) * W / 4, (cell // 4) * H / 4
        x0 = cx + draw(st.floats(0, W / 8))
        y0 = cy + draw(st.floats(0, H / 8))
        x1 = x0 + draw(st.floats(20, W / 8 - 1))
        y1 = y0 + draw(st.floats(20, H / 8 - 1))
        out.append((draw(st.integers(0, 13)), round(x0, 1), round(y0, 1), round(x1, 1), round(y1, 1)))
    return out


def _frame(rows: list[tuple[object, ...]]) -> pd.DataFrame:
    raw = pd.DataFrame(rows, columns=list(COLUMNS)).astype(str).replace({"None": ""})
    return parse_frame(raw).frame


def _rows(boxes: list[tuple[int, float, float, float, float]], reader: str) -> list[tuple[object, ...]]:
    from data_pipeline.classes import CLASS_NAMES

    return [("img", CLASS_NAMES[c], c, reader, x0, y0, x1, y1) for c, x0, y0, x1, y1 in boxes]


def _sorted(arr: np.ndarray) -> np.ndarray:
    return arr[np.lexsort(arr.T[::-1])]


@settings(max_examples=25, deadline=None)
@given(boxes=separated_boxes())
def test_one_reader_gives_back_the_same_boxes(boxes: list[tuple[int, float, float, float, float]]) -> None:
    fused = fuse_annotations(_frame(_rows(boxes, "R1")), FusionConfig(), {"img": (W, H)})
    got = _sorted(fused[["class_id", "x_min", "y_min", "x_max", "y_max"]].to_numpy(dtype=float))
    want = _sorted(np.array(boxes, dtype=float))
    np.testing.assert_allclose(got, want, atol=1e-2)
    assert (fused["score"] == 1.0).all() and (fused["n_readers"] == 1).all()


@settings(max_examples=25, deadline=None)
@given(boxes=separated_boxes(), n_readers=st.integers(2, 5))
def test_identical_readers_give_the_same_boxes_with_full_agreement(
    boxes: list[tuple[int, float, float, float, float]], n_readers: int
) -> None:
    rows = [row for r in range(n_readers) for row in _rows(boxes, f"R{r}")]
    fused = fuse_annotations(_frame(rows), FusionConfig(), {"img": (W, H)})
    got = _sorted(fused[["class_id", "x_min", "y_min", "x_max", "y_max"]].to_numpy(dtype=float))
    np.testing.assert_allclose(got, _sorted(np.array(boxes, dtype=float)), atol=1e-2)
    assert (fused["n_readers"] == n_readers).all()
    np.testing.assert_allclose(fused["score"], 1.0)


def test_score_is_the_share_of_readers_who_drew_the_finding() -> None:
    box = (8, 100.0, 100.0, 300.0, 300.0)
    rows = _rows([box], "R1") + _rows([(8, 110.0, 105.0, 305.0, 290.0)], "R2")
    rows.append(("img", NO_FINDING, NO_FINDING_ID, "R3", None, None, None, None))
    fused = fuse_annotations(_frame(rows), FusionConfig(), {"img": (W, H)})
    assert len(fused) == 1
    assert fused["n_readers"].iloc[0] == 2
    assert fused["score"].iloc[0] == pytest.approx(2 / 3)
    assert 100 <= fused["x_min"].iloc[0] <= 110


def test_min_readers_drops_single_reader_boxes_and_image_becomes_no_finding() -> None:
    rows = _rows([(8, 100.0, 100.0, 300.0, 300.0)], "R1")
    rows += [("img", NO_FINDING, NO_FINDING_ID, r, None, None, None, None) for r in ("R2", "R3")]
    fused = fuse_annotations(_frame(rows), FusionConfig(min_readers=2), {"img": (W, H)})
    assert fused["class_id"].tolist() == [NO_FINDING_ID]
    assert fused["score"].iloc[0] == pytest.approx(2 / 3)


def test_by_default_a_box_needs_half_of_the_images_readers() -> None:
    """2 of 3 readers agree on one finding; one reader alone drew another: only the first is truth."""
    agreed = (8, 100.0, 100.0, 300.0, 300.0)
    rows = _rows([agreed, (3, 600.0, 600.0, 700.0, 700.0)], "R1") + _rows([agreed], "R2")
    rows.append(("img", NO_FINDING, NO_FINDING_ID, "R3", None, None, None, None))
    fused = fuse_annotations(_frame(rows), FusionConfig(), {"img": (W, H)})
    assert fused["class_id"].tolist() == [8]
    assert fused["n_readers"].tolist() == [2]
    kept_all = fuse_annotations(_frame(rows), FusionConfig(min_reader_share=0.0), {"img": (W, H)})
    assert sorted(kept_all["class_id"].tolist()) == [3, 8]


def test_the_row_order_of_the_file_does_not_change_the_fused_boxes() -> None:
    """Three readers' boxes in a chain (R1 overlaps R2, R2 overlaps R3, R1 barely R3): WBF clusters
    greedily in input order, so each row order used to give other boxes or other reader counts."""
    import itertools

    rows = (
        _rows([(8, 100.0, 100.0, 200.0, 200.0)], "R1")
        + _rows([(8, 125.0, 100.0, 225.0, 200.0)], "R2")
        + _rows([(8, 150.0, 100.0, 250.0, 200.0)], "R3")
    )
    results = set()
    for perm in itertools.permutations(rows):
        fused = fuse_annotations(_frame(list(perm)), FusionConfig(), {"img": (1000, 1000)})
        cols = ["class_id", "x_min", "y_min", "x_max", "y_max", "n_readers"]
        results.add(fused[cols].round(3).to_csv(index=False))
    assert len(results) == 1, results


@pytest.mark.parametrize(
    ("readers", "share", "needed"), [(1, 0.5, 1), (2, 0.5, 1), (3, 0.5, 2), (5, 0.5, 3), (3, 0.0, 1)]
)
def test_required_readers(readers: int, share: float, needed: int) -> None:
    assert FusionConfig(min_reader_share=share).required_readers(readers) == needed


def test_vindr_sized_file_fuses_in_seconds() -> None:
    """The real train.csv has ~68k rows for 15k images; fusion must stay well under 30 s here."""
    raw = vindr_like_annotations(15_000, seed=1).astype(str).replace({"nan": ""})
    frame = parse_frame(raw).frame
    assert len(frame) > 60_000
    start = time.perf_counter()
    fused = fuse_annotations(frame, FusionConfig())
    seconds = time.perf_counter() - start
    assert fused["image_id"].nunique() == 15_000
    assert seconds < 30, f"fusion took {seconds:.1f} s"
