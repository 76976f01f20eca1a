"""The GitOps repository: commit exactly the stage files a delivery changed, read their history.

GitPython drives the ``git`` binary, so hooks, signing and the user's identity behave as on the
command line. Commits name their paths (``git commit -- paths``) so whatever else a person has
staged in the same checkout never rides along with a promotion.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import git

from core.stage_file import StageFile, parse_stage_file, stage_file_path
from core.stages import Stage
from delivery.errors import GitOpsRepoError
from delivery.messages import DeliveryRecord, parse_record

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HistoryEntry:
    """One commit that touched a stage file, with the file as it was after that commit."""

    sha: str
    content: StageFile
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

    def push(self, remote: str = "origin") -> None:
        """Push the current branch; a rejected push leaves the local commit for a person to rebase."""
        try:
            branch = self._repo.active_branch.name
        except TypeError as exc:
            raise GitOpsRepoError("HEAD is detached; check out the branch ArgoCD watches first") from exc
        if remote not in [r.name for r in self._repo.remotes]:
            raise GitOpsRepoError(f"no git remote named {remote!r}; add it or drop --push")
        try:
            self._repo.git.push(remote, f"HEAD:refs/heads/{branch}")
        except git.GitCommandError as exc:
            raise GitOpsRepoError(
                f"git push to {remote}/{branch} was refused: {(exc.stderr or '').strip()}; "
                "pull --rebase and push again (the commit is kept locally)"
            ) from exc
        log.info("gitops_push remote=%s branch=%s", remote, branch)

    def head_sha(self) -> str:
        return self._repo.head.commit.hexsha

    def history(self, stage: Stage) -> Iterator[HistoryEntry]:
        """Commits that changed the stage file, newest first, with the file's content after each."""
        rel = self._relative(self.stage_path(stage))
        if not self._repo.head.is_valid():
            return
        for commit in self._repo.iter_commits(paths=rel):
            try:
                text = (commit.tree / rel).data_stream.read().decode("utf-8")
            except KeyError:  # the commit deleted the file
                continue
            message = commit.message if isinstance(commit.message, str) else commit.message.decode()
            yield HistoryEntry(
                sha=commit.hexsha,
                content=parse_stage_file(text, stage, f"{rel}@{commit.hexsha[:12]}"),
                record=parse_record(message),
                committed_at=commit.committed_datetime,
            )
