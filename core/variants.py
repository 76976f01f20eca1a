"""Serving variants of a model version: which precision a stage serves, and where its file lives.

A registered version is trained once and exported once (``fp32``, the ONNX whose parity with
PyTorch passed); cheaper variants are built from that file and carried by the same version:

- ``fp32``: the run's ``onnx/model.onnx``;
- ``int8``: static QDQ INT8 for ONNX Runtime on the CPU (``cxr train quantize``), in ``onnx_int8/``;
- ``fp16-trt``: the fp32 graph run by ONNX Runtime's TensorRT provider at FP16 in the cluster
  Triton; it can only be evaluated on a GPU machine with TensorRT, in ``onnx_fp16_trt/``.

Each non-fp32 variant carries its own figures as version tags (``variant_<name>_<figure>``),
measured against fp32 on the same test images; delivery's variant gate reads them, and the
stage file names the variant it serves, so choosing a precision is a commit like a promotion.
"""

from __future__ import annotations

from typing import Literal, get_args

Variant = Literal["fp32", "int8", "fp16-trt"]
VARIANTS: tuple[Variant, ...] = get_args(Variant)
DEFAULT_VARIANT: Variant = "fp32"

#: ONNX metadata key (and Triton config parameter) naming the variant a file is
VARIANT_METADATA_KEY = "cxr_variant"
#: version tag listing the variants a version carries, comma separated ("fp32,int8")
VARIANTS_TAG = "variants"

#: figures every non-fp32 variant records as tags (see :func:`variant_tag`)
VARIANT_FIGURES: tuple[str, ...] = (
    "sha256",
    "map50",
    "map40",
    "map50_drop",
    "map40_drop",
    "score_max_abs_diff",
    "finding_agreement",
    "latency_ms_b1",
    "latency_ms_b8",
)


def artifact_dir(variant: Variant) -> str:
    """Folder of the version's run that holds the variant's ``model.onnx`` (and operating points)."""
    return "onnx" if variant == DEFAULT_VARIANT else "onnx_" + variant.replace("-", "_")


def variant_tag(variant: Variant, figure: str) -> str:
    """``variant_int8_map50_drop``: the version tag of one of a variant's figures."""
    return f"variant_{variant.replace('-', '_')}_{figure}"


def served_label(version: str, variant: str | None) -> str:
    """``3``, or ``3 int8`` for a variant other than fp32: how commits, the golden table and the
    DICOM objects name a model that serves (fp32 keeps the bare number it always had)."""
    return version if variant in (None, "", DEFAULT_VARIANT) else f"{version} {variant}"


def cpu_precision(variant: Variant) -> Variant:
    """What a CPU computes for ``variant``: fp16-trt is the fp32 graph, which only TensorRT runs in
    FP16, so a CPU backend answers in fp32 and must say so (a response names what computed it)."""
    return DEFAULT_VARIANT if variant == "fp16-trt" else variant


def parse_variant(value: str) -> Variant:
    """A variant name from outside (CLI, YAML, metadata), or a ValueError naming the valid ones."""
    if value not in VARIANTS:
        raise ValueError(f"unknown serving variant {value!r}; use one of {', '.join(VARIANTS)}")
    return value
