"""DICOMweb pull: fetch a study from the configured PACS (QIDO-RS + WADO-RS) for analysis.

Neither goes through dicomweb-client. It parses what WADO-RS retrieves with ``pydicom.dcmread``,
and an instance from outside must reach pydicom only through the guarded reader; and its
requests session reads a QIDO-RS answer whole, however large, with a timeout per read only (a
PACS trickling a byte at a time holds the pull for ever), and follows redirects to any host,
headers and all (the closed network: nothing leaves the configured PACS). So every answer is
streamed with httpx, no redirect followed, cut off at a size and at ``CXR_REQUEST_TIMEOUT_S``
in all; an instance is split with the STOW-RS parser the gateway already uses, and the
detector's guarded decode then reads it like any upload. QIDO-RS is read page by page (limit
and offset) until a page comes back short: a study that also holds our own objects from earlier
analyses lists more instances than one page, and analysing only the radiographs of its first
page would answer for a study some of whose images were never looked at. Every UID the PACS
returns is checked before it is put in a URL, and only the SOP classes the SCP accepts (chest
radiographs) are fetched: our own SRs and presentation states in the same study are not.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Any

import httpx
from pydicom.uid import UID

from core.urls import redacted
from serving.config import ServingSettings
from serving.dicom.sop_classes import RADIOGRAPH_SOP_CLASSES
from serving.dicom.stow import split_related
from serving.errors import (
    Conflict,
    InvalidRequest,
    NotFound,
    PacsUnavailable,
    PayloadTooLarge,
    UnsupportedMediaType,
)

log = logging.getLogger(__name__)

_STUDY, _SERIES, _SOP, _CLASS = "0020000D", "0020000E", "00080018", "00080016"
_QIDO_PAGES = 16  # pages of a study's QIDO-RS answer read at most: 16 x 4 x CXR_PACS_MAX_STUDY_INSTANCES
#: a pulled study holds at most this many CXR_MAX_BODY_BYTES in all (a chest study is 1-3 images
#: of ~15 MiB; the default allows 256 MiB)
STUDY_BODIES = 4
_QIDO_ENTRY_BYTES = 16 * 1024  # generous for one instance's DICOM JSON (a PACS adds its default fields)


def check_uid(value: str, what: str) -> str:
    if not value or len(value) > 64 or not UID(value).is_valid:
        raise InvalidRequest(f"{what} is not a valid DICOM UID (digits and dots, at most 64 characters)")
    return value


@dataclass(frozen=True)
class RemoteInstance:
    series_uid: str
    sop_uid: str
    sop_class_uid: str


def _value(item: dict[str, Any], tag: str) -> str:
    values = item.get(tag, {}).get("Value", []) if isinstance(item, dict) else []
    return str(values[0]) if isinstance(values, list) and values else ""


class PacsPull:
    def __init__(self, settings: ServingSettings) -> None:
        if not settings.pacs_dicomweb_url:
            raise Conflict("no PACS to pull from: set CXR_PACS_DICOMWEB_URL (and CXR_PACS_DICOMWEB_HEADERS)")
        self.url = settings.pacs_dicomweb_url.rstrip("/")
        self.where = redacted(self.url)
        self.headers = dict(settings.pacs_dicomweb_headers)
        self.max_bytes = settings.max_body_bytes
        self.max_instances = settings.pacs_max_study_instances
        self.page = self.max_instances * 4
        self.timeout_s = settings.request_timeout_s

    def _get(
        self, url: str, params: dict[str, Any], accept: str, limit: int, what: str
    ) -> tuple[str, bytes] | None:
        """One GET: its Content-Type and body, None on 204/404 (blocking); ``what`` names it in a 413.

        No redirect is followed (a 3xx is a refusal), at most ``limit`` bytes are read, and the
        whole answer must come within the timeout: httpx's applies to each read only.
        """
        deadline = time.monotonic() + self.timeout_s
        chunks: list[bytes] = []
        size = 0
        try:
            with (
                httpx.Client(timeout=self.timeout_s, trust_env=False, follow_redirects=False) as client,
                client.stream(
                    "GET", url, params=params, headers={**self.headers, "Accept": accept}
                ) as response,
            ):
                if response.status_code in (204, 404):
                    return None
                if response.is_redirect:  # off the configured PACS, perhaps off the hospital's network
                    raise PacsUnavailable(
                        f"the PACS at {self.where} answered a redirect (HTTP {response.status_code}), which "
                        "is not followed: set CXR_PACS_DICOMWEB_URL to where it serves DICOMweb"
                    )
                if response.status_code != 200:
                    raise PacsUnavailable(f"the PACS at {self.where} refused (HTTP {response.status_code})")
                for chunk in response.iter_bytes():
                    size += len(chunk)
                    if size > limit:
                        raise PayloadTooLarge(f"{what} is over {limit} bytes")
                    if time.monotonic() > deadline:
                        raise PacsUnavailable(
                            f"the PACS at {self.where} did not answer within {self.timeout_s:g} s "
                            "(CXR_REQUEST_TIMEOUT_S)"
                        )
                    chunks.append(chunk)
                content_type = response.headers.get("content-type", "")
        except httpx.HTTPError as exc:
            raise PacsUnavailable(f"the PACS at {self.where} did not answer: {type(exc).__name__}") from exc
        return content_type, b"".join(chunks)

    def _qido_page(self, study_uid: str, offset: int) -> list[Any]:
        answer = self._get(
            f"{self.url}/studies/{study_uid}/instances",
            {"includefield": [_SERIES, _SOP, _CLASS], "limit": self.page, "offset": offset},
            "application/dicom+json, application/json",
            min(self.max_bytes, self.page * _QIDO_ENTRY_BYTES),
            "the PACS's answer to the study query",
        )
        if answer is None:
            return []
        try:
            found = json.loads(answer[1])
        except ValueError as exc:
            raise PacsUnavailable(f"the PACS at {self.where} answered the study query with no JSON") from exc
        if not isinstance(found, list):
            raise PacsUnavailable(f"the PACS at {self.where} answered the study query with no JSON list")
        return found

    def instances(self, study_uid: str) -> list[RemoteInstance]:
        """The study's radiographs, by QIDO-RS, every page of it (blocking)."""
        listed: set[str] = set()
        out: list[RemoteInstance] = []
        for number in range(_QIDO_PAGES):
            found = self._qido_page(study_uid, number * self.page)
            before = len(listed)
            for item in found:
                series, sop, sop_class = _value(item, _SERIES), _value(item, _SOP), _value(item, _CLASS)
                if sop in listed:  # listed twice (or on two pages): fetched and analysed once
                    continue
                listed.add(sop)
                if sop_class in RADIOGRAPH_SOP_CLASSES and UID(series).is_valid and UID(sop).is_valid:
                    out.append(RemoteInstance(series, sop, sop_class))
            if len(out) > self.max_instances:
                raise PayloadTooLarge(
                    f"the study has over {self.max_instances} radiographs; at most {self.max_instances} "
                    "are analysed per pull (CXR_PACS_MAX_STUDY_INSTANCES)"
                )
            if len(found) < self.page:
                break
            if len(listed) == before:  # a full page of nothing new: the PACS ignores the offset
                raise PacsUnavailable(
                    f"the PACS at {self.where} lists the same instances whatever the offset: "
                    "the study's other instances cannot be listed"
                )
        else:
            raise PayloadTooLarge(
                f"the study lists over {_QIDO_PAGES * self.page} instances; its radiographs "
                "cannot all be found"
            )
        if not out:
            raise NotFound("the PACS holds no radiograph (CR, DX or Secondary Capture) in that study")
        return out

    def retrieve(self, study_uid: str, instance: RemoteInstance) -> bytes:
        """One instance's bytes by WADO-RS, at most CXR_MAX_BODY_BYTES (blocking)."""
        answer = self._get(
            f"{self.url}/studies/{study_uid}/series/{instance.series_uid}/instances/{instance.sop_uid}",
            {},
            'multipart/related; type="application/dicom"; transfer-syntax=*',
            self.max_bytes,
            "an instance of the study (CXR_MAX_BODY_BYTES)",
        )
        if answer is None:
            raise PacsUnavailable("the PACS listed an instance of the study it does not deliver (HTTP 404)")
        content_type, body = answer
        try:
            parts = split_related(content_type, body, max_parts=1)
        except (InvalidRequest, UnsupportedMediaType) as exc:
            # the PACS's answer, not the caller's request: a 502 naming the PACS, not a STOW-RS 4xx
            raise PacsUnavailable(
                f"the PACS at {self.where} answered an instance that is not one application/dicom part "
                f"of a multipart/related body ({exc.message})"
            ) from exc
        return parts[0]

    def fetch_study(self, study_uid: str, listed: list[RemoteInstance] | None = None) -> list[bytes]:
        """Every radiograph of the study, of ``listed`` (:meth:`instances`) if given (blocking: run it
        in the worker pool). The gateway lists first, to charge the caller per radiograph before any
        is fetched: a pull refused by the rate limit costs the PACS nothing.

        At most :data:`STUDY_BODIES` times ``CXR_MAX_BODY_BYTES`` in all: the study is held whole
        until it is analysed, and CXR_PACS_MAX_STUDY_INSTANCES instances each up to the body limit
        would be 64 x 64 MiB, 4 GiB for one request.
        """
        study_uid = check_uid(study_uid, "the study UID")
        instances = self.instances(study_uid) if listed is None else listed
        limit = STUDY_BODIES * self.max_bytes
        data: list[bytes] = []
        total = 0
        for instance in instances:
            data.append(self.retrieve(study_uid, instance))
            total += len(data[-1])
            if total > limit:
                raise PayloadTooLarge(
                    f"the study's radiographs are over {limit} bytes in all ({STUDY_BODIES} x "
                    "CXR_MAX_BODY_BYTES), more than one pull holds: send it by STOW-RS or DIMSE instead"
                )
        log.info("pacs_pull_fetched instances=%d bytes=%d", len(data), sum(len(d) for d in data))
        return data
