"""Build one versioned YOLO dataset: decode, validate, fuse, check, split, export, version, publish.

The order matters: images are decoded first (in a process pool) because
validating boxes needs image sizes; annotations are then checked against
those sizes, fused, and only images that decoded, passed the checks and have
labels enter the split. Everything is written to a staging folder and renamed
into ``<out>/<version>/`` at the end, so a crash never leaves a half version
and a second identical build finds the first one and reuses it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from rich.console import Console

from core.hashing import file_sha256
from core.scratch import scratch_dir
from data_pipeline.annotations import (
    COORDS,
    AnnotationTable,
    check_inside_images,
    load_annotations,
    merge_tables,
)
from data_pipeline.classes import CLASS_NAMES, NO_FINDING_ID
from data_pipeline.config import DataSettings
from data_pipeline.dicom_io import hash_patient_id, max_file_bytes
from data_pipeline.drift import build_reference
from data_pipeline.errors import AnnotationError, EmptyDatasetError
from data_pipeline.executors import run_images
from data_pipeline.export import (
    ImageJob,
    ImageResult,
    ambiguity,
    scan_image_folder,
    write_data_yaml,
    yolo_label_text,
)
from data_pipeline.feedback import FeedbackBatch, collect_feedback
from data_pipeline.fusion import FusionConfig, fuse_annotations, no_consensus_images
from data_pipeline.output import ensure_output_folder
from data_pipeline.quality import QualityReport, check_images, check_labels, near_any, near_duplicate_groups
from data_pipeline.report import (
    INDEX,
    READERS_CSV,
    REPORT_DIR,
    ReportInputs,
    build_report,
    readers_frame,
    split_counts,
)
from data_pipeline.split import SPLITS, SplitConfig, group_key, linked_by, merge_groups, split_groups
from data_pipeline.store import ObjectStore
from data_pipeline.versioning import (
    MANIFEST,
    compute_version,
    file_listing,
    publish,
    sha256_text,
)

log = logging.getLogger(__name__)


@dataclass
class DatasetBuild:
    """Result of :func:`build_dataset`: the version, its local folder and manifest, and how it went."""

    version: str
    path: Path
    manifest: dict[str, Any]
    reused: bool = False
    published: bool = False
    quality: QualityReport | None = None
    seconds: float = 0.0
    stage_seconds: dict[str, float] = field(default_factory=dict)
    report: Path | None = None  # the version's report page (data_pipeline/report.py)

    @property
    def images_per_second(self) -> float:
        n = sum(self.manifest.get("counts", {}).get("images", {}).values())
        return n / self.seconds if self.seconds else 0.0


def _workers(settings: DataSettings) -> int:
    if settings.workers:
        return settings.workers
    try:
        return max(len(os.sched_getaffinity(0)), 1)
    except AttributeError:  # pragma: no cover - non-Linux
        return os.cpu_count() or 1


def build_dataset(
    dicom_dir: Path,
    annotations_csv: Path,
    out_dir: Path,
    *,
    settings: DataSettings,
    store: ObjectStore | None = None,
    feedback: bool = True,
    console: Console | None = None,
    golden: bool = False,
    exclude_patients: frozenset[str] | Callable[[], frozenset[str]] = frozenset(),
    cache_dir: Path | None = None,
) -> DatasetBuild:
    """Turn a VinDr-layout folder (+ feedback from S3) into ``<out_dir>/<version>/`` and publish it.

    ``store``: when given, feedback rows are merged from ``feedback/`` (if
    ``feedback``) and the version is uploaded to ``datasets/<version>/``.
    ``golden``: every image goes to the test split (an evaluation-only set, data_pipeline/golden.py).
    ``exclude_patients``: images of these (salted) patients enter no split (split group keys,
    :func:`~data_pipeline.split.group_key`, so also images without a PatientID): the golden set's
    patients, so no model ever trains or is tuned on them. A callable is called only when the
    split needs them, after decoding and fusion (a golden set still being built can finish meanwhile).
    ``cache_dir``: a published version is also placed in this fetch cache (hard links,
    :func:`~data_pipeline.versioning.seed_cache`), so fetching it next on this machine reads no store.
    """
    started = time.perf_counter()
    dicom_dir, annotations_csv, out_dir = Path(dicom_dir), Path(annotations_csv), Path(out_dir)
    if not dicom_dir.is_dir():
        what = "is not a folder" if dicom_dir.exists() else "does not exist"
        raise AnnotationError(f"image folder {dicom_dir} {what}")
    ensure_output_folder(out_dir)
    # [1] the new studies: annotation rows and the images they may refer to
    table = load_annotations(annotations_csv)
    folder = scan_image_folder(dicom_dir)
    files, refused = folder.files, folder.refused_ids
    images = {i: paths[0] for i, paths in files.items() if len(paths) == 1 and i not in refused}
    # an id naming two files labels neither (export.find_images), nor one naming a symbolic link (never
    # followed: it may point at another patient's file or anywhere) or something else refused by the
    # scan: a decode failure naming the files, the scan's refusals listed in the quality report
    unusable = {i: ambiguity(dicom_dir, paths) for i, paths in files.items() if len(paths) > 1} | refused
    batch: FeedbackBatch | None = None

    with scratch_dir(out_dir, ".staging-") as staging:
        # [2] radiologists' feedback (rows and images), item by item, when there is a store to read it from
        if store is not None and feedback:
            batch = _collect_feedback(store, staging, images, settings, frozenset(files) | frozenset(refused))
        # [3] decode the annotated images (box checks need their sizes), then check and fuse the boxes
        annotated = set(table.image_ids()) | set(batch.table.image_ids() if batch else [])
        all_dir = staging / "_all"
        decoded = _decode_annotated(sorted(annotated & set(images)), images, all_dir, settings, console)
        decoded.results.extend(
            ImageResult(i, error=why) for i, why in sorted(unusable.items()) if i in annotated
        )
        table, fused = _check_and_fuse(table, batch.table if batch else None, decoded.sizes, settings)
        # [4] the quality checks decide which images enter the dataset
        unannotated = sorted(set(images) - annotated - set(unusable))
        report = _quality(
            settings, decoded.results, decoded.ok, fused, decoded.sizes, table, unannotated, folder.refused
        )
        keep, fused = _usable_images(decoded, report, fused, dicom_dir)
        excluded = exclude_patients() if callable(exclude_patients) else exclude_patients
        studies = {i: _study_key(decoded.ok[i], settings.resolved_patient_salt()) for i in keep}
        keep, fused, held_out = _without_patients(
            keep, fused, decoded.ok, excluded, dicom_dir, settings.quality.duplicate_max_distance, studies
        )
        # [5] split by patient, move images + labels into their split, derive the content version
        split = {i: "test" for i in keep} if golden else _split(keep, fused, decoded.ok, report, settings)
        entries, image_meta = _write_split(staging, all_dir, keep, split, fused, decoded.ok, studies)
        shutil.rmtree(all_dir)
        version = compute_version(entries, settings.version_config())
        # [6] the files that ship with every version, its report, the manifest (which lists them) last
        readers = readers_frame(table.frame, keep)
        _write_side_files(staging, keep, split, decoded.ok, fused, report, readers)
        report_seconds = _write_report(version, staging, image_meta, console)
        source = _source(dicom_dir, annotations_csv, table, batch)
        source.update({"golden": golden, "golden_patient_images_excluded": held_out})
        _write_manifest(staging, version, settings, source, split_counts(split, fused), image_meta, report)
        # [7] into <out>/<version>/ in one rename, unless an identical build is already there
        target, reused = _move_into_place(staging, out_dir / version)
    build = DatasetBuild(
        version=version,
        path=target,
        manifest=json.loads((target / MANIFEST).read_text()),
        reused=reused,
        quality=report,
        stage_seconds={**_stage_totals(decoded.results, decoded.wall), "report": report_seconds},
        report=target / REPORT_DIR / INDEX if (target / REPORT_DIR / INDEX).is_file() else None,
    )
    # [8] publish to the store, then time and log the whole build
    return _publish_and_log(build, store, started, len(keep), cache_dir)


@dataclass(frozen=True)
class _Decoded:
    """The image pool's output, split the ways the later steps need it."""

    n_jobs: int
    results: list[ImageResult]
    ok: dict[str, ImageResult]
    sizes: dict[str, tuple[int, int]]
    wall: float


def _collect_feedback(
    store: ObjectStore,
    staging: Path,
    images: dict[str, Path],
    settings: DataSettings,
    reserved: frozenset[str],
) -> FeedbackBatch | None:
    """Radiologists' corrections enter like new studies: their images join ``images``, their rows
    (checked item by item, never naming an id of the DICOM folder, ``reserved``) are merged after the
    checks."""
    limits = settings.dicom_limits()
    batch = collect_feedback(store, staging, reserved=reserved, limits=limits)
    if batch is not None:
        for image_id, path in batch.images.items():
            images.setdefault(image_id, path)
    return batch


def _decode_annotated(
    image_ids: list[str],
    images: dict[str, Path],
    all_dir: Path,
    settings: DataSettings,
    console: Console | None,
) -> _Decoded:
    """Decode ``image_ids`` to PNGs under ``all_dir`` in a process pool: the slow step, so it is timed."""
    all_dir.mkdir()
    jobs = [
        ImageJob(
            i,
            str(images[i]),
            str(all_dir / f"{i}.png"),
            settings.max_side,
            settings.png_compression,
            settings.resolved_patient_salt(),
            max_file_bytes(settings.dicom_limits()),
        )
        for i in image_ids
    ]
    t_images = time.perf_counter()
    results = run_images(jobs, _workers(settings), console, executor=settings.executor)
    wall = time.perf_counter() - t_images
    ok = {r.image_id: r for r in results if r.error is None}
    sizes = {i: (r.width, r.height) for i, r in ok.items()}
    return _Decoded(len(jobs), results, ok, sizes, wall)


def _check_and_fuse(
    table: AnnotationTable,
    feedback: AnnotationTable | None,
    sizes: dict[str, tuple[int, int]],
    settings: DataSettings,
) -> tuple[AnnotationTable, pd.DataFrame]:
    """Quarantine boxes outside their image, stop on too many bad rows, fuse the readers' boxes (WBF).

    The bad-row limit judges the annotations CSV alone: feedback items were checked one by one, and
    a bad one left out, so they neither trip the limit nor dilute it.
    """
    table = check_inside_images(table, sizes)
    table.enforce(settings.max_bad_row_fraction)
    if feedback is not None and feedback.total_rows:
        table = merge_tables(table, check_inside_images(feedback, sizes))
    return table, fuse_annotations(table.frame, _fusion_config(settings), sizes)


def _fusion_config(settings: DataSettings) -> FusionConfig:
    return FusionConfig(
        settings.wbf_iou_thr, settings.min_readers, settings.wbf_skip_box_thr, settings.min_reader_share
    )


def _usable_images(
    decoded: _Decoded, report: QualityReport, fused: pd.DataFrame, dicom_dir: Path
) -> tuple[list[str], pd.DataFrame]:
    """Keep images that decoded, passed the checks and have labels; an empty dataset is an error."""
    keep = sorted(set(decoded.ok) - set(report.excluded) & set(fused["image_id"]))
    if not keep:
        raise EmptyDatasetError(
            f"no usable image in {dicom_dir}: {decoded.n_jobs} annotated files, "
            f"{len(report.decode_failures)} undecodable, {len(report.excluded)} excluded by the quality "
            "checks (see thresholds CXR_QUALITY__*); nothing to build"
        )
    return keep, fused[fused["image_id"].isin(set(keep))].reset_index(drop=True)


def _without_patients(
    keep: list[str],
    fused: pd.DataFrame,
    ok: dict[str, ImageResult],
    patients: frozenset[str],
    dicom_dir: Path,
    max_distance: int = 0,
    studies: dict[str, str] | None = None,
) -> tuple[list[str], pd.DataFrame, int]:
    """Drop the images of held-out (golden) patients and copies of golden images; returns what is
    left and how many went.

    ``patients`` holds split group keys (:func:`~data_pipeline.split.group_key`): an image without
    a PatientID is matched by its own key, or a golden image without one was trained on. When it is
    a :class:`~data_pipeline.golden.HeldOut` with perceptual hashes, an image within
    ``max_distance`` bits of a golden image (``CXR_QUALITY__DUPLICATE_MAX_DISTANCE``, as the split's
    near duplicates) goes too, whatever patient it is filed under. With its study keys (``studies``:
    image id -> :func:`_study_key`), an image of a golden study goes too: another view of it whose
    PatientID was blanked or changed on export is the same patient, and had no key to be caught by.
    """
    phashes = getattr(patients, "phashes", ())
    golden_studies = frozenset(getattr(patients, "studies", ()))
    if not patients and not phashes:
        return keep, fused, 0
    copies = near_any(
        {i: stats.phash for i in keep if (stats := ok[i].stats) is not None}, phashes, max_distance
    )
    copies.update(i for i, key in (studies or {}).items() if key and key in golden_studies)
    left = [i for i in keep if group_key(i, ok[i].patient_hash) not in patients and i not in copies]
    if not left:
        raise EmptyDatasetError(
            f"every usable image in {dicom_dir} belongs to a golden-set patient ({len(keep)} images): "
            "nothing may be trained on them"
        )
    return left, fused[fused["image_id"].isin(set(left))].reset_index(drop=True), len(keep) - len(left)


def _split(
    keep: list[str],
    fused: pd.DataFrame,
    ok: dict[str, ImageResult],
    report: QualityReport,
    settings: DataSettings,
) -> dict[str, str]:
    """Image id -> split, by patient, study and near-duplicate group, so no patient is in two splits."""
    labels = _labels_by_image(fused)
    studies = linked_by({i: ok[i].study_uid for i in keep})
    groups = merge_groups(
        {i: group_key(i, ok[i].patient_hash) for i in keep}, report.duplicate_groups + studies
    )
    return split_groups(
        groups, labels, SplitConfig(settings.val_fraction, settings.test_fraction, settings.split_seed)
    )


def _write_side_files(
    staging: Path,
    keep: list[str],
    split: dict[str, str],
    ok: dict[str, ImageResult],
    fused: pd.DataFrame,
    report: QualityReport,
    readers: pd.DataFrame,
) -> None:
    """The quality report, drift reference, fused and readers' annotations and data.yaml of a version.

    The readers' rows (before fusion) are what the report's reader agreement is computed from,
    kept so that ``cxr data report`` can redraw it from the version alone.
    """
    reference = _reference(keep, split, ok, fused)
    (staging / "quality_report.json").write_text(json.dumps(report.to_dict(), indent=1, sort_keys=True))
    (staging / "reference_stats.json").write_text(json.dumps(reference, sort_keys=True))
    fused.to_csv(staging / "annotations_fused.csv", index=False, float_format="%.2f")
    readers.to_csv(staging / READERS_CSV, index=False)
    write_data_yaml(staging)


def _write_report(
    version: str, staging: Path, image_meta: dict[str, dict[str, Any]], console: Console | None
) -> float:
    """The version's report into ``report/`` (so the manifest lists it); returns its seconds.

    A figure that fails to draw must not fail a build of thousands of images: it is logged, and
    the version ships without a report (``cxr data report`` can draw one later).
    """
    try:
        inputs = ReportInputs.from_files(version, staging, image_meta)  # the CSVs as written (rounded)
        return build_report(inputs, staging / REPORT_DIR, console=console).seconds
    except Exception as exc:
        log.warning("event=dataset_report_failed version=%s error=%r", version, exc)
        shutil.rmtree(staging / REPORT_DIR, ignore_errors=True)
        return 0.0


def _source(
    dicom_dir: Path, annotations_csv: Path, table: AnnotationTable, batch: FeedbackBatch | None
) -> dict[str, Any]:
    """The manifest's lineage: where the images and annotations came from, which feedback objects
    were merged and which feedback items were left out (id -> the fixed reason)."""
    return {
        "dicom_dir": str(dicom_dir.resolve()),
        "annotations": str(annotations_csv.resolve()),
        "annotations_sha256": file_sha256(annotations_csv),
        "annotation_rows": table.total_rows,
        "feedback_objects": batch.objects if batch else [],
        "feedback_skipped": dict(sorted(batch.skipped.items())) if batch else {},
    }


def _write_manifest(
    staging: Path,
    version: str,
    settings: DataSettings,
    source: dict[str, Any],
    counts: dict[str, Any],
    image_meta: dict[str, dict[str, Any]],
    report: QualityReport,
) -> None:
    """The version's manifest, written last so its file listing covers everything else."""
    manifest = {
        "version": version,
        "format": "yolo",
        "classes": list(CLASS_NAMES),
        "config": settings.version_config(),
        "source": source,
        "counts": counts,
        "images": image_meta,
        "quality": report.summary(),
        "reference_stats": "reference_stats.json",
        "quality_report": "quality_report.json",
    }
    if (staging / REPORT_DIR / INDEX).is_file():
        manifest["report"] = f"{REPORT_DIR}/{INDEX}"
    manifest["files"] = file_listing(staging)
    (staging / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))


def _move_into_place(staging: Path, target: Path) -> tuple[Path, bool]:
    """Rename staging to ``target`` so a crash never leaves half a version; reuse an identical one.

    Two builds of one version into one folder (the retrain cron and a person's ``cxr data ingest``)
    race: the second saw no manifest, then removed the first's finished version as "a partial
    folder" or failed its own rename on the non-empty folder, while the first was publishing from
    it. The rename alone decides: it fails on a non-empty ``target``, and one with a manifest is an
    identical build that won (the version is the content), reused as it is.
    """
    if not (target / MANIFEST).exists():
        try:
            staging.rename(target)
        except OSError:
            if (target / MANIFEST).exists():  # another build of this version finished first
                return target, True
            # a partial folder from an older crash: set aside (atomically) before removing
            aside = staging.with_name(f"{staging.name}-partial")
            target.rename(aside)
            shutil.rmtree(aside)
            staging.rename(target)
        write_data_yaml(target)  # data.yaml's path now points at the final folder
        staging.mkdir()  # so the context manager has something to remove
        return target, False
    return target, True


def _publish_and_log(
    build: DatasetBuild, store: ObjectStore | None, started: float, n_images: int, cache_dir: Path | None
) -> DatasetBuild:
    """Upload to ``datasets/<version>/`` when there is a store (and seed ``cache_dir`` with it), then
    time the build and log one line."""
    if store is not None:
        golden = build.manifest["source"].get("golden", False)
        publish(build.path, build.version, store, latest=not golden, cache_dir=cache_dir)
        build.published = True
    build.seconds = time.perf_counter() - started
    log.info(
        "event=dataset_built version=%s images=%d reused=%s published=%s seconds=%.1f",
        build.version,
        n_images,
        build.reused,
        build.published,
        build.seconds,
    )
    return build


def _labels_by_image(fused: pd.DataFrame) -> dict[str, set[int]]:
    labels: dict[str, set[int]] = {}
    for image_id, cid in zip(fused["image_id"], fused["class_id"], strict=True):
        labels.setdefault(str(image_id), set()).add(int(cid))
    return labels


def _quality(
    settings: DataSettings,
    results: list[ImageResult],
    ok: dict[str, ImageResult],
    fused: pd.DataFrame,
    sizes: dict[str, tuple[int, int]],
    table: AnnotationTable,
    unannotated: list[str],
    refused_files: dict[str, str],
) -> QualityReport:
    stats = [r.stats for r in ok.values() if r.stats is not None]
    image_failures = check_images(stats, settings.quality)
    report = QualityReport(
        thresholds=settings.quality.model_dump(),
        n_images=len(results),
        image_failures=image_failures,
        duplicate_groups=near_duplicate_groups(stats, settings.quality.duplicate_max_distance),
        decode_failures={r.image_id: r.error or "" for r in results if r.error is not None},
        label_failures={
            **check_labels(fused, sizes, settings.quality),
            "no_consensus": no_consensus_images(fused, _fusion_config(settings)),
        },
        quarantined_rows=json.loads(table.quarantine.to_json(orient="records")),
        unannotated_images=unannotated,
        refused_files=refused_files,
    )
    # no label to train on, whatever exclude_failed_images says (fusion.no_consensus_images)
    excluded = set(report.decode_failures) | set(report.label_failures["no_consensus"])
    if settings.exclude_failed_images:
        for ids in image_failures.values():
            excluded.update(ids)
    report.excluded = sorted(excluded)
    return report


def _write_split(
    staging: Path,
    all_dir: Path,
    keep: list[str],
    split: dict[str, str],
    fused: pd.DataFrame,
    ok: dict[str, ImageResult],
    studies: dict[str, str],
) -> tuple[list[tuple[str, ...]], dict[str, dict[str, Any]]]:
    for name in SPLITS:
        (staging / "images" / name).mkdir(parents=True, exist_ok=True)
        (staging / "labels" / name).mkdir(parents=True, exist_ok=True)
    by_image = {str(k): g for k, g in fused.groupby("image_id", sort=False)}
    entries: list[tuple[str, ...]] = []
    meta: dict[str, dict[str, Any]] = {}
    for image_id in keep:
        name = split[image_id]
        result = ok[image_id]
        rows = by_image[image_id]
        boxes = rows[rows["class_id"] != NO_FINDING_ID]
        text = yolo_label_text(
            boxes["class_id"].to_numpy(dtype=int),
            boxes[COORDS].to_numpy(dtype=np.float64),
            result.width,
            result.height,
        )
        (staging / "labels" / name / f"{image_id}.txt").write_text(text)
        (all_dir / f"{image_id}.png").rename(staging / "images" / name / f"{image_id}.png")
        label_sha = sha256_text(text)
        meta[image_id] = {
            "split": name,
            "width": result.width,
            "height": result.height,
            "out_width": result.out_width,
            "out_height": result.out_height,
            "sha256": result.png_sha256,
            "label_sha256": label_sha,
            "patient": result.patient_hash,
            # the salted StudyInstanceUID: the golden hold-out catches other views of a golden study by it
            "study": studies[image_id],
            # the golden hold-out's near-duplicate check (data_pipeline/golden.py HeldOut): not in the
            # version's identity, a function of the pixels already counted
            "phash": result.stats.phash if result.stats is not None else "",
            # sex, age BAND (not the age), manufacturer, view: PS3.15 Annex E's "Retain Patient
            # Characteristics" option, narrowed (data_pipeline/subgroups.py); nothing else identifying
            "subgroups": result.subgroups,
        }
        entries.append((name, result.png_sha256, label_sha, _identity_sha(image_id, meta[image_id])))
    return entries, meta


def _identity_sha(image_id: str, meta: dict[str, Any]) -> str:
    """Hash of what the manifest says of an image beyond its pixels and label: its id, patient key,
    subgroups and original size, so they count in the version.

    A build whose version exists reuses that folder and its manifest. Pixels and labels alone made
    the version, so a rebuild after PatientID or PatientSex corrections in the headers (a golden set:
    all test, whatever the patients) kept the old manifest, and the golden hold-out read stale patients.
    """
    keys = ("patient", "study", "subgroups", "width", "height")
    return sha256_text(json.dumps({"image_id": image_id, **{k: meta[k] for k in keys}}, sort_keys=True))


def _study_key(result: ImageResult, salt: str) -> str:
    """The salted StudyInstanceUID of an image, as a patient key is salted ("" without one): the
    manifest keeps it for the golden hold-out, never the UID itself."""
    return hash_patient_id(result.study_uid, salt) or ""


def _reference(
    keep: list[str], split: dict[str, str], ok: dict[str, ImageResult], fused: pd.DataFrame
) -> dict[str, Any]:
    """Drift reference statistics of the TRAIN split: what a model trained on this version learned from.

    The gateway scores its window against "the training data" (serving/inference/drift.py); the
    reference was drawn from every image, val and test included. A version without train images
    (a golden set, all test) describes all of its images.
    """
    keep = [i for i in keep if split.get(i) == "train"] or keep
    fused = fused[fused["image_id"].isin(set(keep))]
    boxes = fused[fused["class_id"] != NO_FINDING_ID]
    w = boxes["image_id"].map(lambda i: ok[i].width).to_numpy(dtype=np.float64)
    h = boxes["image_id"].map(lambda i: ok[i].height).to_numpy(dtype=np.float64)
    coords = boxes[COORDS].to_numpy(dtype=np.float64)
    norm = coords / np.stack([w, h, w, h], axis=1) if len(boxes) else np.zeros((0, 4))
    hist: list[int] = np.sum([ok[i].histogram for i in keep], axis=0).tolist() if keep else [0] * 64
    return build_reference(
        intensity_means=[ok[i].stats.mean for i in keep if ok[i].stats is not None],  # type: ignore[union-attr]
        intensity_stds=[ok[i].stats.std for i in keep if ok[i].stats is not None],  # type: ignore[union-attr]
        widths=[ok[i].width for i in keep],
        heights=[ok[i].height for i in keep],
        class_ids=boxes["class_id"].astype(int).tolist(),
        boxes_norm=norm,
        pixel_histogram=hist,
        n_images=len(keep),
    )


def _stage_totals(results: list[ImageResult], wall: float) -> dict[str, float]:
    totals: dict[str, float] = {"wall": wall}
    for r in results:
        for k, v in r.timings.items():
            totals[k] = totals.get(k, 0.0) + v
    return totals
