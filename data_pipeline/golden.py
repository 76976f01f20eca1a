"""The golden set: a frozen evaluation-only dataset version, pinned by a reviewed file.

Gates that compare a candidate with production must measure both on the same images, and on
images no model was trained or tuned on. The golden set is a dataset version like any other
(content-hashed, published to ``datasets/<version>/``) whose images are all in its test split;
its version is pinned in ``training/golden.yaml`` of the GitOps repository, so changing the
yardstick is a reviewed commit. Every later ``ingest`` drops the golden patients' images from
all splits (:func:`golden_patients`), so nothing leaks into training by patient.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import yaml
from pydantic import BaseModel, Field, ValidationError

from data_pipeline.errors import DataPipelineError, StoreError
from data_pipeline.versioning import DATASET_VERSION_PATTERN, MANIFEST

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from data_pipeline.config import DataSettings
    from data_pipeline.store import ObjectStore

PIN_FILE = Path("training") / "golden.yaml"


class GoldenError(DataPipelineError):
    """The golden pin is missing, unreadable, or names a version that is no golden set."""


class GoldenPin(BaseModel):
    """What ``training/golden.yaml`` holds: the version, and what it was when it was pinned."""

    version: str = Field(pattern=f"^{DATASET_VERSION_PATTERN.pattern}$", description="a dataset version")
    images: int = Field(ge=1)
    patients: int = Field(ge=1)
    findings: dict[str, int] = Field(default_factory=dict, description="boxes per class")
    no_finding_images: int = 0
    pinned_at: str = ""


def pin_path(gitops_dir: Path) -> Path:
    return Path(gitops_dir) / PIN_FILE


def read_pin(gitops_dir: Path) -> GoldenPin | None:
    """The pinned golden set, or None when the repository pins none yet."""
    path = pin_path(gitops_dir)
    if not path.exists():
        return None
    try:
        return GoldenPin.model_validate(yaml.safe_load(path.read_text()) or {})
    except (yaml.YAMLError, ValidationError) as exc:
        raise GoldenError(f"{path} is not a valid golden pin: {exc}") from exc


def describe(dataset_dir: Path) -> GoldenPin:
    """A pin for a built dataset version; refuses one whose images are not all in its test split."""
    manifest = json.loads((Path(dataset_dir) / MANIFEST).read_text())
    images = manifest.get("images") or {}
    counts = manifest.get("counts", {})
    splits = counts.get("images", {})
    if not manifest.get("source", {}).get("golden") or splits.get("train") or splits.get("val"):
        raise GoldenError(
            f"dataset {manifest.get('version')} is no golden set (built without --golden: "
            f"{splits.get('train', 0)} train / {splits.get('val', 0)} val images)"
        )
    findings = counts.get("boxes_per_class", {}).get("test", {})
    return GoldenPin(
        version=str(manifest["version"]),
        images=len(images),
        patients=len({meta.get("patient") or name for name, meta in images.items()}),
        findings={k: int(v) for k, v in findings.items() if k != "No finding"},
        no_finding_images=int(findings.get("No finding", 0)),
        pinned_at=datetime.now(UTC).isoformat(timespec="seconds"),
    )


def write_pin(gitops_dir: Path, pin: GoldenPin) -> Path:
    """Write ``training/golden.yaml`` (commit it: changing the yardstick is a reviewed change)."""
    path = pin_path(gitops_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = (
        "# The golden set promotion gates evaluate candidate and production on (data_pipeline/golden.py).\n"
        "# Changing it changes the yardstick: review it like a gate threshold.\n"
    )
    # atomically: the first training build polls for this file while it is written (wait_for_pin)
    tmp = path.with_suffix(".yaml.tmp")
    tmp.write_text(header + yaml.safe_dump(pin.model_dump(), sort_keys=False))
    tmp.replace(path)
    return path


def commit_pin(gitops_dir: Path, pin: GoldenPin) -> str | None:
    """Commit ``training/golden.yaml`` when the GitOps folder is a git repository; the new sha or None.

    The pin is a reviewed change like a gate threshold: committing it here gives the review and
    the history one place (push and open a merge request as for any promotion).
    """
    from git import GitCommandError, InvalidGitRepositoryError, NoSuchPathError, Repo

    try:
        repo = Repo(gitops_dir)
    except (InvalidGitRepositoryError, NoSuchPathError):
        return None
    repo.index.add([str(PIN_FILE)])
    if repo.head.is_valid() and not repo.index.diff("HEAD", paths=[str(PIN_FILE)]):
        return None  # the same pin again: nothing to commit
    message = (
        f"pin golden set {pin.version} ({pin.images} images, {pin.patients} patients)\n\n"
        "Promotion gates compare candidate and production on this set (data_pipeline/golden.py)."
    )
    # the git binary with the pin's path only: the index's commit took whatever else was staged
    # (a half-edited stage file) into the pin's commit, and skipped the repository's hooks
    try:
        repo.git.commit("-m", message, "--", str(PIN_FILE))
    except GitCommandError as exc:
        # no identity, a hook refusing it: the pin is written, left staged, and said so
        raise GoldenError(
            f"{pin_path(gitops_dir)} is written and staged but git refused to commit it "
            f"({(exc.stderr or '').strip()[:200] or exc.status}); set user.name and user.email "
            f"(git config) or fix the hook, then commit it: git -C {gitops_dir} commit -- {PIN_FILE}"
        ) from None
    return str(repo.head.commit.hexsha)


class HeldOut(frozenset[str]):
    """The golden set's split group keys, and the perceptual hashes and study keys of its images.

    A frozenset of the keys, so every caller that held out patients still does; ``phashes`` lets
    ingest also hold out a copy of a golden image filed under another patient (re-exported or
    re-anonymised: the same pixels, another PatientID), which the keys alone let into training.
    A golden version built before its manifest kept the hashes has none (patients only).
    ``studies``: salted StudyInstanceUIDs (ingest's ``_study_key``), so another view of a golden
    study whose PatientID was blanked or changed is held out too.
    """

    phashes: tuple[str, ...]
    studies: frozenset[str]

    def __new__(
        cls, keys: Iterable[str] = (), phashes: Iterable[str] = (), studies: Iterable[str] = ()
    ) -> HeldOut:
        held = super().__new__(cls, keys)
        held.phashes = tuple(phashes)
        held.studies = frozenset(studies)
        return held


def golden_patients(dataset_dir: Path) -> HeldOut:
    """The patients of a golden version, as split group keys: ingest keeps their images out of every split.

    A salted patient id, or ``image:<image_id>`` for an image without a PatientID (a PNG or JPEG, a
    header without one: :func:`~data_pipeline.split.group_key`). Only patient ids were returned,
    so such golden images went into the next training set when they came again. With them, the
    images' perceptual hashes (:class:`HeldOut`).
    """
    from data_pipeline.split import group_key  # here: the split module loads scikit-learn

    manifest = json.loads((Path(dataset_dir) / MANIFEST).read_text())
    images = (manifest.get("images") or {}).items()
    held = HeldOut(
        (group_key(str(name), meta.get("patient") or None) for name, meta in images),
        (str(meta["phash"]) for _, meta in images if meta.get("phash")),
        (str(meta["study"]) for _, meta in images if meta.get("study")),
    )
    if len(held.phashes) < len(images):
        log.warning(
            "golden_holdout_by_patient_only version=%s images_without_hash=%d: copies of these golden "
            "images filed under other patients are not held out",
            manifest.get("version", "?"),
            len(images) - len(held.phashes),
        )
    return held


def wait_for_pin(gitops_dir: Path, timeout_s: float, poll_s: float = 0.2) -> GoldenPin:
    """The golden pin, waiting up to ``timeout_s`` for a build running beside this one to commit it.

    The first ``make up`` builds its golden set and its first training dataset side by side
    (stack/bootstrap.py): the training build needs the golden patients only to split, so it
    decodes and fuses meanwhile and waits here.
    """
    deadline = time.monotonic() + timeout_s
    while (pin := read_pin(gitops_dir)) is None:
        if time.monotonic() >= deadline:
            raise GoldenError(
                f"no golden set was pinned in {pin_path(gitops_dir)} within {timeout_s:.0f} s; its patients "
                "must be kept out of this dataset: build it first (`cxr data golden build`)"
            )
        time.sleep(poll_s)
    return pin


def held_out_patients(settings: DataSettings, store: ObjectStore | None) -> HeldOut:
    """The pinned golden set's patients (none when nothing is pinned), fetched if not cached.

    A pin whose version cannot be read is an error, not an empty set: building anyway could
    put golden patients into training.
    """
    from data_pipeline.versioning import fetch_dataset

    pin = read_pin(settings.gitops_dir)
    if pin is None:
        return HeldOut()
    cached = settings.cache_dir() / pin.version
    try:
        folder = (
            cached
            if (cached / MANIFEST).exists()
            else fetch_dataset(pin.version, settings.cache_dir(), store)
        )
    except StoreError as exc:  # DatasetNotFound included
        raise GoldenError(
            f"{pin_path(settings.gitops_dir)} pins golden set {pin.version}, which cannot be read ({exc}); "
            "its patients must be kept out of this dataset: make it reachable, or unpin it by a commit"
        ) from exc
    return golden_patients(folder)
