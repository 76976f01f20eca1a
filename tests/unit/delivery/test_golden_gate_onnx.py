"""The golden gate evaluates only the versions' own files: ``cxr promote``'s ``onnx_for`` (the ONNX cache).

The golden set and the evaluation are stand-ins: what matters is which bytes would be evaluated.
Its real counterpart, with MLflow, S3 and the evaluation: tests/integration/delivery/test_golden_gate.py.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from core.variants import Variant
from delivery import golden_gate as gg
from delivery.onnx_cache import OnnxIntegrityError
from delivery.policy import GoldenPolicy
from delivery.reconcile import fetch_onnx  # what delivery/promote.py's onnx_for calls
from tests.unit.delivery.registry_support import TaggedRegistry, sha256

pytestmark = pytest.mark.unit


class Evaluated(Exception):
    """Stops the gate once a model would have been evaluated."""


@pytest.fixture
def evaluated(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """The ONNX bytes the gate evaluates, in order; the first evaluation ends the gate."""
    seen: list[bytes] = []

    def golden_results(onnx: Path, golden: object, cache_dir: Path, version: str) -> Any:
        seen.append(onnx.read_bytes())
        raise Evaluated

    monkeypatch.setattr(gg, "open_golden", lambda *a: SimpleNamespace(version="golden-1"))
    monkeypatch.setattr(gg, "golden_results", golden_results)
    return seen


def _gate(tmp_path: Path, registry: TaggedRegistry) -> gg.GoldenVerdict:
    def onnx_for(version: str, variant: Variant) -> Path:  # as delivery/promote.py's
        return fetch_onnx(registry, version, tmp_path / "onnx", variant)  # type: ignore[arg-type]

    return gg.golden_gate(
        gitops_dir=tmp_path / "gitops",
        cache_dir=tmp_path / "golden",
        policy=GoldenPolicy(),
        candidate="3",
        production="2",
        onnx_for=onnx_for,
    )


def test_golden_gate_refuses_a_candidate_whose_bytes_differ_from_its_tag_and_evaluates_nothing(
    tmp_path: Path, evaluated: list[bytes]
) -> None:
    registry = TaggedRegistry().register("2", b"production").register("3", b"candidate")
    registry.swap("3", b"candidate swapped after the gates")
    with pytest.raises(OnnxIntegrityError, match=sha256(b"candidate")[:12]):
        _gate(tmp_path, registry)
    assert evaluated == []


def test_golden_gate_does_not_evaluate_a_cached_file_of_another_model_name_or_registry(
    tmp_path: Path, evaluated: list[bytes]
) -> None:
    for registry in (
        TaggedRegistry().register("3", b"candidate A"),
        TaggedRegistry().register("3", b"candidate B after a registry reset"),
        TaggedRegistry("cxr-other").register("3", b"candidate C of another model"),
    ):
        registry.register("2", b"production")
        with pytest.raises(Evaluated):
            _gate(tmp_path, registry)
    assert evaluated == [
        b"candidate A",
        b"candidate B after a registry reset",
        b"candidate C of another model",
    ]
