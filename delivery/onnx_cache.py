"""The delivery ONNX cache: a registered version's file, checked against its lineage tag, downloaded once.

Reconcile builds Triton repositories from this cache and ``cxr promote`` measures latency and runs
the golden gate on it (``delivery.promote``'s ``onnx_for``), so what it hands out must be the very
bytes the registry recorded when the version was registered:

- **Keyed by model name and sha256**: ``<cache>/<model name>/<sha256>/<registry>-v<version>/model.onnx``,
  the sha256 being the version's lineage tag (``onnx_sha256`` for fp32, ``variant_<name>_sha256``
  for int8 and fp16-trt, which are files of their own) and ``<registry>`` a short hash of the
  tracking URI. A stage file naming another model, another ``CXR_MLFLOW_URI``, or a registry reset
  that reuses a version number for another file, all lead to another folder: the file of another
  model is never served under this one's number. The last level keeps each version's
  ``operating_points.json`` (an artifact of the version, not of the file) its own, also when two
  versions registered the same bytes.
- **Verified**: a downloaded file whose sha256 differs from the tag is refused
  (:class:`OnnxIntegrityError`) before anything serves or evaluates it, and nothing is cached; a
  cached file is hashed again on every fetch and downloaded afresh when it no longer matches.
- **Written atomically**: downloaded into a scratch folder of this call's own beside the target,
  fsync'd, renamed into place, then the folder fsync'd (:mod:`core.durable`): a reader sees the
  whole file or none, also after a crash.

A version registered before its file's hash was tagged (no ``onnx_sha256``, or a variant without
its ``variant_<name>_sha256``) cannot be verified: it falls back to model name + registry +
version + variant, ``<cache>/<model name>/untagged-<variant>/<registry>-v<version>/model.onnx``,
and is logged as unverified. Files of the older layout (``<cache>/<version>[/<variant>]``, keyed
by the version number alone) are never read.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from pathlib import Path

from core.durable import fsync_dir, make_dirs, replace_durably
from core.hashing import file_sha256
from core.operating_points import OPERATING_POINTS_FILE
from core.scratch import scratch_dir
from core.variants import DEFAULT_VARIANT, Variant, variant_tag
from delivery.errors import DeliveryError
from training.errors import RegistryUnreachable
from training.registry import ONNX_FILE, ModelRegistry

log = logging.getLogger(__name__)

#: the lineage tag holding the fp32 export's sha256 (training/registry.py ``LineageTags``)
ONNX_SHA256_TAG = "onnx_sha256"
_SHA256 = re.compile(r"[0-9a-f]{64}")
#: beside a cached file: which variant it is (a sha256-named folder does not say; cached_offline needs it)
VARIANT_FILE = "variant"


class OnnxIntegrityError(DeliveryError):
    """A version's ONNX file is not the one its lineage tag records: it is neither served nor evaluated."""


def sha256_tag(variant: Variant) -> str:
    """The version tag recording the sha256 of ``variant``'s file."""
    return ONNX_SHA256_TAG if variant == DEFAULT_VARIANT else variant_tag(variant, "sha256")


def recorded_sha256(registry: ModelRegistry, version: str, variant: Variant = DEFAULT_VARIANT) -> str:
    """The sha256 the registry recorded for the version's ``variant`` file; "" when it recorded none."""
    recorded = registry.facts(version).tags.get(sha256_tag(variant), "").strip().lower()
    if recorded and not _SHA256.fullmatch(recorded):
        raise OnnxIntegrityError(
            f"{registry.model_name} v{version} ({variant}): its tag {sha256_tag(variant)}={recorded[:80]!r} "
            "is not a sha256, so its file cannot be checked; fix the tag in MLflow or re-register the model"
        )
    return recorded


def _safe_name(name: str) -> str:
    """A model name as one folder name; a name that had to be changed gets a hash of itself appended."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", name)
    if safe == name and name not in ("", ".", ".."):
        return name
    return f"{safe}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"


def cache_folder(cache: Path, registry: ModelRegistry, version: str, variant: Variant, sha256: str) -> Path:
    """Where the version's ``variant`` file lives in the cache (see the module docstring)."""
    model = cache / _safe_name(registry.model_name)
    return model / (sha256 or f"untagged-{variant}") / _version_dir(registry, version)


def _version_dir(registry: ModelRegistry, version: str) -> str:
    """The last level of :func:`cache_folder`: the registry (a hash of its address) and the version."""
    return f"{hashlib.sha256(registry.tracking_uri.encode()).hexdigest()[:12]}-v{version}"


def _mismatch(registry: ModelRegistry, version: str, variant: Variant, expected: str, actual: str) -> str:
    return (
        f"{registry.model_name} v{version} ({variant}) from MLflow at {registry.tracking_uri}: the ONNX "
        f"downloaded has sha256 {actual[:12]}, but the version's lineage tag {sha256_tag(variant)} records "
        f"{expected[:12]}; it was not served or evaluated. The artifact was changed after the version was "
        "registered (or the tag was): check the run's artifacts in the artifact store, and re-register the "
        "model (`cxr train run`) to serve a new file as a new version"
    )


def _install(downloaded: Path, target: Path) -> None:
    """Rename the finished download into place: its bytes on disk first, then the name made durable."""
    with downloaded.open("rb") as fh:
        os.fsync(fh.fileno())
    os.replace(downloaded, target)
    fsync_dir(target.parent)


def fetch_onnx(
    registry: ModelRegistry, version: str, cache: Path, variant: Variant = DEFAULT_VARIANT
) -> Path:
    """The version's ONNX of ``variant``, verified against its lineage tag, its operating points beside it.

    Downloaded once per (model name, sha256, registry, version) and hashed again on each call; raises
    :class:`OnnxIntegrityError` when the registry's file is not the one its tag records. The
    repository builder takes ``operating_points.json`` from beside the ONNX into the model config,
    so every repository built from the cache carries the thresholds of that very file (they record
    the sha256 they were measured on). A version without a hash tag (registered before it was
    recorded) is cached per (model name, registry, version, variant) and served unverified (the
    module docstring).
    """
    try:
        expected = recorded_sha256(registry, version, variant)
    except RegistryUnreachable:
        held = cached_offline(cache, registry, version, variant)
        if held is None:
            raise
        return held
    folder = cache_folder(cache, registry, version, variant, expected)
    target = folder / ONNX_FILE
    if expected and target.exists() and file_sha256(target) != expected:
        # a damaged cache (a crash before the rename was durable, a hand edit): fetch the file again
        log.warning("onnx_cache_mismatch path=%s expected=%s: downloading again", target, expected[:12])
        target.unlink(missing_ok=True)
    # A download folder of this call's own (core.scratch): the reconcile watcher and a
    # `cxr promote` fetch the same version at the same moment (the pipeline promotes to staging,
    # then the next stage is asked for at once). MLflow writes a download in place, so with one
    # shared folder one fetcher renamed a file the other was still writing: a truncated ONNX in
    # the cache ("Protobuf parsing failed" in the golden gate). Each fetcher renames its finished
    # file into place, atomically; the second rename puts the same bytes there again.
    if not target.exists():
        make_dirs(folder)
        with scratch_dir(folder, "download-") as tmp:
            downloaded = registry.download_onnx(version, tmp, variant)
            if expected:
                actual = file_sha256(downloaded)
                if actual != expected:
                    raise OnnxIntegrityError(_mismatch(registry, version, variant, expected, actual))
            else:
                log.warning(
                    "onnx_unverified model=%s version=%s variant=%s: no %s tag to check the file against",
                    registry.model_name,
                    version,
                    variant,
                    sha256_tag(variant),
                )
            _install(downloaded, target)
    if not (folder / VARIANT_FILE).exists():  # which variant the file is, for cached_offline
        replace_durably(folder / VARIANT_FILE, variant.encode())
        fsync_dir(folder)
    _fetch_operating_points(registry, version, folder, variant)
    return target


def cached_offline(cache: Path, registry: ModelRegistry, version: str, variant: Variant) -> Path | None:
    """The version's cached ``variant`` file while MLflow does not answer, or None.

    Serving must not stop because the registry is down (a Triton restarted, a rollback to a cached
    version): a file in the cache whose bytes still equal the sha256 its folder is named after (the
    tag it was checked against when it was fetched) is used, with a warning. A version fetched
    without a tag, or a file that no longer matches, is not: MLflow must answer for those.
    """
    model = cache / _safe_name(registry.model_name)
    for target in sorted(model.glob(f"*/{_version_dir(registry, version)}/{ONNX_FILE}")):
        folder = target.parent
        sha = folder.parent.name
        marker = folder / VARIANT_FILE
        if not _SHA256.fullmatch(sha) or not marker.exists() or marker.read_text().strip() != variant:
            continue
        if file_sha256(target) == sha:
            log.warning(
                "onnx_cache_offline model=%s version=%s variant=%s sha256=%s: MLflow unreachable, "
                "serving the cached file checked against its tag when fetched",
                registry.model_name,
                version,
                variant,
                sha[:12],
            )
            return target
    return None


def _fetch_operating_points(registry: ModelRegistry, version: str, folder: Path, variant: Variant) -> None:
    """Once per cached version: its artifact, or a marker that it has none (trained before them)."""
    path = folder / OPERATING_POINTS_FILE
    absent = folder / f"{OPERATING_POINTS_FILE}.absent"
    if path.exists() or absent.exists():
        return
    with scratch_dir(folder, "download-") as tmp:
        downloaded = registry.download_operating_points(version, tmp, variant)
        if downloaded is None:
            log.info("operating_points_absent version=%s: global threshold, raw confidences", version)
            absent.touch()
        else:
            _install(downloaded, path)
