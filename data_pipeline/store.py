"""S3 object store access (SeaweedFS on one machine, MinIO in the cluster) via the ``minio`` SDK.

Every package stores through this class so that retries, timeouts, error
messages and the idempotent upload rule (an object whose sha256 already
matches is not sent again) are the same everywhere. Errors surface as
:class:`~data_pipeline.errors.StoreError` with the endpoint in the message.
"""

from __future__ import annotations

import hashlib
import io
import logging
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import urllib3
from minio import Minio
from minio.error import MinioException, S3Error

from core.hashing import file_sha256
from data_pipeline.config import DataSettings, get_settings
from data_pipeline.errors import StoreError

log = logging.getLogger(__name__)

_SHA_META = "sha256"  # stored as x-amz-meta-sha256


@dataclass(frozen=True)
class ObjectInfo:
    """What a listing tells about one object."""

    name: str
    size: int


def is_missing(exc: StoreError) -> bool:
    """True when the store answered that the object (or its bucket) is not there, as opposed to
    being unreachable or refusing the request."""
    cause = exc.__cause__
    return isinstance(cause, S3Error) and cause.code in (
        "NoSuchKey",
        "NoSuchObject",
        "ResourceNotFound",
        "NoSuchBucket",
    )


class ObjectStore:
    """One bucket of an S3 endpoint, with the few operations the project needs."""

    def __init__(
        self,
        endpoint: str,
        access_key: str,
        secret_key: str,
        bucket: str = "cxr",
        region: str = "us-east-1",
        *,
        timeout_s: float = 30.0,
        retries: int = 2,
    ) -> None:
        try:  # urlparse raises on "http://[::1" (an unclosed IPv6 bracket)
            parsed = urlparse(endpoint if "://" in endpoint else f"http://{endpoint}")
        except ValueError as exc:
            raise StoreError(f"S3 endpoint {endpoint!r} is not a URL like http://127.0.0.1:8333") from exc
        if not parsed.hostname:
            raise StoreError(f"S3 endpoint {endpoint!r} is not a URL like http://127.0.0.1:8333")
        self.endpoint = endpoint
        self.bucket = bucket
        self.region = region
        # few, short retries: a stopped store must fail in seconds with a clear message,
        # not hang the CLI for minutes inside urllib3's default backoff
        http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=min(5.0, timeout_s), read=timeout_s),
            retries=urllib3.Retry(
                total=retries, backoff_factor=0.2, status_forcelist=(500, 502, 503, 504), allowed_methods=None
            ),
            maxsize=8,
        )
        try:
            self._client = Minio(
                parsed.netloc,
                access_key=access_key or None,
                secret_key=secret_key or None,
                secure=parsed.scheme == "https",
                region=region,
                http_client=http,
            )
        except ValueError as exc:  # "invalid port", "username in endpoint is not allowed", ...
            raise StoreError(
                f"S3 endpoint {endpoint!r} is not a URL like http://127.0.0.1:8333 ({exc})"
            ) from exc

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_env(cls, settings: DataSettings | None = None) -> ObjectStore:
        """Build from ``CXR_S3_*``; keys missing there are read from ``<stack>/credentials.json``."""
        settings = settings or get_settings()
        access, secret = settings.s3_keys()
        return cls(settings.s3_endpoint, access, secret, settings.s3_bucket, settings.s3_region)

    # ------------------------------------------------------------------ errors

    @contextmanager
    def _errors(self, action: str) -> Iterator[None]:
        try:
            yield
        except S3Error as exc:
            raise StoreError(f"S3 {self.endpoint} refused to {action}: {exc.code} {exc.message}") from exc
        except (MinioException, urllib3.exceptions.HTTPError, OSError, ValueError) as exc:
            raise StoreError(
                f"S3 {self.endpoint} unreachable while trying to {action} ({type(exc).__name__}: {exc}); "
                "is the stack running (`cxr stack up`) and CXR_S3_ENDPOINT right?"
            ) from exc

    # ------------------------------------------------------------------ buckets / objects

    def ensure_bucket(self) -> None:
        """Create the bucket if it does not exist (idempotent)."""
        with self._errors(f"create bucket {self.bucket}"):
            if not self._client.bucket_exists(self.bucket):
                self._client.make_bucket(self.bucket)

    def put_bytes(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        """Write one object, recording its sha256 in the object's metadata."""
        meta: dict[str, str | list[str] | tuple[str]] = {_SHA_META: hashlib.sha256(data).hexdigest()}
        with self._errors(f"write {key}"):
            self._client.put_object(
                self.bucket, key, io.BytesIO(data), len(data), content_type=content_type, metadata=meta
            )

    def put_file(self, key: str, path: Path, content_type: str = "application/octet-stream") -> None:
        """Upload a file, recording its sha256 in the object's metadata."""
        meta: dict[str, str | list[str] | tuple[str]] = {_SHA_META: file_sha256(Path(path))}
        with self._errors(f"upload {path} to {key}"):
            self._client.fput_object(self.bucket, key, str(path), content_type=content_type, metadata=meta)

    def get_bytes(self, key: str) -> bytes:
        """Read one object whole."""
        with self._errors(f"read {key}"):
            response = self._client.get_object(self.bucket, key)
            try:
                return response.read()
            finally:
                response.close()
                response.release_conn()

    def get_file(self, key: str, dest: Path) -> Path:
        """Download one object to ``dest`` (parents created)."""
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        with self._errors(f"download {key}"):
            self._client.fget_object(self.bucket, key, str(dest))
        return dest

    def exists(self, key: str) -> bool:
        """True when the object exists."""
        return self._stat_sha(key) is not False

    def _stat_sha(self, key: str) -> str | bool | None:
        """The stored sha256 (None if the object has none), or False when there is no object."""
        try:
            with self._errors(f"look up {key}"):
                stat = self._client.stat_object(self.bucket, key)
        except StoreError as exc:
            if is_missing(exc):
                return False
            raise
        meta = {k.lower(): v for k, v in (stat.metadata or {}).items()}
        return meta.get(f"x-amz-meta-{_SHA_META}")

    def list_prefix(self, prefix: str) -> list[str]:
        """Object names under ``prefix``, recursively, sorted."""
        return [info.name for info in self.list_objects(prefix)]

    def list_objects(self, prefix: str) -> list[ObjectInfo]:
        """Objects under ``prefix`` with their sizes, sorted by name."""
        with self._errors(f"list {prefix}"):
            items = [
                ObjectInfo(obj.object_name, int(obj.size or 0))
                for obj in self._client.list_objects(self.bucket, prefix=prefix, recursive=True)
                if obj.object_name and not obj.is_dir
            ]
        return sorted(items, key=lambda o: o.name)

    def delete_prefix(self, prefix: str) -> int:
        """Delete everything under ``prefix``; returns how many objects went."""
        names = self.list_prefix(prefix)
        with self._errors(f"delete {prefix}"):
            for name in names:
                self._client.remove_object(self.bucket, name)
        return len(names)

    # ------------------------------------------------------------------ folders

    def upload_dir(self, directory: Path, prefix: str, *, skip: set[str] | None = None) -> int:
        """Upload every file under ``directory`` to ``prefix``; returns how many were sent.

        Idempotent: a file whose sha256 equals the one recorded on the existing
        object is not sent again, so re-running an interrupted upload is cheap.
        """
        directory = Path(directory)
        prefix = prefix.rstrip("/") + "/" if prefix else ""
        # one listing instead of a HEAD per file: only objects that exist need their hash checked
        existing = {o.name: o.size for o in self.list_objects(prefix)}

        def send(path: Path) -> bool:
            key = prefix + path.relative_to(directory).as_posix()
            if (
                key in existing
                and existing[key] == path.stat().st_size
                and self._stat_sha(key) == file_sha256(path)
            ):
                return False
            self.put_file(key, path)
            return True

        files = [
            p
            for p in sorted(directory.rglob("*"))
            if p.is_file() and not (skip and p.relative_to(directory).as_posix() in skip)
        ]
        # uploads are latency-bound; a few threads (the minio client is thread-safe) cut a
        # 15k-file dataset from minutes to seconds
        with ThreadPoolExecutor(max_workers=8) as pool:
            sent = sum(pool.map(send, files))
        log.info("event=upload_dir prefix=%s files=%d sent=%d", prefix, len(files), sent)
        return sent

    def download_prefix(self, prefix: str, dest: Path) -> list[Path]:
        """Download every object under ``prefix`` into ``dest`` keeping relative paths.

        Files already present with the object's size are kept (cheap resume);
        callers that need certainty verify hashes against a manifest.
        """
        dest = Path(dest)
        prefix = prefix.rstrip("/") + "/" if prefix else ""
        paths: list[Path] = []
        for obj in self.list_objects(prefix):
            rel = obj.name[len(prefix) :]
            if not rel or rel.startswith("/") or ".." in Path(rel).parts:
                continue  # never write outside dest, whatever the store holds
            target = dest / rel
            if not (target.exists() and target.stat().st_size == obj.size):
                self.get_file(obj.name, target)
            paths.append(target)
        return paths
