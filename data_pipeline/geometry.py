"""Letterbox resizing and the box mappings between original pixels and model input.

The gateway letterboxes an image exactly as ultralytics does during training
and validation (centered, pad 114, ``round(dh - 0.1)`` on the top/left), then
maps the model's boxes back to the ORIGINAL image's pixels, the VinDr
convention of the API. Keeping both directions here, next to each other, is
what makes the round trip testable.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np


@dataclass(frozen=True)
class LetterboxParams:
    """How a ``src_w`` x ``src_h`` image was placed in a ``dst`` x ``dst`` square."""

    scale: float
    pad_x: int
    pad_y: int
    src_w: int
    src_h: int
    dst: int

    @property
    def new_w(self) -> int:
        """Width of the resized image inside the square (ultralytics rounds each side)."""
        return max(round(self.src_w * self.scale), 1)

    @property
    def new_h(self) -> int:
        return max(round(self.src_h * self.scale), 1)

    @property
    def scale_x(self) -> float:
        """Effective horizontal gain after rounding (what ``scale_boxes`` divides by)."""
        return self.new_w / self.src_w

    @property
    def scale_y(self) -> float:
        return self.new_h / self.src_h


def letterbox_params(src_w: int, src_h: int, new_size: int) -> LetterboxParams:
    """Parameters of ultralytics' centered ``LetterBox(new_shape=new_size)`` for a given source size."""
    if src_w <= 0 or src_h <= 0 or new_size <= 0:
        raise ValueError(f"sizes must be positive, got {src_w}x{src_h} -> {new_size}")
    scale = min(new_size / src_h, new_size / src_w)
    new_w, new_h = max(round(src_w * scale), 1), max(round(src_h * scale), 1)
    pad_x = round((new_size - new_w) / 2 - 0.1)
    pad_y = round((new_size - new_h) / 2 - 0.1)
    return LetterboxParams(scale=scale, pad_x=pad_x, pad_y=pad_y, src_w=src_w, src_h=src_h, dst=new_size)


def letterbox(img: np.ndarray, new_size: int, pad_value: int = 114) -> tuple[np.ndarray, LetterboxParams]:
    """Resize keeping aspect and pad to a ``new_size`` square; (H, W) or (H, W, C) uint8 in, same rank out."""
    if img.ndim not in (2, 3):
        raise ValueError(f"expected an (H, W) or (H, W, C) image, got shape {img.shape}")
    src_h, src_w = img.shape[:2]
    params = letterbox_params(src_w, src_h, new_size)
    if (params.new_w, params.new_h) != (src_w, src_h):
        resized = cv2.resize(img, (params.new_w, params.new_h), interpolation=cv2.INTER_LINEAR)
        if img.ndim == 3 and resized.ndim == 2:  # cv2 drops a single channel axis
            resized = resized[..., None]
    else:
        resized = img
    shape = (new_size, new_size, *img.shape[2:])
    out = np.full(shape, pad_value, dtype=img.dtype)
    out[params.pad_y : params.pad_y + params.new_h, params.pad_x : params.pad_x + params.new_w] = resized
    return out, params


def boxes_to_source(boxes_xyxy: np.ndarray, params: LetterboxParams) -> np.ndarray:
    """Map (N, 4) xyxy boxes from letterboxed input pixels to original pixels, clipped to the image."""
    boxes = np.asarray(boxes_xyxy, dtype=np.float64).reshape(-1, 4).copy()
    boxes[:, [0, 2]] = (boxes[:, [0, 2]] - params.pad_x) / params.scale_x
    boxes[:, [1, 3]] = (boxes[:, [1, 3]] - params.pad_y) / params.scale_y
    boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, params.src_w)
    boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, params.src_h)
    return boxes


def boxes_to_input(boxes_xyxy: np.ndarray, params: LetterboxParams) -> np.ndarray:
    """Map (N, 4) xyxy boxes from original pixels into the letterboxed input (inverse of the above)."""
    boxes = np.asarray(boxes_xyxy, dtype=np.float64).reshape(-1, 4).copy()
    boxes[:, [0, 2]] = boxes[:, [0, 2]] * params.scale_x + params.pad_x
    boxes[:, [1, 3]] = boxes[:, [1, 3]] * params.scale_y + params.pad_y
    return boxes


def xyxy_to_yolo(boxes_xyxy: np.ndarray, width: int, height: int) -> np.ndarray:
    """(N, 4) pixel xyxy -> YOLO (cx, cy, w, h) normalized to the image, clipped to 0..1."""
    boxes = np.asarray(boxes_xyxy, dtype=np.float64).reshape(-1, 4)
    x0 = boxes[:, 0].clip(0, width) / width
    x1 = boxes[:, 2].clip(0, width) / width
    y0 = boxes[:, 1].clip(0, height) / height
    y1 = boxes[:, 3].clip(0, height) / height
    return np.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], axis=1)


def yolo_to_xyxy(boxes_cxcywh: np.ndarray, width: int, height: int) -> np.ndarray:
    """(N, 4) normalized YOLO boxes -> pixel xyxy."""
    boxes = np.asarray(boxes_cxcywh, dtype=np.float64).reshape(-1, 4)
    cx, cy, w, h = boxes[:, 0] * width, boxes[:, 1] * height, boxes[:, 2] * width, boxes[:, 3] * height
    return np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1)


def resize_longest(img: np.ndarray, max_side: int) -> np.ndarray:
    """Downscale so the longer side is ``max_side`` (never upscales); area interpolation avoids aliasing."""
    h, w = img.shape[:2]
    longest = max(h, w)
    if longest <= max_side:
        return img
    scale = max_side / longest
    size = (max(round(w * scale), 1), max(round(h * scale), 1))
    return cv2.resize(img, size, interpolation=cv2.INTER_AREA)


def pairwise_iou(a_xyxy: np.ndarray, b_xyxy: np.ndarray) -> np.ndarray:
    """(N, 4) x (M, 4) xyxy boxes -> (N, M) IoU, in numpy.

    The only library versions (torchvision's ``box_iou``, ultralytics') take torch tensors, and
    the data pipeline does not import torch for a few small matrices per image.
    """
    a = np.asarray(a_xyxy, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b_xyxy, dtype=np.float64).reshape(-1, 4)
    w = np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0])
    h = np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1])
    inter = w.clip(min=0) * h.clip(min=0)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a[:, None] + area_b[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
