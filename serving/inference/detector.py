"""The detection use case: route, bound, run, record, shadow.

Routes stay thin; everything a detection request does beyond HTTP lives here,
so ``/v1/detect``, ``/v1/detect/batch`` and STOW-RS behave identically.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import hashlib
import logging
import math
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from core.stages import STAGES, Stage
from core.triage import is_priority
from core.variants import DEFAULT_VARIANT
from serving.config import ServingSettings
from serving.contract import Detection
from serving.errors import (
    BackendError,
    GatewayTimeout,
    InputLimitExceeded,
    ModelNotReady,
    ServingError,
    StudyPatientMismatch,
    WorklistUnavailable,
)
from serving.inference.backend import InferenceBackend, ServedModel
from serving.inference.cpu_pool import CpuPool
from serving.inference.drift import DriftMonitor
from serving.inference.pipeline import DecodedUpload, InferenceOutcome, Pipeline
from serving.inference.prediction_drift import PredictionDriftMonitor
from serving.inference.routing import Router
from serving.limits import InflightGate
from serving.metrics import GatewayMetrics
from serving.results import ResultRecord, ResultStore, build_response
from serving.triage.worklist import StudyTriage, WorklistStore, same_patient

log = logging.getLogger(__name__)


@dataclass
class DetectionReply:
    record: ResultRecord
    outcome: InferenceOutcome
    study_uid: str | None
    sop_uid: str | None
    # the study's triage over every image seen so far (None: no study UID, or no worklist)
    study: StudyTriage | None = None


def _patient_key(upload: DecodedUpload) -> str:
    """The worklist's patient key of an image: its salted PatientID hash, "" when it carries none.

    With an IssuerOfPatientID, the key covers it too (``<PatientID hash>/<hash with the issuer>``):
    two hospitals' patient 1234 are two patients, and a study UID reused across them must not merge
    their images into one row and one SR (the storage SCP keeps them apart the same way). Without
    one, the key is the PatientID hash alone (:func:`serving.triage.worklist.same_patient`).
    """
    key = upload.image.patient_hash or ""
    ds = upload.image.dataset
    issuer = str(ds.get("IssuerOfPatientID", "") or "").strip() if ds is not None else ""
    if key and issuer:
        with_issuer = hashlib.sha256(f"{key}\x00{issuer}".encode()).hexdigest()[:16]
        key = f"{key}/{with_issuer}"
    return key


def new_request_id() -> str:
    """A result's id: made here, never taken from the client (X-Request-ID only correlates logs)."""
    return uuid.uuid4().hex


def agreement(a: list[Detection], b: list[Detection], iou_threshold: float = 0.5) -> float:
    """F1 of two detection sets matched greedily by class and IoU (1.0 when both are empty)."""
    if not a and not b:
        return 1.0
    if not a or not b:
        return 0.0
    used: set[int] = set()
    matches = 0
    for da in sorted(a, key=lambda d: -d.confidence):
        best, best_iou = -1, iou_threshold
        for j, db in enumerate(b):
            if j in used or db.class_id != da.class_id:
                continue
            iou = _iou(da.box, db.box)
            if iou >= best_iou:
                best, best_iou = j, iou
        if best >= 0:
            used.add(best)
            matches += 1
    return 2 * matches / (len(a) + len(b))


def _iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def study_triage(replies: list[DetectionReply]) -> StudyTriage | None:
    """The study's triage as of the fullest view among ``replies``.

    Images of one request are recorded side by side, and each reply sees the study as it was
    when its image was recorded: the one that saw the most images (then the highest score) is
    the study's triage, for the JSON answer and the SR alike.
    """
    seen = [r.study for r in replies if r.study is not None]
    return max(seen, key=lambda t: (len(t.result_ids), t.score)) if seen else None


class DetectionService:
    MODEL_RECHECK_S = 1.0  # see _model: how often a stage whose server lags its stage file is re-asked

    def __init__(
        self,
        settings: ServingSettings,
        backend: InferenceBackend,
        router: Router,
        metrics: GatewayMetrics,
        results: ResultStore,
        drift: DriftMonitor,
        cpu: CpuPool | None = None,
        worklist: WorklistStore | None = None,
        prediction_drift: PredictionDriftMonitor | None = None,
    ) -> None:
        """``cpu``: the gateway's worker pool (one of its own when None); :meth:`close` shuts it down.

        ``worklist``: where analysed studies are triaged (None: no worklist, replies carry no study).
        ``prediction_drift``: None builds one from the settings, publishing into ``metrics``.
        """
        self.settings = settings
        self.worklist = worklist
        self.backend = backend
        self.router = router
        self.metrics = metrics
        self.results = results
        self.drift = drift
        self.prediction_drift = prediction_drift or PredictionDriftMonitor(
            window=settings.prediction_drift_window,
            min_samples=settings.prediction_drift_min_samples,
            min_detections=settings.prediction_drift_min_detections,
            on_report=metrics.set_prediction_drift,
            on_reset=metrics.clear_prediction_drift,
        )
        self.cpu = cpu or CpuPool(settings.worker_threads)
        self.pipeline = Pipeline(settings, backend, metrics, self.cpu)
        self.gate = InflightGate(settings.max_inflight_per_stage, settings.overload_retry_after_s)
        self._background: set[asyncio.Task[Any]] = set()
        self._versions: dict[str, str] = {}
        self._rechecked: dict[str, float] = {}
        self.clock: Callable[[], float] = time.monotonic  # tests step it

    # ----------------------------------------------------------------- routing state

    def refresh_routing(self, force: bool = False) -> None:
        if force:
            self.router.reload()
        changed = force or self.router.maybe_reload()
        if changed:
            for stage, entry in self.router.table.stages.items():
                served = f"{entry.model_version}/{entry.variant}"  # a new variant is a new file
                if self._versions.get(stage) != served:
                    self.backend.forget(stage)
                    self._versions[stage] = served
        self.metrics.canary_weight.set(self.router.table.canary_weight)

    async def _model(self, stage: Stage) -> ServedModel:
        """The stage's model, asking the backend again while it disagrees with the stage file.

        A promotion writes the stage file before the stage's server has loaded the new model;
        a request in between caches the old model's info, and :meth:`refresh_routing` forgets
        only on a stage-file change. So while the cached version differs from the stage
        file's, the cache is dropped and the backend asked again (at most once per
        ``MODEL_RECHECK_S`` per stage: a server that never loads the version costs one
        metadata call per interval, not one per request). The version alone is compared: a
        CPU backend honestly reports fp32 for an fp16-trt variant.
        """
        served = await self.backend.model(stage)
        expected = self.router.table.version(stage)
        if served.version and expected and served.version != expected:
            now = self.clock()
            if now - self._rechecked.get(stage, -math.inf) >= self.MODEL_RECHECK_S:
                self._rechecked[stage] = now
                self.backend.forget(stage)
                served = await self.backend.model(stage)
        version = served.version or expected
        if version != served.version:
            served = dataclasses.replace(served, version=version)
        self.metrics.set_model_info(stage, served.name, served.version, served.variant)
        return served

    async def publish_stage_state(self) -> None:
        """Each stage's readiness and model as of now, for a scrape of ``/metrics``.

        ``/readyz`` sets ``cxr_stage_ready`` only for ``CXR_SERVING_STAGES`` and only when
        something calls it, and ``cxr_model_info`` followed requests: a Triton that died after
        the last probe kept reading ready, and CxrStageNotReady had no model to join with.
        """
        self.refresh_routing()
        await asyncio.gather(*(self._publish_stage(stage) for stage in STAGES))

    async def _publish_stage(self, stage: Stage) -> None:
        """A ready stage with a version assigned names what its server holds; any other, what git assigns
        it (an empty version: nothing assigned, unready by design)."""
        ready = await self.backend.ready(stage)
        self.metrics.stage_ready.labels(stage).set(1 if ready else 0)
        entry = self.router.table.stages.get(stage)
        if ready and entry is not None and entry.model_version:
            try:
                await self._model(stage)
                return
            except ServingError:
                pass
            except Exception as exc:  # e.g. a malformed model config: a scrape must still answer
                log.warning("stage_model_unreadable stage=%s error=%s", stage, exc)
        self.metrics.set_model_info(
            stage,
            self.settings.model_name,
            entry.model_version if entry else "",
            entry.variant if entry else DEFAULT_VARIANT,
        )

    async def served_model(self, stage: Stage) -> ServedModel:
        """The model ``stage`` serves now, with the version a detection's response would name."""
        self.refresh_routing()
        return await self._model(stage)

    def spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # ----------------------------------------------------------------- detection

    async def detect(
        self,
        payloads: list[bytes],
        *,
        conf: float | None = None,
        forced: Stage | None = None,
        tenant: str = "default",
    ) -> list[DetectionReply]:
        """Detect on one or more images; one backend call per stage for all of them.

        Each result gets a server-made id and is journalled to disk under the
        caller's tenant before this returns, so the answer survives a crash.
        """
        try:
            replies = await asyncio.wait_for(
                self._detect(payloads, conf, forced, tenant), timeout=self.settings.request_timeout_s
            )
        except TimeoutError as exc:
            raise GatewayTimeout(
                f"detection did not finish within {self.settings.request_timeout_s:g} s; retry later"
            ) from exc
        for reply in replies:
            reply.record.tenant = tenant
        await asyncio.gather(*(self.cpu.run(self.results.journal, r.record) for r in replies))
        if self.settings.store_results:
            for reply in replies:
                self.spawn(self.cpu.run(self.results.persist, reply.record))
        if self.worklist is not None:
            await self._triage(replies, tenant, self.worklist)
        return replies

    async def _triage(self, replies: list[DetectionReply], tenant: str, worklist: WorklistStore) -> None:
        """Merge each study's new images into the worklist and put the study's triage on its replies.

        After the journal, so the worklist never names a result that is not stored. One
        observation of the metrics per study in this call: a study sent one instance per request
        (STOW-RS, DIMSE) is observed once per instance, with its score so far. A failing worklist
        does not fail the detection (the results are already stored); it is logged without the UID.
        """
        studies: dict[str, list[DetectionReply]] = {}
        for reply in replies:
            if reply.study_uid:
                studies.setdefault(reply.study_uid, []).append(reply)
        threshold = self.settings.triage_threshold
        for study_uid, group in studies.items():
            last = group[-1].outcome
            try:
                study = await self.cpu.run(
                    functools.partial(
                        worklist.record,
                        patient_key=_patient_key(last.upload),
                        max_results=self.settings.pacs_max_study_instances,
                        sop_uids=[r.sop_uid or "" for r in group],
                    ),
                    tenant,
                    study_uid,
                    [r.record.request_id for r in group],
                    [r.outcome.image_score for r in group],
                    last.model.version,
                    last.stage,
                    threshold,
                )
            except StudyPatientMismatch:
                # another request of another patient took the study UID since _check_study_patients:
                # this one's results are journalled but never merged, answered or sent back
                log.warning("study_patient_mismatch_refused images=%d after=inference", len(group))
                raise
            except WorklistUnavailable as exc:
                log.warning("worklist_record_failed error_type=%s error=%s", type(exc).__name__, exc)
                continue
            self.metrics.triage_score.labels(last.stage).observe(study.score)
            self.metrics.triage_studies.labels(str(study.priority).lower()).inc()
            for reply in group:
                reply.study = study

    async def _check_study_patients(self, uploads: list[DecodedUpload], tenant: str) -> None:
        """Refuse, before inference, images whose study UID names another patient's study.

        Within the request (two patients' images under one StudyInstanceUID) and against the
        worklist's row for the study. A worklist that cannot be read does not fail the detection
        (as in :meth:`_triage`); :meth:`WorklistStore.record` checks again when merging.
        """
        keys: dict[str, set[str]] = {}
        for up in uploads:
            if up.image.study_uid:
                keys.setdefault(up.image.study_uid, set()).add(_patient_key(up))
        for study_uid, found in keys.items():
            stored = None
            if self.worklist is not None:
                try:
                    stored = await self.cpu.run(self.worklist.patient_key, tenant, study_uid)
                except WorklistUnavailable as exc:
                    log.warning("worklist_read_failed error_type=%s", type(exc).__name__)
            if len(found) > 1 or (stored is not None and not same_patient(stored, next(iter(found)))):
                log.warning("study_patient_mismatch_refused images=%d after=decode", len(uploads))
                raise StudyPatientMismatch()

    async def _detect(
        self, payloads: list[bytes], conf: float | None, forced: Stage | None, tenant: str
    ) -> list[DetectionReply]:
        self.refresh_routing()
        # conf None: each stage's model applies its own per-class operating points (pipeline._post)
        first_stage: Stage = forced or "production"
        first_model = await self._model(first_stage)
        try:
            uploads = await self.pipeline.decode(payloads, first_model, first_stage)
        except InputLimitExceeded as exc:
            self.metrics.input_refused.labels(exc.limit).inc()
            raise
        await self._check_study_patients(uploads, tenant)
        groups: dict[Stage, list[int]] = {}
        shadows: list[int] = []
        mirrors: list[int] = []
        for i, up in enumerate(uploads):
            decision = self.router.decide(up.sticky_key, forced)
            groups.setdefault(decision.stage, []).append(i)
            if decision.shadow:
                shadows.append(i)
            if decision.canary_mirror:
                mirrors.append(i)
        outcomes: dict[int, InferenceOutcome] = {}
        for stage, idxs in groups.items():
            stage_uploads = [uploads[i] for i in idxs]
            results = await self._run_stage(stage, stage_uploads, first_model, conf, forced)
            for i, outcome in zip(idxs, results, strict=True):
                outcomes[i] = outcome
        replies = []
        for i, up in enumerate(uploads):
            replies.append(self._record(new_request_id(), up, outcomes[i], at_operating_points=conf is None))
        for i in shadows:
            self.spawn(self._shadow(uploads[i], outcomes[i], conf))
        for i in mirrors:
            # a canary that could not answer fell back to production: there is no canary answer to judge
            if outcomes[i].stage == "canary":
                self.spawn(self._shadow(uploads[i], outcomes[i], conf, run_on="production", judged="canary"))
        return replies

    async def _run_stage(
        self,
        stage: Stage,
        uploads: list[DecodedUpload],
        first_model: ServedModel,
        conf: float | None,
        forced: Stage | None,
    ) -> list[InferenceOutcome]:
        """Infer on the routed stage; a failing canary falls back to production instead of failing."""
        routed_away = stage != (forced or "production")
        if routed_away:
            try:
                model = await self._model(stage)
                return await self._infer_bounded(stage, model, uploads, conf)
            except (ModelNotReady, BackendError) as exc:
                # the canary is down: serve the study from production rather than fail it
                log.warning("route_fallback from=%s to=production reason=%s", stage, exc.message)
                self.metrics.rejected.labels(stage, "stage_unavailable").inc()
                stage = "production"
        return await self._infer_bounded(stage, first_model, uploads, conf)

    async def _infer_bounded(
        self,
        stage: Stage,
        model: ServedModel,
        uploads: list[DecodedUpload],
        conf: float | None,
        *,
        retry_swap: bool = True,
    ) -> list[InferenceOutcome]:
        """Infer on ``model``'s very version; once more on the stage's new one if it was swapped.

        The backend refuses a version no longer loaded rather than let another answer under its name
        (backend_triton.py). When a promotion swapped it between this request's config read and its
        inference, the request is prepared again for the model the stage serves now and answered by
        it, named after it: a promotion costs no request a 503.
        """
        uploads = await self.pipeline.reprepare(uploads, model)
        # a batch of more images than the stage's bound takes all of it (it runs when the stage is
        # idle): weighed by its image count, it was refused with "retry later" even by an idle stage
        weight = max(1, min(len(uploads), self.gate.limit))
        try:
            with self.gate.enter(stage, weight):
                self.metrics.inflight.labels(stage).inc(len(uploads))
                try:
                    return await self.pipeline.infer(stage, model, uploads, conf)
                finally:
                    self.metrics.inflight.labels(stage).dec(len(uploads))
        except ServingError as exc:
            if isinstance(exc, ModelNotReady):
                self.backend.forget(stage)
                if retry_swap and model.server_version:
                    swapped = await self._swapped_model(stage, model)
                    if swapped is not None:
                        log.info("model_swapped stage=%s version=%s", stage, swapped.version)
                        return await self._infer_bounded(stage, swapped, uploads, conf, retry_swap=False)
            self.metrics.rejected.labels(stage, exc.code).inc()
            raise

    async def _swapped_model(self, stage: Stage, model: ServedModel) -> ServedModel | None:
        """The stage's model now, when it is another loaded version than ``model``'s; else None."""
        try:
            now = await self._model(stage)
        except ServingError:
            return None
        return now if now.server_version and now.server_version != model.server_version else None

    def _record(
        self,
        request_id: str,
        up: DecodedUpload,
        outcome: InferenceOutcome,
        *,
        at_operating_points: bool = True,
    ) -> DetectionReply:
        stage, model = outcome.stage, outcome.model
        m = self.metrics
        m.images.labels(stage, model.version).inc()
        for det in outcome.detections:
            m.detections.labels(stage, model.version, det.class_name).inc()
            m.confidence.labels(stage).observe(det.confidence)
        m.intensity.labels(stage).observe(up.prepared.intensity_mean)
        dataset_version = model.contract.extra.get("cxr_dataset_version", "")
        self.spawn(
            self.cpu.run(
                functools.partial(
                    self.drift.observe,
                    stage,
                    mean=up.prepared.intensity_mean,
                    std=up.prepared.intensity_std,
                    width=up.image.cols,
                    height=up.image.rows,
                    dataset_version=dataset_version,
                )
            )
        )
        if at_operating_points:  # a request's own threshold changes the answer by design: not drift
            ops = model.operating_points
            self.spawn(
                self.cpu.run(
                    functools.partial(
                        self.prediction_drift.observe,
                        stage,
                        model_version=model.version,
                        reference=ops.prediction_reference if ops is not None else None,
                        detections=[(d.class_id, d.confidence) for d in outcome.detections],
                    )
                )
            )
        timings = dict(outcome.timings_ms)
        timings["total"] = sum(timings.values())
        response = build_response(
            request_id,
            model_name=model.name,
            model_version=model.version,
            stage=stage,
            width=up.image.cols,
            height=up.image.rows,
            sop_instance_uid=up.image.sop_uid,
            detections=outcome.detections,
            timings_ms=timings,
            triage=(outcome.image_score, is_priority(outcome.image_score, self.settings.triage_threshold)),
            variant=model.variant,
        )
        record = ResultRecord(request_id, response, up.image.source_format, up.data)
        return DetectionReply(record, outcome, up.image.study_uid, up.image.sop_uid)

    async def _shadow(
        self,
        upload: DecodedUpload,
        served: InferenceOutcome,
        conf: float | None,
        *,
        run_on: Stage = "staging",
        judged: Stage = "staging",
    ) -> None:
        """Mirror to ``run_on``; the answer is discarded, only its agreement is recorded as ``judged``'s.

        Two mirrors, both a ``CXR_SHADOW_FRACTION`` share (:meth:`Router.decide`):

        - staging: the candidate's answer against the one served (production's or the canary's),
          ``cxr_shadow_agreement{stage="staging"}``;
        - production, of a request the canary served: the canary's answer against production's
          on the same image, ``cxr_shadow_agreement{stage="canary"}``, which the canary analysis
          judges (``delivery/canary.py``, policy ``min_agreement``).

        The mirror runs after the reply is built and never changes it. It takes one slot of
        ``run_on``'s in-flight bound, only while the stage is below half of it, and is dropped, not
        queued, otherwise: mirroring must neither push production past its limit nor take the slots
        real requests need near it. Its phase timings, images and detections are
        not counted as the stage's (they served no one).
        """
        try:
            model = await self._model(run_on)
            [up] = await self.pipeline.reprepare([upload], model)
            with self.gate.enter(run_on, share=0.5):  # never the slots a real request needs
                [outcome] = await self.pipeline.infer(run_on, model, [up], conf, observe=False)
            score = agreement(served.detections, outcome.detections)
            self.metrics.shadow_agreement.labels(judged).observe(score)
        except Exception as exc:  # a broken shadow must never affect anyone
            log.info("shadow_failed stage=%s run_on=%s error=%s", judged, run_on, exc)

    async def close(self) -> None:
        for task in list(self._background):
            task.cancel()
        self.cpu.close()
