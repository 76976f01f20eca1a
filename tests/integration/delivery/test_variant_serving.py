"""A serving variant end to end on real parts: MLflow, a git repo, a stage Triton and the gateway.

An INT8 file quantized by the project's own code is attached to a registered version; promoted
with ``--variant int8`` it passes the variant gate, the stage file names it, the stage's Triton
loads that very file and the gateway's answer says ``int8``. Going back to fp32 of the same
version reloads the Triton (a new variant is a new file). A version whose INT8 lost more mAP
than the policy allows is refused with its figures and changes nothing.
"""

from __future__ import annotations

import io
import secrets
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnx
import pytest
from PIL import Image

from core.hashing import file_sha256
from core.stage_file import read_stage_file
from delivery.context import DeliveryContext
from delivery.errors import GateFailed
from delivery.promote import PromotionRequest, promote_version
from tests.integration.delivery.gitops_helpers import (
    IMGSZ,
    git,
    init_gitops_repo,
    register_version,
    start_gateway,
    tiny_detector,
)
from training.config import EvalConfig
from training.errors import RegistryError
from training.predictors import OrtPredictor
from training.quantize import quantize_int8
from training.registry import ModelRegistry
from training.variants import VariantFigures, parity

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def png(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (IMGSZ, IMGSZ), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def attach_int8(registry: ModelRegistry, version: str, fp32: Path, work: Path, map50_drop: float) -> Path:
    """Quantize ``fp32`` for real and attach it; the mAP drop is this test's input (no dataset here)."""
    images = []
    for seed in range(4):
        path = work / "calibration" / f"{seed}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(png(seed))
        images.append(path)
    folder = work / "int8"
    result = quantize_int8(fp32, folder / "model.onnx", images)
    measured = parity(OrtPredictor.load(fp32), OrtPredictor.load(result.onnx_path), images, EvalConfig())
    figures = VariantFigures(
        variant="int8",
        sha256=result.sha256,
        map50=0.40 - map50_drop,
        map40=0.35,
        map50_drop=map50_drop,
        map40_drop=0.0,
        score_max_abs_diff=measured.score_max_abs_diff,  # measured: the gate judges the real figures
        finding_agreement=measured.finding_agreement,
        latency_ms_b1=None,
        latency_ms_b8=None,
    )
    registry.attach_variant(version, "int8", folder, figures.tags())
    return result.onnx_path


def test_an_int8_variant_that_passes_is_served_and_named_and_one_over_the_limit_is_refused(
    mlflow_server: Any, triton_factory: Any, tmp_path: Path
) -> None:
    name = f"cxr-detector-variant-{secrets.token_hex(3)}"
    root = init_gitops_repo(tmp_path / "gitops", name)
    registry = ModelRegistry(mlflow_server.uri, name)
    fp32 = tiny_detector(tmp_path / "good" / "model.onnx", score=0.9)
    good = register_version(mlflow_server.uri, name, fp32)
    int8_file = attach_int8(registry, good, fp32, tmp_path / "good", map50_drop=0.004)
    worse_fp32 = tiny_detector(tmp_path / "worse" / "model.onnx", score=0.8)
    worse = register_version(mlflow_server.uri, name, worse_fp32)
    attach_int8(registry, worse, worse_fp32, tmp_path / "worse", map50_drop=0.05)
    # a version's variant files are immutable: the same file again is fine, another one is refused
    attach_int8(registry, good, fp32, tmp_path / "good-again", map50_drop=0.004)
    with pytest.raises(RegistryError, match=r"already carries a int8 variant.*immutable"):
        attach_int8(registry, good, worse_fp32, tmp_path / "other", map50_drop=0.004)

    stack = (tmp_path / "stack").resolve()
    triton = triton_factory("staging", stack / "triton" / "staging")
    ctx = DeliveryContext(
        gitops_dir=root,
        mlflow_uri=mlflow_server.uri,
        prometheus_url="http://127.0.0.1:9",
        stack_dir=stack,
        model_name=name,
        triton_urls=(("staging", triton.http_url),),
    )
    lines: list[str] = []

    def promote(version: str, variant: str) -> Any:
        request = PromotionRequest(version, "staging", variant=variant)  # type: ignore[arg-type]
        return promote_version(ctx, request, registry=registry, echo=lines.append)

    # [1] the INT8 that passes: gate, stage file, commit, and the Triton serving that very file
    out = promote(good, "int8")
    assert any(line.startswith("- variant int8: pass (mAP@0.5 drop +0.0040") for line in lines)
    assert read_stage_file(root, "staging").variant == "int8"
    assert (
        git(root, "log", "-1", "--format=%s").strip() == f"promote {name} {good} (int8) to staging (was none)"
    )
    assert out.applied is not None and out.applied.action == "loaded"
    served = triton.repo_dir / name / good / "model.onnx"
    assert file_sha256(served) == file_sha256(int8_file)
    assert "QuantizeLinear" in {n.op_type for n in onnx.load(str(served)).graph.node}

    # [2] the gateway says which variant answered: body, header and /v1/models
    tritons = {"staging": triton.http_url}
    gateway, base = start_gateway(root, stack, name, tritons, mlflow_server.uri, tmp_path / "gateway.log")
    try:
        with httpx.Client(base_url=base, timeout=60) as client:

            def detect(seed: int) -> httpx.Response:
                headers = {"Content-Type": "image/png", "X-CXR-Stage": "staging"}
                response = client.post("/v1/detect", content=png(seed), headers=headers)
                assert response.status_code == 200, response.text
                return response

            answer = detect(10)
            body = answer.json()
            assert body["model"] == {"name": name, "version": good, "stage": "staging", "variant": "int8"}
            assert answer.headers["X-CXR-Model-Variant"] == "int8"
            assert body["detections"], "the INT8 tiny detector still finds its box"
            staging = client.get("/v1/models").json()["stages"]["staging"]
            assert (staging["variant"], staging["routing_variant"]) == ("int8", "int8")

            # [3] back to fp32 of the same version: a new file, so the Triton reloads and says fp32
            out = promote(good, "fp32")
            assert out.applied is not None and out.applied.action == "loaded"
            assert file_sha256(served) == file_sha256(fp32)
            client.post("/v1/routing/reload")
            assert detect(11).json()["model"]["variant"] == "fp32"
    finally:
        gateway.stop()

    # [4] an INT8 that lost more than the policy allows is refused with its figures; nothing moves
    head = git(root, "rev-parse", "HEAD")
    with pytest.raises(GateFailed, match="variant int8"):
        promote(worse, "int8")
    assert any("- variant int8: FAIL (mAP@0.5 drop +0.0500" in line for line in lines)
    assert git(root, "rev-parse", "HEAD") == head
    assert read_stage_file(root, "staging").model_version == good
