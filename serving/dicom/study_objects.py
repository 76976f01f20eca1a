"""The DICOM objects sent back to the PACS for one analysed study.

One SR for the whole study (findings, no-finding groups, triage), one GSPS per
image (what viewers draw over the original), and, when the displayed pixels are
at hand, one burned-in Secondary Capture per image (what every viewer can
show). All UIDs are derived from the sources and the model version, so sending
the bundle again is idempotent at the PACS.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
from pydicom.dataset import Dataset

from serving.dicom.capture import build_burned_capture
from serving.dicom.gsps import build_gsps
from serving.dicom.sr import build_study_sr, check_referencable, refusing_unbuildable
from serving.errors import Conflict


def study_objects(
    items: list[tuple[Dataset, dict[str, Any]]],
    triage: dict[str, Any] | None,
    *,
    capture_pixels: list[np.ndarray] | None = None,
) -> list[Dataset]:
    """[study SR, GSPS per image..., capture per image...] for ``(source header, response)`` pairs.

    Raises :class:`Conflict` when a source cannot be referenced or an object
    cannot be built from it: the caller reports that instead of sending part
    of a result.
    """
    if not items:
        raise Conflict("a study result needs at least one analysed image")
    if capture_pixels is not None and len(capture_pixels) != len(items):
        raise Conflict("capture pixels must be given for every image of the study, or for none")
    sources = [source for source, _ in items]
    responses = [response for _, response in items]
    for source in sources:
        check_referencable(source)
    with refusing_unbuildable("the result objects of this study"):
        objects = [build_study_sr(sources, responses, triage)]
        objects += [build_gsps(source, response) for source, response in items]
        if capture_pixels is not None:
            objects += [
                build_burned_capture(source, pixels, response)
                for (source, response), pixels in zip(items, capture_pixels, strict=True)
            ]
    return objects


def dataset_bytes(ds: Dataset) -> bytes:
    """``ds`` as a DICOM Part 10 file (preamble and file meta), as STOW-RS sends it."""
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()
