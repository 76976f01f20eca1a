"""Find the dataset a run trains on: a local version folder, or a version fetched from S3.

A dataset version folder is portable (it may be built on one machine and
fetched into a cache on another), so the ``path`` inside its ``data.yaml``
cannot be trusted. Training reads a copy of ``data.yaml`` rewritten to point at
where the folder is now; the original stays untouched, keeping its content hash.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import yaml

from data_pipeline.classes import CLASS_NAMES
from training.errors import DatasetError

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class DatasetRef:
    """A dataset ready for ultralytics: its folder, its version id and a resolved data.yaml."""

    path: Path
    version: str
    data_yaml: Path
    synthetic: bool

    def images(self, split: str) -> list[Path]:
        """Image files of one split, sorted so every caller sees the same order."""
        folder = self.path / "images" / split
        return sorted(p for p in folder.glob("*") if p.suffix.lower() in {".png", ".jpg", ".jpeg"})

    def patients(self) -> dict[str, str]:
        """Image id -> pseudonymous patient (the manifest's salted hash), for resampling by patient.

        An image without one counts as a patient of its own (phantoms without PatientID).
        """
        meta = _read_manifest(self.path).get("images")
        out = {}
        for split in ("train", "val", "test"):
            for image in self.images(split):
                entry = meta.get(image.stem) if isinstance(meta, dict) else None
                patient = entry.get("patient") if isinstance(entry, dict) else None
                out[image.stem] = str(patient) if patient else f"image:{image.stem}"
        return out

    def subgroups(self) -> dict[str, dict[str, str]]:
        """Image id -> subgroup attributes (sex, age band, manufacturer, view) from the manifest.

        Only images whose manifest entry has them are listed: a dataset built before the data
        pipeline recorded subgroups yields an empty mapping, and evaluation then reports none.
        """
        meta = _read_manifest(self.path).get("images")
        if not isinstance(meta, dict):
            return {}
        out: dict[str, dict[str, str]] = {}
        for image_id, entry in meta.items():
            groups = entry.get("subgroups") if isinstance(entry, dict) else None
            if isinstance(groups, dict) and groups:
                out[str(image_id)] = {str(k): str(v) for k, v in groups.items()}
        return out

    def label_file(self, image: Path) -> Path:
        """The YOLO label file that belongs to an image (may be missing or empty: No finding)."""
        split = image.parent.name
        return self.path / "labels" / split / f"{image.stem}.txt"


def _read_manifest(path: Path) -> dict[str, object]:
    manifest = path / "manifest.json"
    if not manifest.is_file():
        return {}
    try:
        data = json.loads(manifest.read_text())
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{manifest} is not valid JSON: {exc}") from exc
    return data if isinstance(data, dict) else {}


def _is_synthetic(manifest: dict[str, object]) -> bool:
    """Whether the manifest says the images are phantoms, stated in the model card."""
    for key in ("synthetic", "is_synthetic"):
        if isinstance(manifest.get(key), bool):
            return bool(manifest[key])
    source = json.dumps(manifest.get("source", "")).lower()
    return "synth" in source or "phantom" in source


def open_dataset_dir(path: Path, work_dir: Path, required: tuple[str, ...] = ("train", "val")) -> DatasetRef:
    """Check a dataset folder's layout and write a resolved data.yaml under ``work_dir``.

    ``required``: the splits that must exist; training needs train and val, a golden set (an
    evaluation-only version, data_pipeline/golden.py) has only test.
    """
    path = path.resolve()
    data_yaml = path / "data.yaml"
    if not data_yaml.is_file():
        raise DatasetError(
            f"{path} has no data.yaml: pass a dataset version folder built by `cxr data ingest`"
        )
    try:
        data = yaml.safe_load(data_yaml.read_text()) or {}
    except yaml.YAMLError as exc:
        raise DatasetError(f"{data_yaml} is not valid YAML: {exc}") from exc
    names = data.get("names")
    names_list = [names[k] for k in sorted(names)] if isinstance(names, dict) else list(names or [])
    if names_list != list(CLASS_NAMES):
        raise DatasetError(
            f"{data_yaml} names {names_list[:3]}... differ from the 14 VinDr findings; "
            "rebuild the dataset with the current data_pipeline"
        )
    for split in required:
        if not (path / "images" / split).is_dir():
            raise DatasetError(f"{path} lacks images/{split}/: the dataset is incomplete")
    manifest = _read_manifest(path)
    version = str(manifest.get("version") or manifest.get("dataset_version") or path.name)
    resolved = {
        "path": str(path),
        "train": "images/train",
        "val": "images/val",
        "test": "images/test" if (path / "images" / "test").is_dir() else "images/val",
        "names": dict(enumerate(CLASS_NAMES)),
    }
    work_dir.mkdir(parents=True, exist_ok=True)
    out = work_dir / f"data-{version[:16]}.yaml"
    out.write_text(yaml.safe_dump(resolved, sort_keys=False))
    return DatasetRef(path=path, version=version, data_yaml=out, synthetic=_is_synthetic(manifest))


def dataset_ref(configured: str | None, given: str | Path | None) -> str:
    """The dataset to train on: the caller's beats the recipe's, and having neither is an error."""
    ref = str(given) if given is not None else configured
    if not ref:
        raise DatasetError("no dataset given: pass --dataset VERSION|DIR or set `dataset:` in the config")
    return ref


def resolve_dataset(ref: str, work_dir: Path, cache_dir: Path) -> DatasetRef:
    """A directory is used as is; anything else is a dataset version fetched from the object store."""
    candidate = Path(ref).expanduser()
    if candidate.is_dir():
        return open_dataset_dir(candidate, work_dir)
    if "/" in ref or ref.startswith("."):
        raise DatasetError(f"dataset directory {ref} does not exist")
    try:
        from data_pipeline.versioning import fetch_dataset
    except ImportError as exc:  # the data pipeline is a sibling package of the same distribution
        raise DatasetError(
            f"cannot fetch dataset version {ref}: data_pipeline.versioning missing ({exc})"
        ) from exc
    log.info("event=dataset_fetch version=%s cache=%s", ref, cache_dir)
    try:
        path = fetch_dataset(ref, cache_dir)
    except Exception as exc:  # whatever the store raised, the person needs the version and the endpoint
        raise DatasetError(f"cannot fetch dataset version {ref} from the object store: {exc}") from exc
    return open_dataset_dir(Path(path), work_dir)
