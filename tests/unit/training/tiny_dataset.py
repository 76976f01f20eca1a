"""A tiny YOLO dataset in the data pipeline's layout, drawn here so training tests need no other package.

Gray 8-bit radiograph-like squares with bright discs and rectangles; each shape
kind is one VinDr class, so a detector can learn them in a couple of epochs.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import cv2
import numpy as np
import yaml

from data_pipeline.classes import CLASS_NAMES

# class id -> shape drawn: a big disc (Cardiomegaly), a small disc (Nodule/Mass), a bar (Pleural effusion)
SHAPES = {3: "big_disc", 8: "small_disc", 10: "bar"}


def _draw(
    rng: np.random.Generator, size: int
) -> tuple[np.ndarray, list[tuple[int, float, float, float, float]]]:
    img = np.clip(rng.normal(70, 12, (size, size)), 0, 255).astype(np.uint8)
    labels: list[tuple[int, float, float, float, float]] = []
    for cls in rng.choice(list(SHAPES), size=int(rng.integers(1, 3)), replace=False):
        kind = SHAPES[int(cls)]
        if kind == "big_disc":
            r = int(rng.integers(size // 6, size // 4))
            cx, cy = int(rng.integers(r, size - r)), int(rng.integers(r, size - r))
            cv2.circle(img, (cx, cy), r, 200, -1)
            box = (cx - r, cy - r, cx + r, cy + r)
        elif kind == "small_disc":
            r = int(rng.integers(size // 16, size // 10))
            cx, cy = int(rng.integers(r, size - r)), int(rng.integers(r, size - r))
            cv2.circle(img, (cx, cy), r, 245, -1)
            box = (cx - r, cy - r, cx + r, cy + r)
        else:
            w, h = int(rng.integers(size // 3, size // 2)), int(rng.integers(size // 12, size // 8))
            x0, y0 = int(rng.integers(0, size - w)), int(rng.integers(size // 2, size - h))
            cv2.rectangle(img, (x0, y0), (x0 + w, y0 + h), 160, -1)
            box = (x0, y0, x0 + w, y0 + h)
        x0, y0, x1, y1 = (max(0, min(size, v)) for v in box)
        labels.append(
            (int(cls), (x0 + x1) / 2 / size, (y0 + y1) / 2 / size, (x1 - x0) / size, (y1 - y0) / size)
        )
    return img, labels


def build_tiny_dataset(
    root: Path, *, size: int = 128, counts: dict[str, int] | None = None, seed: int = 0
) -> Path:
    """Write ``root/<version>/`` with images, labels, data.yaml and manifest.json; return that folder."""
    counts = counts or {"train": 16, "val": 8, "test": 8}
    rng = np.random.default_rng(seed)
    staging = root / "staging"
    digest = hashlib.sha256()
    for split, n in counts.items():
        (staging / "images" / split).mkdir(parents=True, exist_ok=True)
        (staging / "labels" / split).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            img, labels = _draw(rng, size)
            name = f"{split}_{i:04d}"
            cv2.imwrite(str(staging / "images" / split / f"{name}.png"), img)
            text = "".join(f"{c} {x:.6f} {y:.6f} {w:.6f} {h:.6f}\n" for c, x, y, w, h in labels)
            (staging / "labels" / split / f"{name}.txt").write_text(text)
            digest.update(img.tobytes())
            digest.update(text.encode())
    version = f"tiny-{digest.hexdigest()[:12]}"
    final = root / version
    staging.rename(final)
    data = {
        "path": str(final),
        "train": "images/train",
        "val": "images/val",
        "test": "images/test",
        "names": dict(enumerate(CLASS_NAMES)),
    }
    (final / "data.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    manifest = {"version": version, "synthetic": True, "counts": counts, "source": "tests tiny phantom"}
    (final / "manifest.json").write_text(json.dumps(manifest))
    return final
