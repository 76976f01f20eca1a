"""Subgroup attributes: phantoms vary them, one vendor is harder on purpose, headers give them safely."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from data_pipeline import synth
from data_pipeline.config import DataSettings
from data_pipeline.dicom_io import decode_file
from data_pipeline.ingest import build_dataset
from data_pipeline.subgroups import ATTRIBUTES, age_band, manufacturer, sex, subgroup_attributes, view
from data_pipeline.synth import (
    HARD_MANUFACTURER,
    MANUFACTURERS,
    Acquisition,
    SynthConfig,
    generate,
    render_case,
)

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("raw", "band"),
    [
        ("045Y", "40-49"),
        ("040Y", "40-49"),
        ("009Y", "0-9"),
        ("018M", "0-9"),
        ("006W", "0-9"),
        ("089Y", "80-89"),
        ("090Y", "90+"),
        ("104Y", "90+"),
        ("45", "unknown"),
        ("045X", "unknown"),
        ("", "unknown"),
        ("abcY", "unknown"),
    ],
)
def test_age_is_kept_only_as_a_decade_band_with_90_and_over_together(raw: str, band: str) -> None:
    assert age_band(raw) == band


def test_sex_view_and_manufacturer_are_normalized_and_garbage_is_unknown() -> None:
    assert [sex(s) for s in ("M", "f ", "O", "X", "")] == ["M", "F", "O", "unknown", "unknown"]
    assert [view(v) for v in ("PA", " ap", "LLD", "P A", "", "A")] == [
        "PA",
        "AP",
        "LLD",
        "unknown",
        "unknown",
        "unknown",
    ]
    assert manufacturer("  Acme   Medical ") == "Acme Medical"
    assert manufacturer("") == manufacturer("x" * 65) == manufacturer("bad\x00name") == "unknown"


def test_a_header_gives_the_four_attributes_and_nothing_identifying() -> None:
    ds = Dataset()
    ds.PatientID, ds.PatientName, ds.PatientBirthDate = "P123", "DOE^JANE", "19800101"
    ds.PatientSex, ds.PatientAge, ds.Manufacturer, ds.ViewPosition = "F", "044Y", "Acme", "AP"
    attrs = subgroup_attributes(ds)
    assert attrs == {"sex": "F", "age_band": "40-49", "manufacturer": "Acme", "view": "AP"}
    assert not {"P123", "DOE^JANE", "19800101", "044Y"} & set(attrs.values())
    assert subgroup_attributes(Dataset()) == subgroup_attributes(None) == dict.fromkeys(ATTRIBUTES, "unknown")


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("subgroup-phantoms")
    generate(SynthConfig(n_images=48, seed=11, size=256, compressed_fraction=0.0, workers=1), out)
    return out


def test_phantoms_vary_sex_age_vendor_and_view(phantoms: Path) -> None:
    seen: dict[str, set[str]] = defaultdict(set)
    for path in sorted((phantoms / "dicom").glob("*.dicom")):
        for key, value in subgroup_attributes(decode_file(path, salt="s").dataset).items():
            seen[key].add(value)
    assert seen["sex"] == {"M", "F"}
    assert len(seen["age_band"]) >= 4 and "unknown" not in seen["age_band"]
    assert seen["manufacturer"] == set(MANUFACTURERS)  # the hard vendor among them
    assert seen["view"] == {"PA", "AP"}


def test_the_hard_vendors_images_are_noisier(phantoms: Path) -> None:
    """Read as any user would (header Manufacturer, stored pixels): air outside the body is noisier."""
    noise: dict[bool, list[float]] = defaultdict(list)
    for path in sorted((phantoms / "dicom").glob("*.dicom")):
        ds = pydicom.dcmread(path)
        raw = ds.pixel_array.astype(np.float64)
        corner = raw[: raw.shape[0] // 10, : raw.shape[1] // 10]  # air: outside the body ellipse
        # relative to the display window, so bit depth and exposure (which vary per image) cancel
        noise[ds.Manufacturer == HARD_MANUFACTURER].append(np.diff(corner, axis=1).std() / ds.WindowWidth)
    assert len(noise[True]) >= 5 and len(noise[False]) >= 15
    assert min(noise[True]) > 2 * max(noise[False])


def test_the_hard_vendors_findings_keep_a_fraction_of_their_contrast(monkeypatch: pytest.MonkeyPatch) -> None:
    """One case rendered on an ordinary and on the hard vendor's detector: same anatomy, fainter findings.

    The finding's signal is the box mean minus the same case without its findings (the hard
    rendering with the finding contrast turned to zero: same anatomy, same noise).
    """
    config = SynthConfig(seed=11, size=256)
    ordinary, hard = Acquisition(MANUFACTURERS[0], "PA"), Acquisition(HARD_MANUFACTURER, "PA")
    assert hard.hard and not ordinary.hard
    ratios = []
    for index in range(10):
        plain, findings, _ = render_case(config, index, ordinary)
        faint, _, _ = render_case(config, index, hard)
        with monkeypatch.context() as patch:
            patch.setattr(synth, "HARD_FINDING_CONTRAST", 0.0)
            anatomy, _, _ = render_case(config, index, hard)
        h, w = plain.shape
        for f in findings:
            x0, y0, x1, y1 = (
                round(f.box[0] * w),
                round(f.box[1] * h),
                round(f.box[2] * w),
                round(f.box[3] * h),
            )
            box = np.s_[y0:y1, x0:x1]
            signal = abs(float((plain[box].astype(np.float64) - anatomy[box]).mean()))
            weak = abs(float((faint[box].astype(np.float64) - anatomy[box]).mean()))
            if signal > 0.005 * float(plain.max()):  # a finding that shows at all on the ordinary detector
                ratios.append(weak / signal)
    assert len(ratios) >= 8
    assert 0.1 < float(np.median(ratios)) < 0.6, ratios


def test_the_manifest_keeps_bands_not_ages_and_training_reads_them(phantoms: Path, tmp_path: Path) -> None:
    from training.dataset import open_dataset_dir

    build = build_dataset(
        phantoms / "dicom",
        phantoms / "annotations.csv",
        tmp_path / "data",
        settings=DataSettings(max_side=64, workers=1),
    )
    images = build.manifest["images"]
    assert images and all(set(meta["subgroups"]) == set(ATTRIBUTES) for meta in images.values())
    text = (build.path / "manifest.json").read_text()
    for path in sorted((phantoms / "dicom").glob("*.dicom"))[:10]:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        assert str(ds.PatientAge) not in text and str(ds.PatientID) not in text  # bands and hashes only
    by_image = open_dataset_dir(build.path, tmp_path / "work").subgroups()
    assert by_image.keys() == images.keys()
    assert {g["manufacturer"] for g in by_image.values()} == set(MANUFACTURERS)
