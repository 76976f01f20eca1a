"""The SCP's durable spool: every received instance is on disk before C-STORE answers Success.

Layout: ``<root>/studies/<study key>/<instance key>.dcm`` plus ``study_uid`` (the UID in
plain text, needed to address the study on the gateway), and per instance the gateway has
analysed an empty ``<instance key>.<inode>-<mtime ns>.analysed`` marker. The marker names the
copy it is for: an instance sent again replaces the ``.dcm`` (a new file) and is analysed again. A
marker lost in a crash costs a second analysis of that image, never a result, so markers are
not fsync'd. Keys are sha256 prefixes of the UIDs (an instance's with its patient), so a hostile
UID never becomes a path. A file is written to a temp name, fsync'd, renamed into place and the
folder fsync'd: after Success, a crash or power cut loses nothing, and a restarted SCP finds
every study still waiting (the settle clock is the newest file's mtime, so it survives the
restart too). A study's first arrival is the mtime of its
``study_uid`` file (written once, with its first instance), so an instance sent again and again
does not move it (the forwarder's maximum wait counts from it); when the forwarder hands a study
over while later instances keep its folder, that mtime is set to the earliest of them: they are
the study's next round. A write that fails leaves neither a temp file nor, for a study's first
instance, the folder: a folder without an instance is never listed, so it would never be removed.
At most ``max_study_instances`` instances wait per study (:class:`StudyFull` beyond), and no
write leaves the disk with less than ``min_free_bytes`` free (:class:`SpoolDiskLow`). Bytes are
not the only bound: a sender of many tiny instances (each one-instance study is a folder, its UID
file, the instance and its marker) ran the file system out of inodes with bytes to spare, and made
the forwarder's listing (every folder, on every store) ever longer. So the whole spool holds at
most ``max_instances`` instances in ``max_studies`` studies, and no write leaves the file system
with fewer than ``min_free_inodes`` free inodes (:class:`SpoolFull`). Those counts are kept as
the spool writes and removes (counted from the disk at start): a C-STORE lists nothing.

One lock orders the SCP's writes against the forwarder's deletions, so an instance that
arrives while its study is being handed over is never removed unsent.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path

from core.durable import (
    DISK_RESERVE_BYTES,
    discard_leftovers,
    fsync_dir,
    leaves_reserve,
    replace_durably,
    write_synced,
)
from serving.dicom.headers import instance_uids  # the one guarded header read

log = logging.getLogger("cxr.dimse")


def _key(uid: str) -> str:
    # every character counts: with "replace", the non-ASCII SOP Instance UIDs "1.2.\u00e9" and "1.2.\u00fc"
    # (the SCP spools invalid UIDs as read, STOW-RS takes them) had one key, and the second replaced the
    # first, acknowledged. ASCII UIDs keep their keys
    return hashlib.sha256(uid.encode("utf-8", "surrogatepass")).hexdigest()[:32]


def _instance_key(sop_uid: str, patient: str) -> str:
    """An instance's file name: its SOP Instance UID and its patient (see :meth:`InstanceSpool.write`)."""
    return _key(sop_uid) if not patient else _key(json.dumps([sop_uid, patient]))


class SpoolFull(OSError):
    """The spool has no room for a new instance: refused (the SCP answers 0xA700).

    ``reason`` names the bound reached: ``instances`` or ``studies`` (``held`` of at most ``limit``
    wait), ``inodes`` (``held`` free inodes would be left, under a reserve of ``limit``) or
    ``disk_bytes`` (:class:`SpoolDiskLow`).
    """

    def __init__(self, reason: str, held: int, limit: int) -> None:
        super().__init__(errno.ENOSPC, f"the spool is full: {reason} {held}, limit {limit}")
        self.reason = reason
        self.held = held
        self.limit = limit


class SpoolDiskLow(SpoolFull):
    """The write would leave less than the spool's disk reserve free: refused (the SCP answers 0xA700)."""

    def __init__(self, free: int, limit: int) -> None:
        super().__init__("disk_bytes", free, limit)


class StudyFull(Exception):
    """The study already has ``limit`` instances waiting: a new one is refused (the SCP answers 0xA700)."""

    def __init__(self, instances: int, limit: int) -> None:
        super().__init__(f"{instances} instances of the study wait, at most {limit}")
        self.instances = instances
        self.limit = limit


@dataclass(frozen=True)
class SpooledStudy:
    """One study waiting in the spool: its UID, its instance files, which of them still await
    analysis (``pending``), and when the first and the last arrived."""

    study_uid: str
    folder: Path
    files: tuple[Path, ...]
    last_arrival: float
    pending: tuple[Path, ...]
    # the study's (or its current round's) first instance: the study_uid file's mtime, or an
    # instance's if older; an instance sent again does not move it
    first_arrival: float
    # each file's copy when listed (inode and mtime): the analysed marker names the copy it was made for
    stamps: tuple[str, ...]


def _has_content(path: Path) -> bool:
    try:
        return path.stat().st_size > 0
    except FileNotFoundError:
        return False


def _marker(instance: Path, stamp: str) -> Path:
    return instance.with_name(f"{instance.stem}.{stamp}.analysed")


def _copy_id(st: os.stat_result) -> str:
    """Which copy of an instance a stat describes: a resend is a new file (inode) written later (mtime)."""
    return f"{st.st_ino}-{st.st_mtime_ns}"


def _instance_names(folder: Path) -> set[str]:
    with os.scandir(folder) as names:
        return {name.name for name in names if name.name.endswith(".dcm")}


def _remove_folder(folder: Path) -> None:
    """Delete a study folder that holds no instance, whatever else it holds (UID, markers, flag)."""
    for leftover in folder.iterdir():
        leftover.unlink(missing_ok=True)
    folder.rmdir()


def _free_inodes(folder: Path) -> int | None:
    """Inodes an unprivileged writer may still create on ``folder``'s file system; None where the file
    system reports no inode count (``f_files`` 0: btrfs, some network and FUSE file systems)."""
    st = os.statvfs(folder)
    return None if st.f_files == 0 else st.f_favail


def _current_copy(instance: Path) -> str | None:
    """The copy of ``instance`` on disk now; None once removed."""
    try:
        return _copy_id(instance.stat())
    except FileNotFoundError:
        return None


class InstanceSpool:
    def __init__(
        self,
        root: Path,
        max_study_instances: int = 500,
        min_free_bytes: int = DISK_RESERVE_BYTES,
        *,
        max_instances: int = 20_000,
        max_studies: int = 2_000,
        min_free_inodes: int = 20_000,
    ) -> None:
        self.root = root
        self.max_study_instances = max_study_instances
        self.min_free_bytes = min_free_bytes
        self.max_instances = max_instances
        self.max_studies = max_studies
        self.min_free_inodes = min_free_inodes
        self.studies_dir = root / "studies"
        self.studies_dir.mkdir(parents=True, exist_ok=True)
        self.lock = threading.Lock()
        # set by every write: the forwarder hands a new instance to the gateway at once
        self.changed = threading.Event()
        self._uids: dict[str, str] = {}  # study folder -> its UID, read once (the file never changes)
        discard_leftovers(self.studies_dir, "*/.tmp-*")  # writes a crash interrupted: never acknowledged
        self._discard_empty_folders()
        self._repair_uid_files()
        # what the spool holds, kept by write and remove under the lock: the room check lists nothing
        self._studies, self._instances = self._count_held()

    def _discard_empty_folders(self) -> None:
        """Delete study folders without an instance (a crash between creating one and its first
        instance): never listed, so nothing else would ever remove them. Only at start."""
        for folder in self.studies_dir.iterdir():
            if folder.is_dir() and not _instance_names(folder):
                with contextlib.suppress(OSError):
                    _remove_folder(folder)

    def _repair_uid_files(self) -> None:
        """Give back its UID file to a study folder whose file is missing or empty, from its instances.

        An older SCP wrote the file in place and never fsync'd it, so a crash could leave it empty
        beside acknowledged instances; such a study was never listed again (:meth:`study`). The UID
        comes from an instance's header through the guarded reader, and is used only when its key
        is the folder's own name.
        """
        repaired = unreadable = 0
        for folder in self.studies_dir.iterdir():
            if not folder.is_dir() or _has_content(folder / "study_uid"):
                continue
            study_uid = ""
            for instance in sorted(folder.glob("*.dcm")):
                found = instance_uids(instance.read_bytes())[2]
                if found and _key(found) == folder.name:
                    study_uid = found
                    break
            if study_uid:
                replace_durably(folder / "study_uid", study_uid.encode())
                fsync_dir(folder)
                repaired += 1
            elif any(folder.glob("*.dcm")):
                unreadable += 1
        if repaired or unreadable:  # folder names are hashes: nothing identifying in the line
            log.warning("dimse_spool_uid_repaired studies=%d unreadable=%d", repaired, unreadable)

    def _count_held(self) -> tuple[int, int]:
        """(studies, instances) on disk: folders with an instance, and their instances. Only at start."""
        studies = instances = 0
        with os.scandir(self.studies_dir) as folders:
            for entry in folders:
                if entry.is_dir(follow_symlinks=False):
                    held = len(_instance_names(Path(entry.path)))
                    studies += held > 0
                    instances += held
        return studies, instances

    @property
    def held(self) -> tuple[int, int]:
        """(studies, instances) waiting, as counted by the spool (no listing)."""
        return self._studies, self._instances

    def full(self, size: int = 0, *, new_study: bool = True, new_instance: bool = True) -> SpoolFull | None:
        """Why an instance of ``size`` bytes would be refused now (for a new study, by default); None: room.

        A resent instance (``new_instance`` False) replaces its copy: it adds nothing to the counts,
        but its copy is written beside the old one first, so the bytes and inodes are checked all the same.
        """
        if not leaves_reserve(self.studies_dir, size, self.min_free_bytes):
            return SpoolDiskLow(shutil.disk_usage(self.studies_dir).free, self.min_free_bytes)
        if new_instance and self._instances >= self.max_instances:
            return SpoolFull("instances", self._instances, self.max_instances)
        if new_study and self._studies >= self.max_studies:
            return SpoolFull("studies", self._studies, self.max_studies)
        free = _free_inodes(self.studies_dir)
        # a new study's folder, UID file, instance and marker; an instance and its marker otherwise
        needed = 4 if new_study else 2
        if free is not None and free - needed < self.min_free_inodes:
            return SpoolFull("inodes", free, self.min_free_inodes)
        return None

    def write(self, study_uid: str, sop_uid: str, data: bytes, *, patient: str = "") -> Path:
        """Store one instance durably (blocking). A second copy of the same instance replaces the first.

        The same instance is the same SOP Instance UID of the same ``patient`` (the SCP passes the
        instance's PatientID and IssuerOfPatientID): an instance of another patient that reuses the UID
        (a colliding or broken sender) is kept beside it, not written over an acknowledged instance, and
        the gateway, which refuses one patient's image in another's study, has the last word on both.

        Raises :class:`StudyFull` for a new instance of a study that has ``max_study_instances``
        waiting, :class:`SpoolFull` (before writing anything) when the spool has no room for it
        (:meth:`full`: :class:`SpoolDiskLow` for the byte reserve), and ``OSError`` when the disk
        refuses the write: then nothing of this call is left, and a study folder that held no
        instance before it is removed.
        """
        with self.lock:
            folder = self.studies_dir / _key(study_uid)
            target = folder / f"{_instance_key(sop_uid, patient)}.dcm"
            try:
                held = _instance_names(folder)
            except FileNotFoundError:
                held = set()
            new_instance = target.name not in held
            if new_instance and len(held) >= self.max_study_instances:
                raise StudyFull(len(held), self.max_study_instances)
            refused = self.full(len(data), new_study=not held, new_instance=new_instance)
            if refused is not None:
                raise refused
            folder.mkdir(parents=True, exist_ok=True)
            try:
                self._write(folder, target, study_uid, data, first=not held)
            except BaseException:
                if not held and not _instance_names(folder):
                    with contextlib.suppress(OSError):  # the write's own error is the one to report
                        _remove_folder(folder)
                    self._uids.pop(folder.name, None)
                raise
            finally:  # a write that failed after its rename left the instance: counted, as it is on disk
                if new_instance and target.exists():
                    self._instances += 1
                    self._studies += not held
        self.changed.set()
        return target

    def _write(self, folder: Path, target: Path, study_uid: str, data: bytes, *, first: bool) -> None:
        """The instance, and the study's UID file if missing, durable in ``folder`` (under the lock)."""
        uid_file = folder / "study_uid"
        new_uid = not _has_content(uid_file)  # a new study, or a file a failed or older write left
        if new_uid:
            # whole or absent: the forwarder lists folders without this lock, and a UID file it
            # found empty (opened, not yet written) had sent the study to the gateway without its
            # UID. Durable before any instance is: POSIX orders no two renames
            replace_durably(uid_file, study_uid.encode())
            fsync_dir(folder)
        elif first:  # a UID file some failed write left: the study's first arrival is this one
            os.utime(uid_file)
        replace_durably(target, data)
        for marker in folder.glob(f"{target.stem}.*.analysed"):  # a new copy: analysed afresh
            marker.unlink(missing_ok=True)
        fsync_dir(folder)
        # the folder's own name: whenever it held no instance before this one, whoever created it or
        # its UID file (a first try that failed after writing the UID, a crash's leftover)
        if new_uid or first:
            fsync_dir(self.studies_dir)

    def studies(self) -> list[SpooledStudy]:
        """Every study waiting, the one whose first instance arrived first first (handed over in order).

        Listed on every store and every finished hand-over, so one ``scandir`` per folder and a
        cache of the (immutable) study UID files: with pathlib globs and reads, 40 waiting studies
        cost 3.4 ms a listing (1.5 ms now), and the SCP's CPU per image in a burst rose from ~15 to
        ~20 ms (docs/benchmarks.md, "Images analysed on arrival").
        """
        out = []
        with os.scandir(self.studies_dir) as folders:
            entries = [e for e in folders if e.is_dir(follow_symlinks=False)]
        for entry in entries:
            study = self.study(Path(entry.path))
            if study is not None:
                out.append(study)
        return sorted(out, key=lambda s: (s.first_arrival, s.folder.name))

    def study(self, folder: Path) -> SpooledStudy | None:
        """The study in ``folder`` as it is now; None once handed over (or not a study)."""
        study_uid = self._uids.get(folder.name)
        if study_uid is None:
            try:
                study_uid = (folder / "study_uid").read_text().strip()
            except (FileNotFoundError, NotADirectoryError):  # not a study, or handed over meanwhile
                return None
            if not study_uid:  # not written yet (an older SCP wrote it in place): cache no UID until it is
                return None
            self._uids[folder.name] = study_uid
        found: list[tuple[Path, str, float]] = []
        markers = set()
        started = float("inf")  # the study_uid file's mtime: when the study (its current round) began
        try:
            with os.scandir(folder) as names:
                for name in names:
                    if name.name == "study_uid":
                        with contextlib.suppress(FileNotFoundError):
                            started = name.stat(follow_symlinks=False).st_mtime
                    elif name.name.endswith(".dcm"):
                        try:
                            st = name.stat(follow_symlinks=False)
                        except FileNotFoundError:  # handed over and removed while listing
                            continue
                        found.append((Path(name.path), _copy_id(st), st.st_mtime))
                    elif name.name.endswith(".analysed"):
                        markers.add(name.name)
        except FileNotFoundError:
            return None
        if not found:
            return None
        found.sort()
        files = tuple(f for f, _, _ in found)
        stamps = tuple(stamp for _, stamp, _ in found)
        arrivals = [arrival for _, _, arrival in found]
        pending = tuple(f for f, stamp, _ in found if _marker(f, stamp).name not in markers)
        return SpooledStudy(
            study_uid,
            folder,
            files,
            max(arrivals),
            pending=pending,
            first_arrival=min(started, *arrivals),
            stamps=stamps,
        )

    def mark_analysed(self, study: SpooledStudy, files: list[Path]) -> None:
        """Note that the gateway has answered for ``files`` (as listed in ``study``): not sent again.

        A file replaced since it was listed (the instance sent again) keeps no marker of its new
        copy, so the new copy is analysed too.
        """
        listed = dict(zip(study.files, study.stamps, strict=True))
        with self.lock:
            for f in files:
                current = _current_copy(f)
                if current is not None and listed.get(f) == current:
                    _marker(f, current).touch()

    def forget_analysed(self, study: SpooledStudy) -> bool:
        """Clear the study's analysed markers, once: its images go to the gateway again.

        For a gateway whose send-back answer says it holds nothing of the study although it had
        answered for its images (its worklist lost, or the results expired): the images are
        analysed again rather than the study dropped without results. False when this was done
        before for the study (its images were then all refused: the answer is the gateway's last word).
        """
        flag = study.folder / "analysed-again"
        with self.lock:
            if flag.exists():
                return False
            for marker in study.folder.glob("*.analysed"):
                marker.unlink(missing_ok=True)
            fsync_dir(study.folder)  # the markers are gone before the flag says the retry was given
            write_synced(flag, b"")
            fsync_dir(study.folder)
        return True

    def remove(self, study: SpooledStudy) -> None:
        """Drop the instances that were handed over; the folder goes only if nothing new arrived.

        An instance replaced after ``study`` was listed (sent again meanwhile) stays, unanalysed.
        What stays is the study's next round: its first arrival (the UID file's mtime) is set to
        the earliest of it. Not fsync'd: lost in a crash, the next round is only sent back sooner.
        """
        listed = dict(zip(study.files, study.stamps, strict=True))
        with self.lock:
            removed = 0
            for f in study.files:
                current = _current_copy(f)
                if current is not None and current != listed[f]:
                    continue  # sent again since the listing: that copy is still to be analysed
                with contextlib.suppress(FileNotFoundError):
                    f.unlink()
                    removed += 1
                for marker in study.folder.glob(f"{f.stem}.*.analysed"):
                    marker.unlink(missing_ok=True)
            # under the lock: nothing else removes an instance meanwhile
            kept = [f.stat().st_mtime_ns for f in study.folder.glob("*.dcm")]
            self._instances = max(0, self._instances - removed)
            if removed and not kept:
                self._studies = max(0, self._studies - 1)
            if not kept:
                _remove_folder(study.folder)
                self._uids.pop(study.folder.name, None)
            else:  # arrived after the listing: the study's next round, which begins with the first of them
                with contextlib.suppress(FileNotFoundError):
                    os.utime(study.folder / "study_uid", ns=(min(kept), min(kept)))
                # the round's own retry (forget_analysed): the flag of this one had dropped the next
                # round, unsent, at the gateway's first study_not_analysed or study_results_missing
                (study.folder / "analysed-again").unlink(missing_ok=True)

    def depth(self) -> tuple[int, int]:
        """(studies, instances) waiting."""
        studies = self.studies()
        return len(studies), sum(len(s.files) for s in studies)
