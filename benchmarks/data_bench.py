"""Data pipeline benchmarks for ``make bench``: dataset build speed, fusion of a VinDr-sized CSV, decode.

Measured, never assumed: each figure comes from running the real code on
synthetic inputs of the real size (2048x2048 16-bit uncompressed DICOMs, a
~70k-row annotation file for 15k images).
"""

from __future__ import annotations

import io
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np


def _decode_ms_2048x2500(repeats: int = 10) -> float:
    """Median ms to decode + VOI + invert one uncompressed 2048x2500 16-bit MONOCHROME1 DICOM (one core)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

    from data_pipeline.dicom_io import decode_bytes

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 4096, size=(2500, 2048), dtype=np.uint16)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = UID("1.2.840.10008.5.1.4.1.1.1.1")
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.WindowCenter, ds.WindowWidth = 2048, 4000
    ds.PatientID = "BENCH"
    ds.PixelData = pixels.tobytes()
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    data = buffer.getvalue()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        decode_bytes(data, salt="bench")
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def _fusion(n_images: int = 15_000) -> dict[str, float]:
    from data_pipeline.annotations import parse_frame
    from data_pipeline.fusion import FusionConfig, fuse_annotations
    from data_pipeline.synth import vindr_like_annotations

    raw = vindr_like_annotations(n_images, seed=0)
    start = time.perf_counter()
    table = parse_frame(raw.astype(str), source="bench")
    validated = time.perf_counter()
    fuse_annotations(table.frame, FusionConfig())
    done = time.perf_counter()
    return {
        "fusion_70k_rows_s": done - validated,
        "fusion_validate_s": validated - start,
        "fusion_rows": float(len(raw)),
    }


def _dataset_build(n_images: int, workdir: Path) -> dict[str, Any]:
    from data_pipeline.config import DataSettings
    from data_pipeline.ingest import build_dataset
    from data_pipeline.synth import SynthConfig, generate

    start = time.perf_counter()
    synth = generate(
        SynthConfig(n_images=n_images, seed=123, size=2048, compressed_fraction=0.0), workdir / "synth"
    )
    synth_s = time.perf_counter() - start
    build = build_dataset(
        synth.dicom_dir, synth.annotations_csv, workdir / "datasets", settings=DataSettings(max_side=1024)
    )
    n = sum(build.manifest["counts"]["images"].values())
    per_image_ms = {k: 1000 * v / n for k, v in build.stage_seconds.items() if k != "wall"}
    return {
        "dataset_build_img_per_s": n / build.seconds,
        "dataset_build_images_stage_img_per_s": n / build.stage_seconds["wall"],
        "dataset_build_images": n,
        # flat keys so `make bench` prints the per-stage split in its table
        **{f"dataset_build_ms_per_image_{k}": round(v, 2) for k, v in sorted(per_image_ms.items())},
        "synth_2048_img_per_s": n_images / synth_s,
    }


def run_data_benchmarks(n_images: int = 60) -> dict[str, Any]:
    """All data-pipeline figures for ``benchmarks/results.json`` (keys from DESIGN.md plus details)."""
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="cxr-data-bench-") as tmp:
        results.update(_dataset_build(n_images, Path(tmp)))
    results.update(_fusion())
    results["decode_voi_2048x2500_ms"] = _decode_ms_2048x2500()
    return results


if __name__ == "__main__":
    import json

    print(json.dumps(run_data_benchmarks(), indent=2))
