"""Typed errors of the data pipeline.

Callers (the gateway turns these into 4xx answers, the CLI into one red line)
need to tell "this file is broken" from "this file is fine but not something
we handle" without parsing messages; every message says what to do next.
"""

from __future__ import annotations

from core.errors import CxrError


class DataPipelineError(CxrError):
    """Base of every error this package raises on purpose."""


class ImageDecodeError(DataPipelineError):
    """An image could not be turned into pixels (base of the two below)."""


class UnsupportedImage(ImageDecodeError):
    """A valid file of a kind we refuse: color-only modality, multi-frame series, > 50 MP, no decoder."""


class UnrecognisedImage(UnsupportedImage):
    """Bytes that are no DICOM, PNG or JPEG at all (the gateway answers 415, not 422)."""


class CorruptImage(ImageDecodeError):
    """A file that claims to be an image but is truncated, garbled or has no pixel data."""


class AnnotationError(DataPipelineError):
    """The annotations file cannot be used (missing columns, too many bad rows)."""


class EmptyDatasetError(DataPipelineError):
    """No image survived decoding, validation and the quality checks."""


class StoreError(DataPipelineError):
    """The S3 object store refused or could not be reached."""


class DatasetNotFound(StoreError):
    """A dataset version was asked for that the object store does not hold."""


class DatasetIntegrityError(DataPipelineError):
    """A downloaded dataset does not match the hashes in its manifest."""
