"""The whole canary loop on real parts: gateway, two Tritons, Prometheus, MLflow, a git repo.

A model that never detects anything is promoted to canary and given 50 % of traffic; real
requests flow through the gateway, Prometheus scrapes it, ``canary step`` judges the PromQL,
fails the canary and commits the rollback, and no request reaches the canary afterwards. A
healthy canary then climbs 10 -> 50 -> 100 and becomes production, one commit per step.
"""

from __future__ import annotations

import io
import secrets
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from core.stage_file import read_stage_file, write_stage_file
from delivery.canary import PrometheusClient, build_queries
from delivery.canary_step import step
from delivery.canary_window import current_window
from delivery.context import DeliveryContext
from delivery.git_repo import GitOpsRepo
from delivery.messages import DeliveryRecord, parse_record
from delivery.policy import load_policy
from delivery.promote import PromotionRequest, promote_version
from serving.inference.triton_repo import TritonAdmin
from tests.integration.delivery.gitops_helpers import (
    git,
    init_gitops_repo,
    register_version,
    start_gateway,
    tiny_detector,
)
from training.registry import ModelRegistry

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# Latency is not what this test judges (test_gitops_canary_prometheus fails a slow canary at
# ratio > 10): on a shared 2-core machine one canary p95 can exceed production's by 1.5x by chance.
POLICY_YAML = """\
canary:
  window: 30s
  min_requests: 10
  max_p95_ratio: 5.0
  weights: [10, 50, 100]
golden:
  required: false  # this test judges canary traffic; test_golden_gate judges the golden-set comparison
"""


def png(seed: int) -> bytes:
    """A distinct 64x64 PNG per seed (the gateway routes by image hash: each lands in its own bucket)."""
    pixels = np.random.default_rng(seed).integers(0, 255, (64, 64), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def send(gateway: str, seeds: range) -> list[tuple[str, int]]:
    """(stage, number of detections) per request."""
    answers = []
    with httpx.Client(base_url=gateway, timeout=30) as client:
        for seed in seeds:
            response = client.post("/v1/detect", content=png(seed), headers={"Content-Type": "image/png"})
            assert response.status_code == 200, response.text
            answers.append((response.headers["X-CXR-Stage"], len(response.json()["detections"])))
    return answers


def send_until_prometheus_sees(
    gateway: str, first_seed: int, prometheus_url: str, minimum: float, gitops: Path, timeout_s: float = 90
) -> list[tuple[str, int]]:
    """Traffic in small batches until the canary-requests query ``canary step`` runs reaches ``minimum``.

    Traffic must span several scrapes: increase() does not count a series' first sample, so a
    burst that ends before the second scrape would look like no traffic at all. The window is
    the one step uses: the policy's, cut to the current canary version's age.
    """
    policy = load_policy(gitops).canary
    client = PrometheusClient(prometheus_url)
    answers: list[tuple[str, int]] = []
    deadline = time.monotonic() + timeout_s
    seed = first_seed
    while time.monotonic() < deadline:
        answers += send(gateway, range(seed, seed + 10))
        seed += 10
        value = client.scalar(build_queries(current_window(policy, gitops).window)["canary-requests"])
        if value is not None and value >= minimum:
            return answers
        time.sleep(0.5)
    raise AssertionError(f"Prometheus never saw {minimum} canary requests ({len(answers)} sent)")


def test_bad_canary_is_rolled_back_and_good_canary_reaches_production(
    mlflow_server: Any, triton_factory: Any, prometheus_factory: Any, tmp_path: Path
) -> None:
    # [1] a GitOps repo, three registered models, the stage Tritons
    name = f"cxr-detector-canary-{secrets.token_hex(3)}"
    root = init_gitops_repo(tmp_path / "gitops", name, POLICY_YAML)
    good = register_version(mlflow_server.uri, name, tiny_detector(tmp_path / "a" / "model.onnx", score=0.9))
    blind = register_version(mlflow_server.uri, name, tiny_detector(tmp_path / "b" / "model.onnx", score=0.0))
    better = register_version(
        mlflow_server.uri, name, tiny_detector(tmp_path / "c" / "model.onnx", score=0.85)
    )
    stack = (tmp_path / "stack").resolve()
    tritons = {s: triton_factory(s, stack / "triton" / s) for s in ("production", "canary")}
    ctx = DeliveryContext(
        gitops_dir=root,
        mlflow_uri=mlflow_server.uri,
        prometheus_url="http://127.0.0.1:9",
        stack_dir=stack,
        model_name=name,
        triton_urls=tuple((s, t.http_url) for s, t in tritons.items()),
    )
    registry = ModelRegistry(mlflow_server.uri, name)
    quiet: dict[str, Any] = {"registry": registry, "echo": lambda _: None}
    promote_version(
        ctx, PromotionRequest(good, "production", force=True, reason="bootstrap", publish=False), **quiet
    )

    # [2] the real gateway, following the stage files of that repo, scraped by Prometheus
    urls = {stage: triton.http_url for stage, triton in tritons.items()}
    gateway, base = start_gateway(root, stack, name, urls, mlflow_server.uri, tmp_path / "gateway.log")
    try:
        # [3] the blind model as canary at weight 50 (promote sets 10; an operator's step commit sets 50)
        promote_version(ctx, PromotionRequest(blind, "canary", publish=False), **quiet)
        bumped = read_stage_file(root, "canary").model_copy(update={"canary_weight": 50})
        GitOpsRepo(root).commit(
            [write_stage_file(root, bumped)],
            DeliveryRecord(
                action="canary-step",
                model_name=name,
                stage="canary",
                from_version=blind,
                to_version=blind,
                canary_weight=50,
            ),
        )
        prometheus = prometheus_factory([base.removeprefix("http://")])
        ctx_live = DeliveryContext(**{**ctx.__dict__, "prometheus_url": prometheus.url})
        answers = send_until_prometheus_sees(base, 0, prometheus.url, 10, root)
        canary_answers = [d for s, d in answers if s == "canary"]
        assert 0.25 < len(canary_answers) / len(answers) < 0.75  # weight 50, sticky by image hash
        assert set(canary_answers) == {0}
        assert all(d > 0 for s, d in answers if s == "production")

        outcome = step(ctx_live, publish=False, **quiet)
        assert outcome.action == "rollback", outcome.message
        assert read_stage_file(root, "canary").canary_weight == 0
        assert read_stage_file(root, "production").model_version == good
        record = parse_record(git(root, "log", "-1", "--format=%B"))
        assert record is not None and record.action == "rollback" and record.rolled_back_version == blind
        assert not TritonAdmin(tritons["canary"].http_url).is_ready(name)  # the stack followed the file
        after = send(base, range(1000, 1040))
        assert {s for s, _ in after} == {"production"}, "traffic reached the rolled-back canary"

        # [4] a healthy canary climbs 10 -> 50 -> 100 and becomes production, one commit per move
        promote_version(ctx, PromotionRequest(better, "canary", publish=False), **quiet)
        # the same Prometheus still holds the blind canary's samples in a 30 s window: step
        # judges only what this version served since its promote commit (canary_window)
        head = git(root, "rev-parse", "HEAD").strip()
        answers = send_until_prometheus_sees(base, 2000, prometheus.url, 10, root)
        assert all(d > 0 for _, d in answers)
        outcomes = [step(ctx_live, publish=False, **quiet) for _ in range(3)]
        assert [o.action for o in outcomes] == ["increase", "increase", "promote"], [
            (o.action, o.message, o.analysis.lines() if o.analysis else None) for o in outcomes
        ]
        assert read_stage_file(root, "production").model_version == better
        assert read_stage_file(root, "canary").canary_weight == 0
        subjects = git(root, "log", "--format=%s", f"{head}..HEAD").splitlines()
        assert subjects == [
            f"promote {name} {better} to production (was {good})",
            f"canary step: {name} {better} weight 100%",
            f"canary step: {name} {better} weight 50%",
        ]
        served = send(base, range(3000, 3010))
        assert {s for s, _ in served} == {"production"}
    finally:
        gateway.stop()
