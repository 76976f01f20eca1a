"""``cxr data`` commands: exit codes and messages a person can act on."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from data_pipeline.cli import app

pytestmark = pytest.mark.unit


def _text(output: str) -> str:
    """Rich wraps long lines at the terminal width; compare words, not line breaks."""
    return " ".join(output.split())


HEADER = "image_id,class_name,class_id,rad_id,x_min,y_min,x_max,y_max\n"


def test_validate_passes_a_clean_file_and_fails_a_bad_one_with_line_numbers(tmp_path: Path) -> None:
    runner = CliRunner()
    env = {"CXR_STACK_DIR": str(tmp_path / "stack")}
    good = tmp_path / "good.csv"
    good.write_text(HEADER + "a,Cardiomegaly,3,R1,10,20,100,200\na,No finding,14,R2,,,,\n")
    result = runner.invoke(app, ["validate", "--annotations", str(good)], env=env)
    assert result.exit_code == 0, result.output
    bad = tmp_path / "bad.csv"
    bad.write_text(HEADER + "a,Cardiomegaly,3,R1,10,20,100,200\nb,Bogus,3,R1,1,2,3,4\n")
    result = runner.invoke(app, ["validate", "--annotations", str(bad)], env=env)
    assert result.exit_code == 1
    assert "line 3" in _text(result.output)
    assert "class_name does not match class_id" in _text(result.output)


def test_validate_refuses_a_file_with_a_header_and_no_rows(tmp_path: Path) -> None:
    """A header alone labels no image: "ok" would pass an export that stopped after its first line."""
    empty = tmp_path / "empty.csv"
    empty.write_text(HEADER)
    result = CliRunner().invoke(
        app, ["validate", "--annotations", str(empty)], env={"CXR_STACK_DIR": str(tmp_path / "stack")}
    )
    assert result.exit_code == 1, result.output
    assert "no annotation rows" in _text(result.output) and "Traceback" not in result.output


def test_invalid_setting_is_reported_without_a_traceback(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app,
        ["validate", "--annotations", str(tmp_path / "x.csv")],
        env={"CXR_WORKERS": "many", "CXR_STACK_DIR": str(tmp_path)},
    )
    assert result.exit_code == 2
    assert "workers" in _text(result.output) and "Traceback" not in result.output


def test_ingest_of_a_missing_folder_is_one_error_line(tmp_path: Path) -> None:
    csv = tmp_path / "a.csv"
    csv.write_text(HEADER)
    result = CliRunner().invoke(
        app,
        [
            "ingest",
            "--dicom-dir",
            str(tmp_path / "nope"),
            "--annotations",
            str(csv),
            "--out",
            str(tmp_path / "o"),
            "--upload",
            "no",
        ],
        env={"CXR_STACK_DIR": str(tmp_path / "stack")},
    )
    assert result.exit_code == 1
    assert "does not exist" in _text(result.output)


def test_a_folder_or_a_file_in_the_wrong_place_is_one_error_line(tmp_path: Path) -> None:
    """--annotations naming a folder, --out naming a file, --dicom-dir naming nothing: no traceback."""
    runner = CliRunner()
    env = {"CXR_STACK_DIR": str(tmp_path / "stack")}
    csv = tmp_path / "a.csv"
    csv.write_text(HEADER + "a,No finding,14,R1,,,,\n")
    images = tmp_path / "images"
    images.mkdir()
    cases = {
        "cannot be read": ["validate", "--annotations", str(tmp_path)],
        "image folder": ["validate", "--annotations", str(csv), "--dicom-dir", str(tmp_path / "nope")],
        "is a file, not a folder": ["synth", "--out", str(csv), "--n-images", "1", "--size", "64"],
    }
    ingest = ["ingest", "--dicom-dir", str(images), "--annotations", str(csv), "--upload", "no"]
    cases["is a file, not a folder "] = [*ingest, "--out", str(csv)]
    for expected, args in cases.items():
        result = runner.invoke(app, args, env=env)
        text = _text(result.output)
        assert result.exit_code == 1, (args, result.output)
        assert expected.strip() in text and "Traceback" not in text, (args, text)
        assert isinstance(result.exception, SystemExit), (args, result.exception)
    # the missing image folder is named, not blamed on every row of the CSV
    result = runner.invoke(app, cases["image folder"], env=env)
    assert "does not exist" in _text(result.output) and "quarantined" not in result.output


def test_fetch_latest_with_the_store_down_says_so_not_that_nothing_was_published(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app,
        ["fetch", "latest", "--cache-dir", str(tmp_path / "cache")],
        env={
            "CXR_STACK_DIR": str(tmp_path / "stack"),
            "CXR_S3_ENDPOINT": "http://127.0.0.1:9",
            "CXR_S3_ACCESS_KEY": "k",
            "CXR_S3_SECRET_KEY": "s",
        },
    )
    text = _text(result.output)
    assert result.exit_code == 1
    assert "unreachable" in text and "no dataset published" not in text


def test_an_s3_endpoint_that_is_no_url_is_one_error_line(tmp_path: Path) -> None:
    for endpoint in ("http://[::1", "http://127.0.0.1:port"):
        result = CliRunner().invoke(
            app, ["buckets"], env={"CXR_STACK_DIR": str(tmp_path), "CXR_S3_ENDPOINT": endpoint}
        )
        assert result.exit_code == 1, (endpoint, result.output)
        assert "is not a URL like" in _text(result.output), (endpoint, result.output)
        assert isinstance(result.exception, SystemExit), (endpoint, result.exception)


def test_synth_refuses_a_negative_seed_or_an_absurd_size_as_usage_errors(tmp_path: Path) -> None:
    """numpy raised ValueError for a negative seed, OpenCV a cv2.error for a side past its int, and
    10**20 images never finished listing patients: each was a traceback or a hang, not a usage line."""
    for args, option in (
        (["--seed", "-5"], "--seed"),
        (["--size", "99999999999"], "--size"),
        (["--n-images", "99999999999999999999"], "--n-images"),
    ):
        result = CliRunner().invoke(app, ["synth", "--out", str(tmp_path / "s"), "--workers", "1", *args])
        assert result.exit_code == 2, (args, result.output)
        assert f"Invalid value for '{option}'" in result.output, (args, result.output)
        assert not (tmp_path / "s").exists()
