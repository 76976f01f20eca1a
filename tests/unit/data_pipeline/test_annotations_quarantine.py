"""VinDr CSV validation: bad rows are quarantined with line numbers, never silently dropped."""

from __future__ import annotations

from pathlib import Path

import pytest

from data_pipeline.annotations import check_inside_images, load_annotations, merge_tables
from data_pipeline.errors import AnnotationError

pytestmark = pytest.mark.unit

HEADER = "image_id,class_name,class_id,rad_id,x_min,y_min,x_max,y_max\n"
GOOD = [
    "a,Cardiomegaly,3,R1,10,20,100,200",
    "a,No finding,14,R2,,,,",
    "b,Nodule/Mass,8,R1,50,50,90,60",
]
BAD = {
    "c,Nodule/Mass,8,R1,50,50,40,60": "x_min<x_max",
    "d,Bogus,3,R1,1,2,3,4": "class_name does not match",
    "e,No finding,14,R1,1,2,3,4": "must have no box",
    "f,Nodule/Mass,8,R1,abc,2,3,4": "not a number",
    "g,Nodule/Mass,22,R1,1,2,3,4": "outside 0..14",
    ",Nodule/Mass,8,R1,1,2,3,4": "image_id is empty",
    "h,Nodule/Mass,8,R1,,,,": "x_min<x_max",
}


def _write(tmp_path: Path, lines: list[str]) -> Path:
    path = tmp_path / "train.csv"
    path.write_text(HEADER + "\n".join(lines) + "\n")
    return path


def test_each_bad_row_is_quarantined_with_its_line_number_and_reason(tmp_path: Path) -> None:
    lines = GOOD + list(BAD)
    table = load_annotations(_write(tmp_path, lines))
    assert len(table.frame) == len(GOOD)
    assert table.total_rows == len(lines)
    by_line = dict(zip(table.quarantine["line"], table.quarantine["reason"], strict=True))
    for offset, (line, reason) in enumerate(BAD.items()):
        file_line = len(GOOD) + offset + 2  # header is line 1
        assert reason in by_line[file_line], (line, by_line.get(file_line))
    assert table.frame["line"].tolist() == [2, 3, 4]


def test_run_fails_with_actionable_message_above_the_bad_fraction(tmp_path: Path) -> None:
    table = load_annotations(_write(tmp_path, GOOD + list(BAD)))
    with pytest.raises(AnnotationError, match="CXR_MAX_BAD_ROW_FRACTION"):
        table.enforce(0.05)
    table.enforce(0.9)  # a lenient limit lets the run go on


def test_missing_columns_are_reported_by_name(tmp_path: Path) -> None:
    path = tmp_path / "x.csv"
    path.write_text("image_id,class_id\na,3\n")
    with pytest.raises(AnnotationError, match="class_name"):
        load_annotations(path)


def test_boxes_outside_a_known_image_and_unknown_images_are_quarantined(tmp_path: Path) -> None:
    table = load_annotations(_write(tmp_path, GOOD))
    checked = check_inside_images(table, {"a": (80, 300)})  # a's box reaches x=100 > 80; b is unknown
    reasons = dict(zip(checked.quarantine["line"], checked.quarantine["reason"], strict=True))
    assert reasons[2] == "box outside the image"
    assert reasons[4] == "image not found or not decodable"
    assert checked.frame["line"].tolist() == [3]


def test_feedback_rows_replace_the_readers_of_the_same_image(tmp_path: Path) -> None:
    base = load_annotations(_write(tmp_path, GOOD))
    extra_path = tmp_path / "fb.csv"
    extra_path.write_text(HEADER + "a,Pleural effusion,10,radiologist1,5,5,50,50\n")
    merged = merge_tables(base, load_annotations(extra_path))
    rows_a = merged.frame[merged.frame["image_id"] == "a"]
    assert rows_a["class_id"].tolist() == [10]
    assert (merged.frame["image_id"] == "b").sum() == 1
