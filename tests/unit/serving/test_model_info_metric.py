"""``cxr_model_info`` says which model AND which serving variant each stage serves, one series per stage."""

from __future__ import annotations

import pytest
from prometheus_client import generate_latest

from serving.metrics import GatewayMetrics

pytestmark = pytest.mark.unit


def _series(metrics: GatewayMetrics) -> list[str]:
    text = generate_latest(metrics.registry).decode()
    return sorted(line for line in text.splitlines() if line.startswith("cxr_model_info{"))


def test_a_new_variant_of_the_same_version_replaces_the_stage_series() -> None:
    metrics = GatewayMetrics()
    metrics.set_model_info("staging", "cxr-detector", "3", "fp32")
    metrics.set_model_info("production", "cxr-detector", "2", "fp32")
    metrics.set_model_info("staging", "cxr-detector", "3", "int8")
    assert _series(metrics) == [
        'cxr_model_info{model_name="cxr-detector",model_version="2",stage="production",variant="fp32"} 1.0',
        'cxr_model_info{model_name="cxr-detector",model_version="3",stage="staging",variant="int8"} 1.0',
    ]
