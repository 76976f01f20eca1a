"""Content-hashed dataset versions: compute, publish to S3, fetch into a local cache.

A version is the sha256 (first 16 hex) of the sorted (split, image content
hash, label hash, image identity hash) entries plus the pipeline's own
configuration, so the same inputs give the same version on any machine and
any change of pixels, labels, split, image id, patient key, subgroups or
settings gives a new one. ``manifest.json`` is uploaded LAST: its presence in
S3 means the version is complete, and fetching checks every file against the
hashes it lists.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from core.hashing import file_sha256
from data_pipeline.errors import DatasetIntegrityError, DatasetNotFound, StoreError
from data_pipeline.store import ObjectStore, is_missing

log = logging.getLogger(__name__)

DATASETS_PREFIX = "datasets/"
MANIFEST = "manifest.json"
LATEST = "datasets/LATEST"
#: Files that are rewritten per machine and so are not hash-checked on fetch.
MACHINE_LOCAL = frozenset({"data.yaml"})


def compute_version(entries: Iterable[tuple[str, ...]], config: Mapping[str, Any]) -> str:
    """sha256 over the sorted entries and the config; 16 hex chars.

    An entry is (split, image_sha256, label_sha256, identity_sha256): the last hashes what the
    manifest keeps of the image besides its bytes (id, patient key, subgroups, size; ingest's
    ``_identity_sha``), since a build with an existing version reuses that version's manifest.
    """
    payload = json.dumps(
        {"entries": sorted(list(e) for e in entries), "config": config}, sort_keys=True, separators=(",", ":")
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def file_listing(dataset_dir: Path) -> dict[str, dict[str, Any]]:
    """relative path -> {sha256, size} for every file except the manifest itself."""
    files: dict[str, dict[str, Any]] = {}
    for path in sorted(p for p in dataset_dir.rglob("*") if p.is_file()):
        rel = path.relative_to(dataset_dir).as_posix()
        if rel == MANIFEST:
            continue
        files[rel] = {"sha256": file_sha256(path), "size": path.stat().st_size}
    return files


#: what :func:`compute_version` makes: the only form a version read from outside may take
DATASET_VERSION_PATTERN = re.compile(r"[0-9a-f]{16}")


def checked_version(version: str, where: str) -> str:
    """``version`` when it is a dataset version's form, else :class:`DatasetNotFound`.

    A version becomes a folder name under the cache (and a store prefix): one read from the store
    (``datasets/LATEST``), a manifest or an MLflow tag must not name another path (``../x``, ``/x``).
    """
    if not DATASET_VERSION_PATTERN.fullmatch(version):
        raise DatasetNotFound(
            f"{where} names dataset version {version[:40]!r}, which is not a version "
            "(16 lowercase hex digits, as `cxr data ingest` makes them)"
        )
    return version


def version_prefix(version: str) -> str:
    return f"{DATASETS_PREFIX}{version}/"


def publish(
    dataset_dir: Path, version: str, store: ObjectStore, *, latest: bool = True, cache_dir: Path | None = None
) -> int:
    """Upload a built version (idempotent; manifest last) and point ``datasets/LATEST`` at it.

    ``latest=False`` for a golden set: it must never become what training picks up.
    ``cache_dir``: this machine's fetch cache, which then holds the version too (:func:`seed_cache`).
    """
    store.ensure_bucket()
    prefix = version_prefix(version)
    sent = store.upload_dir(dataset_dir, prefix, skip={MANIFEST})
    store.put_file(prefix + MANIFEST, dataset_dir / MANIFEST, content_type="application/json")
    if latest:
        store.put_bytes(LATEST, version.encode(), content_type="text/plain")
    log.info("event=dataset_published version=%s files_sent=%d prefix=%s", version, sent, prefix)
    if cache_dir is not None:
        seed_cache(dataset_dir, version, cache_dir)
    return sent + 1


def list_versions(store: ObjectStore) -> list[str]:
    """Complete versions (those with a manifest) in the store."""
    names = store.list_prefix(DATASETS_PREFIX)
    return sorted({n.split("/")[1] for n in names if n.endswith("/" + MANIFEST) and n.count("/") == 2})


def latest_version(store: ObjectStore) -> str:
    """The version the last ingest published."""
    try:
        latest = store.get_bytes(LATEST).decode(errors="replace").strip()
    except StoreError as exc:
        if not is_missing(exc):  # unreachable or refused: its own message says so, not "nothing published"
            raise
        raise DatasetNotFound(
            f"no dataset published yet in {store.endpoint} (run `cxr data ingest`)"
        ) from exc
    return checked_version(latest, f"{store.endpoint}'s {LATEST}")


def fetch_dataset(version: str, cache_dir: Path, store: ObjectStore | None = None) -> Path:
    """Local folder of ``version`` (download once, verify against the manifest, reuse afterwards).

    ``version`` may be ``"latest"``. The returned folder's ``data.yaml`` points
    at itself, ready for ultralytics.
    """
    store = store or ObjectStore.from_env()
    if version == "latest":
        version = latest_version(store)
    checked_version(version, "the dataset reference")
    cache_dir = Path(cache_dir)
    target = cache_dir / version
    if (target / MANIFEST).exists():
        _rewrite_data_yaml(target)
        return target
    prefix = version_prefix(version)
    if not store.exists(prefix + MANIFEST):
        known = ", ".join(list_versions(store)[-5:]) or "none"
        raise DatasetNotFound(f"dataset version {version} is not in {store.endpoint} (recent: {known})")

    def download(staging: Path) -> None:
        _download_listed(store, prefix, staging)
        verify(staging)

    _into_cache(target, download)
    log.info("event=dataset_fetched version=%s path=%s", version, target)
    return target


def _download_listed(store: ObjectStore, prefix: str, staging: Path) -> None:
    """The manifest, then exactly the files it lists (what :func:`verify` then checks).

    Every object under the prefix was downloaded, and only the listed ones checked: an image and
    label placed in ``images/train/`` in the store after publishing were trained on unchecked.
    A listed path that would leave the folder (``../x``) is refused, never written.
    """
    store.get_file(prefix + MANIFEST, staging / MANIFEST)
    try:
        files = json.loads((staging / MANIFEST).read_text())["files"]
    except (ValueError, KeyError, TypeError) as exc:
        raise DatasetIntegrityError(f"{prefix}{MANIFEST} is not a dataset manifest ({exc!r:.80})") from exc
    for rel in files:
        if not _inside(rel):
            raise DatasetIntegrityError(f"{prefix}{MANIFEST} lists {rel[:80]!r}, a path outside the version")
        store.get_file(prefix + rel, staging / rel)


def _inside(rel: object) -> bool:
    """True when ``rel`` is a relative path that stays inside the version's folder."""
    if not isinstance(rel, str) or not rel or rel.startswith("/") or "\\" in rel:
        return False
    return ".." not in Path(rel).parts and rel != MANIFEST


def _into_cache(target: Path, fill: Callable[[Path], None]) -> None:
    """Fill a staging folder beside ``target``, then rename it into place (all or nothing).

    Its ``data.yaml`` points at ``target`` before the rename, so no reader ever sees it point
    elsewhere; a process that finished the same version first wins, and ours is dropped.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        fill(staging)
        _rewrite_data_yaml(staging, points_to=target)
        if not (target / MANIFEST).exists():
            try:
                staging.rename(target)
            except OSError as exc:  # ENOTEMPTY: another process renamed its copy in between
                if not (target / MANIFEST).exists():
                    raise DatasetIntegrityError(
                        f"{target} exists without its {MANIFEST} (an interrupted copy?): "
                        "delete that folder and fetch again"
                    ) from exc
        if staging.exists():  # theirs is as good as ours
            shutil.rmtree(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


#: the folders of a version big enough to link rather than copy: the images, and their labels
#: beside them. Nothing rewrites these in place; the report, data.yaml and the manifest are copied
#: (``cxr data report`` may redraw a report where it lies, and must not redraw the other copy).
LINKED_FOLDERS = ("images", "labels")


def seed_cache(dataset_dir: Path, version: str, cache_dir: Path) -> Path | None:
    """Put a version just published into the fetch cache, as :func:`fetch_dataset` would.

    The build folder holds the very bytes just uploaded, so the next fetch of this version on this
    machine (the local runner's train step right after its build, the next ingest reading the
    golden set) need not download them back: 2-3 s of the first ``make up`` for 400 phantoms.
    Its files are checked against the manifest first, as a fetch checks them (a reused build
    folder may have been edited; hashing 400 images of 1.3 MB takes ~0.4 s here). Images and
    labels are hard-linked (:data:`LINKED_FOLDERS`); the rest is copied.

    Only a saving, never a failure: across file systems (where linking would turn into copying
    the whole version) or on any error it logs why and returns None, and the next fetch downloads
    as before. Returns the cache folder, or None when it was not seeded (or already there).
    """
    dataset_dir, target = Path(dataset_dir), Path(cache_dir) / version
    if (target / MANIFEST).exists() or target.resolve() == dataset_dir.resolve():
        return None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        if os.stat(dataset_dir).st_dev != os.stat(target.parent).st_dev:
            log.info("event=dataset_cache_not_seeded version=%s reason=another_file_system", version)
            return None
        verify(dataset_dir)

        def link(staging: Path) -> None:
            for item in dataset_dir.iterdir():
                if item.is_dir() and item.name in LINKED_FOLDERS:
                    shutil.copytree(item, staging / item.name, copy_function=os.link)
                elif item.is_dir():
                    shutil.copytree(item, staging / item.name)
                else:
                    shutil.copy2(item, staging / item.name)

        _into_cache(target, link)
    except (OSError, DatasetIntegrityError) as exc:
        log.warning("event=dataset_cache_not_seeded version=%s reason=%r", version, exc)
        return None
    log.info("event=dataset_cache_seeded version=%s path=%s", version, target)
    return target


def verify(dataset_dir: Path) -> dict[str, Any]:
    """Check every file against the manifest, and that images/ and labels/ hold no other file;
    raises :class:`DatasetIntegrityError` listing mismatches.

    The caches ultralytics leaves in a folder it trained from are removed first
    (:func:`drop_trainer_caches`): a folder someone trained from still verifies, and what verifies
    is all that training then reads.
    """
    manifest = json.loads((dataset_dir / MANIFEST).read_text())
    problems = []
    try:
        drop_trainer_caches(dataset_dir, manifest["files"])
    except OSError as exc:  # left in place, it would be trusted by the next training: damage
        problems.append(f"an ultralytics cache that cannot be removed ({exc.strerror}: {exc.filename})")
    for rel, meta in manifest["files"].items():
        if rel in MACHINE_LOCAL:
            continue
        path = dataset_dir / rel
        if not _inside(rel):
            problems.append(f"{rel[:80]}: a path outside the version")
        elif not path.exists():
            problems.append(f"{rel}: missing")
        elif file_sha256(path) != meta["sha256"]:
            problems.append(f"{rel}: sha256 differs")
    # what training reads is every file in these folders (ultralytics globs images/<split>/):
    # one the manifest does not list was never checked, nor counted in the version
    problems += [f"{rel}: not in the manifest" for rel in _unlisted(dataset_dir, manifest["files"])]
    if problems:
        raise DatasetIntegrityError(
            f"dataset {manifest.get('version')} at {dataset_dir} is damaged ({len(problems)} files): "
            + "; ".join(problems[:5])
            + ". Delete the folder and fetch again."
        )
    return manifest


#: what ultralytics writes into a dataset folder it trains from (folder, pattern), as of 8.4:
#: ``labels/<split>.cache``, the label cache of each split (data/dataset.py ``get_labels``: an
#: ``np.save`` of a pickled dict; ``.cache.npy`` is where older versions wrote it before a rename), and
#: ``images/<split>/<stem>.npy``, an image's pixels (data/base.py ``cache_images_to_disk``, with
#: ``cache="disk"``; ``load_image`` reads one in place of its PNG whatever the cache mode).
TRAINER_CACHES = (("labels", "*.cache"), ("labels", "*.cache.npy"), ("images", "*/*.npy"))


def drop_trainer_caches(dataset_dir: Path, listed: Mapping[str, Any]) -> list[str]:
    """Remove the caches ultralytics wrote into a version folder (:data:`TRAINER_CACHES`) that the
    manifest does not list; returns their paths, relative to the folder.

    Training from a build folder (``--dataset DIR``) or a fetched one leaves ``labels/train.cache``
    there, so :func:`verify` called the folder damaged and :func:`seed_cache` skipped it. Listing
    such a file as harmless would not do: ultralytics trusts a label cache whose hash matches the
    label and image files' paths, sizes and mtimes, never their bytes, so a cache edited to carry
    other boxes (mtimes are easily set) is trained on while every label file still verifies; and
    it is a pickle, which ultralytics loads with ``allow_pickle=True``, so it cannot be checked
    here without running what it holds. An ``.npy`` beside an image replaces the PNG's pixels the
    same way. Each is derived from files the manifest checks, and ultralytics rebuilds a missing
    one from them at the next training start (one scan of the labels), so removing it is the sound
    fix: what verifies is then all that training reads. A file of the same name the manifest
    lists is checked like any other, never removed. Raises :class:`OSError` when one cannot be
    removed (:func:`verify` reports that as damage).
    """
    dropped: list[str] = []
    for folder, pattern in TRAINER_CACHES:
        for path in sorted((dataset_dir / folder).glob(pattern)):
            rel = path.relative_to(dataset_dir).as_posix()
            if rel in listed or not (path.is_symlink() or path.is_file()):
                continue
            path.unlink()
            dropped.append(rel)
    if dropped:
        log.info(
            "event=dataset_trainer_cache_removed path=%s files=%d first=%s",
            dataset_dir,
            len(dropped),
            ",".join(dropped[:3]),
        )
    return dropped


def _unlisted(dataset_dir: Path, listed: Mapping[str, Any]) -> list[str]:
    """Files under :data:`LINKED_FOLDERS` (images, labels) that the manifest does not list."""
    found = (p for folder in LINKED_FOLDERS for p in sorted((dataset_dir / folder).rglob("*")))
    return [
        rel for p in found if p.is_file() and (rel := p.relative_to(dataset_dir).as_posix()) not in listed
    ]


def _rewrite_data_yaml(dataset_dir: Path, points_to: Path | None = None) -> None:
    """Point ``data.yaml``'s ``path`` at the folder it will be read from (this one by default)."""
    path = dataset_dir / "data.yaml"
    if not path.exists():
        return
    data = yaml.safe_load(path.read_text())
    resolved = str((points_to or dataset_dir).resolve())
    if data.get("path") != resolved:
        data["path"] = resolved
        path.write_text(yaml.safe_dump(data, sort_keys=False))
