"""Symbolic links in an ingest's image folder: refused and listed with their reason, never followed."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from data_pipeline import export
from data_pipeline.config import DataSettings
from data_pipeline.dicom_io import read_image_file
from data_pipeline.errors import UnsupportedImage
from data_pipeline.ingest import build_dataset
from data_pipeline.synth import SynthConfig, generate

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    generate(SynthConfig(n_images=8, seed=11, size=256, compressed_fraction=0.0, workers=1), out)
    return out


def test_a_linked_file_or_folder_in_the_image_folder_is_a_listed_reject_never_read(
    phantoms: Path, tmp_path: Path
) -> None:
    """A link inside the input folder pulled in a file from anywhere (another patient's folder,
    /etc): the ingest decoded what it pointed at, labelled it with the rows of the link's name,
    trained on it and shipped its pixels in the dataset."""
    files = sorted((phantoms / "dicom").iterdir())
    dicom_dir, elsewhere = tmp_path / "dicom", tmp_path / "another-patient"
    shutil.copytree(phantoms / "dicom", dicom_dir)
    (elsewhere / "series").mkdir(parents=True)
    # a file link, named as an annotated image, to a study outside the folder
    (dicom_dir / files[0].name).rename(elsewhere / files[0].name)
    (dicom_dir / files[0].name).symlink_to(elsewhere / files[0].name)
    # a folder link whose target holds another annotated image
    (dicom_dir / files[1].name).rename(elsewhere / "series" / files[1].name)
    (dicom_dir / "site-b").symlink_to(elsewhere / "series", target_is_directory=True)
    # a link to a file no ingest may read, under an image's name
    (dicom_dir / "passwd.dcm").symlink_to("/etc/passwd")

    settings = DataSettings(max_side=96, workers=1, max_bad_row_fraction=0.6)  # type: ignore[call-arg]
    build = build_dataset(dicom_dir, phantoms / "annotations.csv", tmp_path / "out", settings=settings)

    linked = {files[0].stem, files[1].stem}
    # every regular file is ingested as before, and nothing behind a link
    assert set(build.manifest["images"]) == {p.stem for p in files} - linked
    report = json.loads((build.path / "quality_report.json").read_text())
    assert report["refused_files"] == {
        files[0].name: export.REFUSALS["symlink"],
        "passwd.dcm": export.REFUSALS["symlink"],
        "site-b": export.REFUSALS["symlink_to_folder"],
    }
    assert "symbolic link" in export.REFUSALS["symlink"] and "not followed" in export.REFUSALS["symlink"]
    assert build.manifest["quality"]["file.refused"] == 3
    # the linked image's rows label nothing, with the reason; the folder's image was never seen
    reason = report["decode_failures"][files[0].stem]
    assert reason == f"{files[0].name} is {export.REFUSALS['symlink']}"
    assert files[0].stem in report["excluded"]
    assert {r["image_id"] for r in report["quarantined_rows"]} == linked


def test_the_scan_and_the_read_refuse_links_and_what_is_no_regular_file(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """``cxr data validate`` reads sizes through the same scan; the image pool opens no link either,
    so one swapped in after the scan is not followed; a pipe under an image's name blocked the read."""
    folder = tmp_path / "dicom"
    (folder / "sub").mkdir(parents=True)
    outside = tmp_path / "outside.dcm"
    outside.write_bytes(b"DICM")
    (folder / "sub" / "real.dcm").write_bytes(b"DICM")
    (folder / "link.dcm").symlink_to(outside)
    (folder / "dangling.dcm").symlink_to(tmp_path / "gone.dcm")
    (folder / "loop").symlink_to(folder, target_is_directory=True)
    os.mkfifo(folder / "pipe.dcm")

    assert export.find_images(folder) == {"real": folder / "sub" / "real.dcm"}
    scan = export.scan_image_folder(folder)
    assert scan.files == {"real": [folder / "sub" / "real.dcm"]}
    assert scan.refused == {
        "dangling.dcm": export.REFUSALS["symlink"],
        "link.dcm": export.REFUSALS["symlink"],
        "loop": export.REFUSALS["symlink_to_folder"],
        "pipe.dcm": export.REFUSALS["not_regular_file"],
    }
    assert set(scan.refused_ids) == {"dangling", "link", "pipe"}
    assert "event=image_files_refused" in caplog.text and "count=4 first='dangling.dcm'" in caplog.text
    # the folder given may itself be a link: its caller named it
    (tmp_path / "alias").symlink_to(folder, target_is_directory=True)
    assert export.find_images(tmp_path / "alias") == {"real": tmp_path / "alias" / "sub" / "real.dcm"}

    with pytest.raises(UnsupportedImage, match="symbolic link"):
        read_image_file(folder / "link.dcm", 1 << 20, follow_symlinks=False)
    assert read_image_file(folder / "link.dcm", 1 << 20) == b"DICM"  # other callers: as before
    assert read_image_file(folder / "sub" / "real.dcm", 1 << 20, follow_symlinks=False) == b"DICM"
