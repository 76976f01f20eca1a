"""Synthetic phantoms: deterministic, realistic DICOM tags, every transfer syntax decodes."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest

from data_pipeline.dicom_io import decode_file
from data_pipeline.synth import SynthConfig, generate, render_case

pytestmark = pytest.mark.unit


def _digests(folder: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def test_same_seed_gives_identical_files_whatever_the_worker_count(tmp_path: Path) -> None:
    config = SynthConfig(n_images=8, seed=4, size=256, compressed_fraction=0.5)
    generate(SynthConfig(**{**config.__dict__, "workers": 1}), tmp_path / "a")
    generate(SynthConfig(**{**config.__dict__, "workers": 2}), tmp_path / "b")
    assert _digests(tmp_path / "a") == _digests(tmp_path / "b")
    generate(SynthConfig(**{**config.__dict__, "seed": 5, "workers": 1}), tmp_path / "c")
    assert _digests(tmp_path / "a") != _digests(tmp_path / "c")


def test_dicom_tags_and_mix_of_encodings(tmp_path: Path) -> None:
    result = generate(
        SynthConfig(
            n_images=12, seed=1, size=256, compressed_fraction=1.0, monochrome1_fraction=0.5, workers=1
        ),
        tmp_path,
    )
    syntaxes = {c.transfer_syntax for c in result.cases}
    assert len(syntaxes) == 3  # RLE, JPEG-LS, JPEG 2000 all exercised
    assert {c.photometric for c in result.cases} == {"MONOCHROME1", "MONOCHROME2"}
    for case in result.cases:
        ds = pydicom.dcmread(result.dicom_dir / f"{case.image_id}.dicom")
        assert ds.Modality in ("CR", "DX")
        assert ds.PatientID and ds.StudyInstanceUID and ds.SeriesInstanceUID and ds.SOPInstanceUID
        assert 12 <= ds.BitsStored <= 16
        assert ds.PixelSpacing and ds.WindowCenter is not None and ds.WindowWidth
        image = decode_file(result.dicom_dir / f"{case.image_id}.dicom", salt="s")
        # lungs are darker than the mediastinum in every phantom, whatever the photometric
        h, w = image.pixels.shape
        lung = image.pixels[int(h * 0.35) : int(h * 0.5), int(w * 0.25) : int(w * 0.35)].mean()
        spine = image.pixels[int(h * 0.35) : int(h * 0.5), int(w * 0.48) : int(w * 0.52)].mean()
        assert lung < spine, case.image_id


def test_readers_disagree_but_agree_on_most_findings(tmp_path: Path) -> None:
    result = generate(SynthConfig(n_images=30, seed=2, size=256, workers=1, compressed_fraction=0), tmp_path)
    ann = pd.read_csv(result.annotations_csv)
    truth = pd.read_csv(result.truth_csv)
    assert list(ann.columns) == [
        "image_id",
        "class_name",
        "class_id",
        "rad_id",
        "x_min",
        "y_min",
        "x_max",
        "y_max",
    ]
    assert ann.groupby("image_id")["rad_id"].nunique().eq(3).all()
    no_finding_images = ann.groupby("image_id")["class_id"].apply(lambda s: (s == 14).all()).mean()
    assert 0.15 < no_finding_images < 0.7
    assert set(truth["class_id"]) <= set(range(14))
    boxes = ann[ann["class_id"] < 14]
    assert (boxes["x_min"] < boxes["x_max"]).all() and (boxes["y_max"] <= 256).all()


def test_default_sizes_follow_real_radiographs() -> None:
    pixels, _, attrs = render_case(SynthConfig(seed=3), 0)
    h, w = pixels.shape
    assert 1800 <= h <= 3000 and 1800 <= w <= 3000
    assert pixels.dtype == np.uint16 and int(pixels.max()) < 2 ** int(attrs["bits"])
