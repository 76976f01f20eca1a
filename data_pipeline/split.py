"""Patient-level, multilabel-stratified train/val/test split.

Two radiographs of one patient in train and test inflate every metric, so the
unit of splitting is the group: the salted PatientID hash, else the image id,
with near-duplicate images and images of one study merged into one group. Groups are stratified on
class presence with iterative stratification (``iterstrat``'s
``MultilabelStratifiedShuffleSplit``) so rare findings land in every split;
the seed makes it deterministic.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from iterstrat.ml_stratifiers import MultilabelStratifiedShuffleSplit

from data_pipeline.classes import NO_FINDING_ID

log = logging.getLogger(__name__)

SPLITS: tuple[str, ...] = ("train", "val", "test")


@dataclass(frozen=True)
class SplitConfig:
    """Fractions of groups for val and test (train gets the rest) and the seed."""

    val_fraction: float = 0.15
    test_fraction: float = 0.15
    seed: int = 42


def group_key(image_id: str, patient_hash: str | None) -> str:
    """The group one image is split with: its salted patient, else the image alone (``image:<id>``).

    One definition for the split and for the golden set's hold-out (:func:`data_pipeline.golden.
    golden_patients`), so an image without a PatientID (a PNG, a header without one) is held out
    by the same key it is grouped by.
    """
    return patient_hash or f"image:{image_id}"


def merge_groups(groups: Mapping[str, str], linked: Sequence[Sequence[str]]) -> dict[str, str]:
    """Put images that must stay together (near duplicates, one study) into one group (the smallest
    group id of those linked, transitively).

    A union-find over group ids: linking every multi-image study rescanned every image once per link
    (15k images in 5k two-view studies: 75M steps).
    """
    parent = {g: g for g in groups.values()}

    def find(g: str) -> str:
        while parent[g] != g:
            parent[g] = parent[parent[g]]
            g = parent[g]
        return g

    for images in linked:
        present = [groups[i] for i in images if i in groups]
        for other in present[1:]:
            a, b = find(present[0]), find(other)
            if a != b:
                parent[max(a, b)] = min(a, b)
    return {image_id: find(group) for image_id, group in groups.items()}


def linked_by(values: Mapping[str, str | None]) -> list[list[str]]:
    """Image ids that share a value (a StudyInstanceUID), one list per value held by two or more.

    A study is one patient's visit: its views are one patient whatever their PatientID says (blanked on
    one view by an export, mistyped or re-keyed on another), so they are split as one group.
    """
    by_value: dict[str, list[str]] = {}
    for image_id, value in values.items():
        if value:
            by_value.setdefault(value, []).append(image_id)
    return [sorted(ids) for _, ids in sorted(by_value.items()) if len(ids) > 1]


def split_groups(
    groups: Mapping[str, str], labels: Mapping[str, set[int]], config: SplitConfig
) -> dict[str, str]:
    """image_id -> "train" | "val" | "test"; every image of a group gets the same split.

    ``labels`` maps image_id to its class ids (0..14; 14 for no finding).
    """
    image_ids = sorted(groups)
    group_ids = sorted(set(groups.values()))
    if not image_ids:
        return {}
    index = {g: k for k, g in enumerate(group_ids)}
    y = np.zeros((len(group_ids), NO_FINDING_ID + 1), dtype=np.int8)
    for image_id in image_ids:
        for cid in labels.get(image_id, {NO_FINDING_ID}):
            y[index[groups[image_id]], cid] = 1
    y = y[:, y.any(axis=0)] if y.any() else np.ones((len(group_ids), 1), dtype=np.int8)
    if y.shape[1] == 1:
        # every group has the same one label (all "No finding", or one finding only): iterstrat takes a
        # single column for a binary target and refuses it, so the build stopped; a column of zeros
        # keeps it a multilabel target without changing what is stratified
        y = np.hstack([y, np.zeros_like(y)])

    assignment = np.array(["train"] * len(group_ids), dtype=object)
    n = len(group_ids)
    n_test = _count(n, config.test_fraction)
    n_val = _count(n - n_test, config.val_fraction / max(1 - config.test_fraction, 1e-9))
    rest = np.arange(n)
    if n_test:
        test_idx, rest = _take(rest, y, n_test, config.seed)
        assignment[test_idx] = "test"
    if n_val:
        val_idx, rest = _take(rest, y, n_val, config.seed + 1)
        assignment[val_idx] = "val"
    result = {image_id: str(assignment[index[groups[image_id]]]) for image_id in image_ids}
    log.info(
        "event=split groups=%d images=%d %s",
        n,
        len(image_ids),
        " ".join(f"{s}={sum(v == s for v in result.values())}" for s in SPLITS),
    )
    return result


def _count(n: int, fraction: float) -> int:
    """Groups to put aside: at least one when the fraction is > 0 and 3+ groups exist."""
    if fraction <= 0 or n < 3:
        return 0
    return min(max(round(n * fraction), 1), n - 1)


def _take(candidates: np.ndarray, y: np.ndarray, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Pick ``k`` of ``candidates`` stratified on ``y``; returns (picked, remaining)."""
    if k >= len(candidates):
        return candidates, candidates[:0]
    splitter = MultilabelStratifiedShuffleSplit(n_splits=1, test_size=k, random_state=seed)
    rest_pos, pick_pos = next(splitter.split(np.zeros((len(candidates), 1)), y[candidates]))
    if len(pick_pos) < k:
        # iterative stratification can hand out fewer than asked on tiny sets; top up at random (seeded)
        extra = np.random.default_rng(seed).choice(rest_pos, size=k - len(pick_pos), replace=False)
        pick_pos = np.concatenate([pick_pos, extra])
        rest_pos = np.setdiff1d(rest_pos, extra)
    return np.sort(candidates[pick_pos]), np.sort(candidates[rest_pos])
