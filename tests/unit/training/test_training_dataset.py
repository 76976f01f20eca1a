"""Dataset resolution: moved folders still train, wrong or incomplete datasets are refused clearly."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from training.dataset import open_dataset_dir, resolve_dataset
from training.errors import DatasetError

pytestmark = pytest.mark.unit


def test_moved_dataset_gets_a_data_yaml_pointing_at_its_new_place(
    tiny_dataset_dir: Path, tmp_path: Path
) -> None:
    moved = tmp_path / "elsewhere" / tiny_dataset_dir.name
    shutil.copytree(tiny_dataset_dir, moved)
    ref = open_dataset_dir(moved, tmp_path / "work")
    data = yaml.safe_load(ref.data_yaml.read_text())
    assert data["path"] == str(moved.resolve())
    assert ref.version == tiny_dataset_dir.name and ref.synthetic
    assert len(ref.images("train")) == 16
    assert (moved / "data.yaml").read_text() == (
        tiny_dataset_dir / "data.yaml"
    ).read_text()  # original untouched


def test_dataset_with_other_class_names_is_refused(tiny_dataset_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "ds"
    shutil.copytree(tiny_dataset_dir, copy)
    (copy / "data.yaml").write_text(yaml.safe_dump({"path": str(copy), "names": {0: "cat", 1: "dog"}}))
    with pytest.raises(DatasetError, match="14 VinDr findings"):
        open_dataset_dir(copy, tmp_path / "work")


def test_folder_without_data_yaml_is_refused(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"no data\.yaml"):
        open_dataset_dir(tmp_path, tmp_path / "work")


def test_missing_directory_path_is_refused_without_contacting_the_store(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="does not exist"):
        resolve_dataset(str(tmp_path / "missing" / "dir"), tmp_path / "work", tmp_path / "cache")
