"""DICOMweb pull: fetch a study from the configured PACS (QIDO-RS + WADO-RS) for analysis.

QIDO-RS goes through dicomweb-client. WADO-RS does not: dicomweb-client parses what it
retrieves with ``pydicom.dcmread``, and an instance from outside must reach pydicom only
through the guarded reader. So each instance is streamed with httpx, cut off at
``CXR_MAX_BODY_BYTES``, and split with the STOW-RS parser the gateway already uses; the
detector's guarded decode then reads it like any upload. Every UID the PACS returns is
checked before it is put in a URL, and only the SOP classes the SCP accepts (chest
radiographs) are fetched: our own SRs and presentation states in the same study are not.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import httpx
import requests
from pydicom.uid import UID

from serving.config import ServingSettings
from serving.dicom.sop_classes import RADIOGRAPH_SOP_CLASSES
from serving.dicom.stow import split_related
from serving.errors import Conflict, InvalidRequest, NotFound, PacsUnavailable, PayloadTooLarge
from serving.pacs.senders import dicomweb_client

log = logging.getLogger(__name__)

_STUDY, _SERIES, _SOP, _CLASS = "0020000D", "0020000E", "00080018", "00080016"


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
    values = item.get(tag, {}).get("Value", [])
    return str(values[0]) if values else ""


class PacsPull:
    def __init__(self, settings: ServingSettings) -> None:
        if not settings.pacs_dicomweb_url:
            raise Conflict("no PACS to pull from: set CXR_PACS_DICOMWEB_URL (and CXR_PACS_DICOMWEB_HEADERS)")
        self.url = settings.pacs_dicomweb_url.rstrip("/")
        self.headers = dict(settings.pacs_dicomweb_headers)
        self.max_bytes = settings.max_body_bytes
        self.max_instances = settings.pacs_max_study_instances
        self.timeout_s = settings.request_timeout_s

    def instances(self, study_uid: str) -> list[RemoteInstance]:
        """The study's radiographs, by QIDO-RS (blocking)."""
        client = dicomweb_client(self.url, self.headers, self.timeout_s)
        try:
            found = client.search_for_instances(
                study_instance_uid=study_uid,
                fields=[_SERIES, _SOP, _CLASS],
                limit=self.max_instances * 4,
            )
        except requests.HTTPError as exc:
            status = exc.response.status_code if exc.response is not None else 0
            if status == 404:
                found = []
            else:
                raise PacsUnavailable(f"the PACS refused the study query (HTTP {status})") from exc
        except (requests.RequestException, OSError) as exc:
            raise PacsUnavailable(f"the PACS at {self.url} did not answer: {type(exc).__name__}") from exc
        out = []
        for item in found:
            sop_class = _value(item, _CLASS)
            if sop_class not in RADIOGRAPH_SOP_CLASSES:
                continue
            series, sop = _value(item, _SERIES), _value(item, _SOP)
            if UID(series).is_valid and UID(sop).is_valid:
                out.append(RemoteInstance(series, sop, sop_class))
        if not out:
            raise NotFound("the PACS holds no radiograph (CR, DX or Secondary Capture) in that study")
        if len(out) > self.max_instances:
            raise PayloadTooLarge(
                f"the study has {len(out)} radiographs; at most {self.max_instances} are analysed per pull "
                "(CXR_PACS_MAX_STUDY_INSTANCES)"
            )
        return out

    def retrieve(self, study_uid: str, instance: RemoteInstance) -> bytes:
        """One instance's bytes by WADO-RS, at most CXR_MAX_BODY_BYTES (blocking)."""
        url = f"{self.url}/studies/{study_uid}/series/{instance.series_uid}/instances/{instance.sop_uid}"
        headers = {**self.headers, "Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'}
        chunks: list[bytes] = []
        size = 0
        try:
            with (
                httpx.Client(timeout=self.timeout_s, trust_env=False) as client,
                client.stream("GET", url, headers=headers) as response,
            ):
                if response.status_code != 200:
                    raise PacsUnavailable(f"the PACS refused an instance (HTTP {response.status_code})")
                content_type = response.headers.get("content-type", "")
                for chunk in response.iter_bytes():
                    size += len(chunk)
                    if size > self.max_bytes:
                        raise PayloadTooLarge(
                            f"an instance of the study is over {self.max_bytes} bytes (CXR_MAX_BODY_BYTES)"
                        )
                    chunks.append(chunk)
        except httpx.HTTPError as exc:
            raise PacsUnavailable(f"the PACS at {self.url} did not answer: {type(exc).__name__}") from exc
        parts = split_related(content_type, b"".join(chunks), max_parts=1)
        return parts[0]

    def fetch_study(self, study_uid: str) -> list[bytes]:
        """Every radiograph of the study (blocking: run it in the worker pool)."""
        study_uid = check_uid(study_uid, "the study UID")
        instances = self.instances(study_uid)
        data = [self.retrieve(study_uid, i) for i in instances]
        log.info("pacs_pull_fetched instances=%d bytes=%d", len(data), sum(len(d) for d in data))
        return data
