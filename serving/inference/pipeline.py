"""decode -> preprocess -> infer -> postprocess: each phase timed and recorded here.

CPU work (decoding, letterbox, NMS) runs in the gateway's worker pool so the
event loop only waits. Inference goes to the backend of the stage the router
picked. The pipeline measures every phase and records it in
``cxr_gateway_phase_duration_seconds`` itself: nothing else observes phases.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

from core.stages import Stage
from core.triage import head_image_score
from data_pipeline.dicom_guard import DicomLimitExceeded, DicomLimits
from data_pipeline.dicom_io import DecodedImage, decode_bytes
from data_pipeline.errors import CorruptImage, ImageDecodeError, UnrecognisedImage, UnsupportedImage
from serving.config import ServingSettings
from serving.contract import Detection
from serving.errors import InputLimitExceeded, InvalidImage, Overloaded, UnsupportedMediaType
from serving.inference.backend import InferenceBackend, ServedModel
from serving.inference.cpu_pool import CpuPool
from serving.inference.postprocess import finite_class_scores, to_detections
from serving.inference.preprocess import PreparedImage, prepare, stack
from serving.metrics import GatewayMetrics

T = TypeVar("T")


@dataclass
class DecodedUpload:
    """One upload after decode and letterbox, before inference."""

    data: bytes
    image: DecodedImage
    prepared: PreparedImage
    sticky_key: str
    timings_ms: dict[str, float] = field(default_factory=dict)


@dataclass
class InferenceOutcome:
    upload: DecodedUpload
    detections: list[Detection]
    model: ServedModel
    stage: Stage
    timings_ms: dict[str, float]
    # the triage image score (core/triage.py): best candidate before the operating points' thresholds
    image_score: float = 0.0


def decode_upload(
    data: bytes, salt: str | None = None, limits: DicomLimits | None = None
) -> tuple[DecodedImage, float]:
    """Decode bytes (through the guarded reader), mapping the pipeline's errors to HTTP errors."""
    start = time.perf_counter()
    try:
        image = decode_bytes(data, salt=salt, limits=limits)
    except DicomLimitExceeded as exc:
        raise InputLimitExceeded(str(exc), limit=exc.limit) from exc
    except UnrecognisedImage as exc:  # no image format at all: 415, not 422
        raise UnsupportedMediaType(f"{exc}; send application/dicom, image/png or image/jpeg") from exc
    except UnsupportedImage as exc:
        raise InvalidImage(str(exc)) from exc
    except (CorruptImage, ImageDecodeError) as exc:
        raise InvalidImage(str(exc)) from exc
    if image.pixels.ndim != 2:
        raise InvalidImage(f"expected one 2-D radiograph, got pixel array of shape {image.pixels.shape}")
    if min(image.rows, image.cols) < 8:
        raise InvalidImage(f"{image.cols}x{image.rows} is too small to be a radiograph (min 8 px a side)")
    return image, (time.perf_counter() - start) * 1000


async def _all_or_none(calls: list[Coroutine[Any, Any, T]]) -> list[T]:
    """Every call's result; when one fails, the others are cancelled AND awaited before it is raised.

    ``asyncio.gather`` raises the first failure while the other chunks are still at the backend:
    the caller's in-flight slot (:class:`serving.limits.InflightGate`) was then given back with
    inferences still running, so the per-stage bound no longer held.
    """
    tasks = [asyncio.ensure_future(c) for c in calls]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


class Pipeline:
    def __init__(
        self, settings: ServingSettings, backend: InferenceBackend, metrics: GatewayMetrics, cpu: CpuPool
    ) -> None:
        self.settings = settings
        self.backend = backend
        self.metrics = metrics
        self.cpu = cpu
        from data_pipeline.config import get_settings

        self.limits = get_settings().dicom_limits()  # CXR_DICOM_*: owned by the guarded reader's package
        self._decoding = 0

    def _observe(self, phase: str, stage: Stage, ms: float) -> None:
        self.metrics.phase_duration.labels(phase, stage).observe(ms / 1000)

    # ----------------------------------------------------------------- decode + preprocess

    def _decode_and_prepare(self, data: bytes, model: ServedModel) -> DecodedUpload:
        image, decode_ms = decode_upload(data, limits=self.limits)
        start = time.perf_counter()
        prepared = prepare(image.to_uint8(), model.contract, self.settings.max_side)
        prep_ms = (time.perf_counter() - start) * 1000
        key = image.study_uid or hashlib.sha256(data).hexdigest()
        return DecodedUpload(
            data=data,
            image=image,
            prepared=prepared,
            sticky_key=key,
            timings_ms={"decode": decode_ms, "preprocess": prep_ms},
        )

    async def _decode_one(self, data: bytes, model: ServedModel) -> DecodedUpload:
        """Decode in the bounded pool: a full queue is a 503, a decode past its time a 422.

        A thread cannot be killed, so a decode past CXR_DECODE_TIMEOUT_S finishes in
        the background; the declared-size limits of the guarded reader are what
        bound its cost, the timeout only frees the request.
        """
        if self._decoding >= self.settings.max_decode_queue:
            raise Overloaded(
                f"{self._decoding} uploads are waiting to be decoded (CXR_MAX_DECODE_QUEUE); retry later",
                retry_after_s=self.settings.overload_retry_after_s,
            )
        self._decoding += 1
        try:
            return await asyncio.wait_for(
                self.cpu.run(self._decode_and_prepare, data, model), timeout=self.settings.decode_timeout_s
            )
        except TimeoutError as exc:
            raise InputLimitExceeded(
                f"decoding took longer than {self.settings.decode_timeout_s:g} s",
                limit="CXR_DECODE_TIMEOUT_S",
            ) from exc
        finally:
            self._decoding -= 1

    async def decode(self, payloads: list[bytes], model: ServedModel, stage: Stage) -> list[DecodedUpload]:
        """Decode and letterbox every payload for ``model``; the phases are recorded under ``stage``."""
        uploads = await asyncio.gather(*(self._decode_one(p, model) for p in payloads))
        for up in uploads:
            self._observe("decode", stage, up.timings_ms["decode"])
            self._observe("preprocess", stage, up.timings_ms["preprocess"])
        return list(uploads)

    async def reprepare(self, uploads: list[DecodedUpload], model: ServedModel) -> list[DecodedUpload]:
        """Letterbox again only when ``model`` takes another input (size or fill) than the uploads were
        prepared for: a shadow or canary version whose contract pads with another value must not see
        the other version's padding."""
        if all(u.prepared.fits(model.contract) for u in uploads):
            return uploads
        out = []
        for up in uploads:
            image = up.image.to_uint8()
            prepared = await self.cpu.run(prepare, image, model.contract, self.settings.max_side)
            out.append(DecodedUpload(up.data, up.image, prepared, up.sticky_key, dict(up.timings_ms)))
        return out

    # ----------------------------------------------------------------- infer + postprocess

    def _post(
        self, outputs: np.ndarray, uploads: list[DecodedUpload], model: ServedModel, conf: float | None
    ) -> tuple[list[list[Detection]], list[float], float]:
        """NMS and boxes back to source pixels, plus each image's triage score; ``conf`` None: the
        version's operating points decide.

        A version without operating points keeps the global CXR_CONF_THRESHOLD and raw scores. The
        triage score (:func:`core.triage.head_image_score`) looks at every candidate, whatever
        threshold drops boxes from the answer, and is calibrated like the confidences returned.
        Anchors with a non-finite value are left out of both (an fp16 engine can overflow).
        """
        start = time.perf_counter()
        ops = model.operating_points
        threshold = self.settings.conf_threshold if conf is None and ops is None else conf
        result = [
            to_detections(
                outputs[i],
                up.prepared.params,
                model.contract.class_names,
                conf_threshold=threshold,
                iou_threshold=self.settings.iou_threshold,
                max_det=self.settings.max_detections,
                source_size=up.prepared.source_size,
                operating_points=ops,
            )
            for i, up in enumerate(uploads)
        ]
        # non-finite anchors count for the triage no more than for the boxes (postprocess.finite_anchors)
        scores = [head_image_score(finite_class_scores(outputs[i]), ops) for i in range(len(uploads))]
        return result, scores, (time.perf_counter() - start) * 1000

    async def infer(
        self,
        stage: Stage,
        model: ServedModel,
        uploads: list[DecodedUpload],
        conf: float | None,
        *,
        observe: bool = True,
    ) -> list[InferenceOutcome]:
        """One backend call for all uploads (the batch route sends N images as one tensor).

        ``conf``: the request's threshold on the returned confidence, or None for the model's
        per-class operating points (the global threshold when it has none).

        ``observe=False`` (the shadow mirror, which serves no one) leaves the phase
        histogram alone; the outcomes carry their timings either way.
        """
        size = model.batch_size(self.settings.max_backend_batch)
        chunks = [uploads[i : i + size] for i in range(0, len(uploads), size)]
        start = time.perf_counter()
        # copying a 640 px image into a batch tensor is ~5 MB of memory traffic: not on the event loop
        batches = await asyncio.gather(*(self.cpu.run(stack, [u.prepared for u in c]) for c in chunks))
        # Triton refuses batches above the model's max_batch_size: send chunks of at most it, concurrently
        parts = await _all_or_none([self.backend.infer(stage, batch, model) for batch in batches])
        outputs = np.concatenate(parts) if len(parts) > 1 else parts[0]
        infer_ms = (time.perf_counter() - start) * 1000
        detections, scores, post_ms = await self.cpu.run(self._post, outputs, uploads, model, conf)
        outcomes = []
        for up, dets, score in zip(uploads, detections, scores, strict=True):
            timings = {**up.timings_ms, "infer": infer_ms, "postprocess": post_ms / len(uploads)}
            outcomes.append(InferenceOutcome(up, dets, model, stage, timings, image_score=score))
            if observe:
                self._observe("infer", stage, timings["infer"])
                self._observe("postprocess", stage, timings["postprocess"])
        return outcomes
