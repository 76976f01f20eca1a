"""core.durable: what each helper makes durable, and in which order (a power cut cannot be staged
in a test, so the order of the fsyncs and the rename is what is checked)."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from core import durable
from tests.unit.core.durable_support import Steps

pytestmark = pytest.mark.unit


def test_a_published_folder_has_its_files_then_its_names_then_its_own_name_on_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    recorder = Steps(tmp_path, monkeypatch)
    tmp = tmp_path / ".tmp-item"
    tmp.mkdir()
    durable.write_synced(tmp / "object.dcm", b"data")
    assert durable.publish_dir(tmp, tmp_path / "item")
    assert recorder.steps == ["fsync tmp/object.dcm", "fsync tmp", "rename tmp -> item", "fsync ."]
    assert (tmp_path / "item" / "object.dcm").read_bytes() == b"data"


def test_publishing_onto_an_existing_folder_renames_nothing_and_says_so(tmp_path: Path) -> None:
    (tmp_path / "item").mkdir()
    (tmp_path / "item" / "object.dcm").write_bytes(b"first")
    tmp = tmp_path / ".tmp-item"
    tmp.mkdir()
    durable.write_synced(tmp / "object.dcm", b"second")
    assert not durable.publish_dir(tmp, tmp_path / "item")
    assert (tmp_path / "item" / "object.dcm").read_bytes() == b"first" and tmp.exists()


def test_any_other_failure_to_publish_raises(tmp_path: Path) -> None:
    tmp = tmp_path / ".tmp-item"
    tmp.mkdir()
    with pytest.raises(FileNotFoundError):
        durable.publish_dir(tmp, tmp_path / "missing" / "item")


def test_a_replaced_file_is_whole_and_synced_before_its_rename(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    recorder = Steps(tmp_path, monkeypatch)
    seen: list[str] = []
    real_replace = os.replace

    def replace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        seen.append(Path(src).read_text())
        real_replace(src, dst)

    monkeypatch.setattr(durable.os, "replace", replace)
    (tmp_path / "uid").write_text("old")
    durable.replace_durably(tmp_path / "uid", b"1.2.3")
    assert recorder.steps == ["fsync tmp"] and seen == ["1.2.3"]
    assert (tmp_path / "uid").read_text() == "1.2.3" and not list(tmp_path.glob(".tmp-*"))


def test_publishing_onto_an_existing_folder_makes_that_folder_durable_before_saying_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "item").mkdir()
    (tmp_path / "item" / "object.dcm").write_bytes(b"first")  # another writer's, maybe not yet durable
    tmp = tmp_path / ".tmp-item"
    tmp.mkdir()
    recorder = Steps(tmp_path, monkeypatch)
    assert not durable.publish_dir(tmp, tmp_path / "item")
    assert recorder.steps == ["fsync tmp", "fsync ."]


def test_new_folders_are_made_durable_in_their_parents(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    recorder = Steps(tmp_path, monkeypatch)
    durable.make_dirs(tmp_path / "a" / "b")
    assert recorder.steps == ["fsync .", "fsync a"] and (tmp_path / "a" / "b").is_dir()
    recorder.steps.clear()
    durable.make_dirs(tmp_path / "a" / "b")
    assert recorder.steps == []


def test_a_discarded_folder_leaves_its_name_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "item").mkdir()
    (tmp_path / "item" / "meta.json").write_text("{}")
    monkeypatch.setattr(durable.shutil, "rmtree", lambda *a, **k: None)  # a crash before the deletion
    durable.discard_dir(tmp_path / "item")
    [left] = tmp_path.iterdir()
    assert left.name.startswith(".tmp-del-")  # skipped by listings, deleted by the next start
    durable.discard_dir(tmp_path / "item")  # gone already: nothing to do


def test_a_discarded_folders_new_name_is_durable_before_its_files_are_deleted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "item").mkdir()
    (tmp_path / "item" / "meta.json").write_text("{}")
    recorder = Steps(tmp_path, monkeypatch)
    real_rmtree = durable.shutil.rmtree

    def rmtree(path: Path, ignore_errors: bool = False) -> None:
        recorder.steps.append(f"rmtree {recorder.name(Path(path))}")
        real_rmtree(path, ignore_errors=ignore_errors)

    monkeypatch.setattr(durable.shutil, "rmtree", rmtree)
    durable.discard_dir(tmp_path / "item")
    # without the fsync, a power cut could keep the deletions of its files but not the rename:
    # the item under its own name, part of it gone (its index without its data)
    assert recorder.steps == ["rename item -> tmp", "fsync .", "rmtree tmp"]
    assert not list(tmp_path.iterdir())


def test_published_files_are_on_disk_before_their_folder_and_no_temp_folder_outlives_the_call(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    recorder = Steps(tmp_path, monkeypatch)
    assert durable.publish_files(tmp_path / "item", {"a.bin": b"1", "index.json": b"{}"})
    assert recorder.steps == [
        "fsync tmp/a.bin",
        "fsync tmp/index.json",
        "fsync tmp",
        "rename tmp -> item",
        "fsync .",
    ]
    assert not durable.publish_files(tmp_path / "item", {"a.bin": b"2"})  # already there: untouched
    assert (tmp_path / "item" / "a.bin").read_bytes() == b"1"

    def full_disk(path: Path, data: bytes) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(durable, "write_synced", full_disk)
    with pytest.raises(OSError, match="No space"):
        durable.publish_files(tmp_path / "other", {"a.bin": b"3"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["item"]


def test_leftovers_of_a_crash_are_deleted_files_and_folders_alike(tmp_path: Path) -> None:
    (tmp_path / ".tmp-put").mkdir()
    (tmp_path / ".tmp-put" / "object.dcm").write_bytes(b"x")
    (tmp_path / "item").mkdir()
    (tmp_path / "item" / ".tmp-meta").write_text("{}")
    (tmp_path / "item" / "meta.json").write_text("{}")
    durable.discard_leftovers(tmp_path, ".tmp-*", "*/.tmp-*")
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == ["item", "item/meta.json"]
    durable.discard_leftovers(tmp_path / "missing", ".tmp-*")  # a root not made yet: nothing to do


def test_a_write_the_disk_refuses_leaves_no_temp_or_partial_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a full disk every refused write left its ``.tmp-`` file until the owner's next start."""
    (tmp_path / "uid").write_bytes(b"old")
    real_fsync = os.fsync

    def full_disk(fd: int) -> None:  # the bytes written so far are refused when they reach the disk
        if Path(os.readlink(f"/proc/self/fd/{fd}")).is_relative_to(tmp_path):
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(durable.os, "fsync", full_disk)
    with pytest.raises(OSError, match="No space"):
        durable.replace_durably(tmp_path / "uid", b"1.2.3")
    with pytest.raises(OSError, match="No space"):
        durable.write_synced(tmp_path / "flag", b"")
    assert [p.name for p in tmp_path.iterdir()] == ["uid"] and (tmp_path / "uid").read_bytes() == b"old"
    monkeypatch.undo()
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "x").write_bytes(b"x")
    with pytest.raises(OSError):  # the rename refused: a folder holds the name
        durable.replace_durably(tmp_path / "folder", b"1.2.3")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder", "uid"]
