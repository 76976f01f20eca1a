"""Image -> model input, exactly as training saw it.

One module for both backends so the Triton and in-process paths cannot drift
apart. The letterbox is data_pipeline's (ultralytics' centred letterbox, pad
114); a test holds it identical to ultralytics' own predictor.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from data_pipeline.drift import intensity_mean_std, level_histogram
from data_pipeline.geometry import LetterboxParams, letterbox, resize_longest
from serving.contract import ModelContract


@dataclass(frozen=True)
class PreparedImage:
    """A model-ready tensor (3, S, S) float32 in 0..1, the letterbox used, and input statistics."""

    tensor: np.ndarray
    params: LetterboxParams
    intensity_mean: float
    intensity_std: float
    source_size: tuple[int, int]  # (width, height) of the ORIGINAL image, where boxes are reported
    pad_value: int = 114  # the letterbox's fill: a model whose contract says another needs its own input

    def fits(self, contract: ModelContract) -> bool:
        """Whether this input is what ``contract``'s model takes (its size and its letterbox fill)."""
        return self.params.dst == contract.size and self.pad_value == contract.pad_value


def prepare(gray_uint8: np.ndarray, contract: ModelContract, max_side: int = 0) -> PreparedImage:
    """Letterbox a (H, W) uint8 radiograph and normalise it like ultralytics (RGB, /255, CHW).

    Images longer than ``max_side`` are first shrunk exactly as the dataset
    builder shrinks them for training (``resize_longest``, area interpolation),
    so the model sees what it was trained on rather than a 2048 px image
    aliased straight down to 640. Letterboxing the single grey channel and then
    repeating it is identical to letterboxing the 3-channel copy (resize acts
    per channel) and a third of the work.
    """
    if gray_uint8.ndim != 2:
        raise ValueError(f"expected a (H, W) grey image, got shape {gray_uint8.shape}")
    source_size = (int(gray_uint8.shape[1]), int(gray_uint8.shape[0]))
    if max_side:
        gray_uint8 = resize_longest(gray_uint8, max_side)
    boxed, params = letterbox(gray_uint8, contract.size, pad_value=contract.pad_value)
    plane = boxed.astype(np.float32) / np.float32(255.0)  # divide, as ultralytics does: bit-identical
    tensor = np.broadcast_to(plane, (3, *plane.shape))
    mean, std = intensity_mean_std(level_histogram(gray_uint8))
    return PreparedImage(
        tensor=tensor,
        params=params,
        intensity_mean=mean,
        intensity_std=std,
        source_size=source_size,
        pad_value=contract.pad_value,
    )


def stack(images: list[PreparedImage]) -> np.ndarray:
    """Batch tensors into one contiguous (N, 3, S, S) array for a single inference call."""
    return np.ascontiguousarray(np.stack([im.tensor for im in images]), dtype=np.float32)
