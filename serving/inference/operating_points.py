"""Where the gateway finds a served version's operating points, and how it checks they are that model's.

Training writes ``operating_points.json`` beside the ONNX (:mod:`core.operating_points`). The
Triton repository builder copies it into ``config.pbtxt`` (parameter ``cxr_operating_points``),
where the Triton backend reads it with the contract; the in-process ONNX backend reads the file
beside its model. Either way the artifact names the sha256 of the ONNX it was measured on, and a
file that belongs to another model is ignored rather than applied to the wrong one.

A version without operating points (trained before them) is served as before: the global
``CXR_CONF_THRESHOLD`` and raw scores; ``/v1/models`` says so.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from core.hashing import file_sha256
from core.operating_points import (
    CONFIG_PARAMETER,
    OPERATING_POINTS_FILE,
    OperatingPoints,
    OperatingPointsError,
)

log = logging.getLogger(__name__)


def beside(onnx_path: Path, onnx_sha256: str | None = None) -> OperatingPoints | None:
    """``operating_points.json`` next to the ONNX file, if it exists and was measured on that very file.

    A malformed file is an error (a model shipped with broken thresholds must not start);
    one measured on another model is ignored with a warning.
    """
    path = onnx_path.parent / OPERATING_POINTS_FILE
    if not path.is_file():
        return None
    ops = OperatingPoints.from_json(path.read_bytes())
    digest = onnx_sha256 or file_sha256(onnx_path)
    if ops.onnx_sha256 and ops.onnx_sha256 != digest:
        log.warning(
            "operating_points_ignored path=%s reason=measured_on_another_model expected=%s got=%s",
            path,
            ops.onnx_sha256[:12],
            digest[:12],
        )
        return None
    return ops


def from_parameters(params: dict[str, str]) -> OperatingPoints | None:
    """The operating points a Triton model config carries (None when the version has none).

    The builder validated them, so a malformed value here means a hand-edited config: logged,
    and the version is served as one without operating points rather than not at all.
    """
    text = params.get(CONFIG_PARAMETER)
    if not text:
        return None
    try:
        return OperatingPoints.from_json(text)
    except OperatingPointsError as exc:
        log.error("operating_points_malformed parameter=%s error=%s", CONFIG_PARAMETER, exc)
        return None


def describe(ops: OperatingPoints | None, global_threshold: float) -> dict[str, Any]:
    """The ``operating_points`` entry of a stage in ``/v1/models``."""
    if ops is None:
        return {
            "status": "none",
            "note": f"this version has no operating points (trained before them): the global threshold "
            f"{global_threshold} applies and confidences are the model's raw scores",
        }
    return {"status": "applied", "sha256": ops.sha256(), **ops.summary()}
