"""Reading request bodies safely: size limit while streaming, multipart or raw image bodies.

The limit is enforced as bytes arrive (not only from Content-Length, which a
client may omit or lie about), so a huge body costs at most the limit in memory.
"""

from __future__ import annotations

from fastapi import Request
from starlette.datastructures import UploadFile
from starlette.requests import ClientDisconnect

from serving.errors import InvalidRequest, PayloadTooLarge, UnsupportedMediaType

RAW_IMAGE_TYPES = ("application/dicom", "image/png", "image/jpeg", "image/jpg", "application/octet-stream")


async def read_body(request: Request, limit: int, setting: str = "CXR_MAX_BODY_BYTES") -> bytes:
    """The whole body, refused with 413 past ``limit`` bytes; ``setting`` names the knob that sets it.

    A compressed body (``Content-Encoding: gzip``, ...) is refused with 415 (RFC 9110 15.5.16)
    naming the encoding: it was read as the image itself and refused as unrecognised content, a
    message that sent the client looking at the file. Not inflated here: a body that inflates past
    every limit after they were checked is the bomb the guarded reader exists to stop.

    The body is not kept on the request: a caller that splits it (STOW-RS) or parses a form out of
    it drops it then, and its images alone are held while they are analysed, not twice the body.
    """
    encoding = request.headers.get("content-encoding", "").strip().lower()
    if encoding not in ("", "identity"):
        raise UnsupportedMediaType(
            f"Content-Encoding '{encoding[:32]}' is not accepted: send the body uncompressed"
        )
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            if int(declared) > limit:
                raise PayloadTooLarge(
                    f"body of {int(declared)} bytes exceeds the {limit}-byte limit ({setting})"
                )
        except ValueError as exc:
            raise InvalidRequest("Content-Length is not a number") from exc
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(f"body exceeds the {limit}-byte limit ({setting})")
            chunks.append(chunk)
    except ClientDisconnect as exc:
        raise InvalidRequest("client disconnected before the body was complete") from exc
    return b"".join(chunks)


def media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


async def form_files(request: Request, body: bytes, field: str, *, max_files: int) -> list[bytes]:
    """Files of one multipart field of ``body`` (already size-checked by :func:`read_body`)."""
    request._body = body  # what request.form() parses: the stream was already read
    try:
        form = await request.form(max_files=max_files, max_fields=32)
    except Exception as exc:  # starlette raises HTTPException/MultiPartException on broken bodies
        detail = getattr(exc, "detail", None) or str(exc) or type(exc).__name__
        raise InvalidRequest(f"malformed multipart/form-data body: {detail}") from exc
    finally:
        del request._body  # parsed: its files are in the form, the body need not outlive this
    items = [v for v in form.getlist(field) if isinstance(v, UploadFile)]
    if not items:
        names = ", ".join(sorted(set(form.keys()))) or "none"
        raise InvalidRequest(f"multipart upload needs a file in field '{field}' (fields sent: {names})")
    return [await item.read() for item in items]


async def image_payloads(
    request: Request, limit: int, *, field: str = "file", max_files: int = 1
) -> list[bytes]:
    """The uploaded image(s): multipart ``file`` field(s) or a raw DICOM/PNG/JPEG body."""
    kind = media_type(request)
    body = await read_body(request, limit)
    if kind == "multipart/form-data":
        return await form_files(request, body, field, max_files=max_files)
    if kind in RAW_IMAGE_TYPES or kind == "":
        return [body]
    raise UnsupportedMediaType(
        f"Content-Type '{kind}' is not accepted: send multipart/form-data with a 'file' field, "
        "or a raw body as application/dicom, image/png or image/jpeg"
    )
