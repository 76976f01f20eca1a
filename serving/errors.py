"""Domain exceptions of the gateway, each naming its HTTP status.

Following KServe's errors module: route code raises what went wrong in domain
terms and one handler turns it into the JSON body every client parses,
``{"error": {"code", "message", "request_id"}}``. Nothing a client sends may
end in a bare 500 with a traceback.
"""

from __future__ import annotations


class ServingError(Exception):
    """Base class; ``status`` is the HTTP status, ``code`` the stable machine-readable name."""

    status: int = 500
    code: str = "internal_error"

    def __init__(self, message: str, *, retry_after_s: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after_s = retry_after_s


class InvalidImage(ServingError):
    """422: the upload is not a usable radiograph (corrupt, no pixels, multi-frame, too small/large)."""

    status = 422
    code = "invalid_image"


class InputLimitExceeded(InvalidImage):
    """422 (problem+json): a DICOM broke one of the guarded reader's limits; ``limit`` names the setting."""

    code = "input_limit_exceeded"

    def __init__(self, message: str, *, limit: str) -> None:
        super().__init__(message)
        self.limit = limit


class InvalidRequest(ServingError):
    """400: the request itself is malformed (multipart, parameters, feedback body)."""

    status = 400
    code = "invalid_request"


class UnsupportedMediaType(ServingError):
    """415: neither DICOM, PNG nor JPEG, or a Content-Type the route does not take."""

    status = 415
    code = "unsupported_media_type"


class PayloadTooLarge(ServingError):
    """413: the body exceeds CXR_MAX_BODY_BYTES."""

    status = 413
    code = "payload_too_large"


class Unauthorized(ServingError):
    """401: no API key, or one that is not known."""

    status = 401
    code = "unauthorized"


class Forbidden(ServingError):
    """403: a known key whose role does not include this route."""

    status = 403
    code = "forbidden"


class NotFound(ServingError):
    """404: no such result / model / stage."""

    status = 404
    code = "not_found"


class StudyNotAnalysed(NotFound):
    """404: no image of the study was analysed by this gateway (all refused, or its worklist lost)."""

    code = "study_not_analysed"


class Conflict(ServingError):
    """409: the request conflicts with what is stored (e.g. SR of a non-DICOM input)."""

    status = 409
    code = "conflict"


class StudyPatientMismatch(Conflict):
    """409: an image names a study that this gateway holds for another patient (a reused StudyInstanceUID).

    Merging it would put one patient's findings into another's SR, triage score and worklist row.
    The message names no UID and no patient value: it reaches the client and, through a STOW-RS
    answer, the PACS.
    """

    code = "study_patient_mismatch"

    def __init__(self, message: str = "") -> None:
        super().__init__(
            message
            or "the image's StudyInstanceUID is already held for another patient (another PatientID); "
            "a study UID must name one patient's examination: ask the PACS administrator to correct the study"
        )


class StudyResultsMissing(Conflict):
    """409: the study's images were analysed, but none of their results or sources is still held."""

    code = "study_results_missing"


class RateLimited(ServingError):
    """429 + Retry-After: this key sent more than its share."""

    status = 429
    code = "rate_limited"


class Overloaded(ServingError):
    """503 + Retry-After: the stage has too many requests in flight or Triton's queue is full."""

    status = 503
    code = "overloaded"


class ModelNotReady(ServingError):
    """503: the stage's inference server has no model loaded or cannot be reached."""

    status = 503
    code = "model_not_ready"


class GatewayTimeout(ServingError):
    """504: inference did not finish within CXR_REQUEST_TIMEOUT_S."""

    status = 504
    code = "timeout"


class BackendError(ServingError):
    """502: the inference server answered with an error that is not the client's fault."""

    status = 502
    code = "backend_error"


class WorklistUnavailable(ServingError):
    """503: the worklist's database (its SQLite file, or the cluster's PostgreSQL) cannot be used."""

    status = 503
    code = "worklist_unavailable"


class PacsUnavailable(ServingError):
    """The configured PACS did not answer, or answered with an error: retry later."""

    status = 502
    code = "pacs_unavailable"


class FeedbackIdReused(Conflict):
    """409: a feedback_id this key already sent for this result comes back with a different body.

    A retry sends the same body; new corrections need a new feedback_id. The message names no
    value of the feedback (it may carry free text).
    """

    code = "feedback_id_reused"
