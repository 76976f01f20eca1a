"""Occlusion saliency per box, on the very model that answered: ``GET /v1/results/{id}/saliency.png``.

Method: the source is decoded and letterboxed exactly as for detection, then a square patch of
two grid cells a side (``CXR_SALIENCY_GRID`` cells across the image, stride one cell, filled
with the letterbox's own grey, which the model has learnt to read as "no image") hides one part
of the image at a time. Each occluded copy goes through the stage's backend, in batches of
``CXR_MAX_BACKEND_BATCH``: ``(grid - 1)^2`` runs plus one unoccluded. A box's score in one run is
the best ``IoU(anchor's box, the box) x anchor's score for the box's class`` over the anchors
(a D-RISE-like similarity: a patch that moves the box or weakens its class both count). A patch's
saliency for the box is the share of the box's unoccluded score it took away; a cell's is the
mean over the patches that cover it. The map of all boxes is the per-cell maximum over them;
it is shown divided by its peak (``X-CXR-Saliency-Peak`` says what that peak was, so a flat map
is not mistaken for a strong one).

Why occlusion and not a gradient method (Grad-CAM, EigenCAM from ``grad-cam``): those need the
PyTorch weights and a hook on a layer, inside the gateway. The gateway serves an ONNX file, in
process or through Triton, and never holds torch weights; occlusion needs nothing but the
forward pass the backend already offers, so the map explains the exact file and version that
produced the boxes, through the same preprocessing, whichever backend serves it. The price is
``(grid - 1)^2 + 1`` inferences (122 at the default 12), paid once per result and box: maps are
computed on demand, ``CXR_SALIENCY_CONCURRENCY`` at a time, off the event loop (NumPy and
OpenCV in the gateway's worker pool, inference in the backend's), and kept beside the
journalled result (deleted with its source) and in a small in-memory LRU.
"""

from __future__ import annotations

import asyncio
import functools
import io
import json
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, cast

import cv2
import numpy as np
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from core.stages import PROMOTION_ORDER, Stage
from data_pipeline.geometry import LetterboxParams, boxes_to_input
from serving.config import ServingSettings
from serving.errors import Conflict, GatewayTimeout, InvalidRequest, NotFound
from serving.inference.cpu_pool import CpuPool
from serving.inference.detector import DetectionService
from serving.inference.pipeline import decode_upload
from serving.inference.preprocess import PreparedImage, prepare
from serving.results import ResultRecord, ResultStore

log = logging.getLogger(__name__)

METHOD = "occlusion"
MAX_SIDE = 1024  # the map's longer side, as the review page's preview (routes/results.py)
PNG_KEY = "cxr-saliency"

Infer = Callable[[np.ndarray], Awaitable[np.ndarray]]
Run = Callable[..., Awaitable[Any]]


# ------------------------------------------------------------------------------------- the method


@dataclass(frozen=True)
class Target:
    """A box to explain: xyxy in model-input pixels, and its class id."""

    box: tuple[float, float, float, float]
    class_id: int


def cell_edges(params: LetterboxParams, grid: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel edges (grid + 1 each, x then y) of the grid over the image inside the letterbox."""
    xs = np.rint(np.linspace(params.pad_x, params.pad_x + params.new_w, grid + 1)).astype(int)
    ys = np.rint(np.linspace(params.pad_y, params.pad_y + params.new_h, grid + 1)).astype(int)
    return xs, ys


def patches(grid: int) -> list[tuple[int, int]]:
    """Top-left cells (row, col) of the 2 x 2-cell patches, stride one cell: (grid - 1)^2 of them."""
    return [(r, c) for r in range(grid - 1) for c in range(grid - 1)]


def occluded_batch(
    plane: np.ndarray,
    which: list[tuple[int, int]],
    edges: tuple[np.ndarray, np.ndarray],
    fill: float,
) -> np.ndarray:
    """(n, 3, S, S) float32: ``plane`` (S, S) once per patch in ``which`` with that patch filled."""
    xs, ys = edges
    out = np.empty((len(which), 3, *plane.shape), np.float32)
    for i, (r, c) in enumerate(which):
        out[i, :] = plane
        out[i, :, ys[r] : ys[r + 2], xs[c] : xs[c + 2]] = fill
    return out


def box_scores(outputs: np.ndarray, targets: list[Target]) -> np.ndarray:
    """(n, B): each target's best ``IoU(anchor box, target) x anchor's class score`` per output.

    ``outputs``: (n, 4 + classes, anchors), boxes as cx, cy, w, h in input pixels (the raw head).
    An anchor with a non-finite value scores nothing, as it is no candidate for detection either
    (``postprocess.finite_anchors``): an fp16 engine's one overflow made a NaN of the whole map,
    its PNG and its ``X-CXR-Saliency-Peak``.
    """
    finite = np.isfinite(outputs).all(axis=1)  # (n, anchors)
    outputs = np.where(finite[:, None, :], outputs, np.float32(0.0))
    xywh = outputs[:, :4, :].astype(np.float32, copy=False)
    x0, x1 = xywh[:, 0] - xywh[:, 2] / 2, xywh[:, 0] + xywh[:, 2] / 2
    y0, y1 = xywh[:, 1] - xywh[:, 3] / 2, xywh[:, 1] + xywh[:, 3] / 2
    area = np.clip(xywh[:, 2], 0, None) * np.clip(xywh[:, 3], 0, None)
    scores = np.zeros((outputs.shape[0], len(targets)), np.float32)
    for j, t in enumerate(targets):
        tx0, ty0, tx1, ty1 = t.box
        iw = np.clip(np.minimum(x1, tx1) - np.maximum(x0, tx0), 0, None)
        ih = np.clip(np.minimum(y1, ty1) - np.maximum(y0, ty0), 0, None)
        inter = iw * ih
        union = area + (tx1 - tx0) * (ty1 - ty0) - inter
        iou = np.where(union > 0, inter / np.maximum(union, 1e-9), 0.0)
        row = 4 + t.class_id
        if row >= outputs.shape[1]:
            continue
        scores[:, j] = (iou * outputs[:, row, :]).max(axis=1)
    return scores


def cell_map(drops: np.ndarray, grid: int) -> np.ndarray:
    """(grid, grid) mean over the covering patches of each patch's drop; ``drops`` is (grid - 1)^2."""
    patch = drops.reshape(grid - 1, grid - 1)
    total = np.zeros((grid, grid), np.float64)
    count = np.zeros((grid, grid), np.float64)
    for dr in (0, 1):
        for dc in (0, 1):
            total[dr : dr + grid - 1, dc : dc + grid - 1] += patch
            count[dr : dr + grid - 1, dc : dc + grid - 1] += 1
    return (total / count).astype(np.float32)


async def occlusion_maps(
    prepared: PreparedImage,
    targets: list[Target],
    infer: Infer,
    *,
    grid: int,
    batch: int,
    fill: float,
    run: Run | None = None,
) -> np.ndarray:
    """(B, grid, grid) float32 in 0..1: per target, the share of its score each cell's hiding took.

    The cells tile the image inside the letterbox (rows top to bottom). ``infer`` is the backend's
    forward pass on a (n, 3, S, S) batch; ``run`` runs the NumPy work off the event loop (the
    gateway's worker pool; None: inline, for tests).
    """

    async def inline(fn: Callable[..., Any], *args: object) -> Any:
        return fn(*args)

    run = run or inline
    plane = np.ascontiguousarray(prepared.tensor[0], dtype=np.float32)
    edges = cell_edges(prepared.params, grid)
    base = cast(np.ndarray, await run(box_scores, await infer(prepared.tensor[None].copy()), targets))[0]
    which = patches(grid)
    size = max(1, batch)
    parts = []
    for i in range(0, len(which), size):
        occluded = await run(occluded_batch, plane, which[i : i + size], edges, fill)
        parts.append(await run(box_scores, await infer(occluded), targets))
    scores = np.concatenate(parts)  # (patches, B)
    safe = np.where(base > 0, base, 1.0)
    drops = np.where(base > 0, np.clip(base - scores, 0, None) / safe, 0.0)
    maps = [cell_map(drops[:, j], grid) for j in range(len(targets))]
    return np.stack(maps) if maps else np.zeros((0, grid, grid), np.float32)


def render_png(heat: np.ndarray, width: int, height: int, meta: dict[str, Any]) -> bytes:
    """RGBA PNG of ``heat`` (cells, 0..1, drawn over the whole image) at the image's aspect.

    At most :data:`MAX_SIDE` a side; JET colours, opacity rising with the value, so the
    radiograph stays readable where the model did not look. ``meta`` goes into a text chunk.
    """
    scale = min(1.0, MAX_SIDE / max(width, height))
    w, h = max(1, round(width * scale)), max(1, round(height * scale))
    smooth = cv2.resize(heat.astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR)
    smooth = np.clip(smooth, 0.0, 1.0)
    levels = np.rint(smooth * 255).astype(np.uint8)
    bgr = cv2.applyColorMap(levels, cv2.COLORMAP_JET)
    rgba = np.dstack([bgr[..., ::-1], levels])
    info = PngInfo()
    info.add_text(PNG_KEY, json.dumps(meta, separators=(",", ":")))
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgba), mode="RGBA").save(
        buf, format="PNG", pnginfo=info, compress_level=6
    )
    return buf.getvalue()


def png_meta(png: bytes) -> dict[str, Any]:
    """What :func:`render_png` wrote into the PNG's text chunk ({} when none)."""
    with Image.open(io.BytesIO(png)) as img:
        text = getattr(img, "text", {}).get(PNG_KEY)
    return dict(json.loads(text)) if text else {}


def targets_of(record: ResultRecord, prepared: PreparedImage, box: int | None) -> list[Target]:
    """The result's boxes (or box ``box``) mapped from source pixels into the model's input."""
    params = prepared.params
    width, height = prepared.source_size
    out = []
    for i, det in enumerate(record.detections):
        if box is not None and i != box:
            continue
        xyxy = np.asarray(det["box"], dtype=np.float64).reshape(1, 4)
        xyxy[:, [0, 2]] *= params.src_w / width  # the image may have been shrunk before the letterbox
        xyxy[:, [1, 3]] *= params.src_h / height
        x0, y0, x1, y1 = (float(v) for v in boxes_to_input(xyxy, params)[0])
        out.append(Target((x0, y0, x1, y1), int(det["class_id"])))
    return out


# ------------------------------------------------------------------------------------- the service


@dataclass(frozen=True)
class SaliencyImage:
    png: bytes
    meta: dict[str, Any]

    def headers(self) -> dict[str, str]:
        return {
            "X-CXR-Saliency-Method": str(self.meta.get("method", METHOD)),
            "X-CXR-Saliency-Peak": repr(float(self.meta.get("peak", 0.0))),
            "X-CXR-Saliency-Boxes": str(self.meta.get("boxes", 0)),
            "X-CXR-Model-Version": str(self.meta.get("model_version", "")),
        }


class SaliencyService:
    """Computes, bounds and caches the maps; one per gateway (``state.extras['saliency']``)."""

    def __init__(
        self, settings: ServingSettings, detector: DetectionService, results: ResultStore, cpu: CpuPool
    ) -> None:
        self.settings = settings
        self.detector = detector
        self.results = results
        self.cpu = cpu
        self._slots = asyncio.Semaphore(settings.saliency_concurrency)
        self._memory: OrderedDict[tuple[str, str], SaliencyImage] = OrderedDict()

    def _name(self, box: int | None) -> str:
        """Derived file name: grid and box, so a changed grid recomputes (only ``[A-Za-z0-9_-]``)."""
        return f"saliency-g{self.settings.saliency_grid}-{'all' if box is None else f'box{box}'}"

    def _remember(self, key: tuple[str, str], image: SaliencyImage) -> None:
        self._memory[key] = image
        self._memory.move_to_end(key)
        while len(self._memory) > self.settings.saliency_cache_items:
            self._memory.popitem(last=False)

    async def get(self, request_id: str, tenant: str, box: int | None) -> SaliencyImage:
        """The map of result ``request_id`` (all boxes, or box ``box``): cached, else computed.

        404: unknown, another tenant's, or its source no longer kept (the map needs the pixels and
        is deleted with them). 400: no such box. 409: its stage serves another version now.
        504: not computed within ``CXR_SALIENCY_TIMEOUT_S`` (waiting for a slot included).
        """
        record = await self.cpu.run(self.results.get, request_id, tenant)
        if record.source is None:
            raise NotFound(
                f"the source image of '{request_id}' is no longer kept (CXR_SOURCE_RETENTION_HOURS); "
                "its saliency map went with it; detect again"
            )
        n = len(record.detections)
        if box is not None and box >= n:
            raise InvalidRequest(f"box={box}: result '{request_id}' has {n} box(es), numbered from 0")
        key = (request_id, self._name(box))
        if key in self._memory:
            self._memory.move_to_end(key)
            return self._memory[key]
        kept = await self.cpu.run(self.results.derived, request_id, key[1])
        if kept is not None:
            image = SaliencyImage(kept, await self.cpu.run(png_meta, kept))
            self._remember(key, image)
            return image
        timeout = self.settings.saliency_timeout_s
        try:
            return await asyncio.wait_for(self._compute_bounded(key, record, box), timeout=timeout)
        except TimeoutError as exc:
            raise GatewayTimeout(
                f"the saliency map of '{request_id}' was not computed within {timeout:g} s "
                "(CXR_SALIENCY_TIMEOUT_S); retry later"
            ) from exc

    async def _compute_bounded(
        self, key: tuple[str, str], record: ResultRecord, box: int | None
    ) -> SaliencyImage:
        async with self._slots:
            if key in self._memory:  # computed by the request this one waited behind
                return self._memory[key]
            image = await self._compute(record, box)
        self._remember(key, image)
        kept = await self.cpu.run(self.results.keep_derived, record.request_id, key[1], image.png)
        if not kept:
            log.debug("saliency_not_kept request_id=%s (not journalled here)", record.request_id)
        return image

    async def _compute(self, record: ResultRecord, box: int | None) -> SaliencyImage:
        model_block = record.response.get("model", {})
        stage_name = str(model_block.get("stage", "production"))
        if stage_name not in PROMOTION_ORDER:
            raise Conflict(f"result '{record.request_id}' names no serving stage ({stage_name!r})")
        stage = cast(Stage, stage_name)
        served = await self.detector.served_model(stage)
        version = str(model_block.get("version", ""))
        if served.version != version:
            raise Conflict(
                f"result '{record.request_id}' came from model version {version}; {stage} serves "
                f"{served.version} now, and a saliency map must explain the model that answered"
            )
        assert record.source is not None
        limits = self.detector.pipeline.limits
        image, _ = await self.cpu.run(functools.partial(decode_upload, record.source, limits=limits))
        prepared = await self.cpu.run(prepare, image.to_uint8(), served.contract, self.settings.max_side)
        targets = targets_of(record, prepared, box)
        grid = self.settings.saliency_grid
        backend = self.detector.backend

        async def infer(batch: np.ndarray) -> np.ndarray:
            return await backend.infer(stage, batch, served)

        maps = await occlusion_maps(
            prepared,
            targets,
            infer,
            grid=grid,
            batch=served.batch_size(self.settings.max_backend_batch),
            fill=served.contract.pad_value / 255.0,
            run=self.cpu.run,
        )
        combined = maps.max(axis=0) if len(maps) else np.zeros((grid, grid), np.float32)
        peak = float(combined.max())
        heat = combined / peak if peak > 0 else combined
        meta = {
            "method": METHOD,
            "grid": grid,
            "box": box,
            "boxes": len(targets),
            "peak": round(peak, 4),
            "model_version": served.version,
            "stage": stage,
        }
        width, height = prepared.source_size
        png = await self.cpu.run(render_png, heat, width, height, meta)
        log.info(
            "saliency_computed request_id=%s boxes=%d grid=%d peak=%.3f",
            record.request_id,
            len(targets),
            grid,
            peak,
        )
        return SaliencyImage(png, meta)
