"""Feedback items from the store are outside input: each is judged alone, and a bad one is left out.

An item's rows must all be valid and name the image the item itself holds; one that names an image
of the DICOM folder, holds junk, or cannot be read is skipped (logged by id), does not count against
the annotations CSV's bad-row limit and does not stop the build. Versions built from a store here use
an in-memory stand-in (the S3 round trip itself is tests/integration/data_pipeline).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, cast

import pandas as pd
import pytest

from data_pipeline.annotations import COLUMNS
from data_pipeline.config import DataSettings
from data_pipeline.errors import StoreError
from data_pipeline.feedback import CROWDED, MAX_IMAGE_ROWS, collect_feedback, put_feedback
from data_pipeline.ingest import build_dataset
from data_pipeline.store import ObjectInfo
from data_pipeline.synth import SynthConfig, generate

pytestmark = pytest.mark.unit


class MemoryStore:
    """The few ObjectStore calls feedback collection and publishing make, in a dict."""

    endpoint = "memory://"
    bucket = "cxr"

    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}
        self.broken: set[str] = set()  # keys whose reads fail like an unreachable store

    def ensure_bucket(self) -> None:
        pass

    def put_bytes(self, key: str, data: bytes, content_type: str = "") -> None:
        self.objects[key] = bytes(data)

    def put_file(self, key: str, path: Path, content_type: str = "") -> None:
        self.objects[key] = Path(path).read_bytes()

    def upload_dir(self, directory: Path, prefix: str, *, skip: set[str] | None = None) -> int:
        files = [p for p in sorted(Path(directory).rglob("*")) if p.is_file()]
        for path in files:
            rel = path.relative_to(directory).as_posix()
            if not (skip and rel in skip):
                self.objects[prefix.rstrip("/") + "/" + rel] = path.read_bytes()
        return len(files)

    def list_objects(self, prefix: str) -> list[ObjectInfo]:
        return [ObjectInfo(k, len(v)) for k, v in sorted(self.objects.items()) if k.startswith(prefix)]

    def list_prefix(self, prefix: str) -> list[str]:
        return [o.name for o in self.list_objects(prefix)]

    def get_bytes(self, key: str) -> bytes:
        if key in self.broken:
            raise StoreError(f"S3 {self.endpoint} unreachable while trying to read {key}")
        return self.objects[key]

    def get_file(self, key: str, dest: Path) -> Path:
        data = self.get_bytes(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(data)
        return dest


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    generate(SynthConfig(n_images=8, seed=11, size=256, compressed_fraction=0.0, workers=1), out)
    return out


def _settings(**kw: object) -> DataSettings:
    base: dict[str, object] = {"max_side": 64, "workers": 1}
    base.update(kw)
    return DataSettings(**base)  # type: ignore[arg-type]


def _rows(image_id: str, n: int = 1, **cells: object) -> pd.DataFrame:
    row = {
        "image_id": image_id,
        "class_name": "Pleural effusion",
        "class_id": 10,
        "rad_id": "radiologist-1",
        "x_min": 20.0,
        "y_min": 30.0,
        "x_max": 120.0,
        "y_max": 140.0,
    }
    row.update(cells)
    return pd.DataFrame([row] * n, columns=list(COLUMNS))


def _a_dicom(phantoms: Path) -> bytes:
    return sorted((phantoms / "dicom").iterdir())[-1].read_bytes()


def _build(phantoms: Path, out: Path, store: MemoryStore, **kw: object) -> Any:
    return build_dataset(
        phantoms / "dicom",
        phantoms / "annotations.csv",
        out,
        settings=_settings(**kw),
        store=cast(Any, store),
    )


def _fused(build: Any, image_id: str) -> list[int]:
    fused = pd.read_csv(build.path / "annotations_fused.csv")
    return sorted(fused.loc[fused["image_id"] == image_id, "class_id"].tolist())


def test_feedback_cannot_relabel_an_image_of_the_dicom_folder(phantoms: Path, tmp_path: Path) -> None:
    plain = _build(phantoms, tmp_path / "plain", MemoryStore())
    target = sorted(plain.manifest["images"])[0]
    store = MemoryStore()
    put_feedback(store, "no-image", _rows(target))  # rows only: the folder's image is not the item's
    put_feedback(store, "same-name", _rows(target), image=_a_dicom(phantoms))  # its own file, named alike
    put_feedback(  # its own image, plus a row naming the folder's image
        store, "mixed", pd.concat([_rows("fbimage0001"), _rows(target)]), image=_a_dicom(phantoms)
    )
    build = _build(phantoms, tmp_path / "out", store)
    assert _fused(build, target) == _fused(plain, target) != [10]
    assert build.manifest["source"]["feedback_objects"] == []
    assert sorted(build.manifest["source"]["feedback_skipped"]) == ["mixed", "no-image", "same-name"]
    assert "fbimage0001" not in build.manifest["images"]


def test_a_valid_feedback_item_with_its_own_image_is_merged(phantoms: Path, tmp_path: Path) -> None:
    store = MemoryStore()
    put_feedback(store, "fb-good", _rows("fbimage0001"), image=_a_dicom(phantoms), image_ext="dcm")
    build = _build(phantoms, tmp_path / "out", store)
    assert build.manifest["source"]["feedback_objects"] == ["feedback/fb-good/annotations.csv"]
    assert build.manifest["source"]["feedback_skipped"] == {}
    assert "fbimage0001" in build.manifest["images"]
    assert _fused(build, "fbimage0001") == [10]


def test_a_junk_feedback_item_is_skipped_without_failing_the_build(
    phantoms: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = MemoryStore()
    # 5000 rows of a class that does not exist: far above the 5% bad-row limit of the real CSV
    put_feedback(store, "fb-junk", _rows("fbimage0002", 5000, class_id=99), image=_a_dicom(phantoms))
    put_feedback(store, "fb-good", _rows("fbimage0001"), image=_a_dicom(phantoms))
    caplog.set_level("WARNING", logger="data_pipeline.feedback")
    build = _build(phantoms, tmp_path / "out", store)
    assert build.manifest["source"]["feedback_objects"] == ["feedback/fb-good/annotations.csv"]
    assert build.manifest["source"]["feedback_skipped"] == {"fb-junk": "5000 of 5000 rows invalid"}
    assert "fbimage0001" in build.manifest["images"] and "fbimage0002" not in build.manifest["images"]
    assert "event=feedback_item_skipped id=fb-junk" in caplog.text
    report = json.loads((build.path / "quality_report.json").read_text())
    assert not any(r["image_id"] == "fbimage0002" for r in report["quarantined_rows"])


def test_a_feedback_item_with_an_infinite_class_id_is_skipped(phantoms: Path, tmp_path: Path) -> None:
    store = MemoryStore()
    put_feedback(store, "fb-inf", _rows("fbimage0002", class_id="inf"), image=_a_dicom(phantoms))
    batch = collect_feedback(cast(Any, store), tmp_path)
    assert batch is not None and batch.skipped == {"fb-inf": "1 of 1 rows invalid"}
    assert batch.table.frame.empty and batch.images == {}


def test_a_store_failing_while_feedback_is_read_fails_the_build_to_be_retried(
    phantoms: Path, tmp_path: Path
) -> None:
    """Not a bad item: taken for one, it would be listed as skipped and never counted again."""
    from data_pipeline.errors import StoreError

    for broken in ("feedback/fb-lost/annotations.csv", "feedback/fb-lost/fbimage0002.dcm"):
        store = MemoryStore()
        put_feedback(store, "fb-lost", _rows("fbimage0002"), image=_a_dicom(phantoms))
        put_feedback(store, "fb-good", _rows("fbimage0001"), image=_a_dicom(phantoms))
        store.broken = {broken}
        with pytest.raises(StoreError):
            _build(phantoms, tmp_path / broken.replace("/", "_"), store)


def test_bad_feedback_rows_do_not_count_toward_the_csvs_bad_row_limit(phantoms: Path, tmp_path: Path) -> None:
    """The CSV alone is judged: its one bad row is exactly at the limit, whatever feedback brings."""
    source = tmp_path / "src"
    shutil.copytree(phantoms / "dicom", source / "dicom")
    rows = (phantoms / "annotations.csv").read_text().splitlines()
    csv = source / "annotations.csv"
    csv.write_text("\n".join(rows) + "\nnope,Bogus,3,R1,1,2,3,4\n")
    n_rows = len(rows)  # header + data rows: the bad row makes exactly 1 of n_rows
    limit = 1 / n_rows
    store = MemoryStore()
    put_feedback(store, "fb-outside", _rows("fbimage0002", 3, x_max=5000.0), image=_a_dicom(phantoms))
    build = build_dataset(
        source / "dicom",
        csv,
        tmp_path / "out",
        settings=_settings(max_bad_row_fraction=limit),
        store=cast(Any, store),
    )
    assert build.manifest["source"]["feedback_skipped"] == {"fb-outside": "3 of 3 rows outside the image"}


def test_an_item_named_like_a_path_is_never_a_folder(tmp_path: Path) -> None:
    store = MemoryStore()
    store.put_bytes("feedback/../annotations.csv", _rows("x").to_csv(index=False).encode())
    store.put_bytes("feedback/../x.png", b"\x89PNG\r\n\x1a\n")
    store.put_bytes("feedback/../feedback.json", b"{}")
    work = tmp_path / "work"
    batch = collect_feedback(cast(Any, store), work)
    assert batch is not None and batch.skipped == {"..": "unusable item id"} and not batch.images
    assert not (work / "x.png").exists() and not (tmp_path / "x.png").exists()


def test_a_radiologists_later_correction_of_an_image_replaces_the_earlier_one(
    phantoms: Path, tmp_path: Path
) -> None:
    """The gateway names a feedback image by its (de-identified) source, so a radiologist who
    corrects one image twice makes two items of one image id: both sets of rows were merged as one
    reader's, and the box the second correction moved (or removed, "No finding") stayed a label."""
    image = _a_dicom(phantoms)
    store = MemoryStore()
    first = _rows("fbimage0001", x_min=20.0, y_min=30.0, x_max=120.0, y_max=140.0)
    moved = _rows("fbimage0001", x_min=130.0, y_min=130.0, x_max=200.0, y_max=210.0)
    other_reader = _rows("fbimage0001", rad_id="radiologist-2")
    put_feedback(store, "fb-b-first", first, image=image, received="2025-01-01T10:00:00+00:00")
    put_feedback(store, "fb-a-later", moved, image=image, received="2025-01-02T10:00:00+00:00")
    put_feedback(store, "fb-c-other", other_reader, image=image, received="2025-01-01T09:00:00+00:00")
    batch = collect_feedback(cast(Any, store), tmp_path)
    assert batch is not None
    rows = batch.table.frame.sort_values("rad_id")
    assert rows["rad_id"].tolist() == ["radiologist-1", "radiologist-2"]
    assert rows["x_min"].tolist() == [130.0, 20.0]
    assert batch.skipped == {"fb-b-first": "superseded by a later correction of its image by its reader"}
    assert batch.objects == ["feedback/fb-a-later/annotations.csv", "feedback/fb-c-other/annotations.csv"]


def test_a_feedback_json_nested_too_deep_to_parse_leaves_the_build_running(
    phantoms: Path, tmp_path: Path
) -> None:
    """An item's ``feedback.json`` is read for its submission time when a reader corrected an image
    twice. One of 200,000 ``[`` (under the 256 KiB marker limit) raised RecursionError, which is no
    ValueError: collect_feedback failed, and with it every dataset build while the object stayed."""
    image = _a_dicom(phantoms)
    store = MemoryStore()
    put_feedback(
        store, "fb-a-nested", _rows("fbimage0001"), image=image, received="2025-01-02T10:00:00+00:00"
    )
    put_feedback(store, "fb-b-plain", _rows("fbimage0001"), image=image, received="2025-01-01T10:00:00+00:00")
    store.objects["feedback/fb-a-nested/feedback.json"] = b"[" * 200_000
    batch = collect_feedback(cast(Any, store), tmp_path)
    assert batch is not None  # the nested marker says no time: the other item, which does, is the later
    assert batch.objects == ["feedback/fb-b-plain/annotations.csv"]
    assert batch.skipped == {"fb-a-nested": "superseded by a later correction of its image by its reader"}


def test_an_image_with_more_feedback_rows_than_fusion_can_take_is_left_out_whole(
    phantoms: Path, tmp_path: Path
) -> None:
    """Fusing an image's boxes (WBF) grows with their square: a crafted 16 MiB annotations.csv holds
    ~300,000 boxes of one image (~40 min of fusion, ~45 s already for 40,000), and so do a few items of
    the same image under other readers' names. All were merged. The items of such an image are left
    out whole (a few hundred rows is what the gateway writes); the other images' items stay."""
    image = _a_dicom(phantoms)
    over, half = MAX_IMAGE_ROWS + 1, MAX_IMAGE_ROWS // 2 + 1
    store = MemoryStore()
    put_feedback(store, "fb-one-big", _rows("fbimage0001", over), image=image)
    put_feedback(store, "fb-two-a", _rows("fbimage0002", half, rad_id="radiologist-1"), image=image)
    put_feedback(store, "fb-two-b", _rows("fbimage0002", half, rad_id="radiologist-2"), image=image)
    put_feedback(store, "fb-good", _rows("fbimage0003"), image=image)
    batch = collect_feedback(cast(Any, store), tmp_path)
    assert batch is not None
    assert batch.skipped == {i: CROWDED for i in ("fb-one-big", "fb-two-a", "fb-two-b")}
    assert batch.objects == ["feedback/fb-good/annotations.csv"]
    assert sorted(batch.images) == ["fbimage0003"] and batch.table.total_rows == 1
