"""DICOMweb STOW-RS (PS3.18 10.5): parse ``multipart/related`` uploads, detect on each, answer.

The body is split with python-multipart's generic ``MultipartParser`` (the
same parser FastAPI uses for forms, which works for any boundary-delimited
body); :class:`StowService` runs each instance through the detector; the
response is a DICOM JSON dataset listing each instance under
ReferencedSOPSequence (with a RetrieveURL to its detection SR) or
FailedSOPSequence (with a FailureReason), as a PACS or ``dicomweb-client`` expects.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header

from data_pipeline.dicom_io import sniff_format
from serving.dicom.headers import instance_uids
from serving.errors import InvalidImage, InvalidRequest, ServingError, UnsupportedMediaType
from serving.inference.cpu_pool import CpuPool
from serving.inference.detector import DetectionReply, DetectionService

log = logging.getLogger(__name__)

# PS3.18 Table I.2-1 failure reasons
FAILURE_PROCESSING = 0x0110
FAILURE_NOT_SUPPORTED = 0xC122
FAILURE_CANNOT_UNDERSTAND = 0xC000


@dataclass
class _Part:
    headers: dict[str, str] = field(default_factory=dict)
    chunks: list[bytes] = field(default_factory=list)


def split_related(content_type: str, body: bytes, *, max_parts: int = 64) -> list[bytes]:
    """The DICOM parts of a ``multipart/related; type="application/dicom"`` body."""
    media, options = parse_options_header(content_type or "")
    if media != b"multipart/related":
        raise UnsupportedMediaType(
            f"STOW-RS takes multipart/related; type=\"application/dicom\", got '{content_type or 'none'}'"
        )
    part_type = options.get(b"type", b"application/dicom").decode("latin-1").lower()
    if part_type != "application/dicom":
        raise UnsupportedMediaType(
            f"STOW-RS part type '{part_type}' is not supported; send application/dicom"
        )
    boundary = options.get(b"boundary")
    if not boundary:
        raise InvalidRequest("multipart/related body without a boundary parameter")
    parts: list[_Part] = []
    header_field: list[bytes] = []
    header_value: list[bytes] = []
    ended: list[bool] = []

    def on_part_begin() -> None:
        if len(parts) >= max_parts:
            raise InvalidRequest(f"too many parts (more than {max_parts}) in one STOW-RS request")
        parts.append(_Part())

    def on_part_data(data: bytes, start: int, end: int) -> None:
        parts[-1].chunks.append(data[start:end])

    def on_header_field(data: bytes, start: int, end: int) -> None:
        header_field.append(data[start:end])

    def on_header_value(data: bytes, start: int, end: int) -> None:
        header_value.append(data[start:end])

    def on_header_end() -> None:
        name = b"".join(header_field).decode("latin-1").strip().lower()
        parts[-1].headers[name] = b"".join(header_value).decode("latin-1").strip()
        header_field.clear()
        header_value.clear()

    try:
        # FormParserError (a ValueError) too: a boundary over 256 bytes is refused by the constructor,
        # and reached the gateway's catch-all as a 500
        parser = MultipartParser(
            boundary,
            {
                "on_part_begin": on_part_begin,
                "on_part_data": on_part_data,
                "on_header_field": on_header_field,
                "on_header_value": on_header_value,
                "on_header_end": on_header_end,
                "on_end": lambda: ended.append(True),
            },
        )
        parser.write(body)
        parser.finalize()
    except FormParserError as exc:
        raise InvalidRequest(f"malformed multipart/related body: {exc}") from exc
    if not ended:
        # python-multipart's finalize() does not check this: a body cut short came back as its parts
        # minus the bytes it held back for a boundary, each then failed as a DICOM it "cannot understand"
        raise InvalidRequest(
            "multipart/related body ends without its closing boundary '--<boundary>--' (RFC 2046 5.1.1): "
            "the request is truncated"
        )
    instances = []
    for i, part in enumerate(parts):
        ctype = part.headers.get("content-type", "application/dicom").split(";")[0].strip().lower()
        if ctype != "application/dicom":
            raise UnsupportedMediaType(
                f"part {i + 1} has Content-Type '{ctype}'; STOW-RS parts must be application/dicom"
            )
        data = b"".join(part.chunks)
        if data:
            instances.append(data)
    if not instances:
        raise InvalidRequest("the STOW-RS request holds no DICOM instances (check the multipart boundary)")
    return instances


@dataclass(frozen=True)
class StowOutcome:
    sop_class_uid: str
    sop_instance_uid: str
    retrieve_url: str | None = None
    failure_reason: int | None = None


def stow_response(outcomes: list[StowOutcome], study_url: str | None) -> dict[str, Any]:
    """DICOM JSON of the Store Instances Response Module."""
    ds = Dataset()
    if study_url:
        ds.RetrieveURL = study_url
    ok, failed = [], []
    for o in outcomes:
        item = Dataset()
        item.ReferencedSOPClassUID = o.sop_class_uid or "1.2.840.10008.5.1.4.1.1.1"
        item.ReferencedSOPInstanceUID = o.sop_instance_uid or "0.0"
        if o.failure_reason is None:
            if o.retrieve_url:
                item.RetrieveURL = o.retrieve_url
            ok.append(item)
        else:
            item.FailureReason = o.failure_reason
            failed.append(item)
    if ok:
        ds.ReferencedSOPSequence = Sequence(ok)
    if failed:
        ds.FailedSOPSequence = Sequence(failed)
    return ds.to_json_dict()


def stow_status(outcomes: list[StowOutcome]) -> int:
    """200 all stored, 202 some failed, 409 none stored (PS3.18 10.5.3)."""
    failed = sum(o.failure_reason is not None for o in outcomes)
    if failed == 0:
        return 200
    return 409 if failed == len(outcomes) else 202


@dataclass
class StowResult:
    """What one STOW-RS request stored and refused, and the response that says so."""

    outcomes: list[StowOutcome]
    detections: int
    study_url: str | None
    replies: list[DetectionReply] = field(default_factory=list)

    @property
    def status(self) -> int:
        return stow_status(self.outcomes)

    def body(self) -> dict[str, Any]:
        return stow_response(self.outcomes, self.study_url)


class StowService:
    """Store Instances: each DICOM instance of a request goes through the detector on its own.

    An instance the detector cannot read fails alone (FailureReason C000), one of another
    study is refused (C122), any other refusal fails it (0110); an overload or timeout
    (503/504) fails the whole request so the sender retries it later.
    """

    def __init__(self, detector: DetectionService, cpu: CpuPool, concurrency: int = 4) -> None:
        self.detector = detector
        self.cpu = cpu
        self.concurrency = max(1, concurrency)

    async def split(self, content_type: str, body: bytes) -> list[bytes]:
        """The request's DICOM instances; parsing 64 MiB of parts and every header runs in the pool."""
        return await self.cpu.run(split_related, content_type, body)

    async def store(
        self,
        instances: list[bytes],
        *,
        study: str | None,
        tenant: str,
        base_url: str,
        on_stored: Callable[[DetectionReply], None] | None = None,
    ) -> StowResult:
        """Detect on the instances, a few at a time; ``on_stored`` sees each reply as it is stored.

        Up to ``concurrency`` instances of one request are analysed side by side (a study's
        images overlap their decode and inference, as separate clients would), never more, so
        one large study cannot take every in-flight slot of a stage.
        """
        gate = asyncio.Semaphore(self.concurrency)

        async def one(data: bytes) -> tuple[StowOutcome, DetectionReply | None]:
            async with gate:
                if sniff_format(data[:132]) in ("png", "jpeg"):
                    # a part declared application/dicom holding a picture: the detector reads PNG and JPEG
                    # (POST /v1/detect takes them), but a STOW-RS instance must be DICOM; stored, it was
                    # reported as SOP Instance 0.0 with a RetrieveURL whose SR could never be built
                    log.info("stow_instance_rejected code=not_dicom")
                    return StowOutcome("", "", failure_reason=FAILURE_CANNOT_UNDERSTAND), None
                sop_class, sop_uid, study_uid = await self.cpu.run(instance_uids, data)
                if study and study_uid != study:  # an instance without a StudyInstanceUID is not of it
                    return StowOutcome(sop_class, sop_uid, failure_reason=FAILURE_NOT_SUPPORTED), None
                try:
                    [reply] = await self.detector.detect([data], tenant=tenant)
                except (InvalidImage, UnsupportedMediaType) as exc:
                    log.info("stow_instance_rejected code=%s", exc.code)  # the message may quote the file
                    return StowOutcome(sop_class, sop_uid, failure_reason=FAILURE_CANNOT_UNDERSTAND), None
                except ServingError as exc:
                    if exc.status in (503, 504):
                        raise  # the whole request should be retried later, not reported as a bad instance
                    return StowOutcome(sop_class, sop_uid, failure_reason=FAILURE_PROCESSING), None
            if on_stored is not None:
                on_stored(reply)
            rid = reply.record.request_id
            return StowOutcome(sop_class, sop_uid, retrieve_url=f"{base_url}/v1/results/{rid}/sr"), reply

        # every instance ends before the request does, even when one is refused 503: gather's
        # first exception would answer while the others still ran, and a result stored after the
        # answer was on no audit line (and its SR RetrieveURL reached no caller)
        ended = await asyncio.gather(*(one(data) for data in instances), return_exceptions=True)
        for item in ended:
            if isinstance(item, BaseException):
                raise item
        done = [item for item in ended if not isinstance(item, BaseException)]
        outcomes = [outcome for outcome, _ in done]
        replies = [reply for _, reply in done if reply is not None]
        detections = sum(len(r.outcome.detections) for r in replies)
        study_url = f"{base_url}/dicomweb/studies/{study}" if study else None
        return StowResult(outcomes, detections, study_url, replies)
