"""The GitOps repository: commit exactly the stage files a delivery changed, read their history.

GitPython drives the ``git`` binary, so hooks, signing and the user's identity behave as on the
command line. Commits name their paths (``git commit -- paths``) so whatever else a person has
staged in the same checkout never rides along with a promotion.

Delivery commands (``promote``, ``rollback``, ``canary step``) take turns on one lock per
checkout, :meth:`GitOpsRepo.delivery_lock`, held from their first read of a stage file to their
commit (and push): a ``canary step`` that read canary v4 at 10 % can no longer write v4 at 50 %
over the v5 a ``promote`` committed meanwhile. :meth:`GitOpsRepo.commit_stage_files` writes the
files and commits them under it, and puts the files (and the index) back as they were when the
commit fails, so the working tree the gateway and the reconciler read never names what git does not.
"""

from __future__ import annotations

import fcntl
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import git

from core.errors import CxrError, StageFileError
from core.stage_file import (
    StageFile,
    parse_stage_file,
    read_stage_text,
    stage_file_path,
    write_stage_file,
    write_stage_text,
)
from core.stages import Stage
from delivery.errors import DeliveryLocked, GitOpsRepoError
from delivery.messages import DeliveryRecord, parse_record

log = logging.getLogger(__name__)

#: the delivery lock's file, inside the checkout's git folder (never committed, never synced)
LOCK_NAME = "cxr-delivery.lock"
#: how long a delivery command waits for another one (a promotion's gates can take minutes)
LOCK_TIMEOUT_S = 300.0
_LOCK_POLL_S = 0.05

# The delivery locks this process holds, by lock file, with the thread holding each: a command run
# inside another one under the same lock (``canary step`` promoting or rolling back) re-enters it,
# any other thread (or process) waits on the file lock.
_held: dict[str, int] = {}
_held_guard = threading.Lock()


@dataclass(frozen=True)
class HistoryEntry:
    """One commit that touched a stage file, with the file as it was after that commit.

    ``content`` is None where that commit left no valid stage file (a hand edit to garbage, fixed
    by a later commit): it named no model, so callers skip it or stop at it, but one bad commit in
    the past must not make every later rollback and canary analysis of the stage fail.
    """

    sha: str
    content: StageFile | None
    record: DeliveryRecord | None
    committed_at: datetime


class GitOpsRepo:
    """A checkout holding ``k8s/overlays``; the root is found from any folder inside it."""

    def __init__(self, gitops_dir: Path) -> None:
        try:
            self._repo = git.Repo(Path(gitops_dir), search_parent_directories=True)
        except (git.InvalidGitRepositoryError, git.NoSuchPathError) as exc:
            raise GitOpsRepoError(
                f"{gitops_dir} is not inside a git repository; set CXR_GITOPS_DIR to the checkout "
                "that holds k8s/overlays (or run `git init` there)"
            ) from exc
        if self._repo.working_tree_dir is None:
            raise GitOpsRepoError(f"{gitops_dir} is a bare repository; promote needs a checkout")
        self.root = Path(self._repo.working_tree_dir)

    def stage_path(self, stage: Stage) -> Path:
        return stage_file_path(self.root, stage)

    @property
    def lock_path(self) -> Path:
        """The checkout's delivery lock: ``.git/cxr-delivery.lock`` (a worktree's own git folder)."""
        return Path(self._repo.git_dir) / LOCK_NAME

    @contextmanager
    def delivery_lock(
        self,
        what: str,
        *,
        timeout_s: float | None = None,
        echo: Callable[[str], None] | None = None,
    ) -> Iterator[None]:
        """Hold the checkout's delivery lock (``fcntl.flock``) for the block; ``what`` names the command.

        Every delivery command holds it from its first read of a stage file to its commit, so
        two of them never interleave their reads and writes, nor ``git add``/``git commit``.
        Re-entered by the thread already holding it. A command that finds it held says so through
        ``echo`` once, waits up to ``timeout_s`` (:data:`LOCK_TIMEOUT_S`), then raises
        :class:`DeliveryLocked` naming the lock file and its holder. The kernel drops the lock
        when its process ends, so a killed command never leaves it held.
        """
        path = self.lock_path
        key = str(path.resolve())
        me = threading.get_ident()
        with _held_guard:
            reentered = _held.get(key) == me
        if reentered:
            yield
            return
        fd = _acquire(path, what, LOCK_TIMEOUT_S if timeout_s is None else timeout_s, echo)
        with _held_guard:
            _held[key] = me
        try:
            yield
        finally:
            with _held_guard:
                del _held[key]
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def commit_stage_files(self, files: list[StageFile], record: DeliveryRecord) -> str:
        """Write ``files`` and commit exactly them (:meth:`commit`); returns the new sha.

        Under the delivery lock. When the write or the commit fails (no git identity, a hook
        refuses it, another git command holds the index lock, Ctrl-C), each file's text as read
        before the write is put back (durably; a file that did not exist is removed) and so is
        its index entry, then the error is raised: the working tree still names what HEAD does,
        so the gateway and the reconciler keep serving it and a retry sees the change to make.
        """
        with self.delivery_lock(record.subject()):
            before = [(f.stage, read_stage_text(self.root, f.stage)) for f in files]
            rel = [self._relative(self.stage_path(f.stage)) for f in files]
            try:
                index_before = self._index_entries(rel)
            except git.GitCommandError as exc:
                raise GitOpsRepoError(f"cannot read the git index: {(exc.stderr or '').strip()}") from exc
            head_before = self.head_sha()
            try:
                paths = [write_stage_file(self.root, f) for f in files]
                return self.commit(paths, record)
            except BaseException as exc:
                head_now = self.head_sha()
                if head_now and head_now != head_before:
                    # the commit itself finished (Ctrl-C or an error after it): the files are what
                    # HEAD holds now; putting the old text back would leave every retry with
                    # "nothing to commit" and the tree naming another version than HEAD
                    log.warning(
                        "gitops_committed_before_error sha=%s error=%s", head_now[:12], type(exc).__name__
                    )
                    raise
                problems = self._put_back(before, rel, index_before)
                if not problems:
                    raise
                log.error("gitops_restore_failed %s", "; ".join(problems))
                if not isinstance(exc, CxrError | OSError):
                    raise
                raise GitOpsRepoError(
                    f"{exc}; and putting the stage files back failed ({'; '.join(problems)}): "
                    f"run `git checkout HEAD -- {' '.join(rel)}` in {self.root}"
                ) from exc

    def _index_entries(self, rel: list[str]) -> dict[str, str]:
        """The index's ``mode,sha`` of each path it holds (``git ls-files --stage``)."""
        out = self._repo.git.ls_files("--stage", "-z", "--", *rel)
        entries: dict[str, str] = {}
        for line in filter(None, out.split("\0")):
            meta, _, path = line.partition("\t")
            mode, sha, _stage = meta.split()
            entries[path] = f"{mode},{sha}"
        return entries

    def _put_back(
        self, before: list[tuple[Stage, str | None]], rel: list[str], index_before: dict[str, str]
    ) -> list[str]:
        """The files' earlier text and index entries back in place; what could not be put back."""
        problems: list[str] = []
        for stage, text in before:
            try:
                write_stage_text(self.root, stage, text)
            except OSError as exc:
                problems.append(f"{self.stage_path(stage)}: {exc}")
        try:
            now = self._index_entries(rel)
            for path in rel:
                if now.get(path) == index_before.get(path):
                    continue  # `git add` never ran (or changed nothing): leave the index alone
                if path in index_before:
                    self._repo.git.update_index("--cacheinfo", f"{index_before[path]},{path}")
                else:
                    self._repo.git.update_index("--force-remove", "--", path)
        except git.GitCommandError as exc:
            problems.append(f"the index: {(exc.stderr or '').strip() or exc}")
        return problems

    def _relative(self, path: Path) -> str:
        return path.resolve().relative_to(self.root.resolve()).as_posix()

    def commit(self, paths: list[Path], record: DeliveryRecord) -> str:
        """Commit only ``paths`` with the record's structured message; returns the new sha."""
        rel = [self._relative(p) for p in paths]
        try:
            self._repo.git.add("--", *rel)
            self._repo.git.commit("-m", record.render(), "--", *rel)
        except git.GitCommandError as exc:
            stderr = (exc.stderr or "").strip()
            hint = ""
            if "user.email" in stderr or "identity" in stderr:
                hint = " (set git user.name and user.email, or GIT_AUTHOR_NAME/GIT_AUTHOR_EMAIL)"
            raise GitOpsRepoError(f"git commit of {', '.join(rel)} failed: {stderr}{hint}") from exc
        sha = self._repo.head.commit.hexsha
        log.info("gitops_commit sha=%s action=%s stage=%s", sha[:12], record.action, record.stage)
        return sha

    def check_push(self, remote: str = "origin") -> str:
        """The branch :meth:`push` would push to ``remote``, or why it cannot: call it before committing.

        A delivery command with ``--push`` checks this first: found only at the push, a detached
        HEAD or a missing remote left the commit made (and the alias moved), and the retry the
        error asked for then promoted nothing ("nothing to commit") or rolled back one version
        further than asked.
        """
        try:
            branch = self._repo.active_branch.name
        except TypeError as exc:
            raise GitOpsRepoError("HEAD is detached; check out the branch ArgoCD watches first") from exc
        if remote not in [r.name for r in self._repo.remotes]:
            raise GitOpsRepoError(f"no git remote named {remote!r}; add it or drop --push")
        return branch

    def push(self, remote: str = "origin") -> None:
        """Push the current branch; a rejected push leaves the local commit for a person to rebase."""
        branch = self.check_push(remote)
        try:
            self._repo.git.push(remote, f"HEAD:refs/heads/{branch}")
        except git.GitCommandError as exc:
            raise GitOpsRepoError(
                f"git push to {remote}/{branch} was refused: {(exc.stderr or '').strip()}; "
                "pull --rebase and push again (the commit is kept locally)"
            ) from exc
        log.info("gitops_push remote=%s branch=%s", remote, branch)

    def head_sha(self) -> str:
        """HEAD's sha, "" before the first commit (or when it cannot be read)."""
        try:
            return str(self._repo.head.commit.hexsha) if self._repo.head.is_valid() else ""
        except (ValueError, git.GitCommandError):
            return ""

    def history(self, stage: Stage) -> Iterator[HistoryEntry]:
        """Commits that changed the stage file, newest first, with the file's content after each
        (None for a revision that is no valid stage file, see :class:`HistoryEntry`)."""
        rel = self._relative(self.stage_path(stage))
        if not self._repo.head.is_valid():
            return
        for commit in self._repo.iter_commits(paths=rel):
            try:
                # not UTF-8: replaced, so it reads as the unreadable revision it is, not a traceback
                text = (commit.tree / rel).data_stream.read().decode("utf-8", errors="replace")
            except KeyError:  # the commit deleted the file
                continue
            message = commit.message if isinstance(commit.message, str) else commit.message.decode()
            try:
                content: StageFile | None = parse_stage_file(text, stage, f"{rel}@{commit.hexsha[:12]}")
            except StageFileError as exc:
                log.warning("gitops_history_unreadable sha=%s error=%s", commit.hexsha[:12], exc)
                content = None
            yield HistoryEntry(
                sha=commit.hexsha,
                content=content,
                record=parse_record(message),
                committed_at=commit.committed_datetime,
            )


def _holder(path: Path) -> str:
    """Who holds the lock, as its holder wrote it into the file."""
    try:
        return path.read_text(encoding="utf-8", errors="replace").strip() or "unknown"
    except OSError:
        return "unknown"


def _acquire(path: Path, what: str, timeout_s: float, echo: Callable[[str], None] | None) -> int:
    """The open, exclusively flock'ed lock file (its holder line rewritten), or :class:`DeliveryLocked`."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise GitOpsRepoError(f"cannot open the delivery lock {path}: {exc}") from exc
    deadline = time.monotonic() + timeout_s
    told = False
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise DeliveryLocked(
                        f"another delivery command ({_holder(path)}) has held the delivery lock {path} "
                        f"for over {timeout_s:g} s; run `{what}` again once it has finished "
                        "(the lock is released when its process ends)"
                    ) from None
                if not told and echo is not None:
                    echo(f"waiting for the delivery lock {path}, held by {_holder(path)}")
                    told = True
                time.sleep(_LOCK_POLL_S)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}: {what}\n".encode(), 0)
    except BaseException:
        os.close(fd)
        raise
    return fd
