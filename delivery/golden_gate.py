"""The golden-set gate: candidate and production evaluated on the same frozen images, compared paired.

Registry tags hold each version's mAP on ITS OWN test split, so comparing two tags compares two
different exams. This gate instead fetches the pinned golden set (``training/golden.yaml`` in the
GitOps repository), runs both ONNX models over every golden image, and asks the paired bootstrap
over patients (training/paired.py) two questions (:func:`decide`): is the candidate non-inferior
overall (the lower bound of the CI of the mAP@0.4 difference at least ``-margin``), and is no class
with enough golden boxes shown worse by more than the margin (its upper bound, Bonferroni-corrected
over the judged classes, below ``-margin``)? Each model's per-image results are cached per (model
version, ONNX sha256, golden version), so the production promotion reuses what the canary
promotion measured.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from core.errors import CxrError
from core.hashing import file_sha256
from core.variants import DEFAULT_VARIANT, Variant, served_label
from data_pipeline.golden import pin_path, read_pin
from delivery.errors import DeliveryError
from delivery.gates import GateResult
from delivery.policy import GoldenPolicy
from training.config import EvalConfig
from training.dataset import DatasetRef, open_dataset_dir
from training.paired import ImageResult, NonInferiority, PairedComparison, non_inferior, paired_bootstrap

log = logging.getLogger(__name__)

GATE_NAME = "golden set vs production (paired)"
CACHE_FORMAT = 1


@dataclass(frozen=True)
class GoldenVerdict:
    """The gate line, the table a reviewer reads, and the comparison itself (None when not run)."""

    result: GateResult
    table: list[str]
    comparison: PairedComparison | None = None
    golden_version: str = ""

    def summary(self) -> dict[str, Any]:
        """A compact record for the registry tag (MLflow tag values are limited to 5000 chars)."""
        if self.comparison is None:
            return {"golden": self.golden_version, "verdict": self.result.observed}
        c = self.comparison
        return {
            "golden": self.golden_version,
            "passed": self.result.passed,
            "diff": round(c.overall.diff, 4),
            "ci": [round(c.overall.low, 4), round(c.overall.high, 4)],
            "patients": c.patients,
            "resamples": c.resamples,
        }


# ---------------------------------------------------------------------- per-version results, cached


def _to_json(results: list[ImageResult]) -> dict[str, Any]:
    return {
        "format": CACHE_FORMAT,
        "images": [
            {
                "id": r.image_id,
                "correct": r.correct.astype(bool).tolist(),
                "conf": r.conf.astype(float).tolist(),
                "pred_cls": r.pred_cls.astype(int).tolist(),
                "gt_cls": r.gt_cls.astype(int).tolist(),
            }
            for r in results
        ],
    }


def _from_json(data: Mapping[str, Any]) -> list[ImageResult]:
    return [
        ImageResult(
            str(i["id"]),
            np.asarray(i["correct"], dtype=bool),
            np.asarray(i["conf"], dtype=float),
            np.asarray(i["pred_cls"], dtype=float),
            np.asarray(i["gt_cls"], dtype=int),
        )
        for i in data["images"]
    ]


def golden_results(onnx: Path, golden: DatasetRef, cache_dir: Path, version: str) -> list[ImageResult]:
    """Every golden image's matched detections for one model, computed once per model and golden set.

    The cache key holds the ONNX file's sha256 as well as the version number, so a registry that
    was reset (same number, different model) never serves stale results. That holds because
    ``onnx`` is the version's own file: ``cxr promote`` passes what :func:`delivery.onnx_cache.fetch_onnx`
    returns, cached per model name and sha256 and checked against the version's lineage tag (a
    file that differs is refused before it gets here), not a file cached under the version number.
    """
    from training.evaluate import evaluate
    from training.predictors import OrtPredictor

    cache = cache_dir / golden.version / f"v{version}-{file_sha256(onnx)[:16]}.json"
    if cache.exists():
        try:
            data = json.loads(cache.read_text())
            if data.get("format") == CACHE_FORMAT:
                log.info("event=golden_eval_cached version=%s golden=%s", version, golden.version)
                return _from_json(data)
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            log.warning("event=golden_cache_unreadable path=%s error=%s", cache, exc)
    results: list[ImageResult] = []
    report = evaluate(
        OrtPredictor.load(onnx), golden, EvalConfig(), split="test", latency=False, results=results
    )
    log.info(
        "event=golden_eval version=%s golden=%s images=%d map40=%.4f",
        version,
        golden.version,
        report.images,
        report.map40,
    )
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".tmp")
    tmp.write_text(json.dumps(_to_json(results)))
    tmp.replace(cache)
    return results


# ---------------------------------------------------------------------- the gate


def judged_classes(comparison: PairedComparison, policy: GoldenPolicy) -> list[int]:
    """The classes with at least ``min_class_instances`` golden boxes: the only ones judged alone."""
    return [c for c, n in sorted(comparison.instances.items()) if n >= policy.min_class_instances]


def screen_confidence(policy: GoldenPolicy, classes: int) -> float:
    """Two-sided confidence whose upper tail is the one-sided level ``(1 - confidence) / 2``
    divided by the number of judged classes (Bonferroni).

    The per-class check is a family of up to 14 tests on a few dozen boxes each. Judged like the
    overall figure (each class's 95 % CI low >= -margin, all of them required), a candidate equal
    to production was refused by chance almost always: per class the low end of a wide interval
    lies below -margin unless the margin dwarfs the noise, and any one of 14 classes sufficed
    (tests/unit/delivery/test_golden_decision.py measures it). A correction on those lower bounds
    only widens them and refuses more. So a class refuses only on evidence of harm: its corrected
    upper bound below -margin; over all judged classes an equal candidate is refused by the
    per-class check in at most ``(1 - confidence) / 2`` of evaluations.
    """
    return 1 - (1 - policy.confidence) / max(classes, 1)


def decide(
    comparison: PairedComparison, screen: PairedComparison | None, policy: GoldenPolicy
) -> NonInferiority:
    """The gate's verdict: overall non-inferiority, then no judged class shown worse than the margin.

    Overall: the lower bound of ``comparison``'s CI (``policy.confidence``) at least ``-margin``
    (training/paired.py's :func:`non_inferior`, which also refuses a set without any box). Per
    class (``min_class_instances`` boxes or more): refused when ``screen``'s upper bound, a
    bootstrap of the same resamples at :func:`screen_confidence`, is below ``-margin``. A candidate
    with the very same results as production has every resampled difference 0 and passes whatever
    the margin.
    """
    overall = non_inferior(comparison, margin=policy.margin, min_instances=_NEVER)
    reasons = list(overall.reasons)
    judged = judged_classes(comparison, policy)
    if screen is not None:
        for cid in judged:
            ci, wide = comparison.per_class[cid], screen.per_class[cid]
            if wide.high < -policy.margin:
                reasons.append(
                    f"class {cid}: AP@0.4 difference {ci.diff:+.4f}, corrected CI high {wide.high:+.4f} "
                    f"< -{policy.margin:g} ({screen.confidence:.4f} over {len(judged)} classes)"
                )
    return NonInferiority(not reasons, reasons)


_NEVER = 2**62  # min_instances that no class reaches: non_inferior judges the overall figure only


def _skipped(observed: str, expected: str, passed: bool, golden_version: str = "") -> GoldenVerdict:
    return GoldenVerdict(GateResult(GATE_NAME, passed, observed, expected), [], None, golden_version)


def open_golden(gitops_dir: Path, cache_dir: Path, store: object | None) -> DatasetRef | None:
    """The pinned golden set as a local dataset (fetched once), or None when nothing is pinned."""
    from data_pipeline.versioning import fetch_dataset

    pin = read_pin(gitops_dir)
    if pin is None:
        return None
    try:
        folder = fetch_dataset(pin.version, cache_dir / "datasets", store)  # type: ignore[arg-type]
    except CxrError as exc:
        raise DeliveryError(
            f"{pin_path(gitops_dir)} pins golden set {pin.version}, which cannot be fetched: {exc}"
        ) from exc
    return open_dataset_dir(folder, cache_dir / "work", required=("test",))


def golden_gate(
    *,
    gitops_dir: Path,
    cache_dir: Path,
    policy: GoldenPolicy,
    candidate: str,
    production: str,
    onnx_for: Callable[[str, Variant], Path],
    store: object | None = None,
    class_names: Mapping[int, str] | None = None,
    candidate_variant: Variant = DEFAULT_VARIANT,
    production_variant: Variant = DEFAULT_VARIANT,
) -> GoldenVerdict:
    """Candidate vs production on the pinned golden set: the verdict, its table, the comparison.

    Each side is a version AND the serving variant it is (or would be) served as: INT8 of the
    version production serves in fp32 is a candidate like any other. ``onnx_for`` gives a side's
    file; ``cxr promote``'s is :func:`delivery.onnx_cache.fetch_onnx`, whose
    :class:`~delivery.onnx_cache.OnnxIntegrityError` (bytes other than the lineage tag's) ends
    the gate before either model is evaluated.
    """
    if not production:
        return _skipped("no production model yet", "a production model to compare with", True)
    mine_label = "v" + served_label(candidate, candidate_variant)
    theirs_label = "v" + served_label(production, production_variant)
    if (production, production_variant) == (candidate, candidate_variant):
        return _skipped(f"{mine_label} already serves production", "a different production model", True)
    golden = open_golden(gitops_dir, cache_dir, store)
    if golden is None:
        where = pin_path(gitops_dir)
        if policy.required:
            need = "a pinned golden set: `cxr data golden build`"
            return _skipped(f"no golden set pinned ({where} missing)", need, False)
        return _skipped("no golden set pinned; policy golden.required=false", "nothing to compare", True)
    mine = golden_results(onnx_for(candidate, candidate_variant), golden, cache_dir / "results", candidate)
    theirs = golden_results(
        onnx_for(production, production_variant), golden, cache_dir / "results", production
    )
    bootstrap = functools.partial(
        paired_bootstrap, mine, theirs, golden.patients(), resamples=policy.resamples, seed=policy.seed
    )
    comparison = bootstrap(confidence=policy.confidence)
    judged = judged_classes(comparison, policy)
    screen = bootstrap(confidence=screen_confidence(policy, len(judged))) if judged else None
    verdict = decide(comparison, screen, policy)
    o = comparison.overall
    observed = (
        f"mAP@0.4 {mine_label} - {theirs_label} = {o.diff:+.4f}, {round(policy.confidence * 100)}% CI "
        f"[{o.low:+.4f}, {o.high:+.4f}] over {comparison.patients} patients of golden {golden.version[:12]}"
        + ("" if verdict.passed else "; " + "; ".join(verdict.reasons))
    )
    expected = (
        f"CI low >= -{policy.margin:g} overall; no class with >= {policy.min_class_instances} boxes "
        f"worse by more than {policy.margin:g} (Bonferroni-corrected CI high >= -{policy.margin:g})"
    )
    table = [
        f"Golden set {golden.version} (paired bootstrap over patients, {comparison.resamples} resamples, "
        f"seed {policy.seed}): candidate {mine_label} vs production {theirs_label}",
        "",
        *comparison.table(class_names),
    ]
    result = GateResult(GATE_NAME, verdict.passed, observed, expected)
    return GoldenVerdict(result, table, comparison, golden.version)
