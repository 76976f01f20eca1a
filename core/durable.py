"""Files and folders that survive a crash or a power cut once the call that wrote them returns.

What a caller has acknowledged (a C-STORE answered Success, a study's send-back answered 200,
feedback answered "spooled") must still be on disk after the machine loses power. A rename is
atomic but not durable until the folder holding the new name is fsync'd, and a file's bytes
are not durable until the file is: each helper here does both, in the order POSIX needs.

Hand-written (a dozen lines of ``os`` calls): no maintained library does fsync'd renames of
folders, and ``atomicwrites`` (files only) is archived.
"""

from __future__ import annotations

import errno
import os
import shutil
import uuid
from pathlib import Path

#: free space a spool leaves on its disk when it takes something it has to keep: the DIMSE spool and
#: the feedback spool share the stack's disk with the result journal (written before each answer)
#: and the PACS outbox (what a PACS is owed); filling it to the last byte failed those instead
DISK_RESERVE_BYTES = 256 * 1024 * 1024


def leaves_reserve(folder: Path, size: int, reserve: int = DISK_RESERVE_BYTES) -> bool:
    """Whether writing ``size`` more bytes under ``folder`` leaves at least ``reserve`` free there."""
    return shutil.disk_usage(folder).free - size >= reserve


def fsync_dir(path: Path) -> None:
    """Make the names in ``path`` (files created, renamed or removed there) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_synced(path: Path, data: bytes, mode: int = 0o666) -> None:
    """``data`` at ``path`` with its bytes on disk; its name is durable once its folder is fsync'd.

    A write that fails once the file is open (a full disk: ``ENOSPC`` from the write, the flush or
    the fsync) removes the partial file before raising: no half-written file is left behind.
    ``mode`` (less the umask) is the file's from its creation: a secret is never readable by others.
    """
    with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode), "wb") as fh:
        try:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        except BaseException:
            path.unlink(missing_ok=True)
            raise


def replace_durably(target: Path, data: bytes, mode: int = 0o666) -> None:
    """``data`` at ``target`` by a temp file beside it, fsync'd and renamed: a reader sees all or none.

    The folder's own fsync (which makes the new name durable) is the caller's, once per batch of writes.
    The temp file never outlives a failed call: on a full disk every refused write would otherwise
    leave one, making the disk fuller until the owner's next start deletes them.
    """
    tmp = target.with_name(f".tmp-{uuid.uuid4().hex}")
    try:
        write_synced(tmp, data, mode)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def make_dirs(path: Path) -> None:
    """``path`` and its missing parents, each new folder's name durable in its parent."""
    missing = []
    while not path.is_dir():
        missing.append(path)
        path = path.parent
    for folder in reversed(missing):
        folder.mkdir(exist_ok=True)  # another process may create it meanwhile: the same folder
        fsync_dir(folder.parent)


def publish_dir(tmp: Path, final: Path) -> bool:
    """Rename the fully written folder ``tmp`` to ``final`` durably; False (nothing renamed, ``tmp``
    left to the caller) when ``final`` already holds something.

    The files in ``tmp`` must have been written with :func:`write_synced`; their names in ``tmp``
    are made durable first, then the rename in the parent. An empty ``final`` is replaced (it held
    no item). On False the parent is fsync'd too: the folder already there may be another
    writer's, renamed but not yet made durable, and the caller is about to answer "already
    there". Any other failure raises ``OSError``.
    """
    fsync_dir(tmp)
    try:
        os.rename(tmp, final)
    except OSError as exc:
        if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
            raise
        fsync_dir(final.parent)
        return False
    fsync_dir(final.parent)
    return True


def publish_files(final: Path, files: dict[str, bytes]) -> bool:
    """A new folder ``final`` holding ``files`` (name -> bytes), whole and durable, or nothing.

    Written in a ``.tmp-`` sibling and published with :func:`publish_dir`; False (nothing
    changed) when ``final`` already holds something. The temp folder never outlives the call,
    whatever fails: the owners delete ``.tmp-`` leftovers only at start (a crash's).
    """
    tmp = final.with_name(f".tmp-{final.name}-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        for name, data in files.items():
            write_synced(tmp / name, data)
        published = publish_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if not published:
        shutil.rmtree(tmp, ignore_errors=True)
    return published


def discard_leftovers(root: Path, *patterns: str) -> None:
    """Delete what a crash left under ``root`` (``.tmp-`` files and folders matching ``patterns``).

    Only at start, by the one process that owns ``root``: at any other time these are another
    call's writes in progress.
    """
    for pattern in patterns:
        for leftover in root.glob(pattern):
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)


def discard_dir(folder: Path) -> None:
    """Remove ``folder`` so that no crash can leave part of it under its own name.

    It is first renamed to a ``.tmp-`` sibling (one atomic step: a listing sees the whole item or
    nothing), then deleted; a crash in between leaves a ``.tmp-`` folder, which the owners of
    these folders skip when listing and delete when they start. A plain ``rmtree`` cut short
    could leave an item's index without its data, listed and failing on every pass. The rename
    is made durable (the parent fsync'd) before the first deletion: POSIX does not order a
    rename before later unlinks in another folder, so a power cut could otherwise keep the
    deletions of the item's files but not its new name.
    """
    grave = folder.with_name(f".tmp-del-{uuid.uuid4().hex}")
    try:
        os.rename(folder, grave)
    except FileNotFoundError:  # removed meanwhile
        return
    fsync_dir(folder.parent)
    shutil.rmtree(grave, ignore_errors=True)
