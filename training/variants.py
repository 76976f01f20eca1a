"""Build a serving variant of a registered version and record its figures against fp32.

``int8`` is built anywhere (ONNX Runtime static QDQ on the CPU, :mod:`training.quantize`).
``fp16-trt`` is the fp32 graph run by ONNX Runtime's TensorRT provider at FP16, as the cluster
Triton runs it: it is measured only where that provider exists (onnxruntime-gpu with TensorRT
on a GPU machine) and refused with that said elsewhere. No machine this project has had carries
TensorRT, so that path has run here only up to its refusal and, with the CPU provider standing
in, through :func:`measure_variant` in the unit tests.

The variant is evaluated with the same code, settings and test images as the fp32 export,
gets its own operating points chosen on val (thresholds and calibrator belong to one
file: the gateway refuses points measured on another sha256), and its figures become version
tags that delivery's variant gate reads (``core/variants.py`` names them).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from core.variants import VARIANT_METADATA_KEY, VARIANTS_TAG, Variant, variant_tag
from training.config import EvalConfig
from training.dataset import DatasetRef
from training.errors import TrainingError
from training.evaluate import EvalReport
from training.operating_points import operating_points_on_split, write_operating_points
from training.predictors import OrtPredictor
from training.quantize import Int8Outcome, quantize_and_evaluate

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Parity:
    """How closely a variant's outputs follow fp32's on the same images."""

    score_max_abs_diff: float  # the worst class score moved (0..1), over every anchor and class
    finding_agreement: float  # min(share of fp32's findings the variant reports, and the reverse)
    findings: int  # fp32's findings on those images (the agreement's sample size)
    images: int


def _same_findings(mine: np.ndarray, theirs: np.ndarray, iou: float) -> int:
    """How many of ``mine`` (n, 6: box, conf, class) ``theirs`` also reports: same class, IoU >= ``iou``."""
    from data_pipeline.geometry import pairwise_iou

    if not len(mine) or not len(theirs):
        return 0
    same = (mine[:, None, 5] == theirs[None, :, 5]) & (pairwise_iou(mine[:, :4], theirs[:, :4]) >= iou)
    return int(same.any(axis=1).sum())


def parity_images(dataset: DatasetRef, count: int) -> list[Path]:
    """The images parity is judged on: test ones, never the val images INT8 was calibrated on
    (an in-sample agreement would flatter it); val when the test split is empty."""
    return (dataset.images("test") or dataset.images("val"))[:count]


def parity(
    fp32: OrtPredictor, variant: OrtPredictor, images: list[Path], cfg: EvalConfig, iou: float = 0.5
) -> Parity:
    """The variant's outputs against fp32's on ``images``: the worst class-score change, and whether
    both report the same findings (same class, IoU >= 0.5) at the global confidence threshold
    (``conf_threshold``, 0.25: the per-class operating points belong to each file).

    The worst score change alone is a gross-breakage check: INT8 moves single high scores by
    ~0.1 while reporting the same findings (measured: docs/benchmarks.md). Agreement is what a
    reader of the report sees: each side's findings the other also reports, the smaller share.
    """
    from training.evaluate import detections, preprocess

    if not images:
        raise TrainingError("the variant parity check needs val or test images; the dataset has none")
    batch = np.stack([preprocess(p, fp32.imgsz)[0] for p in images])
    raw_fp32, raw_variant = fp32(batch), variant(batch)
    score_diff = float(np.abs(raw_fp32[:, 4:] - raw_variant[:, 4:]).max())
    found_fp32 = detections(raw_fp32, cfg, cfg.conf_threshold)
    found_variant = detections(raw_variant, cfg, cfg.conf_threshold)
    total_fp32 = sum(len(f) for f in found_fp32)
    total_variant = sum(len(f) for f in found_variant)
    kept = sum(_same_findings(a, b, iou) for a, b in zip(found_fp32, found_variant, strict=True))
    gained = sum(_same_findings(b, a, iou) for a, b in zip(found_fp32, found_variant, strict=True))
    shares = [kept / total_fp32 if total_fp32 else 1.0, gained / total_variant if total_variant else 1.0]
    return Parity(score_diff, min(shares), total_fp32, len(images))


@dataclass(frozen=True)
class VariantFigures:
    """A variant measured beside its fp32 export on the same test images."""

    variant: Variant
    sha256: str
    map50: float
    map40: float
    map50_drop: float
    map40_drop: float
    score_max_abs_diff: float  # parity: max |fp32 - variant| class score on the parity (val) images
    finding_agreement: float  # parity: share of findings both report (see :func:`parity`)
    latency_ms_b1: float | None
    latency_ms_b8: float | None

    @classmethod
    def measured(
        cls, variant: Variant, sha256: str, report: EvalReport, fp32: EvalReport, parity: Parity
    ) -> VariantFigures:
        return cls(
            variant=variant,
            sha256=sha256,
            map50=report.map50,
            map40=report.map40,
            map50_drop=fp32.map50 - report.map50,
            map40_drop=fp32.map40 - report.map40,
            score_max_abs_diff=parity.score_max_abs_diff,
            finding_agreement=parity.finding_agreement,
            latency_ms_b1=report.latency_ms_b1,
            latency_ms_b8=report.latency_ms_b8,
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
            "finding_agreement": round(self.finding_agreement, 6),
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
    report: EvalReport  # the variant on the test split, beside ``fp32_report``
    fp32_report: EvalReport
    outcome: Int8Outcome | None = None  # INT8's quantization details (evaluation.json, MLflow)


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
    if variant == "fp32":
        raise TrainingError("fp32 is the version's own export, not a variant to build")
    if variant == "fp16-trt":
        return measure_variant(
            variant,
            fp32_onnx,
            folder,
            dataset,
            eval_config,
            fp32_report,
            providers=tensorrt_fp16_providers(folder / "trt-cache"),
            parity_count=calibration_images,
        )
    folder.mkdir(parents=True, exist_ok=True)
    outcome = quantize_and_evaluate(
        fp32_onnx, folder / "model.onnx", dataset, eval_config, calibration_images, fp32_report
    )
    int8 = OrtPredictor.load(outcome.result.onnx_path)
    measured = _Measured(variant, folder, int8, outcome.result.sha256, outcome.report)
    return measured.finish(fp32_onnx, dataset, eval_config, fp32_report, calibration_images, outcome)


def tensorrt_fp16_providers(cache: Path) -> list[Any]:
    """ONNX Runtime's TensorRT provider at FP16 with CUDA behind it, as the cluster Triton runs the
    ``fp16-trt`` variant; a clear error where onnxruntime has no TensorRT (every CPU machine)."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if "TensorrtExecutionProvider" not in available:
        raise TrainingError(
            "the fp16-trt variant is measured with ONNX Runtime's TensorrtExecutionProvider, which this "
            f"onnxruntime lacks (it has {', '.join(available)}): build it on a GPU machine with "
            "onnxruntime-gpu and TensorRT, as the cluster Triton image has"
        )
    cache.mkdir(parents=True, exist_ok=True)
    options = {"trt_fp16_enable": True, "trt_engine_cache_enable": True, "trt_engine_cache_path": str(cache)}
    return [("TensorrtExecutionProvider", options), "CUDAExecutionProvider"]


def measure_variant(
    variant: Variant,
    fp32_onnx: Path,
    folder: Path,
    dataset: DatasetRef,
    eval_config: EvalConfig,
    fp32_report: EvalReport,
    *,
    providers: list[Any],
    parity_count: int = 32,
) -> BuiltVariant:
    """A variant that is the fp32 graph under other execution ``providers`` (TensorRT FP16).

    The file is the fp32 export stamped with its variant (its own sha256, so its operating
    points and caches never mix with fp32's); it is evaluated under ``providers`` with the
    same code and test split as fp32, and its class scores compared with fp32's on the CPU on
    the first test images (:func:`parity_images`).
    """
    import onnx

    from core.hashing import file_sha256
    from training.evaluate import evaluate

    folder.mkdir(parents=True, exist_ok=True)
    target = folder / "model.onnx"
    model = onnx.load(str(fp32_onnx))
    stamped = [p for p in model.metadata_props if p.key != VARIANT_METADATA_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(stamped)
    entry = model.metadata_props.add()
    entry.key, entry.value = VARIANT_METADATA_KEY, variant
    onnx.save(model, str(target))
    sha256 = file_sha256(target)
    predictor = OrtPredictor.load(target, providers=providers)
    measured = _Measured(variant, folder, predictor, sha256, evaluate(predictor, dataset, eval_config))
    return measured.finish(fp32_onnx, dataset, eval_config, fp32_report, parity_count)


@dataclass(frozen=True)
class _Measured:
    """A built variant file, loaded and evaluated on the test split: what every variant ends with."""

    variant: Variant
    folder: Path
    predictor: OrtPredictor
    sha256: str
    report: EvalReport

    def finish(
        self,
        fp32_onnx: Path,
        dataset: DatasetRef,
        eval_config: EvalConfig,
        fp32_report: EvalReport,
        parity_count: int,
        outcome: Int8Outcome | None = None,
    ) -> BuiltVariant:
        """Its own operating points (on val), parity with fp32 (on test), its figures, logged."""
        if dataset.images("val"):
            ops = operating_points_on_split(self.predictor, dataset, eval_config, onnx_sha256=self.sha256)
            write_operating_points(ops, self.folder)
        images = parity_images(dataset, parity_count)
        checked = parity(OrtPredictor.load(fp32_onnx), self.predictor, images, eval_config)
        figures = VariantFigures.measured(self.variant, self.sha256, self.report, fp32_report, checked)
        _log_built(figures)
        return BuiltVariant(self.folder, figures, self.report, fp32_report, outcome)


def _log_built(figures: VariantFigures) -> None:
    log.info(
        "event=variant_built variant=%s map50_drop=%.4f map40_drop=%.4f score_max_abs_diff=%.4f "
        "finding_agreement=%.4f",
        figures.variant,
        figures.map50_drop,
        figures.map40_drop,
        figures.score_max_abs_diff,
        figures.finding_agreement,
    )
