"""Shared helpers for the serving tests: a tiny real model, API keys, test images.

The model is a real ultralytics YOLO11n export (untrained, 128 px) with the
training contract's metadata, so the gateway runs the same code paths as with a
trained model. Its detection head's class biases are set from a fixed seed so
the scores spread out and NMS has real work to do.
"""

from __future__ import annotations

import io
import json
import uuid
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

IMGSZ = 128
ROLES = ("pacs", "radiologist", "operator", "admin")


def export_test_model(out_dir: Path, imgsz: int = IMGSZ, seed: int = 0) -> Path:
    """Export an untrained YOLO11n (14 classes) to ONNX with the cxr_contract metadata."""
    import torch

    from benchmarks.serve_bench import export_model

    def spread_scores(model: Any) -> None:
        head = model.model.model[-1]
        with torch.no_grad():
            for (
                module
            ) in model.model.modules():  # spread BN statistics: fresh ones give near-constant features
                if isinstance(module, torch.nn.BatchNorm2d):
                    module.running_var.uniform_(0.3, 1.0)
                    module.running_mean.normal_(0.0, 0.1)
            for seq in head.cv3:
                last = seq[-1]
                last.bias.uniform_(-6.0, 0.0)
                last.weight.normal_(0.0, 1.0)
            for seq in head.cv2:  # box distribution: favour small distances so boxes stay inside the image
                last = seq[-1]
                bins = head.reg_max
                ramp = -0.6 * torch.arange(bins, dtype=last.bias.dtype).repeat(4)
                last.bias.copy_(ramp + torch.empty_like(ramp).uniform_(-1.0, 1.0))
                last.weight.normal_(0.0, 0.3)

    torch.manual_seed(seed)  # the network's initial weights, then the spread above: the same model each time
    return export_model(out_dir, imgsz, simplify=False, prepare=spread_scores)


def write_keys(path: Path) -> dict[str, str]:
    from serving.gateway.auth import write_keys_file

    return write_keys_file(path, list(ROLES))


def chest_like(width: int, height: int, seed: int = 0) -> np.ndarray:
    """A uint16 image with body-like structure (two dark lungs in a bright body)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    img = 2500 + 600 * np.sin(xx / max(width, 1) * 3.1) + rng.normal(0, 80, (height, width))
    for cx in (0.33, 0.67):
        lung = ((xx - cx * width) / (0.14 * width)) ** 2 + ((yy - 0.5 * height) / (0.3 * height)) ** 2 < 1
        img[lung] -= 1500
    return np.clip(img, 0, 4095).astype(np.uint16)


def make_dicom(
    width: int = 96,
    height: int = 80,
    *,
    seed: int = 0,
    study_uid: str | None = None,
    with_pixels: bool = True,
    frames: int = 1,
    photometric: str = "MONOCHROME2",
    patient_id: str = "MRN-0042",
) -> bytes:
    """A valid single-frame DX DICOM (12-bit, windowed) with patient data to de-identify."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset("upload.dcm", {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientName = "Doe^Jane"
    ds.PatientID = patient_id
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "F"
    ds.StudyDate = "20260101"
    ds.StudyTime = "101010"
    ds.AccessionNumber = "ACC42"
    ds.ReferringPhysicianName = "House^Greg"
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.Modality = "DX"
    ds.Manufacturer = "Test"
    ds.Rows, ds.Columns = height, width
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.WindowCenter, ds.WindowWidth = 2000, 3000
    if frames > 1:
        ds.NumberOfFrames = frames
    if with_pixels:
        pixels = (
            np.stack([chest_like(width, height, seed + i) for i in range(frames)])
            if frames > 1
            else chest_like(width, height, seed)
        )
        ds.PixelData = pixels.tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def make_png(width: int = 96, height: int = 80, seed: int = 0) -> bytes:
    img = (chest_like(width, height, seed) // 16).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def write_stage_files(
    root: Path, production: str = "1", canary: str = "", weight: int = 0, staging: str = ""
) -> None:
    from core.stage_file import StageFile, write_stage_file

    write_stage_file(root, StageFile(stage="production", model_version=production))
    write_stage_file(root, StageFile(stage="canary", model_version=canary, canary_weight=weight))
    write_stage_file(root, StageFile(stage="staging", model_version=staging))


def onnx_settings(onnx_model: Path, keys_file: Path, root: Path, **extra: Any) -> Any:
    """Settings of an in-process gateway on the test model, its state and gitops folders under ``root``."""
    from serving.config import ServingSettings

    fields: dict[str, Any] = {
        "backend": "onnx",
        "onnx_model": onnx_model,
        "api_keys_file": keys_file,
        "gitops_dir": root / "gitops",
        "stack_dir": root / "state",
        "conf_threshold": 0.6,
    }
    return ServingSettings(**(fields | extra))


def stow_body(*parts: bytes) -> tuple[bytes, str]:
    """A STOW-RS ``multipart/related`` body of DICOM parts, and its Content-Type."""
    boundary = uuid.uuid4().hex
    body = b"".join(
        f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + p + b"\r\n" for p in parts
    )
    return (
        body + f"--{boundary}--\r\n".encode(),
        f'multipart/related; type="application/dicom"; boundary={boundary}',
    )


def dump(obj: object) -> str:
    return json.dumps(obj, indent=2, default=str)


class LiveServer:
    """A real uvicorn serving an app on a free loopback port, in a background thread."""

    def __init__(self, app: object, port: int) -> None:
        import threading

        import uvicorn

        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")  # type: ignore[arg-type]
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> LiveServer:
        import time

        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


class MemoryStore:
    """The ObjectStore calls the results and feedback code makes, in memory (unit tests; the
    integration tests run the real SeaweedFS). Subclass it to make one call fail."""

    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}

    def put_bytes(self, key: str, data: bytes, content_type: str = "") -> None:
        self.objects[key] = data

    def get_bytes(self, key: str) -> bytes:
        return self.objects[key]

    def exists(self, key: str) -> bool:
        return key in self.objects

    def list_prefix(self, prefix: str) -> list[str]:
        return sorted(k for k in self.objects if k.startswith(prefix))

    def delete_prefix(self, prefix: str) -> int:
        gone = self.list_prefix(prefix)
        for key in gone:
            del self.objects[key]
        return len(gone)
