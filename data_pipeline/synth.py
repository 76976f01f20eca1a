"""Synthetic chest radiographs (DICOM) with findings and simulated readers, in the VinDr-CXR layout.

No real radiograph can be fetched on these machines, yet tests, the demo and
the bootstrap model must exercise the real path: DICOM decoding (several
transfer syntaxes, MONOCHROME1, windows), three readers who disagree, reader
fusion, patient-level splits. This module draws a chest-like phantom (body,
lungs, mediastinum, heart, aortic knob, ribs, clavicles, spine, diaphragm
domes) and the 14 findings with class-specific looks at plausible places.

Speed: anatomy and findings are drawn on a canvas of at most 512 px (smooth
structures gain nothing from more) and upsampled once; only the noise is made
at full resolution. Each image is a pure function of (seed, index), so any
number of worker processes gives identical files.

Subgroups: every phantom carries PatientSex, PatientAge, Manufacturer (one of
four fictional detector vendors) and ViewPosition (PA, or AP as from a bedside
unit), so per-subgroup evaluation and its promotion gate run on something that
really differs. ONE subgroup is harder on purpose: images from
``HARD_MANUFACTURER`` (an "old CR reader") have findings drawn at a fraction of
their contrast and a stronger quantum noise, so its lesions are fainter. That is
the failure subgroup reporting exists to catch (a scanner the training set
under-serves); a test checks the signal is weaker, and the gate tests check
such a gap refuses a promotion, with predictions made to miss that vendor. A
model the CPU recipe trained does worst on it, but at 256 px the downscale
averages much of the noise away: on the held-out phantoms its mAP@0.4 was
0.00-0.03 below the overall figure the gate compares with (docs/benchmarks.md).
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

from data_pipeline.annotations import COLUMNS
from data_pipeline.classes import ALL_LABELS, CLASS_NAMES, NO_FINDING, NO_FINDING_ID
from data_pipeline.output import ensure_output_folder

log = logging.getLogger(__name__)

_CANVAS = 512
_DX_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation
_CR_STORAGE = "1.2.840.10008.5.1.4.1.1.1"  # Computed Radiography Image Storage
_COMPRESSED = (RLELossless, JPEGLSLossless, JPEG2000Lossless)

#: fictional detector vendors: no real company's name goes on a generated image
MANUFACTURERS = ("Aurora Phantom DR", "Borealis Phantom DR", "Cirrus Phantom CR", "Dunmore Phantom CR")
#: the subgroup made harder on purpose (module docstring): fainter findings, more noise
HARD_MANUFACTURER = "Dunmore Phantom CR"
HARD_FINDING_CONTRAST = 0.35  # share of a finding's density the hard vendor's images keep
_NOISE = 0.012
_HARD_NOISE = 0.035
AP_FRACTION = 0.3  # share of AP (bedside) views; the rest are PA


@dataclass(frozen=True)
class SynthConfig:
    """What to generate; every default follows the issue (real-size CR/DX, 3 readers)."""

    n_images: int = 200
    seed: int = 0
    size: int | None = None  # square side for tests; None: each side drawn from 1800..3000
    readers: int = 3
    reader_pool: int = 8
    no_finding_fraction: float = 0.35
    compressed_fraction: float = 0.2
    monochrome1_fraction: float = 0.2
    second_image_fraction: float = 0.3  # share of patients with two studies (tests patient-level splits)
    omit_probability: float = 0.12
    extra_box_probability: float = 0.08
    workers: int = 0


@dataclass(frozen=True)
class Acquisition:
    """Where and how a phantom was taken: the subgroup attributes besides sex and age."""

    manufacturer: str
    view_position: str

    @property
    def hard(self) -> bool:
        """Whether this image belongs to the subgroup made harder on purpose."""
        return self.manufacturer == HARD_MANUFACTURER


@dataclass
class Finding:
    """One ground-truth finding, box in normalized (0..1) coordinates x0, y0, x1, y1."""

    class_id: int
    box: tuple[float, float, float, float]


@dataclass
class SynthCase:
    """What one generated image produced (no pixels: those are on disk)."""

    image_id: str
    patient_id: str
    width: int
    height: int
    transfer_syntax: str
    photometric: str
    findings: list[Finding] = field(default_factory=list)
    reader_rows: list[tuple[object, ...]] = field(default_factory=list)


@dataclass
class SynthResult:
    """Paths and counts of a generated set."""

    out_dir: Path
    dicom_dir: Path
    annotations_csv: Path
    truth_csv: Path
    cases: list[SynthCase]


# ------------------------------------------------------------------------------------ anatomy


@dataclass
class _Anatomy:
    """Random but plausible placement of the structures, normalized coordinates."""

    lungs: list[tuple[float, float, float, float]]  # (cx, cy, ax, ay) right (image left) then left
    heart: tuple[float, float, float, float]
    knob: tuple[float, float, float]  # cx, cy, r (r relative to width)
    dome_y: tuple[float, float]
    body_axes: tuple[float, float]
    rib_gap: float
    exposure: float

    @classmethod
    def random(cls, rng: np.random.Generator) -> _Anatomy:
        j = lambda s: float(rng.normal(0, s))  # noqa: E731 - tiny local jitter helper
        lung_cy = 0.44 + j(0.015)
        lungs = [
            (0.32 + j(0.01), lung_cy, 0.145 + j(0.008), 0.27 + j(0.015)),
            (0.68 + j(0.01), lung_cy + j(0.01), 0.14 + j(0.008), 0.265 + j(0.015)),
        ]
        heart = (0.555 + j(0.01), 0.60 + j(0.015), 0.125 + j(0.008), 0.10 + j(0.006))
        knob = (0.565 + j(0.006), 0.29 + j(0.01), 0.028 + j(0.002))
        dome_y = (lungs[0][1] + lungs[0][3] * 0.82, lungs[1][1] + lungs[1][3] * 0.86)
        return cls(
            lungs,
            heart,
            knob,
            dome_y,
            (0.47 + j(0.01), 0.62 + j(0.02)),
            0.062 + j(0.004),
            float(rng.uniform(0.85, 1.15)),
        )


def _ellipse_mask(
    w: int, h: int, cx: float, cy: float, ax: float, ay: float, angle: float = 0.0
) -> np.ndarray:
    mask = np.zeros((h, w), dtype=np.uint8)
    cv2.ellipse(
        mask,
        (round(cx * w), round(cy * h)),
        (max(round(ax * w), 1), max(round(ay * h), 1)),
        angle,
        0,
        360,
        1,
        -1,
    )
    return mask.astype(bool)


def _soft_blob(w: int, h: int, cx: float, cy: float, rx: float, ry: float) -> np.ndarray:
    """Gaussian blob (peak 1) in normalized coordinates, computed only in its bounding window."""
    out = np.zeros((h, w), dtype=np.float32)
    x0, x1 = max(int((cx - 3 * rx) * w), 0), min(int((cx + 3 * rx) * w) + 1, w)
    y0, y1 = max(int((cy - 3 * ry) * h), 0), min(int((cy + 3 * ry) * h) + 1, h)
    if x1 <= x0 or y1 <= y0:
        return out
    xs = (np.arange(x0, x1, dtype=np.float32) / w - cx) / max(rx, 1e-4)
    ys = (np.arange(y0, y1, dtype=np.float32) / h - cy) / max(ry, 1e-4)
    out[y0:y1, x0:x1] = np.exp(-0.5 * (ys[:, None] ** 2 + xs[None, :] ** 2))
    return out


def _draw_anatomy(a: _Anatomy, w: int, h: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """Density map (higher = denser = brighter) and the two lung masks."""
    d = np.full((h, w), 0.03, dtype=np.float32)  # air outside the body
    body = _ellipse_mask(w, h, 0.5, 0.6, *a.body_axes)
    d[body] = 0.55
    # shoulders/abdomen: the lower part of the body is denser
    d[body & (np.arange(h)[:, None] > h * 0.78)] = 0.68
    lung_masks = []
    for i, (cx, cy, ax, ay) in enumerate(a.lungs):
        m = _ellipse_mask(w, h, cx, cy, ax, ay, angle=(-6 if i == 0 else 6))
        dome = a.dome_y[i]
        m &= np.arange(h)[:, None] < dome * h + (np.abs(np.arange(w)[None, :] / w - cx) * 0.25 * h)
        lung_masks.append(m)
        d[m] = 0.16
    # mediastinum + spine
    cv2.rectangle(d, (round(0.45 * w), round(0.12 * h)), (round(0.55 * w), round(0.70 * h)), 0.62, -1)
    cv2.rectangle(d, (round(0.48 * w), round(0.05 * h)), (round(0.52 * w), round(0.95 * h)), 0.78, -1)
    # heart and aortic knob
    hx, hy, hax, hay = a.heart
    cv2.ellipse(d, (round(hx * w), round(hy * h)), (round(hax * w), round(hay * h)), -20, 0, 360, 0.66, -1)
    kx, ky, kr = a.knob
    cv2.circle(d, (round(kx * w), round(ky * h)), max(round(kr * w), 1), 0.64, -1)
    # ribs: posterior arcs over each lung, added (bone over lung)
    ribs = np.zeros((h, w), dtype=np.float32)
    thickness = max(round(0.012 * h), 1)
    for side, (_cx, cy, ax, ay) in enumerate(a.lungs):
        top = cy - ay
        for k in range(10):
            y = top + k * a.rib_gap * (ay / 0.27)
            sign = -1 if side == 0 else 1
            cv2.ellipse(
                ribs,
                (round(0.5 * w), round(y * h)),
                (round((ax * 2.1) * w), round(0.05 * h)),
                0,
                90 - sign * 10,
                90 - sign * 80,
                0.2,
                thickness,
            )
    d += ribs
    # clavicles
    for sign in (-1, 1):
        p0 = (round((0.5 + sign * 0.04) * w), round(0.17 * h))
        p1 = (round((0.5 + sign * 0.26) * w), round(0.13 * h))
        cv2.line(d, p0, p1, 0.85, max(round(0.018 * h), 1))
    # diaphragm below the domes stays soft tissue; body edge blur happens later
    return d, lung_masks


# ------------------------------------------------------------------------------------ findings


def _box_from_mask(mask: np.ndarray) -> tuple[float, float, float, float] | None:
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return None
    h, w = mask.shape
    return (xs.min() / w, ys.min() / h, (xs.max() + 1) / w, (ys.max() + 1) / h)


def _point_in_lung(
    rng: np.random.Generator, mask: np.ndarray, y_range: tuple[float, float]
) -> tuple[float, float]:
    h, w = mask.shape
    ys, xs = np.nonzero(mask)
    sel = (ys >= y_range[0] * h) & (ys <= y_range[1] * h)
    if not sel.any():
        sel = np.ones_like(ys, dtype=bool)
    i = int(rng.integers(0, int(sel.sum())))
    return float(xs[sel][i] / w), float(ys[sel][i] / h)


def _lung_zone(mask: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Part of a lung between fractions lo..hi of its own height (0 = apex)."""
    ys = np.nonzero(mask.any(axis=1))[0]
    if len(ys) == 0:
        return mask
    top, bottom = ys.min(), ys.max()
    rows = np.arange(mask.shape[0])[:, None]
    return mask & (rows >= top + lo * (bottom - top)) & (rows <= top + hi * (bottom - top))


def _draw_finding(
    class_id: int, rng: np.random.Generator, d: np.ndarray, lungs: list[np.ndarray], a: _Anatomy
) -> tuple[float, float, float, float] | None:
    """Draw one finding into ``d``; return its normalized box (None: could not place it)."""
    h, w = d.shape
    side = int(rng.integers(0, 2))
    lung = lungs[side]
    name = CLASS_NAMES[class_id]
    if name == "Cardiomegaly":
        hx, hy, hax, hay = a.heart
        hax, hay = hax * 1.45, hay * 1.3
        m = _ellipse_mask(w, h, hx - 0.02, hy, hax, hay, angle=-20)
        d[m] = np.maximum(d[m], 0.66)
        return _box_from_mask(m)
    if name == "Aortic enlargement":
        kx, ky, kr = a.knob
        m = _ellipse_mask(w, h, kx + 0.012, ky, kr * 1.9, kr * 1.9 * w / h)
        d[m] = np.maximum(d[m], 0.64)
        return _box_from_mask(m)
    if name == "Nodule/Mass":
        cx, cy = _point_in_lung(rng, lung, (0.2, 0.75))
        r = float(rng.uniform(0.012, 0.05))
        blob = _soft_blob(w, h, cx, cy, r * 0.6, r * 0.6 * w / h)
        d += blob * 0.35
        return _box_from_mask(blob > 0.15)
    if name == "Pleural effusion":
        zone = _lung_zone(lung, 0.7, 1.0)
        ys = np.nonzero(zone.any(axis=1))[0]
        if len(ys) == 0:
            return None
        # meniscus: higher laterally than medially
        xs = np.arange(w)[None, :] / w
        lateral = np.abs(xs - 0.5)
        level = ys.min() + (ys.max() - ys.min()) * (0.55 - 1.6 * (lateral - 0.15)).clip(0, 1)
        m = zone & (np.arange(h)[:, None] >= level)
        d[m] = np.maximum(d[m], 0.5)
        return _box_from_mask(m)
    if name == "Pneumothorax":
        zone = _lung_zone(lung, 0.0, float(rng.uniform(0.25, 0.45)))
        cx = float(np.nonzero(zone.any(axis=0))[0].mean() / w) if zone.any() else 0.3
        m = zone & (np.abs(np.arange(w)[None, :] / w - 0.5) >= abs(cx - 0.5) - 0.02)
        d[m] = 0.06  # lucent, no lung texture, no ribs over it in the phantom's simplification
        edge = cv2.morphologyEx(m.astype(np.uint8), cv2.MORPH_GRADIENT, np.ones((3, 3), np.uint8)).astype(
            bool
        )
        d[edge] = 0.3  # the visceral pleural line
        return _box_from_mask(m)
    if name in ("Consolidation", "Infiltration", "Lung Opacity", "Other lesion"):
        strength = {"Consolidation": 0.4, "Infiltration": 0.16, "Lung Opacity": 0.25, "Other lesion": 0.3}[
            name
        ]
        cx, cy = _point_in_lung(rng, lung, (0.35, 0.85))
        extent = float(rng.uniform(0.04, 0.09))
        acc = np.zeros_like(d)
        for _ in range(int(rng.integers(4, 9))):
            bx, by = cx + rng.normal(0, extent * 0.5), cy + rng.normal(0, extent * 0.5)
            acc = np.maximum(acc, _soft_blob(w, h, bx, by, extent * 0.35, extent * 0.35 * w / h))
        acc *= lung if name != "Other lesion" else 1.0
        if name == "Other lesion":  # mixed: a patch plus a few dense spots
            for _ in range(3):
                sx, sy = cx + rng.normal(0, extent * 0.4), cy + rng.normal(0, extent * 0.4)
                acc = np.maximum(acc, _soft_blob(w, h, sx, sy, 0.004, 0.004 * w / h) * 1.5)
        d += acc * strength
        return _box_from_mask(acc > 0.2)
    if name == "Calcification":
        cx, cy = _point_in_lung(rng, lung, (0.1, 0.8))
        spots = np.zeros_like(d)
        for _ in range(int(rng.integers(1, 4))):
            sx, sy = cx + rng.normal(0, 0.012), cy + rng.normal(0, 0.012)
            spots = np.maximum(spots, _soft_blob(w, h, sx, sy, 0.004, 0.004 * w / h))
        d += spots * 0.7
        return _box_from_mask(spots > 0.1)
    if name in ("ILD", "Pulmonary fibrosis"):
        lo, hi = (0.5, 1.0) if name == "ILD" else (0.0, 0.5)
        zone = _lung_zone(lung, lo, hi)
        coarse = rng.random((h // 3 + 1, w // 3 + 1)).astype(np.float32)
        texture = cv2.resize(coarse, (w, h), interpolation=cv2.INTER_NEAREST)
        reticular = (cv2.Laplacian(texture, cv2.CV_32F) > 0.9) & zone
        d[reticular] += np.float32(0.18 if name == "ILD" else 0.24)
        return _box_from_mask(zone)
    if name == "Pleural thickening":
        zone = _lung_zone(lung, float(rng.uniform(0.05, 0.4)), float(rng.uniform(0.55, 0.9)))
        edge = zone & ~cv2.erode(zone.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)
        lateral = np.abs(np.arange(w)[None, :] / w - 0.5) > abs(a.lungs[side][0] - 0.5)
        band = edge & lateral
        d[band] = np.maximum(d[band], 0.5)
        return _box_from_mask(band)
    if name == "Atelectasis":
        cx, cy = _point_in_lung(rng, lung, (0.55, 0.85))
        length, angle = float(rng.uniform(0.05, 0.1)), float(rng.uniform(-0.4, 0.4))
        p0 = (round((cx - length * math.cos(angle)) * w), round((cy - length * math.sin(angle)) * h))
        p1 = (round((cx + length * math.cos(angle)) * w), round((cy + length * math.sin(angle)) * h))
        m = np.zeros((h, w), dtype=np.uint8)
        cv2.line(m, p0, p1, 1, max(round(0.008 * h), 2))
        d[m.astype(bool)] += 0.3
        return _box_from_mask(m.astype(bool))
    return None


# ------------------------------------------------------------------------------------ one case


def _position(
    rng: np.random.Generator, density: np.ndarray, findings: list[Finding]
) -> tuple[np.ndarray, list[Finding]]:
    """Patient positioning: a small random rotation, scale and shift of the whole picture (boxes follow)."""
    h, w = density.shape
    angle, scale = float(rng.uniform(-4, 4)), float(rng.uniform(0.9, 1.08))
    shift = rng.uniform(-0.05, 0.05, 2) * np.array([w, h], dtype=np.float64)
    m = np.asarray(cv2.getRotationMatrix2D((w / 2, h / 2), angle, scale), dtype=np.float64)
    m[:, 2] = m[:, 2] + shift
    warped = cv2.warpAffine(density, m, (w, h), flags=cv2.INTER_LINEAR, borderValue=0.03)
    moved = []
    for f in findings:
        x0, y0, x1, y1 = f.box
        corners = np.array(
            [[x0 * w, y0 * h, 1], [x1 * w, y0 * h, 1], [x0 * w, y1 * h, 1], [x1 * w, y1 * h, 1]]
        )
        pts = corners @ m.T
        box = (
            max(pts[:, 0].min() / w, 0.0),
            max(pts[:, 1].min() / h, 0.0),
            min(pts[:, 0].max() / w, 1.0),
            min(pts[:, 1].max() / h, 1.0),
        )
        if box[2] - box[0] > 0.005 and box[3] - box[1] > 0.005:
            moved.append(Finding(f.class_id, box))
    return warped, moved


def _case_rng(seed: int, index: int, stream: str) -> np.random.Generator:
    digest = hashlib.sha256(f"{seed}:{index}:{stream}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def acquisition_for(seed: int, index: int) -> Acquisition:
    """Vendor and view of case ``index``: its own random stream, so the other draws (and thereby every
    image of the other vendors) stay what they were before subgroups existed."""
    rng = _case_rng(seed, index, "acquisition")
    manufacturer = str(MANUFACTURERS[int(rng.integers(0, len(MANUFACTURERS)))])
    return Acquisition(manufacturer, "AP" if rng.random() < AP_FRACTION else "PA")


def image_id_for(seed: int, index: int) -> str:
    """VinDr-style 32-hex image id, deterministic in (seed, index)."""
    return hashlib.md5(f"cxr-synth:{seed}:{index}".encode(), usedforsecurity=False).hexdigest()


def render_case(
    config: SynthConfig, index: int, acquisition: Acquisition | None = None
) -> tuple[np.ndarray, list[Finding], dict[str, object]]:
    """Pixels (uint16, MONOCHROME2 sense), findings and DICOM attributes of case ``index``.

    ``acquisition`` renders the same patient and findings as taken on another vendor's detector
    (default: the case's own, :func:`acquisition_for`), so a case can be compared across subgroups.
    """
    rng = _case_rng(config.seed, index, "image")
    if config.size:
        width = height = int(config.size)
    else:
        width, height = int(rng.integers(1800, 3001)), int(rng.integers(1800, 3001))
    scale = _CANVAS / max(width, height)
    lw, lh = max(round(width * scale), 16), max(round(height * scale), 16)
    anatomy = _Anatomy.random(rng)
    findings: list[Finding] = []
    n_findings = 0 if rng.random() < config.no_finding_fraction else int(rng.choice([1, 1, 2, 2, 3, 4]))
    classes: list[int] = (
        rng.choice(len(CLASS_NAMES), size=n_findings, replace=False).tolist() if n_findings else []
    )
    density, lungs = _draw_anatomy(anatomy, lw, lh)
    hard = (acquisition or acquisition_for(config.seed, index)).hard
    anatomy_only = density.copy() if hard else density
    for cid in sorted(int(c) for c in classes):
        box = _draw_finding(cid, rng, density, lungs, anatomy)
        if box is not None and (box[2] - box[0]) * width >= 8 and (box[3] - box[1]) * height >= 8:
            findings.append(Finding(cid, box))
    if hard:  # the hard subgroup: each finding keeps only part of its contrast over the anatomy
        density = anatomy_only + (density - anatomy_only) * np.float32(HARD_FINDING_CONTRAST)
    density, findings = _position(rng, density, findings)
    density = cv2.GaussianBlur(density, (0, 0), 1.2)
    full = cv2.resize(density, (width, height), interpolation=cv2.INTER_LINEAR)

    bits = int(rng.choice([12, 14, 16]))
    top = float(2**bits - 1)
    # exposure: a gamma and a gain per image, so intensity statistics vary like real departments
    gamma = float(rng.uniform(0.8, 1.25))
    np.clip(full, 0.0, 1.2, out=full)
    full = np.power(full / 1.2, gamma, dtype=np.float32)
    noise_rng = _case_rng(config.seed, index, "noise")
    coarse_noise = noise_rng.standard_normal(size=(height // 2 + 1, width // 2 + 1), dtype=np.float32)
    noise = cv2.resize(coarse_noise, (width, height), interpolation=cv2.INTER_NEAREST)
    full += noise * np.float32(_HARD_NOISE if hard else _NOISE)
    lo_pct = float(rng.uniform(0.04, 0.1))
    hi_pct = float(rng.uniform(0.82, 0.95)) * anatomy.exposure
    full = (full * (hi_pct - lo_pct) + lo_pct) * top
    np.clip(full, 0, top, out=full)
    pixels = full.astype(np.uint16)
    attrs: dict[str, object] = {
        "bits": bits,
        "center": round(top * (lo_pct + (hi_pct - lo_pct) * 0.5)),
        "width": round(top * (hi_pct - lo_pct) * 0.95),
        "spacing": round(float(rng.uniform(0.139, 0.175)), 4),
    }
    return pixels, findings, attrs


def _reader_rows(
    config: SynthConfig, index: int, image_id: str, findings: list[Finding], width: int, height: int
) -> list[tuple[object, ...]]:
    rng = _case_rng(config.seed, index, "readers")
    pool = [f"R{i + 1}" for i in range(max(config.reader_pool, config.readers))]
    readers = sorted(rng.choice(pool, size=config.readers, replace=False).tolist(), key=lambda r: int(r[1:]))
    rows: list[tuple[object, ...]] = []
    for rad in readers:
        drawn: list[tuple[int, float, float, float, float]] = []
        for f in findings:
            if rng.random() < config.omit_probability:
                continue
            x0, y0, x1, y1 = f.box
            bw, bh = (x1 - x0), (y1 - y0)
            jx0, jy0, jx1, jy1 = rng.normal(0, 0.05, 4)
            box = (x0 + jx0 * bw, y0 + jy0 * bh, x1 + jx1 * bw, y1 + jy1 * bh)
            drawn.append((f.class_id, *box))
        if rng.random() < config.extra_box_probability:
            cid = int(rng.integers(0, len(CLASS_NAMES)))
            cx, cy, s = rng.uniform(0.25, 0.75), rng.uniform(0.25, 0.7), rng.uniform(0.03, 0.08)
            drawn.append((cid, cx - s, cy - s, cx + s, cy + s))
        if not drawn:
            rows.append((image_id, NO_FINDING, NO_FINDING_ID, rad, None, None, None, None))
            continue
        for cid, x0, y0, x1, y1 in drawn:
            px = np.clip(
                [x0 * width, y0 * height, x1 * width, y1 * height], 0, [width, height, width, height]
            )
            if px[2] - px[0] < 2 or px[3] - px[1] < 2:
                continue
            rows.append((image_id, ALL_LABELS[cid], cid, rad, *(round(float(v), 1) for v in px)))
    return rows


def _dataset(
    config: SynthConfig,
    index: int,
    image_id: str,
    patient_id: str,
    pixels: np.ndarray,
    attrs: dict[str, object],
) -> tuple[Dataset, str]:
    rng = _case_rng(config.seed, index, "dicom")
    mono1 = rng.random() < config.monochrome1_fraction
    bits = int(attrs["bits"])  # type: ignore[call-overload]
    if mono1:
        pixels = (2**bits - 1 - pixels.astype(np.int32)).astype(np.uint16)
    cr = rng.random() < 0.5
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    sop_class = pydicom.uid.UID(_CR_STORAGE if cr else _DX_STORAGE)
    sop_uid = generate_uid(entropy_srcs=[str(config.seed), image_id, "sop"])
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.file_meta.ImplementationClassUID = pydicom.uid.PYDICOM_IMPLEMENTATION_UID
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = generate_uid(entropy_srcs=[str(config.seed), image_id, "study"])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=[str(config.seed), image_id, "series"])
    ds.Modality = "CR" if cr else "DX"
    ds.PatientID = patient_id
    ds.PatientName = f"SYNTH^{patient_id}"
    rng.choice(["M", "F"]), rng.integers(18, 90)  # drawn as before sex and age became per patient
    # per patient, not per image: a patient's two studies (same year) share sex and age
    person = np.random.default_rng(int.from_bytes(hashlib.sha256(patient_id.encode()).digest()[:8], "little"))
    ds.PatientSex = str(person.choice(["M", "F"]))
    ds.PatientAge = f"{int(person.integers(18, 90)):03d}Y"
    ds.StudyDate = f"2024{int(rng.integers(1, 13)):02d}{int(rng.integers(1, 28)):02d}"
    ds.StudyTime = "120000"
    ds.AccessionNumber = image_id[:16]
    acquisition = acquisition_for(config.seed, index)
    ds.Manufacturer = acquisition.manufacturer
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = acquisition.view_position
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME1" if mono1 else "MONOCHROME2"
    ds.PresentationLUTShape = "INVERSE" if mono1 else "IDENTITY"
    ds.BitsAllocated = 16
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 0
    spacing = float(attrs["spacing"])  # type: ignore[arg-type]
    ds.PixelSpacing = [spacing, spacing]
    ds.ImagerPixelSpacing = [spacing, spacing]
    center, width = int(attrs["center"]), int(attrs["width"])  # type: ignore[call-overload]
    ds.WindowCenter = (2**bits - 1 - center) if mono1 else center
    ds.WindowWidth = width
    ds.RescaleIntercept = 0
    ds.RescaleSlope = 1
    ds.RescaleType = "US"
    ds.PixelData = pixels.tobytes()
    syntax = ExplicitVRLittleEndian
    if rng.random() < config.compressed_fraction:
        syntax = _COMPRESSED[index % len(_COMPRESSED)]
        # pydicom's own RLE encoder is pure Python (seconds per image); pylibjpeg-rle's is native
        plugin = "pylibjpeg" if syntax == RLELossless else ""
        ds.compress(syntax, encoding_plugin=plugin, generate_instance_uid=False)
    return ds, str(syntax)


def generate_case(config: SynthConfig, index: int, patient_id: str, dicom_dir: Path) -> SynthCase:
    """Render, write ``<dicom_dir>/<image_id>.dicom`` and simulate the readers (pure in seed, index)."""
    image_id = image_id_for(config.seed, index)
    pixels, findings, attrs = render_case(config, index)
    height, width = pixels.shape
    ds, syntax = _dataset(config, index, image_id, patient_id, pixels, attrs)
    ds.save_as(dicom_dir / f"{image_id}.dicom", enforce_file_format=True)
    return SynthCase(
        image_id=image_id,
        patient_id=patient_id,
        width=width,
        height=height,
        transfer_syntax=syntax,
        photometric=str(ds.PhotometricInterpretation),
        findings=findings,
        reader_rows=_reader_rows(config, index, image_id, findings, width, height),
    )


def _patients(config: SynthConfig) -> list[str]:
    rng = np.random.default_rng(config.seed)
    ids: list[str] = []
    n = 0
    while len(ids) < config.n_images:
        n += 1
        pid = f"SYN{config.seed:04d}{n:06d}"
        ids.extend([pid] * (2 if rng.random() < config.second_image_fraction else 1))
    return ids[: config.n_images]


def _generate_chunk(args: tuple[SynthConfig, list[int], list[str], str]) -> list[SynthCase]:
    config, indices, patients, dicom_dir = args
    return [generate_case(config, i, p, Path(dicom_dir)) for i, p in zip(indices, patients, strict=True)]


def generate(
    config: SynthConfig, out_dir: Path, progress: Callable[[int], None] | None = None
) -> SynthResult:
    """Write ``out_dir/dicom/*.dicom``, ``annotations.csv`` (readers) and ``truth.csv`` (ground truth)."""
    out_dir = Path(out_dir)
    dicom_dir = out_dir / "dicom"
    ensure_output_folder(out_dir, dicom_dir)
    patients = _patients(config)
    workers = config.workers or (len(_available_cpus()) or 1)
    chunk = 4
    jobs = [
        (config, list(range(s, min(s + chunk, config.n_images))), patients[s : s + chunk], str(dicom_dir))
        for s in range(0, config.n_images, chunk)
    ]
    cases: list[SynthCase] = []
    if workers <= 1 or config.n_images <= chunk:
        for job in jobs:
            cases.extend(_generate_chunk(job))
            if progress:
                progress(len(job[1]))
    else:
        from data_pipeline.executors import pool_context

        with ProcessPoolExecutor(max_workers=workers, mp_context=pool_context()) as pool:
            for result in pool.map(_generate_chunk, jobs):
                cases.extend(result)
                if progress:
                    progress(len(result))
    rows = [row for case in cases for row in case.reader_rows]
    annotations = pd.DataFrame(rows, columns=list(COLUMNS))
    annotations_csv = out_dir / "annotations.csv"
    annotations.to_csv(annotations_csv, index=False)
    truth = pd.DataFrame(
        [
            (
                c.image_id,
                ALL_LABELS[f.class_id],
                f.class_id,
                "truth",
                *(
                    round(v * s, 1)
                    for v, s in zip(f.box, (c.width, c.height, c.width, c.height), strict=True)
                ),
            )
            for c in cases
            for f in c.findings
        ],
        columns=list(COLUMNS),
    )
    truth_csv = out_dir / "truth.csv"
    truth.to_csv(truth_csv, index=False)
    log.info("event=synth_done images=%d rows=%d out=%s", len(cases), len(annotations), out_dir)
    return SynthResult(out_dir, dicom_dir, annotations_csv, truth_csv, cases)


def _available_cpus() -> set[int]:
    try:
        return os.sched_getaffinity(0)
    except AttributeError:  # pragma: no cover - macOS
        return set(range(os.cpu_count() or 1))


def vindr_like_annotations(n_images: int = 15_000, seed: int = 0, finding_share: float = 0.3) -> pd.DataFrame:
    """A VinDr-sized annotation table without images (fusion benchmark and scale tests).

    ~70% "No finding" images with three readers each, the rest with 1-4
    findings drawn by all three readers with jitter: ~70k rows for 15k images.
    """
    rng = np.random.default_rng(seed)
    finding = rng.random(n_images) < finding_share
    ids = np.array([f"{i:032x}" for i in range(n_images)])
    readers = np.stack([rng.choice(17, 3, replace=False) + 1 for _ in range(n_images)])
    parts = [
        pd.DataFrame(
            {
                "image_id": np.repeat(ids[~finding], 3),
                "class_name": NO_FINDING,
                "class_id": NO_FINDING_ID,
                "rad_id": [f"R{r}" for r in readers[~finding].ravel()],
            }
        )
    ]
    img_idx = np.flatnonzero(finding)
    n_find = rng.integers(1, 6, size=len(img_idx))  # ~3 findings x 3 readers: ~70k rows for 15k images
    f_img = np.repeat(img_idx, n_find)
    f_cls = rng.integers(0, 14, size=len(f_img))
    xy = rng.uniform(100, 2000, size=(len(f_img), 2))
    wh = rng.uniform(40, 600, size=(len(f_img), 2))
    r_img = np.repeat(f_img, 3)
    r_rad = readers[r_img, np.tile(np.arange(3), len(f_img))]
    base = np.repeat(np.hstack([xy, xy + wh]), 3, axis=0)
    jitter = rng.normal(0, 0.04, size=base.shape) * np.repeat(np.hstack([wh, wh]), 3, axis=0)
    boxes = np.round(base + jitter, 1)
    boxes[:, 2] = np.maximum(boxes[:, 2], boxes[:, 0] + 2)
    boxes[:, 3] = np.maximum(boxes[:, 3], boxes[:, 1] + 2)
    cls = np.repeat(f_cls, 3)
    parts.append(
        pd.DataFrame(
            {
                "image_id": ids[r_img],
                "class_name": [CLASS_NAMES[c] for c in cls],
                "class_id": cls,
                "rad_id": [f"R{r}" for r in r_rad],
                "x_min": boxes[:, 0],
                "y_min": boxes[:, 1],
                "x_max": boxes[:, 2],
                "y_max": boxes[:, 3],
            }
        )
    )
    return pd.concat(parts, ignore_index=True)[list(COLUMNS)].sort_values("image_id", kind="stable")
