"""The audit log on disk, not only in the OS's cache: a power cut loses about a second of lines at most.

Before, lines were written and flushed to the OS but never fsync'd: what the kernel had not written
back (up to ~30 s on Linux) was lost with the power, accesses to results among them.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from serving.gateway.audit import AuditEntry, AuditLog, now_iso

pytestmark = pytest.mark.unit


def _entry(n: int) -> AuditEntry:
    return AuditEntry(now_iso(), f"r{n:04d}", "k", "pacs", "/v1/results/{result_id}", "GET", 200)


@pytest.fixture()
def synced(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The files os.fsync was called on, by path (the descriptor's target)."""
    seen: list[str] = []
    real = os.fsync
    lock = threading.Lock()

    def fsync(fd: int) -> None:
        with lock:
            seen.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return seen


def test_lines_written_are_fsynced_by_the_sync_thread_and_at_close(tmp_path: Path, synced: list[str]) -> None:
    path = tmp_path / "audit.jsonl"
    audit = AuditLog(path, sync_every_s=0.02)
    try:
        assert synced == [], "nothing written, nothing synced"
        audit.write(_entry(1))
        deadline = time.monotonic() + 10.0
        while str(path) not in synced and time.monotonic() < deadline:
            time.sleep(0.01)
        assert str(path) in synced, "the sync thread never fsync'd the audit file"
        audit.write(_entry(2))
    finally:
        audit.close()
    # the second line: by the thread or at close; an idle turn of the thread syncs nothing
    assert synced.count(str(path)) == 2
    assert path.read_text().count("\n") == 2


def test_a_rotation_syncs_the_file_it_renames_away(tmp_path: Path, synced: list[str]) -> None:
    path = tmp_path / "audit.jsonl"
    audit = AuditLog(path, max_bytes=600, backups=3, sync_every_s=3600.0)  # the thread never turns here
    try:
        for n in range(6):
            audit.write(_entry(n))
        assert (tmp_path / "audit.jsonl.1").exists()
        assert str(path) in synced, "the rotated file was renamed away unsynced"
    finally:
        audit.close()


def test_closing_on_a_full_disk_says_so_in_one_line_and_does_not_raise(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Measured on a 16 KiB tmpfs: the buffer kept the text the disk refused, the close flushed it
    again, and the OSError failed the gateway's shutdown (app.py's lifespan) with a traceback."""
    import errno
    import logging

    audit = AuditLog(tmp_path / "audit.jsonl", sync_every_s=3600.0)
    audit.write(_entry(1))
    handler = audit._handler
    assert handler is not None and handler.stream is not None
    real = handler.stream

    class Full:
        def __getattr__(self, name: str) -> object:
            return getattr(real, name)

        def flush(self) -> None:
            raise OSError(errno.ENOSPC, "No space left on device")

        def close(self) -> None:
            real.close()
            raise OSError(errno.ENOSPC, "No space left on device")

    handler.stream = Full()  # type: ignore[assignment]
    with caplog.at_level(logging.WARNING, logger="cxr.audit"):
        audit.close()
    assert [r.getMessage() for r in caplog.records] == ["audit_close_failed error_type=OSError errno=28"]
