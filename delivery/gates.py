"""Promotion gates: each one a named comparison with its numbers and a verdict.

Gates are pure functions of facts (registry tags, a latency measurement, a canary analysis)
and the policy, so they are tested without servers and every verdict can be printed and put
into the promotion commit as it was decided.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from core.stages import Stage
from core.variants import DEFAULT_VARIANT, VARIANTS_TAG, Variant, variant_tag
from delivery.policy import GatePolicy, VariantPolicy
from training.registry import VersionFacts
from training.subgroups import SUBGROUP_TAG, SubgroupMetrics, decode_tag


@dataclass(frozen=True)
class GateResult:
    """One gate: what was measured, against what, and whether it passed."""

    name: str
    passed: bool
    observed: str
    expected: str
    warning: bool = False  # passed, but only because the policy says warn (subgroup_action: warn)

    def line(self) -> str:
        verdict = ("WARN" if self.warning else "pass") if self.passed else "FAIL"
        return f"- {self.name}: {verdict} ({self.observed}; needs {self.expected})"


@dataclass(frozen=True)
class GateReport:
    """All gates evaluated for one promotion."""

    stage: Stage
    version: str
    results: list[GateResult]
    notes: list[str] = field(default_factory=list)  # tables behind the verdicts (the golden comparison)

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.results)

    @property
    def failed(self) -> list[GateResult]:
        return [r for r in self.results if not r.passed]

    def lines(self) -> list[str]:
        warnings = sum(r.warning for r in self.results)
        verdict = "FAIL" if not self.passed else f"pass with {warnings} WARN" if warnings else "pass"
        head = f"Gates for {self.stage} (version {self.version}): {verdict}"
        return [head, *(r.line() for r in self.results), *(["", *self.notes] if self.notes else [])]


def _missing(name: str, key: str) -> GateResult:
    return GateResult(
        name, False, f"tag {key!r} missing on the registered version", "the tag set by training"
    )


def _at_most(name: str, value: float | None, limit: float, key: str) -> GateResult:
    if value is None:
        return _missing(name, key)
    return GateResult(name, value <= limit, f"{key}={value:.4g}", f"<= {limit:.4g}")


def _at_least(name: str, value: float | None, floor: float, key: str) -> GateResult:
    if value is None:
        return _missing(name, key)
    return GateResult(name, value >= floor, f"{key}={value:.4g}", f">= {floor:.4g}")


def staging_gates(candidate: VersionFacts, policy: GatePolicy) -> list[GateResult]:
    """Parity of the exported ONNX with PyTorch, and the metric floors."""
    return [
        _at_most(
            "onnx parity",
            candidate.number("parity_max_abs_diff"),
            policy.max_parity_abs_diff,
            "parity_max_abs_diff",
        ),
        _at_least("mAP@0.5 floor", candidate.number("map50"), policy.min_map50, "map50"),
        _at_least("mAP@0.4 floor", candidate.number("map40"), policy.min_map40, "map40"),
        subgroup_gate(candidate, policy),
    ]


def _subgroup_text(m: SubgroupMetrics) -> str:
    return (
        f"{m.attribute}={m.value} mAP@0.4 {m.map40:.3f} vs {m.reference_map40:.3f} overall "
        f"(gap {m.gap:+.3f}, {m.images} images, {m.instances} boxes)"
    )


def subgroup_gate(candidate: VersionFacts, policy: GatePolicy) -> GateResult:
    """No subgroup (sex, age band, manufacturer, view) with enough test images AND boxes is more
    than ``max_subgroup_gap`` below overall mAP@0.4 (class-matched, training/subgroups.py).

    A model can clear every floor on average and still fail one scanner or one group of
    patients; this is where that stops a promotion, or (``subgroup_action: warn``) passes it
    with a WARN a reviewer sees in the commit. Versions registered before training measured
    subgroups carry no tag and pass as "not measured". Groups below ``min_subgroup_images`` or
    ``min_subgroup_boxes`` are too noisy to judge and are only reported on the model card: a
    group's mAP averages the classes with a box in it, so 20 images with one or two boxes of a
    class score that class 0 or 1 by chance, and the image count alone let luck refuse (or pass)
    a promotion.
    """
    name = "subgroup mAP@0.4 gap"
    gap, least, boxes = policy.max_subgroup_gap, policy.min_subgroup_images, policy.min_subgroup_boxes
    expected = f"no subgroup of >= {least} images and >= {boxes} boxes more than {gap:g} below overall"
    raw = candidate.tags.get(SUBGROUP_TAG)
    if raw is None:
        return GateResult(name, True, "not measured (the version has no subgroup figures)", expected)
    warn = policy.subgroup_action == "warn"
    groups = decode_tag(raw)
    if groups is None:
        return GateResult(name, warn, f"tag {SUBGROUP_TAG!r} is unreadable", expected, warning=warn)
    judged = [m for m in groups if m.judged(least, boxes)]
    skipped = len(groups) - len(judged)
    if not judged:
        return GateResult(
            name,
            True,
            f"no subgroup measured on >= {least} images and >= {boxes} boxes ({skipped} smaller)",
            expected,
        )
    worst = sorted(judged, key=lambda m: -(m.gap or 0.0))
    flagged = [m for m in worst if (m.gap or 0.0) > gap + 1e-12]
    if not flagged:
        observed = f"{len(judged)} subgroups judged, largest gap: {_subgroup_text(worst[0])}"
    else:
        listed = "; ".join(_subgroup_text(m) for m in flagged[:3])
        more = f"; and {len(flagged) - 3} more" if len(flagged) > 3 else ""
        observed = f"{len(flagged)} of {len(judged)} subgroups beyond the gap: {listed}{more}"
    if skipped:
        observed += f"; {skipped} not judged (fewer than {least} images or {boxes} boxes)"
    if flagged and warn:
        return GateResult(name, True, observed, expected, warning=True)
    return GateResult(name, not flagged, observed, expected)


def regression_gate(
    candidate: VersionFacts, production: VersionFacts | None, policy: GatePolicy
) -> GateResult:
    """Not worse than the model now in production by more than delta mAP@0.5 on the test set."""
    name = "mAP@0.5 vs production"
    mine = candidate.number("map50")
    if mine is None:
        return _missing(name, "map50")
    if production is None:
        return GateResult(name, True, f"map50={mine:.4g}, no production model yet", "nothing to compare")
    theirs = production.number("map50")
    if theirs is None:
        return GateResult(
            name,
            True,
            f"map50={mine:.4g}, production v{production.version} has no map50",
            "nothing to compare",
        )
    floor = theirs - policy.max_map50_drop
    return GateResult(
        name,
        mine >= floor,
        f"map50={mine:.4g} vs production v{production.version} {theirs:.4g}",
        f">= {floor:.4g} (delta {policy.max_map50_drop:g})",
    )


def latency_gate(p95_ms: float | None, policy: GatePolicy) -> GateResult:
    """Batch-1 ONNX Runtime latency of the candidate within the budget."""
    if p95_ms is None:
        return GateResult("latency budget", False, "not measured (ONNX unavailable)", "a measurement")
    return GateResult(
        "latency budget",
        p95_ms <= policy.latency_budget_ms,
        f"p95={p95_ms:.1f} ms",
        f"<= {policy.latency_budget_ms:g} ms",
    )


def production_gates(
    version: str,
    canary_version: str,
    verdict: str,
    summary: str,
    *,
    variant: Variant = DEFAULT_VARIANT,
    canary_variant: Variant = DEFAULT_VARIANT,
) -> list[GateResult]:
    """The canary analysis passed for exactly this version, served as this variant."""
    serves = f"{canary_version} ({canary_variant})" if canary_version else "nothing"
    return [
        GateResult(
            "serving as canary",
            (canary_version, canary_variant) == (version, variant),
            f"canary serves {serves}",
            f"version {version} ({variant})",
        ),
        GateResult("canary analysis", verdict == "pass", f"{verdict}: {summary}", "pass"),
    ]


def variant_gate(candidate: VersionFacts, variant: Variant, policy: VariantPolicy) -> GateResult:
    """The serving variant is as good as the fp32 export it was built from, on the same images.

    fp32 is the export whose parity with PyTorch the staging gate already judged. Any other
    variant must have been built and measured (``cxr train quantize``), lose at most
    ``max_map_drop`` of mAP@0.5 and of mAP@0.4 on the test split, move no class score by more
    than ``max_score_abs_diff`` (a broken conversion) and report the same findings as fp32 on
    test images (``min_finding_agreement``). Unlike the subgroup gate a missing figure fails: a
    precision nobody measured never reaches patients.
    """
    name = f"variant {variant}"
    if variant == DEFAULT_VARIANT:
        return GateResult(name, True, "the fp32 export itself", "nothing to compare")
    expected = (
        f"mAP@0.5 and mAP@0.4 drop <= {policy.max_map_drop:g}, "
        f"class-score parity <= {policy.max_score_abs_diff:g}, "
        f"finding agreement >= {policy.min_finding_agreement:g}"
    )
    carried = [v for v in candidate.tags.get(VARIANTS_TAG, "fp32").split(",") if v]
    if variant not in carried:
        how = "`cxr train quantize`" if variant == "int8" else "a GPU machine with TensorRT"
        return GateResult(
            name,
            False,
            f"version {candidate.version} carries {', '.join(carried)} only; build {variant} with {how}",
            expected,
        )
    keys = ("map50_drop", "map40_drop", "score_max_abs_diff", "finding_agreement")
    figures = {k: candidate.number(variant_tag(variant, k)) for k in keys}
    missing = [variant_tag(variant, k) for k, v in figures.items() if v is None]
    if missing:
        return GateResult(name, False, f"tags {', '.join(missing)} missing on the version", expected)
    drop50, drop40, parity, agreement = (figures[k] or 0.0 for k in keys)
    observed = (
        f"mAP@0.5 drop {drop50:+.4f}, mAP@0.4 drop {drop40:+.4f} on the test split; "
        f"class-score parity {parity:.4f}, finding agreement {agreement:.3f} on test images"
    )
    tolerance = 1e-9  # the figures are rounded to 6 digits in the tags
    passed = (
        drop50 <= policy.max_map_drop + tolerance
        and drop40 <= policy.max_map_drop + tolerance
        and parity <= policy.max_score_abs_diff + tolerance
        and agreement >= policy.min_finding_agreement - tolerance
    )
    return GateResult(name, passed, observed, expected)
