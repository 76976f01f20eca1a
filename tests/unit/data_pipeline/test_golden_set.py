"""The golden set: built evaluation-only, pinned by a file, and its patients kept out of every later split."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
from git import Repo
from typer.testing import CliRunner

from data_pipeline.cli import app
from data_pipeline.config import DataSettings
from data_pipeline.golden import (
    GoldenError,
    describe,
    golden_patients,
    held_out_patients,
    read_pin,
    wait_for_pin,
    write_pin,
)
from data_pipeline.ingest import build_dataset
from data_pipeline.synth import SynthConfig, generate
from data_pipeline.versioning import MANIFEST

pytestmark = pytest.mark.unit


def _settings(tmp: Path, **kw: object) -> DataSettings:
    base: dict[str, object] = {"max_side": 128, "workers": 1, "stack_dir": tmp / "stack", "gitops_dir": tmp}
    base.update(kw)
    return DataSettings(**base)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def sets(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """A golden phantom set, a training set of other patients, and both together in one folder."""
    root = tmp_path_factory.mktemp("golden")
    golden, other, mixed = root / "golden", root / "other", root / "mixed"
    generate(SynthConfig(n_images=12, seed=21, size=256, compressed_fraction=0.0, workers=1), golden)
    generate(SynthConfig(n_images=14, seed=22, size=256, compressed_fraction=0.0, workers=1), other)
    (mixed / "dicom").mkdir(parents=True)
    for src in (golden, other):
        for f in (src / "dicom").iterdir():
            shutil.copy2(f, mixed / "dicom" / f.name)
    pd.concat([pd.read_csv(golden / "annotations.csv"), pd.read_csv(other / "annotations.csv")]).to_csv(
        mixed / "annotations.csv", index=False
    )
    return golden, other, mixed


def _patients_by_split(dataset: Path) -> dict[str, set[str]]:
    manifest = json.loads((dataset / MANIFEST).read_text())
    out: dict[str, set[str]] = {}
    for meta in manifest["images"].values():
        out.setdefault(meta["split"], set()).add(meta["patient"])
    return out


def test_a_golden_set_is_test_only_and_its_patients_enter_no_later_split(
    sets: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    golden_src, _, mixed = sets
    settings = _settings(tmp_path)
    golden = build_dataset(
        golden_src / "dicom", golden_src / "annotations.csv", tmp_path / "ds", settings=settings, golden=True
    )
    assert set(_patients_by_split(golden.path)) == {"test"}
    patients = golden_patients(golden.path)
    assert patients and all(len(p) >= 16 for p in patients)  # salted hashes, not PatientIDs

    built = build_dataset(
        mixed / "dicom",
        mixed / "annotations.csv",
        tmp_path / "ds",
        settings=settings,
        exclude_patients=patients,
    )
    splits = _patients_by_split(built.path)
    assert not set().union(*splits.values()) & patients, "a golden patient leaked into a split"
    assert (
        built.manifest["source"]["golden_patient_images_excluded"]
        == golden.manifest["counts"]["images"]["test"]
    )
    assert built.version != golden.version


def test_golden_images_without_a_patient_id_enter_no_later_split(
    sets: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    """A golden image whose header has no PatientID (or a PNG) is its own patient: the golden set
    held out only PatientIDs, so the same images came back in the next training set."""
    import pydicom

    golden_src, _, mixed = sets
    anonymous = tmp_path / "anonymous"
    shutil.copytree(mixed / "dicom", anonymous)
    for path in anonymous.iterdir():
        ds = pydicom.dcmread(path)
        del ds.PatientID
        ds.save_as(path)
    golden_dir = tmp_path / "golden"
    golden_dir.mkdir()
    for path in (golden_src / "dicom").iterdir():
        shutil.copy2(anonymous / path.name, golden_dir / path.name)
    settings = _settings(tmp_path)
    golden = build_dataset(
        golden_dir, golden_src / "annotations.csv", tmp_path / "ds", settings=settings, golden=True
    )
    held_out = golden_patients(golden.path)
    assert len(held_out) == len(golden.manifest["images"])

    built = build_dataset(
        anonymous, mixed / "annotations.csv", tmp_path / "ds", settings=settings, exclude_patients=held_out
    )
    leaked = set(built.manifest["images"]) & set(golden.manifest["images"])
    assert not leaked, f"golden images without a PatientID leaked into a split: {sorted(leaked)}"
    assert built.manifest["source"]["golden_patient_images_excluded"] == len(golden.manifest["images"])
    assert len(built.manifest["images"]) > 0


def test_a_copy_of_a_golden_image_filed_under_another_patient_enters_no_split(
    sets: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    """Re-exported or re-anonymised, a golden image comes back with another PatientID and new UIDs:
    held out by patient only, the same pixels were trained on."""
    import pydicom
    from pydicom.uid import generate_uid

    golden_src, other, _ = sets
    settings = _settings(tmp_path)
    golden = build_dataset(
        golden_src / "dicom", golden_src / "annotations.csv", tmp_path / "ds", settings=settings, golden=True
    )
    held_out = golden_patients(golden.path)
    assert len(held_out.phashes) == len(golden.manifest["images"])
    incoming = tmp_path / "incoming"
    shutil.copytree(other / "dicom", incoming)
    rows = [pd.read_csv(other / "annotations.csv")]
    golden_rows = pd.read_csv(golden_src / "annotations.csv")
    copies = []
    for path in sorted((golden_src / "dicom").iterdir())[:4]:
        ds = pydicom.dcmread(path)
        ds.PatientID, ds.PatientName = f"REEXPORT-{path.stem}", "Someone^Else"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = (generate_uid() for _ in range(3))
        copy = f"copy-{path.stem}"
        ds.save_as(incoming / f"{copy}{path.suffix}")
        rows.append(golden_rows[golden_rows["image_id"] == path.stem].assign(image_id=copy))
        copies.append(copy)
    pd.concat(rows).to_csv(tmp_path / "incoming.csv", index=False)

    built = build_dataset(
        incoming, tmp_path / "incoming.csv", tmp_path / "ds", settings=settings, exclude_patients=held_out
    )
    assert not set(copies) & set(built.manifest["images"]), "a copy of a golden image was put in a split"
    assert built.manifest["source"]["golden_patient_images_excluded"] == len(copies)
    assert len(built.manifest["images"]) > 0


def test_another_view_of_a_golden_study_without_a_patient_id_enters_no_split(
    sets: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    """A lateral of a golden PA study, exported later with its PatientID blanked: other pixels (no
    near duplicate), no patient key, but the golden study's StudyInstanceUID. It is that patient."""
    import pydicom

    golden_src, other, _ = sets
    settings = _settings(tmp_path)
    golden = build_dataset(
        golden_src / "dicom", golden_src / "annotations.csv", tmp_path / "ds", settings=settings, golden=True
    )
    incoming = tmp_path / "incoming"
    shutil.copytree(other / "dicom", incoming)
    views = []
    for source, view in zip(
        sorted((golden_src / "dicom").iterdir())[:3], sorted(incoming.iterdir())[:3], strict=True
    ):
        ds = pydicom.dcmread(view)
        ds.StudyInstanceUID, ds.PatientID = pydicom.dcmread(source).StudyInstanceUID, ""
        ds.save_as(view)
        views.append(view.stem)

    built = build_dataset(
        incoming,
        other / "annotations.csv",
        tmp_path / "ds",
        settings=settings,
        exclude_patients=golden_patients(golden.path),
    )
    assert not set(views) & set(built.manifest["images"]), "a view of a golden study was put in a split"
    assert built.manifest["source"]["golden_patient_images_excluded"] == len(views)


def test_the_golden_exclusion_catches_a_feedback_image_of_a_golden_patient(
    sets: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    """A radiologist's feedback on a golden patient's image arrives de-identified (its PatientID a
    pseudonym): it must still be known as that patient, or it would train on a golden patient."""
    from serving.dicom.deid import deidentify_dicom

    golden_src, other, _ = sets
    settings = _settings(tmp_path)
    golden = build_dataset(
        golden_src / "dicom", golden_src / "annotations.csv", tmp_path / "ds", settings=settings, golden=True
    )
    source = sorted((golden_src / "dicom").iterdir())[0]
    # the gateway and the pipeline of one install share its secret (CXR_DEID_SECRET / CXR_PATIENT_SALT)
    deidentified, _ = deidentify_dicom(source.read_bytes(), settings.resolved_patient_salt())
    incoming = tmp_path / "incoming"
    shutil.copytree(other / "dicom", incoming / "dicom")
    (incoming / "dicom" / f"fb-{source.stem}.dcm").write_bytes(deidentified)
    rows = pd.read_csv(golden_src / "annotations.csv")
    feedback_rows = rows[rows["image_id"] == source.stem].assign(image_id=f"fb-{source.stem}")
    pd.concat([pd.read_csv(other / "annotations.csv"), feedback_rows]).to_csv(
        incoming / "annotations.csv", index=False
    )

    built = build_dataset(
        incoming / "dicom",
        incoming / "annotations.csv",
        tmp_path / "ds",
        settings=settings,
        exclude_patients=golden_patients(golden.path),
    )
    assert f"fb-{source.stem}" not in built.manifest["images"], "a golden patient's feedback was kept"
    assert built.manifest["source"]["golden_patient_images_excluded"] == 1


def test_a_split_waits_for_a_golden_set_pinned_while_the_build_runs(
    sets: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    """The first `make up` builds both side by side: the training build reads the golden patients
    only at its split, waiting for the pin (stack/bootstrap.py, `cxr pipeline run --golden-wait`)."""
    import threading

    golden_src, _, mixed = sets
    settings = _settings(tmp_path)
    golden = build_dataset(
        golden_src / "dicom", golden_src / "annotations.csv", tmp_path / "ds", settings=settings, golden=True
    )
    asked: list[str] = []

    def patients_at_the_split() -> frozenset[str]:
        assert read_pin(tmp_path) is None  # not pinned yet when the split asks: it has to wait
        pinning = threading.Timer(0.3, write_pin, args=(tmp_path, describe(golden.path)))
        pinning.start()
        try:
            asked.append(wait_for_pin(tmp_path, timeout_s=60).version)
        finally:
            pinning.cancel()
        return golden_patients(golden.path)

    built = build_dataset(
        mixed / "dicom",
        mixed / "annotations.csv",
        tmp_path / "ds",
        settings=settings,
        exclude_patients=patients_at_the_split,
    )
    assert asked == [golden.version]
    leaked = set().union(*_patients_by_split(built.path).values()) & golden_patients(golden.path)
    assert not leaked, "a golden patient leaked into a split"
    assert built.manifest["source"]["golden_patient_images_excluded"] > 0


def test_waiting_for_a_pin_that_never_comes_names_the_file_and_the_command(tmp_path: Path) -> None:
    with pytest.raises(
        GoldenError, match=r"no golden set was pinned in .*golden.* within 0 s.*cxr data golden build"
    ):
        wait_for_pin(tmp_path, timeout_s=0.05, poll_s=0.01)


def test_the_pin_round_trips_and_refuses_a_normal_dataset(
    sets: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    golden_src, other, _ = sets
    settings = _settings(tmp_path)
    golden = build_dataset(
        golden_src / "dicom", golden_src / "annotations.csv", tmp_path / "ds", settings=settings, golden=True
    )
    pin = describe(golden.path)
    assert pin.images == 12 and pin.patients <= 12 and pin.version == golden.version
    write_pin(tmp_path, pin)
    assert read_pin(tmp_path) == pin
    normal = build_dataset(other / "dicom", other / "annotations.csv", tmp_path / "ds", settings=settings)
    with pytest.raises(GoldenError, match="no golden set"):
        describe(normal.path)


def test_a_pinned_golden_set_that_cannot_be_read_stops_the_build(
    sets: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    """Building without knowing the golden patients could train on them: an error, not an empty set."""
    golden_src, _, _ = sets
    settings = _settings(tmp_path, s3_endpoint="http://127.0.0.1:9", dataset_cache_dir=tmp_path / "cache")
    golden = build_dataset(
        golden_src / "dicom", golden_src / "annotations.csv", tmp_path / "ds", settings=settings, golden=True
    )
    write_pin(tmp_path, describe(golden.path))
    from data_pipeline.store import ObjectStore

    unreachable = ObjectStore("http://127.0.0.1:9", "k", "s", timeout_s=1.0, retries=0)
    with pytest.raises(GoldenError, match="cannot be read"):
        held_out_patients(settings, unreachable)
    shutil.copytree(golden.path, tmp_path / "cache" / golden.version)  # in the cache: readable
    assert held_out_patients(settings, unreachable) == golden_patients(golden.path)


def test_cli_builds_pins_and_shows_a_golden_set_and_refuses_a_tiny_one(
    sets: tuple[Path, Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    golden_src, _, _ = sets
    repo = Repo.init(tmp_path)  # a GitOps repository: the pin is committed there
    with repo.config_writer() as config:
        config.set_value("user", "name", "Golden Test")
        config.set_value("user", "email", "golden@example.org")
    (tmp_path / "half-edited.yaml").write_text("stage: not reviewed yet\n")
    repo.index.add(["half-edited.yaml"])  # staged by the person, not part of the pin
    monkeypatch.setenv("CXR_GITOPS_DIR", str(tmp_path))
    monkeypatch.setenv("CXR_STACK_DIR", str(tmp_path / "stack"))
    monkeypatch.setenv("CXR_MAX_SIDE", "128")
    args = ["golden", "build", "--dicom-dir", str(golden_src / "dicom"), "--annotations"]
    args += [str(golden_src / "annotations.csv"), "--out", str(tmp_path / "ds"), "--upload", "no"]
    refused = CliRunner().invoke(app, args)  # CXR_GOLDEN_MIN_IMAGES defaults to 100
    assert refused.exit_code == 1 and "fewer than CXR_GOLDEN_MIN_IMAGES=100" in " ".join(
        refused.output.split()
    )
    assert read_pin(tmp_path) is None
    monkeypatch.setenv("CXR_GOLDEN_MIN_IMAGES", "10")
    built = CliRunner().invoke(app, args)
    assert built.exit_code == 0, built.output
    pin = read_pin(tmp_path)
    assert pin is not None and pin.version in built.output
    assert repo.head.commit.message.startswith(f"pin golden set {pin.version}")
    assert list(repo.head.commit.stats.files) == ["training/golden.yaml"]  # the pin, nothing staged beside
    shown = CliRunner().invoke(app, ["golden", "show"])
    assert shown.exit_code == 0 and pin.version in shown.output


def test_a_pin_git_refuses_to_commit_is_a_clear_error_not_a_traceback(tmp_path: Path) -> None:
    """The git binary commits the pin now (with the repository's hooks): a refusal names what to do."""
    from data_pipeline.golden import GoldenPin, commit_pin

    repo = Repo.init(tmp_path)
    with repo.config_writer() as config:
        config.set_value("user", "name", "Golden Test")
        config.set_value("user", "email", "golden@example.org")
    hook = tmp_path / ".git" / "hooks" / "pre-commit"
    hook.write_text("#!/bin/sh\necho 'refused by review policy' >&2\nexit 1\n")
    hook.chmod(0o755)
    pin = GoldenPin(version="0123456789abcdef", images=10, patients=10)
    write_pin(tmp_path, pin)
    with pytest.raises(GoldenError, match=r"refused by review policy.*commit -- training/golden\.yaml"):
        commit_pin(tmp_path, pin)
