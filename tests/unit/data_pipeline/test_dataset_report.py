"""The dataset report: drawn at ingest into the version, counts that match it, reader agreement, CLI."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from data_pipeline.annotations import COLUMNS, load_annotations
from data_pipeline.cli import app
from data_pipeline.config import DataSettings
from data_pipeline.geometry import pairwise_iou
from data_pipeline.ingest import DatasetBuild, build_dataset
from data_pipeline.report import (
    INDEX,
    READERS_CSV,
    REPORT_DIR,
    REPORT_JSON,
    build_report,
    load_version,
    reader_agreement,
)
from data_pipeline.synth import SynthConfig, generate
from data_pipeline.versioning import verify

pytestmark = pytest.mark.unit

FIGURES = {
    "class_counts.png",
    "boxes_per_image.png",
    "box_sizes.png",
    "box_aspect.png",
    "reader_agreement.png",
    "samples.png",
}


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    generate(SynthConfig(n_images=14, seed=7, size=256, workers=1), out)
    return out


@pytest.fixture(scope="module")
def built(phantoms: Path, tmp_path_factory: pytest.TempPathFactory) -> DatasetBuild:
    return build_dataset(
        phantoms / "dicom",
        phantoms / "annotations.csv",
        tmp_path_factory.mktemp("datasets"),
        settings=DataSettings(max_side=128, workers=1),
        feedback=False,
    )


def _rows(*rows: tuple[str, int, str, float, float, float, float]) -> pd.DataFrame:
    from data_pipeline.classes import ALL_LABELS

    return pd.DataFrame([(i, ALL_LABELS[c], c, r, *xyxy) for i, c, r, *xyxy in rows], columns=list(COLUMNS))


def test_ingest_draws_the_report_into_the_version_where_the_manifest_lists_and_hashes_it(
    built: DatasetBuild,
) -> None:
    report = built.path / REPORT_DIR
    assert built.report == report / INDEX
    assert {p.name for p in report.iterdir()} == {*FIGURES, REPORT_JSON, INDEX}
    for png in FIGURES:
        assert (report / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
    assert built.manifest["report"] == f"{REPORT_DIR}/{INDEX}"
    assert {f"{REPORT_DIR}/{name}" for name in FIGURES} <= set(built.manifest["files"])
    assert READERS_CSV in built.manifest["files"]  # what reader agreement is computed from
    assert built.stage_seconds["report"] > 0
    verify(built.path)  # so it is uploaded with the version and checked when fetched


def test_report_numbers_match_the_version_they_describe(built: DatasetBuild) -> None:
    numbers = json.loads((built.path / REPORT_DIR / REPORT_JSON).read_text())
    counts = built.manifest["counts"]
    assert numbers["version"] == built.version
    assert numbers["images"] == counts["images"]
    assert numbers["boxes_per_class"] == counts["boxes_per_class"]
    label_lines = sum(len(p.read_text().splitlines()) for p in (built.path / "labels").rglob("*.txt"))
    assert numbers["box_size"]["boxes"] == label_lines > 0
    histogram = {int(k): v for k, v in numbers["boxes_per_image"]["histogram"].items()}
    assert sum(histogram.values()) == sum(counts["images"].values())
    assert sum(k * v for k, v in histogram.items()) == label_lines
    assert len(numbers["samples"]) == 12 and set(numbers["samples"]) <= set(built.manifest["images"])
    assert 0.0 < numbers["reader_agreement"]["mean_iou"] < 1.0  # the phantoms' readers jitter


def test_the_page_is_self_contained_and_shows_the_counts(built: DatasetBuild) -> None:
    report = built.path / REPORT_DIR
    page = (report / INDEX).read_text()
    assert "http" not in page and "<script" not in page  # closed networks: nothing fetched from outside
    for ref in re.findall(r'(?:src|href)="([^"]+)"', page):
        assert (report / ref).is_file(), ref
    assert set(re.findall(r'src="([^"]+)"', page)) == FIGURES
    train = built.manifest["counts"]["images"]["train"]
    assert f"<tr><th>images</th><td>{train}</td>" in page
    assert built.version in page


def test_redrawing_from_the_version_folder_gives_the_same_report(built: DatasetBuild, tmp_path: Path) -> None:
    summary = build_report(built.path, tmp_path / "again")
    assert summary.version == built.version and summary.index.is_file()
    for name in (REPORT_JSON, *sorted(FIGURES)):
        assert (tmp_path / "again" / name).read_bytes() == (built.path / REPORT_DIR / name).read_bytes(), name


def test_reader_agreement_is_the_best_same_class_iou_per_box_and_other_reader() -> None:
    same = reader_agreement(
        _rows(("a", 3, "R1", 0, 0, 10, 10), ("a", 3, "R2", 0, 0, 10, 10), ("a", 3, "R3", 0, 0, 10, 10))
    )
    assert same.mean == 1.0 and len(same.ious) == 6  # 3 boxes x 2 other readers
    shifted = reader_agreement(_rows(("a", 3, "R1", 0, 0, 10, 10), ("a", 3, "R2", 5, 0, 15, 10)))
    assert shifted.ious.tolist() == pytest.approx([1 / 3, 1 / 3])
    # another class in the same place, or a reader who saw the image and drew nothing, is no match
    other = reader_agreement(
        _rows(
            ("a", 3, "R1", 0, 0, 10, 10),
            ("a", 8, "R2", 0, 0, 10, 10),
            ("a", 14, "R3", np.nan, np.nan, np.nan, np.nan),
        )
    )
    assert other.ious.tolist() == [0.0] * 4
    assert other.per_class()["Cardiomegaly"] == {"pairs": 2, "mean_iou": 0.0, "missed_share": 1.0}
    # one reader alone has nobody to agree with
    assert reader_agreement(_rows(("b", 3, "R1", 0, 0, 10, 10))).mean is None


def test_identical_readers_agree_fully_and_jittered_ones_less(built: DatasetBuild, tmp_path: Path) -> None:
    readers = load_annotations(built.path / READERS_CSV).frame[list(COLUMNS)]
    copies = []
    for _, rows in readers.groupby("image_id"):
        first = rows[rows["rad_id"] == rows["rad_id"].iloc[0]]
        for rad in rows["rad_id"].unique():
            copies.append(first.assign(rad_id=rad))
    identical = pd.concat(copies, ignore_index=True)
    identical.to_csv(tmp_path / "identical.csv", index=False)
    rng = np.random.default_rng(0)
    jittered = identical.copy()
    moved = jittered["rad_id"] != jittered.groupby("image_id")["rad_id"].transform("first")
    jittered.loc[moved, ["x_min", "x_max"]] += rng.uniform(3, 8, size=(int(moved.sum()), 1))
    jittered.to_csv(tmp_path / "jittered.csv", index=False)

    full = build_report(load_version(built.path, tmp_path / "identical.csv"), tmp_path / "identical")
    less = build_report(load_version(built.path, tmp_path / "jittered.csv"), tmp_path / "jittered")
    assert full.reader_agreement == pytest.approx(1.0)
    assert less.reader_agreement is not None and 0.3 < less.reader_agreement < 0.99
    numbers = json.loads((tmp_path / "identical" / REPORT_JSON).read_text())["reader_agreement"]
    assert numbers["missed_share"] == 0.0
    assert all(c["mean_iou"] == 1.0 for c in numbers["per_class"].values())


def test_a_version_without_the_readers_rows_gets_a_report_without_agreement(
    built: DatasetBuild, tmp_path: Path
) -> None:
    inputs = load_version(built.path)
    older = type(inputs)(inputs.version, inputs.root, inputs.images, inputs.fused, None)
    summary = build_report(older, tmp_path)
    assert summary.reader_agreement is None and not (tmp_path / "reader_agreement.png").exists()
    assert "Not available" in (tmp_path / INDEX).read_text()


def test_pairwise_iou_matches_hand_computed_values() -> None:
    a = np.array([[0, 0, 10, 10], [0, 0, 0, 0]])
    b = np.array([[5, 0, 15, 10], [20, 20, 30, 30], [0, 0, 10, 10]])
    np.testing.assert_allclose(pairwise_iou(a, b), [[1 / 3, 0.0, 1.0], [0.0, 0.0, 0.0]])


def test_cli_report_draws_a_version_folder_and_refuses_other_folders(
    built: DatasetBuild, tmp_path: Path
) -> None:
    runner = CliRunner()
    env = {"CXR_STACK_DIR": str(tmp_path / "stack")}
    result = runner.invoke(app, ["report", str(built.path), "--out", str(tmp_path / "r")], env=env)
    assert result.exit_code == 0, result.output
    assert result.output.strip().splitlines()[-1] == str(tmp_path / "r" / INDEX)
    assert json.loads((tmp_path / "r" / REPORT_JSON).read_text())["version"] == built.version
    result = runner.invoke(app, ["report", str(tmp_path), "--out", str(tmp_path / "x")], env=env)
    assert result.exit_code == 1
    assert "not a dataset version folder" in " ".join(result.output.split())
    assert "Traceback" not in result.output
