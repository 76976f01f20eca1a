"""Stage model files: schema, round trip, one-line diffs, actionable errors."""

from __future__ import annotations

import difflib
from pathlib import Path

import pytest

from core.errors import StageFileError
from core.stage_file import (
    Stage,
    StageFile,
    read_stage_file,
    render_stage_file,
    stage_file_path,
    write_stage_file,
)
from core.stages import as_stage

pytestmark = pytest.mark.unit


def test_missing_file_means_stage_serves_nothing(tmp_path: Path) -> None:
    content = read_stage_file(tmp_path, "production")
    assert content.model_version == ""
    assert not content.serves
    assert read_stage_file(tmp_path, "canary").canary_weight == 0


def test_write_then_read_round_trips_and_lands_in_the_overlay(tmp_path: Path) -> None:
    written = StageFile(stage="canary", model_version="7", canary_weight=50)
    path = write_stage_file(tmp_path, written)
    assert path == tmp_path / "k8s" / "overlays" / "canary" / "model.yaml"
    assert read_stage_file(tmp_path, "canary") == written


def test_changing_the_version_is_a_one_line_diff() -> None:
    before = render_stage_file(StageFile(stage="production", model_version="3")).splitlines()
    after = render_stage_file(StageFile(stage="production", model_version="4")).splitlines()
    changed = [line for line in difflib.unified_diff(before, after, lineterm="", n=0) if line[:1] in "+-"]
    assert changed == ["--- ", "+++ ", '-model_version: "3"', '+model_version: "4"']


def test_unquoted_integer_version_is_read_as_text(tmp_path: Path) -> None:
    path = stage_file_path(tmp_path, "staging")
    path.parent.mkdir(parents=True)
    path.write_text("stage: staging\nmodel_name: cxr-detector\nmodel_version: 12\n")
    assert read_stage_file(tmp_path, "staging").model_version == "12"


@pytest.mark.parametrize(
    ("stage", "text", "message"),
    [
        ("production", "stage: production\nmodel_version: latest\n", "model_version"),
        ("production", 'stage: production\nmodel_version: "\u00b2"\n', "model_version"),  # "²".isdigit()
        ("staging", 'stage: staging\nmodel_version: "\u0663"\n', "model_version"),  # Arabic-Indic 3
        # the name becomes a folder of the published Triton repository and a line of the file
        ("production", 'stage: production\nmodel_name: "../../canary/x"\n', "model_name"),
        ("production", 'stage: production\nmodel_name: "x\\nmodel_version: \\"9\\""\n', "model_name"),
        ("production", 'stage: production\nmodel_name: ""\n', "model_name"),
        ("production", 'stage: production\nmodel_name: ".."\n', "model_name"),
        ("production", "stage: production\ncanary_weight: 10\n", "canary file only"),
        ("canary", "stage: canary\ncanary_weight: 150\n", "canary_weight"),
        ("production", "stage: staging\n", "lives in the 'production' overlay"),
        ("production", "stage: production\nunknown_key: 1\n", "unknown_key"),
        ("production", "- a list\n", "must be a mapping"),
        ("production", "stage: [unclosed\n", "not valid YAML"),
    ],
)
def test_invalid_file_raises_typed_error_naming_the_problem(
    tmp_path: Path, stage: Stage, text: str, message: str
) -> None:
    path = stage_file_path(tmp_path, stage)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    with pytest.raises(StageFileError, match=message):
        read_stage_file(tmp_path, stage)


def test_unknown_stage_name_is_rejected_with_the_valid_choices() -> None:
    assert as_stage("canary") == "canary"
    with pytest.raises(StageFileError, match="staging, canary, production"):
        as_stage("prod")


def test_committed_overlay_files_are_valid() -> None:
    root = Path(__file__).resolve().parents[3]
    for stage in ("staging", "canary", "production"):
        assert read_stage_file(root, stage).stage == stage


def test_writing_a_stage_file_never_touches_another_writers_temp_file(tmp_path: Path) -> None:
    """Two writers once shared ``model.yaml.tmp``: one could move the other's half-written text."""
    path = stage_file_path(tmp_path, "canary")
    path.parent.mkdir(parents=True)
    theirs = path.with_suffix(".yaml.tmp")
    theirs.write_text("stage: canary\nmodel_ver")  # another writer, mid-write
    written = StageFile(stage="canary", model_version="5", canary_weight=10)
    write_stage_file(tmp_path, written)
    assert read_stage_file(tmp_path, "canary") == written
    assert theirs.read_text() == "stage: canary\nmodel_ver"  # theirs is still theirs to finish
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.yaml", "model.yaml.tmp"]  # no leftovers
