"""The SCP's durable spool: every received instance is on disk before C-STORE answers Success.

Layout: ``<root>/studies/<study key>/<instance key>.dcm`` plus ``study_uid`` (the UID in
plain text, needed to address the study on the gateway). Keys are sha256 prefixes of the
UIDs, so a hostile UID never becomes a path. A file is written to a temp name, fsync'd,
renamed into place and the folder fsync'd: after Success, a crash or power cut loses
nothing, and a restarted SCP finds every study still waiting (the settle clock is the
newest file's mtime, so it survives the restart too).

One lock orders the SCP's writes against the forwarder's deletions, so an instance that
arrives while its study is being handed over is never removed unsent.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path


def _key(uid: str) -> str:
    return hashlib.sha256(uid.encode("ascii", "replace")).hexdigest()[:32]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class SpooledStudy:
    """One study waiting in the spool: its UID, its instance files and when the last arrived."""

    study_uid: str
    folder: Path
    files: tuple[Path, ...]
    last_arrival: float


class InstanceSpool:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.studies_dir = root / "studies"
        self.studies_dir.mkdir(parents=True, exist_ok=True)
        self.lock = threading.Lock()
        for tmp in self.studies_dir.glob("*/.tmp-*"):  # a write the crash interrupted: never acknowledged
            tmp.unlink(missing_ok=True)

    def write(self, study_uid: str, sop_uid: str, data: bytes) -> Path:
        """Store one instance durably (blocking). A second copy of the same instance replaces the first."""
        with self.lock:
            folder = self.studies_dir / _key(study_uid)
            new_folder = not folder.exists()
            folder.mkdir(parents=True, exist_ok=True)
            uid_file = folder / "study_uid"
            if not uid_file.exists():
                uid_file.write_text(study_uid)
            target = folder / f"{_key(sop_uid)}.dcm"
            tmp = folder / f".tmp-{uuid.uuid4().hex}"
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, target)
            _fsync_dir(folder)
            if new_folder:
                _fsync_dir(self.studies_dir)
            return target

    def studies(self) -> list[SpooledStudy]:
        out = []
        for folder in sorted(self.studies_dir.iterdir()):
            uid_file = folder / "study_uid"
            files = tuple(sorted(folder.glob("*.dcm")))
            if not folder.is_dir() or not uid_file.exists() or not files:
                continue
            last = max(f.stat().st_mtime for f in files)
            out.append(SpooledStudy(uid_file.read_text().strip(), folder, files, last))
        return out

    def settled(self, settle_s: float, now: float | None = None) -> list[SpooledStudy]:
        """Studies with no new instance for ``settle_s`` seconds: ready to be analysed."""
        now = time.time() if now is None else now
        return [s for s in self.studies() if now - s.last_arrival >= settle_s]

    def remove(self, study: SpooledStudy) -> None:
        """Drop the instances that were handed over; the folder goes only if nothing new arrived."""
        with self.lock:
            for f in study.files:
                f.unlink(missing_ok=True)
            if not any(study.folder.glob("*.dcm")):
                for leftover in study.folder.iterdir():
                    leftover.unlink(missing_ok=True)
                study.folder.rmdir()

    def depth(self) -> tuple[int, int]:
        """(studies, instances) waiting."""
        studies = self.studies()
        return len(studies), sum(len(s.files) for s in studies)
