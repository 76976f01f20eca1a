"""Dataset build end to end on tiny phantoms: same inputs give the same version, layout is YOLO."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest
import yaml

from data_pipeline.classes import CLASS_NAMES
from data_pipeline.config import DataSettings
from data_pipeline.ingest import build_dataset
from data_pipeline.synth import SynthConfig, generate
from data_pipeline.versioning import verify

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    generate(SynthConfig(n_images=14, seed=7, size=256, compressed_fraction=0.3, workers=1), out)
    return out


def _settings(**kw: object) -> DataSettings:
    base: dict[str, object] = {"max_side": 128, "workers": 1}
    base.update(kw)
    return DataSettings(**base)  # type: ignore[arg-type]


def test_building_twice_gives_the_same_version_and_bytes(phantoms: Path, tmp_path: Path) -> None:
    a = build_dataset(phantoms / "dicom", phantoms / "annotations.csv", tmp_path / "a", settings=_settings())
    b = build_dataset(
        phantoms / "dicom", phantoms / "annotations.csv", tmp_path / "b", settings=_settings(workers=2)
    )
    assert a.version == b.version
    files_a = {k: v for k, v in a.manifest["files"].items() if k != "data.yaml"}
    files_b = {k: v for k, v in b.manifest["files"].items() if k != "data.yaml"}
    assert files_a == files_b
    again = build_dataset(
        phantoms / "dicom", phantoms / "annotations.csv", tmp_path / "a", settings=_settings()
    )
    assert again.version == a.version and again.reused


def test_a_changed_setting_gives_a_new_version(phantoms: Path, tmp_path: Path) -> None:
    a = build_dataset(phantoms / "dicom", phantoms / "annotations.csv", tmp_path / "a", settings=_settings())
    b = build_dataset(
        phantoms / "dicom", phantoms / "annotations.csv", tmp_path / "b", settings=_settings(max_side=96)
    )
    assert a.version != b.version


def test_corrected_patient_headers_give_a_new_version_not_the_old_manifest(
    phantoms: Path, tmp_path: Path
) -> None:
    """Same pixels and labels, other PatientID and PatientSex: a golden set (all test whatever the
    patients) kept its version, reused the old folder, and held out the old patients."""
    import shutil

    import pydicom

    from data_pipeline.golden import golden_patients

    dicom = tmp_path / "dicom"
    shutil.copytree(phantoms / "dicom", dicom)
    settings = _settings()
    before = build_dataset(
        dicom, phantoms / "annotations.csv", tmp_path / "ds", settings=settings, golden=True
    )
    for path in dicom.iterdir():
        ds = pydicom.dcmread(path)
        ds.PatientID = f"corrected-{ds.PatientID}"
        ds.PatientSex = "O"
        ds.save_as(path)
    after = build_dataset(
        dicom, phantoms / "annotations.csv", tmp_path / "ds", settings=settings, golden=True
    )
    assert after.version != before.version and not after.reused
    assert not golden_patients(after.path) & golden_patients(before.path)
    assert {m["subgroups"]["sex"] for m in after.manifest["images"].values()} == {"O"}


def test_layout_is_a_valid_yolo_dataset_with_manifest_and_reports(phantoms: Path, tmp_path: Path) -> None:
    build = build_dataset(phantoms / "dicom", phantoms / "annotations.csv", tmp_path, settings=_settings())
    root = build.path
    assert root == tmp_path / build.version
    data = yaml.safe_load((root / "data.yaml").read_text())
    assert Path(data["path"]) == root.resolve()
    assert [data["names"][i] for i in range(14)] == list(CLASS_NAMES)
    for name in ("manifest.json", "quality_report.json", "reference_stats.json", "annotations_fused.csv"):
        assert (root / name).exists(), name
    n_images = 0
    for split in ("train", "val", "test"):
        for png in (root / "images" / split).glob("*.png"):
            n_images += 1
            label = root / "labels" / split / f"{png.stem}.txt"
            assert label.exists()
            for line in label.read_text().splitlines():
                parts = line.split()
                assert 0 <= int(parts[0]) <= 13
                values = np.array([float(v) for v in parts[1:]])
                assert ((values >= 0) & (values <= 1)).all()
    assert n_images == 14 == sum(build.manifest["counts"]["images"].values())
    verify(root)
    meta = next(iter(build.manifest["images"].values()))
    assert meta["width"] == 256 and max(meta["out_width"], meta["out_height"]) == 128


def test_the_drift_reference_describes_the_train_split_only(phantoms: Path, tmp_path: Path) -> None:
    """The gateway compares production with the training data: val and test images are no part of it."""
    build = build_dataset(phantoms / "dicom", phantoms / "annotations.csv", tmp_path, settings=_settings())
    reference = json.loads((build.path / "reference_stats.json").read_text())
    train = [m for m in build.manifest["images"].values() if m["split"] == "train"]
    assert 0 < len(train) < len(build.manifest["images"])
    assert reference["n_images"] == len(train)
    boxes = build.manifest["counts"]["boxes_per_class"]["train"]
    assert reference["n_boxes"] == sum(n for name, n in boxes.items() if name != "No finding")


def test_patients_never_cross_splits_in_a_build(phantoms: Path, tmp_path: Path) -> None:
    build = build_dataset(phantoms / "dicom", phantoms / "annotations.csv", tmp_path, settings=_settings())
    splits: dict[str, set[str]] = {}
    for meta in build.manifest["images"].values():
        splits.setdefault(meta["patient"], set()).add(meta["split"])
    assert all(len(s) == 1 for s in splits.values())


def test_blank_and_undecodable_images_are_reported_and_left_out(phantoms: Path, tmp_path: Path) -> None:
    import shutil

    import pydicom

    dicom_dir = tmp_path / "dicom"
    shutil.copytree(phantoms / "dicom", dicom_dir)
    first = sorted(dicom_dir.iterdir())[0]
    ds = pydicom.dcmread(first)
    if ds.file_meta.TransferSyntaxUID.is_compressed:
        ds.decompress()
    ds.PixelData = np.full((ds.Rows, ds.Columns), 1000, np.uint16).tobytes()
    ds.save_as(dicom_dir / "blank0000.dicom")
    (dicom_dir / "broken0000.dicom").write_bytes(first.read_bytes()[:3000])
    csv = tmp_path / "ann.csv"
    csv.write_text(
        (phantoms / "annotations.csv").read_text()
        + "blank0000,No finding,14,R1,,,,\nbroken0000,No finding,14,R1,,,,\n"
    )
    build = build_dataset(dicom_dir, csv, tmp_path / "out", settings=_settings(max_bad_row_fraction=0.5))
    report = json.loads((build.path / "quality_report.json").read_text())
    assert "blank0000" in report["image_failures"]["blank"]
    assert "broken0000" in report["decode_failures"]
    assert {"blank0000", "broken0000"} <= set(report["excluded"])
    assert "blank0000" not in build.manifest["images"]
    assert any(r["image_id"] == "broken0000" for r in report["quarantined_rows"])


def test_a_seeded_cache_is_what_fetch_returns_without_a_store(phantoms: Path, tmp_path: Path) -> None:
    """The local runner's train step fetches the version its build step just published: from disk."""
    from data_pipeline.store import ObjectStore
    from data_pipeline.versioning import fetch_dataset, seed_cache

    build = build_dataset(
        phantoms / "dicom", phantoms / "annotations.csv", tmp_path / "out", settings=_settings()
    )
    cache = tmp_path / "cache"
    seeded = seed_cache(build.path, build.version, cache)
    assert seeded == cache / build.version
    assert verify(seeded)["version"] == build.version
    image = next((seeded / "images").rglob("*.png"))
    twin = build.path / image.relative_to(seeded)
    assert image.stat().st_ino == twin.stat().st_ino  # hard-linked, not copied
    # what may be rewritten in place is copied: data.yaml (pointing at the cache), the report
    for rel in (
        "data.yaml",
        next(p for p in (seeded / "report").rglob("*") if p.is_file()).relative_to(seeded),
    ):
        assert (seeded / rel).stat().st_ino != (build.path / rel).stat().st_ino
    assert yaml.safe_load((seeded / "data.yaml").read_text())["path"] == str(seeded.resolve())
    assert yaml.safe_load((build.path / "data.yaml").read_text())["path"] == str(build.path.resolve())
    assert seed_cache(build.path, build.version, cache) is None  # already there: left alone
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]  # no staging left behind
    unreachable = ObjectStore("http://127.0.0.1:9", "k", "s", timeout_s=1.0, retries=0)
    assert fetch_dataset(build.version, cache, unreachable) == seeded


def test_seeding_is_a_saving_never_a_failure_and_never_seeds_a_damaged_build(
    phantoms: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from data_pipeline.versioning import MANIFEST, _into_cache, seed_cache

    build = build_dataset(
        phantoms / "dicom", phantoms / "annotations.csv", tmp_path / "out", settings=_settings()
    )
    label = next((build.path / "labels").rglob("*.txt"))
    label.write_text(label.read_text() + "0 0.5 0.5 0.1 0.1\n")  # a reused build folder edited by hand
    assert seed_cache(build.path, build.version, tmp_path / "cache") is None
    assert "dataset_cache_not_seeded" in caplog.text and "sha256 differs" in caplog.text
    assert not (tmp_path / "cache" / build.version).exists()
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.startswith(".")]

    # another process renames its copy into place while ours is being filled: theirs stands
    target = tmp_path / "race" / build.version

    def theirs_first(staging: Path) -> None:
        (staging / "mine").write_text("x")
        target.mkdir(parents=True)
        (target / MANIFEST).write_text("{}")

    _into_cache(target, theirs_first)
    assert sorted(p.name for p in target.iterdir()) == [MANIFEST]
    assert [p.name for p in target.parent.iterdir()] == [build.version]


def test_a_version_read_from_outside_never_names_another_path(tmp_path: Path) -> None:
    """datasets/LATEST, a manifest or an MLflow tag become a folder name under the cache."""
    from data_pipeline.errors import DatasetNotFound
    from data_pipeline.versioning import checked_version, fetch_dataset, latest_version

    class _Store:
        endpoint = "s3://test"

        def __init__(self, latest: bytes) -> None:
            self.latest = latest

        def get_bytes(self, key: str) -> bytes:
            return self.latest

    for hostile in (b"../../outside", b"/home/u/x", b"0123456789abcdef/../x", b""):
        with pytest.raises(DatasetNotFound, match="not a version"):
            latest_version(cast(Any, _Store(hostile)))
        with pytest.raises(DatasetNotFound, match="not a version"):
            fetch_dataset("latest", tmp_path / "cache", cast(Any, _Store(hostile)))
    assert not (tmp_path / "outside").exists()
    assert checked_version("0123456789abcdef", "x") == "0123456789abcdef"


def test_images_of_one_study_share_a_split_when_some_lack_a_patient_id(
    phantoms: Path, tmp_path: Path
) -> None:
    """A study is one patient: a view whose PatientID was blanked (or mistyped) on export, but whose
    StudyInstanceUID names the same study, was split alone, so one patient's study went to train and test."""
    import shutil

    import pydicom

    dicom_dir = tmp_path / "dicom"
    dicom_dir.mkdir()
    files = sorted((phantoms / "dicom").iterdir())
    pairs = []
    for k, (a, b) in enumerate(zip(files[0::2], files[1::2], strict=False)):
        first, second = pydicom.dcmread(a), pydicom.dcmread(b)
        second.StudyInstanceUID = first.StudyInstanceUID
        second.PatientID = "" if k % 2 else f" {first.PatientID.lower()}"
        shutil.copy2(a, dicom_dir / a.name)
        second.save_as(dicom_dir / b.name)
        pairs.append((a.stem, b.stem))
    build = build_dataset(dicom_dir, phantoms / "annotations.csv", tmp_path / "out", settings=_settings())
    images = build.manifest["images"]
    split = [(images[a]["split"], images[b]["split"]) for a, b in pairs if a in images and b in images]
    assert len(split) >= 5 and {s for pair in split for s in pair} >= {"train", "test"}
    assert all(x == y for x, y in split), f"one study in two splits: {split}"


def test_an_image_id_that_names_two_files_labels_neither(phantoms: Path, tmp_path: Path) -> None:
    """Two sites' exports merged into one folder, two files with one stem: the CSV's rows for that id
    went silently to whichever file sorted first (here another patient's image), the other was dropped."""
    import shutil

    files = sorted((phantoms / "dicom").iterdir())
    dicom_dir = tmp_path / "dicom"
    shutil.copytree(phantoms / "dicom", dicom_dir / "siteB")
    (dicom_dir / "siteA").mkdir()
    shutil.copy2(files[1], dicom_dir / "siteA" / files[0].name)  # another patient's image, files[0]'s name
    settings = _settings(max_bad_row_fraction=0.5)  # its rows are 6 of 54: tiny phantoms, few rows
    build = build_dataset(dicom_dir, phantoms / "annotations.csv", tmp_path / "out", settings=settings)
    assert files[0].stem not in build.manifest["images"]
    report = json.loads((build.path / "quality_report.json").read_text())
    reason = report["decode_failures"][files[0].stem]
    assert "2 files" in reason and f"siteA/{files[0].name}" in reason and f"siteB/{files[0].name}" in reason
    assert {r["image_id"] for r in report["quarantined_rows"]} == {files[0].stem}


def test_an_image_whose_readers_all_found_something_but_agree_on_nothing_is_not_trained_as_normal(
    phantoms: Path, tmp_path: Path
) -> None:
    """Three readers, three different findings: no box reaches 2 of 3, and fusion wrote the image's
    "No finding" row (0 of 3 readers said it), an empty label file: a normal chest to train on."""
    import pandas as pd

    from data_pipeline.annotations import COLUMNS

    rows = pd.read_csv(phantoms / "annotations.csv", dtype=str, keep_default_na=False)
    target = sorted(rows["image_id"].unique())[0]
    disagree = pd.DataFrame(
        [
            (target, CLASS_NAMES[0], 0, "R1", 10, 10, 60, 60),
            (target, CLASS_NAMES[3], 3, "R2", 100, 100, 200, 200),
            (target, CLASS_NAMES[7], 7, "R3", 150, 20, 220, 90),
        ],
        columns=list(COLUMNS),
    ).astype(str)
    csv = tmp_path / "annotations.csv"
    pd.concat([rows[rows["image_id"] != target], disagree]).to_csv(csv, index=False)
    build = build_dataset(phantoms / "dicom", csv, tmp_path / "out", settings=_settings())
    assert target not in build.manifest["images"]
    assert not any((build.path / "labels" / s / f"{target}.txt").exists() for s in ("train", "val", "test"))
    assert build.quality is not None and build.quality.label_failures["no_consensus"] == [target]
    assert build.manifest["quality"]["label.no_consensus"] == 1


def test_a_version_built_twice_at_once_into_one_folder_is_reused_not_removed(
    phantoms: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The other build renames its identical version into place between this build's "is there a
    manifest?" and its own rename: this one removed the other's finished folder (which the other
    was publishing from) or failed on the non-empty folder."""
    import shutil

    first = build_dataset(
        phantoms / "dicom", phantoms / "annotations.csv", tmp_path / "a", settings=_settings()
    )
    real_rename = Path.rename
    won: list[Path] = []

    def racing_rename(self: Path, target: Any) -> Path:
        target = Path(target)
        if not won and target.name == first.version and self.name.startswith(".staging-"):
            won.append(target)  # the other build finishes first
            shutil.copytree(first.path, target)
            (target / "theirs").write_text("")
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", racing_rename)
    second = build_dataset(
        phantoms / "dicom", phantoms / "annotations.csv", tmp_path / "b", settings=_settings()
    )
    assert won and second.version == first.version and second.reused
    assert (second.path / "theirs").exists()  # the winner's folder, untouched
    verify(second.path)


class _DictStore:
    """A published version's objects in a dict, read the way :class:`ObjectStore` reads them."""

    endpoint = "memory://"

    def __init__(self, objects: dict[str, bytes]) -> None:
        self.objects = objects

    def exists(self, key: str) -> bool:
        return key in self.objects

    def list_objects(self, prefix: str) -> list[Any]:
        from data_pipeline.store import ObjectInfo

        return [ObjectInfo(k, len(v)) for k, v in sorted(self.objects.items()) if k.startswith(prefix)]

    def list_prefix(self, prefix: str) -> list[str]:
        return [o.name for o in self.list_objects(prefix)]

    def get_bytes(self, key: str) -> bytes:
        return self.objects[key]

    def get_file(self, key: str, dest: Path) -> Path:
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(self.objects[key])
        return dest

    def download_prefix(self, prefix: str, dest: Path) -> list[Path]:
        from data_pipeline.store import ObjectStore

        return ObjectStore.download_prefix(cast(Any, self), prefix, dest)


def _published(build: Any) -> dict[str, bytes]:
    prefix = f"datasets/{build.version}/"
    return {
        prefix + p.relative_to(build.path).as_posix(): p.read_bytes()
        for p in sorted(build.path.rglob("*"))
        if p.is_file()
    }


def test_fetch_refuses_an_image_or_label_the_manifest_does_not_list(phantoms: Path, tmp_path: Path) -> None:
    """Fetch downloaded every object under the version's prefix and checked only the manifest's
    files: an image and label slipped into images/train/ in the store were trained on, unchecked."""
    from data_pipeline.errors import DatasetIntegrityError
    from data_pipeline.versioning import fetch_dataset

    build = build_dataset(
        phantoms / "dicom", phantoms / "annotations.csv", tmp_path / "a", settings=_settings()
    )
    objects = _published(build)
    prefix = f"datasets/{build.version}/"
    some_png = next(v for k, v in objects.items() if k.endswith(".png"))
    objects[prefix + "images/train/planted.png"] = some_png
    objects[prefix + "labels/train/planted.txt"] = b"0 0.5 0.5 0.2 0.2\n"
    try:
        fetched = fetch_dataset(build.version, tmp_path / "cache", cast(Any, _DictStore(objects)))
    except DatasetIntegrityError:
        return  # refused: fine
    assert not (fetched / "images" / "train" / "planted.png").exists()
    assert not (fetched / "labels" / "train" / "planted.txt").exists()


def test_verify_names_an_unlisted_image_in_a_local_version(phantoms: Path, tmp_path: Path) -> None:
    from data_pipeline.errors import DatasetIntegrityError

    build = build_dataset(
        phantoms / "dicom", phantoms / "annotations.csv", tmp_path / "a", settings=_settings()
    )
    (build.path / "labels" / "train" / "planted.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    with pytest.raises(DatasetIntegrityError, match=r"planted\.txt: not in the manifest"):
        verify(build.path)


def test_a_folder_trained_from_verifies_and_its_label_cache_never_carries_unchecked_labels(
    phantoms: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Training from a build folder left ultralytics' labels/train.cache beside the label folders:
    verify called the folder damaged and seed_cache skipped it. Ultralytics trusts that cache on the
    label and image files' paths, sizes and mtimes alone, so it is removed, never let through."""
    import logging

    from ultralytics.data.dataset import DATASET_CACHE_VERSION, YOLODataset
    from ultralytics.data.utils import load_dataset_cache_file, save_dataset_cache_file

    from data_pipeline.errors import DatasetIntegrityError
    from data_pipeline.versioning import seed_cache

    build = build_dataset(
        phantoms / "dicom", phantoms / "annotations.csv", tmp_path / "out", settings=_settings()
    )
    names = {"names": dict(enumerate(CLASS_NAMES)), "channels": 3}

    def trained_labels() -> dict[str, list[int]]:
        """What ultralytics trains on in images/train (as its trainer builds the dataset)."""
        ds = YOLODataset(img_path=str(build.path / "images" / "train"), imgsz=64, augment=False, data=names)
        return {Path(lb["im_file"]).stem: sorted(lb["cls"].ravel().astype(int).tolist()) for lb in ds.labels}

    checked = trained_labels()
    cache = build.path / "labels" / "train.cache"
    assert cache.is_file() and any(checked.values())
    # the cache edited to carry other boxes: ultralytics still trusts it, every label file still verifies
    edited = load_dataset_cache_file(cache)
    for label in edited["labels"]:
        label["cls"] = (label["cls"] + 1) % 14
    save_dataset_cache_file("", cache, edited, DATASET_CACHE_VERSION)
    assert trained_labels() != checked
    image = next((build.path / "images" / "train").glob("*.png"))
    np.save(image.with_suffix(".npy"), np.zeros((8, 8, 3), np.uint8))  # cache="disk": read for the PNG

    with caplog.at_level(logging.INFO, logger="data_pipeline.versioning"):
        assert verify(build.path)["version"] == build.version
    assert not cache.exists() and not image.with_suffix(".npy").exists()
    assert "event=dataset_trainer_cache_removed" in caplog.text and "files=2" in caplog.text
    assert trained_labels() == checked  # rebuilt from the checked label files
    # and the folder trained from (its cache written again) is seeded into the fetch cache
    assert cache.is_file()
    seeded = seed_cache(build.path, build.version, tmp_path / "cache")
    assert seeded == tmp_path / "cache" / build.version
    assert not (seeded / "labels" / "train.cache").exists() and not cache.exists()
    # only ultralytics' own files go: any other file beside the labels is still damage
    (build.path / "labels" / "train" / "x.cache").write_bytes(b"")
    with pytest.raises(DatasetIntegrityError, match=r"labels/train/x\.cache: not in the manifest"):
        verify(build.path)


def test_fetch_refuses_a_truncated_object(phantoms: Path, tmp_path: Path) -> None:
    from data_pipeline.errors import DatasetIntegrityError
    from data_pipeline.versioning import fetch_dataset

    build = build_dataset(
        phantoms / "dicom", phantoms / "annotations.csv", tmp_path / "a", settings=_settings()
    )
    objects = _published(build)
    key = next(k for k in objects if k.endswith(".png"))
    objects[key] = objects[key][: len(objects[key]) // 2]
    with pytest.raises(DatasetIntegrityError, match="sha256 differs"):
        fetch_dataset(build.version, tmp_path / "cache", cast(Any, _DictStore(objects)))
    assert not (tmp_path / "cache" / build.version).exists()
