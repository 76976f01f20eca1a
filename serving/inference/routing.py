"""Which stage answers a request: canary weight, stickiness, shadow, override.

The stage files under ``k8s/overlays/<stage>/model.yaml`` are the GitOps truth
(written only by ``promote``); the gateway re-reads them when their text changes
on disk, so a promotion or rollback commit takes effect without a restart.
Assignment is sticky by StudyInstanceUID so one study never mixes models.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from core.errors import StageFileError
from core.stage_file import StageFile, read_stage_text, stage_file_from_text, stage_file_path
from core.stages import STAGES, Stage
from core.variants import DEFAULT_VARIANT

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StageModel:
    stage: Stage
    model_name: str
    model_version: str
    canary_weight: int = 0
    variant: str = DEFAULT_VARIANT


@dataclass(frozen=True)
class RoutingTable:
    """Snapshot of the three stage files."""

    stages: dict[Stage, StageModel] = field(default_factory=dict)

    @property
    def canary_weight(self) -> int:
        canary = self.stages.get("canary")
        if canary is None or not canary.model_version:
            return 0
        return max(0, min(100, canary.canary_weight))

    def version(self, stage: Stage) -> str:
        entry = self.stages.get(stage)
        return entry.model_version if entry else ""


@dataclass(frozen=True)
class RouteDecision:
    """Where a request goes, and which of the ``CXR_SHADOW_FRACTION`` mirrors it is sampled for.

    ``shadow``: also run on staging (its agreement with the served answer is staging's).
    ``canary_mirror``: routed to the canary, so also run on production (the canary's served
    answer against production's is the canary's agreement). One sample decides both, so a
    study is mirrored whole or not at all.
    """

    stage: Stage
    shadow: bool
    reason: str
    canary_mirror: bool = False


def _stage_model(data: StageFile) -> StageModel:
    return StageModel(
        stage=data.stage,
        model_name=data.model_name,
        model_version=data.model_version,
        canary_weight=int(data.canary_weight or 0),
        variant=data.variant,
    )


def bucket_of(key: str) -> int:
    """0..99, stable across processes and restarts (unlike Python's salted hash())."""
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") % 100


def unit_of(key: str) -> float:
    """A point in [0, 1), stable like :func:`bucket_of` but not rounded to whole percent.

    The shadow share is a fraction (``CXR_SHADOW_FRACTION``), not a percent: compared with a
    bucket it was rounded to whole percent (half to even), so 0.004 shadowed nothing at all and
    0.025 shadowed 2 %.
    """
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") / 2**64


@dataclass(frozen=True)
class _Unreadable:
    """A stage file that could not be read, by its error: the same error is the same stamp."""

    error: str


class Router:
    def __init__(self, gitops_dir: Path, *, shadow_fraction: float = 0.0, poll_s: float = 2.0) -> None:
        self.gitops_dir = gitops_dir
        self.shadow_fraction = shadow_fraction
        self.poll_s = poll_s
        self._texts: dict[Stage, str | _Unreadable | None] = {}
        self._checked = 0.0
        self.table = RoutingTable()
        self.reload()

    def _read_texts(self) -> dict[Stage, str | _Unreadable | None]:
        """Each stage file's text as it is now (None: no file)."""
        texts: dict[Stage, str | _Unreadable | None] = {}
        for stage in STAGES:
            try:
                texts[stage] = read_stage_text(self.gitops_dir, stage)
            except (OSError, StageFileError) as exc:
                texts[stage] = _Unreadable(f"{type(exc).__name__}: {exc}")
        return texts

    def _parse(self, texts: dict[Stage, str | _Unreadable | None]) -> None:
        """The table from the very texts that become the stamp.

        The stamp is the text, not the file's mtime: an mtime taken after reading could belong
        to a promotion written in between (its change then never seen), and two writes within
        one tick of the kernel's coarse clock share an mtime. Either left the gateway on the
        old version for good, answering with a version the stage's Triton no longer served.
        A file that cannot be read or parsed keeps the stage's last entry; it is parsed again
        (and warned about again) when its text or its error changes.
        """
        stages: dict[Stage, StageModel] = {}
        for stage, text in texts.items():
            entry = self.table.stages.get(stage)
            if isinstance(text, _Unreadable):
                log.warning("routing_file_unreadable stage=%s error=%s", stage, text.error)
            else:
                try:
                    source = str(stage_file_path(self.gitops_dir, stage))
                    entry = _stage_model(stage_file_from_text(text, stage, source))
                except StageFileError as exc:
                    log.warning("routing_file_unreadable stage=%s error=%s", stage, exc)
            if entry is not None:
                stages[stage] = entry
        self.table = RoutingTable(stages=stages)
        self._texts = texts
        self._checked = time.monotonic()
        log.info(
            "routing_reloaded production=%s canary=%s weight=%d staging=%s",
            self.table.version("production"),
            self.table.version("canary"),
            self.table.canary_weight,
            self.table.version("staging"),
        )

    def reload(self) -> RoutingTable:
        self._parse(self._read_texts())
        return self.table

    def maybe_reload(self) -> bool:
        """Re-read the files when any changed; three small reads at most every poll_s."""
        now = time.monotonic()
        if now - self._checked < self.poll_s:
            return False
        self._checked = now
        texts = self._read_texts()
        if texts != self._texts:
            self._parse(texts)
            return True
        return False

    def sampled(self, sticky_key: str) -> bool:
        """Whether the study is in the ``CXR_SHADOW_FRACTION`` share that is mirrored."""
        return self.shadow_fraction > 0 and unit_of("shadow:" + sticky_key) < self.shadow_fraction

    def decide(self, sticky_key: str, forced: Stage | None = None) -> RouteDecision:
        if forced is not None:
            return RouteDecision(stage=forced, shadow=False, reason="override")
        bucket = bucket_of(sticky_key)
        weight = self.table.canary_weight
        stage: Stage = "canary" if bucket < weight else "production"
        sampled = self.sampled(sticky_key)
        return RouteDecision(
            stage=stage,
            shadow=sampled and bool(self.table.version("staging")),
            reason=f"bucket={bucket} weight={weight}",
            canary_mirror=sampled and stage == "canary",
        )
