"""Recording what a durable write does on disk, for the tests of ``core.durable`` and its users."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from core import durable


class Steps:
    """Records the fsyncs (of files and folders, by path) and renames under ``root``."""

    def __init__(self, root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.root = root
        self.steps: list[str] = []
        real_fsync, real_rename = os.fsync, os.rename

        def fsync(fd: int) -> None:
            path = Path(os.readlink(f"/proc/self/fd/{fd}"))
            if path.is_relative_to(root):
                self.steps.append(f"fsync {self.name(path)}")
            real_fsync(fd)

        def rename(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
            real_rename(src, dst)  # recorded once done: a refused rename changed nothing
            if Path(dst).is_relative_to(root):
                self.steps.append(f"rename {self.name(Path(src))} -> {self.name(Path(dst))}")

        monkeypatch.setattr(durable.os, "fsync", fsync)
        monkeypatch.setattr(durable.os, "rename", rename)

    def name(self, path: Path) -> str:
        """``path`` relative to the root, a temp folder's random name shown as ``tmp``."""
        rel = path.relative_to(self.root).as_posix()
        return "/".join("tmp" if part.startswith(".tmp-") else part for part in rel.split("/"))
