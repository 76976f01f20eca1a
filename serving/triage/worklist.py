"""The worklist: one row per analysed study, its abnormality score and priority flag, per tenant.

A study arrives image by image (one STOW-RS part or one DIMSE instance per detection call) or all
at once; :meth:`WorklistStore.record` merges each call into the study's row, so the row always
holds the score over every image seen so far (core/triage.py: the maximum of the image scores).

Stored in a SQLite file beside the result journal on one machine, and in the cluster's PostgreSQL
shared by every gateway replica (``CXR_WORKLIST_URL``; serving/triage/worklist_db.py says why):
the worklist is small (one row per study and retention window), must survive a restart, and is
written from the gateway's worker threads; a merge is one transaction holding the study's lock (two
images of one study recorded at once, by two threads or two replicas, cannot lose each other).

Study UIDs identify a patient's examination: they are stored (the worklist must name the study)
but never logged, and every query is scoped to the caller's tenant, so a key of another tenant
never sees a study, exactly as for results.

A study UID is not trusted to name one patient (a modality bug or a forged instance can reuse it):
each row keeps the salted hash of its PatientID (``patient_key``, "" when the images carry none),
and an image of another patient is refused (:class:`StudyPatientMismatch`) instead of being merged
into the row, whose result ids the PACS send-back turns into one SR.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from core.triage import is_priority, shown_score, study_score
from serving.errors import StudyPatientMismatch
from serving.triage.worklist_db import Row, SqliteWorklistDb, WorklistDb

#: the most studies one listing returns
MAX_LIST = 500

_SELECT = "SELECT * FROM studies WHERE tenant = ? AND study_uid = ?"
_WRITTEN = (
    "tenant, study_uid, score, priority, threshold, result_ids, model_version, stage, first_seen, "
    "last_seen, patient_key, result_sops, result_scores, evicted_score"
)
#: one statement for both databases (SQLite >= 3.24 and PostgreSQL share ON CONFLICT ... DO UPDATE)
_UPSERT = (
    f"INSERT INTO studies ({_WRITTEN}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
    "ON CONFLICT (tenant, study_uid) DO UPDATE SET "
    + ", ".join(f"{c} = excluded.{c}" for c in _WRITTEN.split(", ")[2:])
)


@dataclass(frozen=True)
class StudyTriage:
    """A study's triage so far: its score over every image seen, the flag, and where its results are."""

    study_uid: str
    score: float
    priority: bool
    threshold: float
    result_ids: tuple[str, ...]
    model_version: str = ""
    stage: str = ""
    first_seen: datetime | None = None
    last_seen: datetime | None = None

    @property
    def images(self) -> int:
        """Analysed images (one result each) of the study."""
        return len(self.result_ids)

    def as_dict(self) -> dict[str, Any]:
        """The triage the SR and the PACS send-back carry: ``{"score", "priority", "threshold"}``."""
        return {"score": shown_score(self.score), "priority": self.priority, "threshold": self.threshold}

    def to_json(self) -> dict[str, Any]:
        """One entry of ``GET /v1/worklist``."""
        return {
            "study_uid": self.study_uid,
            "score": shown_score(self.score),
            "priority": self.priority,
            "images": self.images,
            "result_ids": list(self.result_ids),
            "model_version": self.model_version,
            "stage": self.stage,
            "first_seen": _iso(self.first_seen),
            "last_seen": _iso(self.last_seen),
        }


def same_patient(stored: str, key: str) -> bool:
    """Whether an image's patient key (serving/inference/detector.py) is the row's patient.

    A key with an IssuerOfPatientID is ``<PatientID hash>/<hash with the issuer>``. A row written
    before the issuer counted holds the PatientID hash alone: it still takes its patient's images
    (and keeps its key), so a study in flight at the upgrade is not refused for the rest of its
    window; any other difference is another patient.
    """
    return stored == key or (bool(stored) and "/" not in stored and key.startswith(f"{stored}/"))


def _iso(value: datetime | None) -> str | None:
    return value.isoformat(timespec="seconds") if value is not None else None


def _epoch(value: datetime) -> float:
    if value.tzinfo is None:  # naive times are UTC here, like every time the gateway makes
        value = value.replace(tzinfo=UTC)
    return value.timestamp()


def _entries(row: Row | None) -> list[tuple[str, str, float | None]]:
    """(result id, SOP Instance UID or "", image score or None) of a row's kept results.

    A row of an older gateway has no SOP UIDs (every image then counts as its own) and no
    scores per result (None: the row's score stands for them).
    """
    if row is None:
        return []
    ids = [str(r) for r in json.loads(row["result_ids"])]
    sops = json.loads(row["result_sops"]) if row["result_sops"] else []
    scores = json.loads(row["result_scores"]) if row["result_scores"] else []
    if len(sops) != len(ids):
        sops = [""] * len(ids)
    if len(scores) != len(ids):
        scores = [None] * len(ids)
    return [
        (rid, str(sop), None if score is None else float(score))
        for rid, sop, score in zip(ids, sops, scores, strict=True)
    ]


def _row(row: Row) -> StudyTriage:
    return StudyTriage(
        study_uid=row["study_uid"],
        score=float(row["score"]),
        priority=bool(row["priority"]),
        threshold=float(row["threshold"]),
        result_ids=tuple(json.loads(row["result_ids"])),
        model_version=row["model_version"],
        stage=row["stage"],
        first_seen=datetime.fromtimestamp(row["first_seen"], UTC),
        last_seen=datetime.fromtimestamp(row["last_seen"], UTC),
    )


class WorklistStore:
    """Studies with their triage, in a :class:`~serving.triage.worklist_db.WorklistDb`; thread-safe."""

    def __init__(self, db: WorklistDb | Path) -> None:
        """A path is a SQLite file (one machine); nothing is created or connected until the first call."""
        self.db: WorklistDb = SqliteWorklistDb(db) if isinstance(db, Path) else db

    def close(self) -> None:
        """Release the database's connections (the gateway's shutdown)."""
        self.db.close()

    def record(
        self,
        tenant: str,
        study_uid: str,
        result_ids: Sequence[str],
        image_scores: Sequence[float],
        model_version: str,
        stage: str,
        threshold: float,
        *,
        patient_key: str | None = None,
        max_results: int | None = None,
        sop_uids: Sequence[str] | None = None,
        now: datetime | None = None,
    ) -> StudyTriage:
        """Merge newly analysed images into the study's row and return the study's triage.

        The score is the maximum over the study's images (an image's latest result only, and
        images the cap dropped included), the result ids their union in arrival order, the flag
        decided with ``threshold`` (the current setting), and model version and stage are the
        latest call's. ``patient_key`` (the images' salted
        PatientID hash, "" for none; None: not known, not checked) must equal the row's, else
        :class:`StudyPatientMismatch` is raised and the row is left as it was; a row of an older
        gateway (no key) takes the first key it is given. ``sop_uids`` (one per result, "" when
        unknown): a result of an image the row already holds replaces that image's earlier one, so a
        resent image counts once. ``max_results``: the row keeps the latest that many images' results
        (a PACS resending a study for ever grew the row, and the send-back loads every result it
        names).
        """
        seen = _epoch(now or datetime.now(UTC))
        with self.db.locked(json.dumps([tenant, study_uid])) as execute:
            found = execute(_SELECT, (tenant, study_uid))
            old = found[0] if found else None
            stored_key = old["patient_key"] if old is not None else None
            if (
                patient_key is not None
                and stored_key is not None
                and not same_patient(stored_key, patient_key)
            ):
                raise StudyPatientMismatch()
            key = stored_key if stored_key is not None else patient_key
            entries = _entries(old)
            known = {rid for rid, _, _ in entries}
            sops = sop_uids or [""] * len(result_ids)
            for rid, sop, image in zip(result_ids, sops, image_scores, strict=True):
                if rid in known:
                    continue
                if sop:  # the image sent again: its latest result stands for it
                    entries = [e for e in entries if e[1] != sop]
                entries.append((rid, sop, float(image)))
                known.add(rid)
            # images the cap drops still count for the score (an urgent finding is never forgotten);
            # a result replaced by its image's newer one does not (a corrected resend, a new model)
            evicted = (
                [float(old["evicted_score"])] if old is not None and old["evicted_score"] is not None else []
            )
            if max_results is not None and len(entries) > max_results:
                dropped = entries[:-max_results]
                evicted += [e[2] for e in dropped if e[2] is not None]
                if old is not None and any(e[2] is None for e in dropped):
                    evicted.append(float(old["score"]))  # an older row: its score stood for them
                entries = entries[-max_results:]
            ids = [rid for rid, _, _ in entries]
            kept = [e[2] for e in entries]
            if any(k is None for k in kept):  # an older gateway's results: its score stands for them
                previous = [float(old["score"])] if old is not None else []
                score = study_score([*previous, *image_scores, *evicted])
            else:
                score = study_score([*(k for k in kept if k is not None), *evicted])
            evicted_score = max(evicted) if evicted else None
            first = float(old["first_seen"]) if old is not None else seen
            execute(
                _UPSERT,
                (
                    tenant,
                    study_uid,
                    score,
                    int(is_priority(score, threshold)),
                    threshold,
                    json.dumps(ids),
                    model_version,
                    stage,
                    first,
                    max(seen, first),
                    key,
                    json.dumps([sop for _, sop, _ in entries]),
                    json.dumps([image for _, _, image in entries]),
                    evicted_score,
                ),
            )
            [row] = execute(_SELECT, (tenant, study_uid))
        return _row(row)

    def patient_key(self, tenant: str, study_uid: str) -> str | None:
        """The salted PatientID hash the study's row holds ("" for none), None when not known."""
        rows = self.db.query(
            "SELECT patient_key FROM studies WHERE tenant = ? AND study_uid = ?", (tenant, study_uid)
        )
        return None if not rows else rows[0]["patient_key"]

    def get(self, tenant: str, study_uid: str) -> StudyTriage | None:
        """The study's triage, or None when this tenant has no such study."""
        rows = self.db.query(_SELECT, (tenant, study_uid))
        return _row(rows[0]) if rows else None

    def list(self, tenant: str, since: datetime, limit: int = 100) -> list[StudyTriage]:
        """The tenant's studies analysed since ``since``: priority first, then oldest first.

        Within a priority class the study waiting longest (earliest first image) comes first:
        first come, first served, so a steady stream of new studies can never push an older one
        down the list and leave it unread; the score only decides the class, not the order in it.
        """
        limit = max(1, min(int(limit), MAX_LIST))
        rows = self.db.query(
            "SELECT * FROM studies WHERE tenant = ? AND last_seen >= ? "
            "ORDER BY priority DESC, first_seen ASC, study_uid ASC LIMIT ?",
            (tenant, _epoch(since), limit),
        )
        return [_row(r) for r in rows]

    def purge(self, before: datetime) -> int:
        """Delete studies last analysed before ``before`` (the results' retention); returns how many."""
        if not self.db.created():
            return 0
        return self.db.execute("DELETE FROM studies WHERE last_seen < ?", (_epoch(before),))
