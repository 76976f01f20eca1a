"""Build a serving variant of a registered version and record its figures against fp32.

Only ``int8`` can be built here (ONNX Runtime static QDQ on the CPU, :mod:`training.quantize`);
``fp16-trt`` needs ONNX Runtime's TensorRT provider on a GPU machine and is refused with that
said. The variant is evaluated with the same code, settings and test images as the fp32
export, gets its own operating points chosen on val (thresholds and calibrator belong to one
file: the gateway refuses points measured on another sha256), and its figures become version
tags that delivery's variant gate reads (``core/variants.py`` names them).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from core.variants import VARIANTS_TAG, Variant, variant_tag
from training.config import EvalConfig
from training.dataset import DatasetRef
from training.errors import TrainingError
from training.evaluate import EvalReport
from training.operating_points import operating_points_on_split, write_operating_points
from training.predictors import OrtPredictor
from training.quantize import Int8Outcome, quantize_and_evaluate

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class VariantFigures:
    """A variant measured beside its fp32 export on the same test images."""

    variant: Variant
    sha256: str
    map50: float
    map40: float
    map50_drop: float
    map40_drop: float
    score_max_abs_diff: float  # parity: max |fp32 - variant| class score on the calibration (val) images
    latency_ms_b1: float | None
    latency_ms_b8: float | None

    @classmethod
    def of_int8(cls, outcome: Int8Outcome) -> VariantFigures:
        fp32, int8 = outcome.fp32_report, outcome.report
        return cls(
            variant="int8",
            sha256=outcome.result.sha256,
            map50=int8.map50,
            map40=int8.map40,
            map50_drop=fp32.map50 - int8.map50,
            map40_drop=fp32.map40 - int8.map40,
            score_max_abs_diff=outcome.result.score_max_abs_diff,
            latency_ms_b1=int8.latency_ms_b1,
            latency_ms_b8=int8.latency_ms_b8,
        )

    def tags(self, carried: str = "fp32") -> dict[str, str]:
        """Version tags: each figure under ``variant_<name>_<figure>``, and the updated variants list.

        ``carried``: the version's ``variants`` tag before this one was added.
        """
        figures = {
            "sha256": self.sha256,
            "map50": round(self.map50, 6),
            "map40": round(self.map40, 6),
            "map50_drop": round(self.map50_drop, 6),
            "map40_drop": round(self.map40_drop, 6),
            "score_max_abs_diff": round(self.score_max_abs_diff, 6),
            "latency_ms_b1": self.latency_ms_b1,
            "latency_ms_b8": self.latency_ms_b8,
        }
        names = [n for n in carried.split(",") if n] or ["fp32"]
        tags = {variant_tag(self.variant, k): str(v) for k, v in figures.items() if v is not None}
        tags[VARIANTS_TAG] = ",".join([*names, self.variant] if self.variant not in names else names)
        return tags


@dataclass(frozen=True)
class BuiltVariant:
    """The variant's folder (``model.onnx`` and, with val images, ``operating_points.json``)."""

    folder: Path
    figures: VariantFigures
    outcome: Int8Outcome


def build_variant(
    variant: Variant,
    fp32_onnx: Path,
    folder: Path,
    dataset: DatasetRef,
    eval_config: EvalConfig,
    fp32_report: EvalReport,
    calibration_images: int = 32,
) -> BuiltVariant:
    """Build ``variant`` of ``fp32_onnx`` into ``folder`` and measure it like ``fp32_report`` was."""
    if variant != "int8":
        why = (
            "it is fp32 itself"
            if variant == "fp32"
            else "it needs ONNX Runtime's TensorRT provider on a GPU machine, which this one lacks"
        )
        raise TrainingError(f"cannot build the {variant} variant here: {why}")
    folder.mkdir(parents=True, exist_ok=True)
    outcome = quantize_and_evaluate(
        fp32_onnx, folder / "model.onnx", dataset, eval_config, calibration_images, fp32_report
    )
    if dataset.images("val"):
        ops = operating_points_on_split(
            OrtPredictor.load(outcome.result.onnx_path),
            dataset,
            eval_config,
            onnx_sha256=outcome.result.sha256,
        )
        write_operating_points(ops, folder)
    figures = VariantFigures.of_int8(outcome)
    log.info(
        "event=variant_built variant=%s map50_drop=%.4f map40_drop=%.4f score_max_abs_diff=%.4f",
        variant,
        figures.map50_drop,
        figures.map40_drop,
        figures.score_max_abs_diff,
    )
    return BuiltVariant(folder, figures, outcome)
