"""Scratch folders beside where results go: a finished file leaves one by an atomic rename."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def scratch_dir(parent: Path, prefix: str) -> Iterator[Path]:
    """A fresh folder of this call's own under ``parent`` (created if need be), removed afterwards.

    Under ``parent`` so that it is on the same filesystem, where ``Path.replace`` of a finished
    file into place is atomic; of this call's own so that concurrent writers never write into
    each other's files. Whatever is left in it when the block ends is deleted.
    """
    parent.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
