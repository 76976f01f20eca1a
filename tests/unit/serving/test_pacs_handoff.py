"""A replica's queued PACS objects outlive it: handed to the object store when it stops, adopted by another.

In the cluster the outbox is on the pod's emptyDir; a scaled-in pod took the objects its PACS had
not yet taken with it (docs/cluster.md). Here the outbox functions, then two gateways built on one
store: the first stops with an object queued, the second adopts it.
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from serving.gateway.auth import hash_key
from serving.pacs import handoff
from serving.pacs.outbox import Outbox, item_id
from tests.unit.serving.serving_support import MemoryStore, make_dicom, onnx_settings

pytestmark = pytest.mark.unit

SR = "1.2.840.10008.5.1.4.1.1.88.33"


def _queued(outbox: Outbox) -> dict[str, tuple[str, str, int]]:
    return {i.item_id: (i.destination, i.sop_instance_uid, i.attempts) for i in outbox.items()}


def test_a_stopping_replicas_objects_and_dead_letters_are_adopted_whole_by_another(tmp_path: Path) -> None:
    store = MemoryStore()
    leaving, staying = Outbox(tmp_path / "a"), Outbox(tmp_path / "b")
    for n in range(2):
        leaving.put("pacs", SR, f"1.2.3.{n}", f"object {n}".encode())
    [first, _] = leaving.items()
    leaving.failed(first, now=time.time() + 3600)  # retried later: handed off with its attempts
    leaving.put("pacs", SR, "1.2.3.9", b"refused object")
    [refused] = [i for i in leaving.items() if i.sop_instance_uid == "1.2.3.9"]
    leaving.refused(refused, "the PACS stores no such class")
    before = _queued(leaving)

    assert handoff.hand_off(leaving, store) == 3
    assert leaving.items() == [] and leaving.dead_letters() == []
    assert all(k.startswith(handoff.PREFIX) for k in store.objects)

    assert handoff.adopt(staying, store) == 3
    assert _queued(staying) == before and store.objects == {}
    assert all(i.next_attempt <= time.time() for i in staying.items())  # due at once on the new replica
    [dead] = staying.dead_letters()
    assert dead.sop_instance_uid == "1.2.3.9" and dead.data() == b"refused object"
    assert json.loads((dead.folder / "meta.json").read_text())["refused"]["reason"]
    assert {i.data() for i in staying.items()} == {b"object 0", b"object 1"}
    assert handoff.adopt(staying, store) == 0


def test_an_object_the_store_refuses_stays_in_the_outbox(tmp_path: Path) -> None:
    class Refusing(MemoryStore):
        def put_bytes(self, key: str, data: bytes, content_type: str = "") -> None:
            if data == b"object 1":
                raise OSError("store full")
            super().put_bytes(key, data, content_type)

    outbox = Outbox(tmp_path / "a")
    for n in range(2):
        outbox.put("pacs", SR, f"1.2.3.{n}", f"object {n}".encode())
    assert handoff.hand_off(outbox, Refusing()) == 1
    assert [i.data() for i in outbox.items()] == [b"object 1"]


def test_what_cannot_be_adopted_is_set_aside_once_and_purged_with_its_day(tmp_path: Path) -> None:
    """Before, such items stayed under the hand-off prefix for ever, read and warned about on every
    pass of every replica, and no retention reached them (they may carry the patient's identity)."""
    store = MemoryStore()
    outbox = Outbox(tmp_path / "a")
    meta = {"destination": "pacs", "sop_class_uid": SR, "sop_instance_uid": "1.2.3", "attempts": 0}
    writing = f"{handoff.PREFIX}{item_id('pacs', '1.2.9')}"
    forged, garbled = (f"{handoff.PREFIX}{c * 40}" for c in "bc")
    store.put_bytes(f"{writing}/object.dcm", b"its meta is still being written")
    store.put_bytes(f"{forged}/object.dcm", b"x")
    store.put_bytes(f"{forged}/meta.json", json.dumps(meta).encode())  # the id names another object
    store.put_bytes(f"{garbled}/object.dcm", b"y")
    store.put_bytes(f"{garbled}/meta.json", b"{not json")
    store.put_bytes(f"{handoff.PREFIX}..%2f/meta.json", json.dumps(meta).encode())
    unclaimed: dict[str, float] = {}
    t0 = time.time()

    assert handoff.adopt(outbox, store, unclaimed=unclaimed, now=t0) == 0
    assert outbox.items() == []
    left = sorted(k for k in store.objects if k.startswith(handoff.PREFIX))
    assert left == sorted([f"{writing}/object.dcm", f"{handoff.PREFIX}..%2f/meta.json"]), "they wait"
    rejected = sorted(k.split("/", 3)[3] for k in store.objects if k.startswith(handoff.REJECTED))
    assert rejected == [f"{c * 40}/{f}" for c in "bc" for f in ("meta.json", "object.dcm")]

    # its writer finishing in time makes it whole: adopted, not set aside
    store.put_bytes(f"{writing}/meta.json", json.dumps({**meta, "sop_instance_uid": "1.2.9"}).encode())
    assert handoff.adopt(outbox, store, unclaimed=unclaimed, now=t0 + 60) == 1
    assert [i.sop_instance_uid for i in outbox.items()] == ["1.2.9"]
    assert list(unclaimed) == [f"{handoff.PREFIX}..%2f"]

    # one left incomplete past the writer's time is set aside too
    later = t0 + handoff.UNCLAIMED_AFTER_S + 1
    assert handoff.adopt(outbox, store, unclaimed=unclaimed, now=later) == 0
    assert not any(k.startswith(handoff.PREFIX) for k in store.objects) and unclaimed == {}

    # the retention job deletes them with their day's results; a folder that is not a time stays
    store.put_bytes(f"{handoff.REJECTED}not-a-time/x", b"foreign")
    day = 86400.0
    assert handoff.purge_rejected(store, 30 * day, later + day) == 0
    assert handoff.purge_rejected(store, 30 * day, later + 31 * day) == 2
    assert sorted(store.objects) == [f"{handoff.REJECTED}not-a-time/x"]


def test_a_gateway_with_an_ephemeral_disk_hands_on_when_it_stops_and_another_adopts(
    onnx_model: Path, gitops_dir: Path, tmp_path: Path
) -> None:
    from serving.gateway.app import create_app

    key = f"cxr_p_{uuid.uuid4().hex}"
    (tmp_path / "keys.json").write_text(
        json.dumps({"keys": [{"id": "p", "role": "pacs", "sha256": hash_key(key)}]})
    )
    store = MemoryStore()

    def settings(name: str):  # type: ignore[no-untyped-def]
        return onnx_settings(
            onnx_model,
            tmp_path / "keys.json",
            tmp_path / name,
            gitops_dir=gitops_dir,
            ephemeral_disk=True,
            spool_retry_s=0.05,
            pacs_destinations=[
                {"name": "pacs", "kind": "stow", "url": "http://127.0.0.1:9/", "callers": ["*"]}
            ],
        )

    leaving = create_app(settings("a"), store=store)
    with TestClient(leaving) as client:
        client.get("/v1/models", headers={"X-API-Key": key})  # refused to this role, and audited
        outbox = leaving.state.cxr.sendback.outbox
        # a readable object (one that is not would be set aside at once): its PACS is down
        outbox.put("pacs", SR, "1.2.3.4", make_dicom(seed=1))
    assert outbox.items() == []
    audit = [k for k in store.objects if k.startswith("audit/")]
    assert audit and b"/v1/models" in store.objects[audit[0]]

    staying = create_app(settings("b"), store=store)
    with TestClient(staying):
        adopted = staying.state.cxr.sendback.outbox
        deadline = time.monotonic() + 30
        while not adopted.items() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [i.sop_instance_uid for i in adopted.items()] == ["1.2.3.4"]
        assert not any(k.startswith(handoff.PREFIX) for k in store.objects)
    # and it hands the object on again when it stops in turn: its PACS never took it
    assert any(k.startswith(handoff.PREFIX) for k in store.objects) and adopted.items() == []


def test_an_adoption_still_running_when_the_replica_hands_off_loses_nothing(tmp_path: Path) -> None:
    """The stopping replica's housekeeping is cancelled, but its adopting thread runs on: an item it
    took in after the hand-off listed the outbox, its handed-off copy then deleted, was left only on
    the disk that dies with the pod."""
    import threading

    fetched, release = threading.Event(), threading.Event()

    class Slow(MemoryStore):
        def get_bytes(self, key: str) -> bytes:
            data = super().get_bytes(key)
            if key.endswith("object.dcm"):
                fetched.set()
                assert release.wait(10)
            return data

    store = Slow()
    other = Outbox(tmp_path / "other")
    other.put("pacs", SR, "1.2.3.7", b"an SR of a replica stopped before")
    assert handoff.hand_off(other, store) == 1
    stopping = Outbox(tmp_path / "stopping")
    adopting = threading.Thread(target=handoff.adopt, args=(stopping, store))
    adopting.start()
    assert fetched.wait(10)  # its housekeeping is taking the item in: now the replica stops
    handoff.hand_off(stopping, store)
    release.set()
    adopting.join(10)
    assert not adopting.is_alive()
    assert stopping.items() == [], "an item is left on the stopping replica's disk"
    running = Outbox(tmp_path / "running")  # a replica still running takes it from the store
    assert handoff.adopt(running, store) == 1
    assert [i.data() for i in running.items()] == [b"an SR of a replica stopped before"]


def test_rotated_audit_files_go_to_the_store_as_they_rotate_and_the_current_one_at_the_stop(
    tmp_path: Path,
) -> None:
    """On a disk that dies with the pod, the rotation deleted the oldest lines after its backups."""
    from types import SimpleNamespace

    from serving.gateway.audit import AuditEntry, AuditLog
    from serving.gateway.handoff import ship_audit

    audit = AuditLog(tmp_path / "audit.jsonl", max_bytes=700, backups=3)  # ~2 lines a file
    store = MemoryStore()
    state = SimpleNamespace(settings=SimpleNamespace(ephemeral_disk=True), store=store, audit=audit)

    def write(n: int) -> None:
        audit.write(
            AuditEntry(
                time="t",
                request_id=f"req-{n:04d}",
                key_id="k",
                role="pacs",
                route="/x",
                method="GET",
                status=200,
            )
        )

    shipped = 0
    for n in range(40):  # many more rotations than backups
        write(n)
        if n % 3 == 2:
            shipped += ship_audit(state)  # type: ignore[arg-type]
    audit.close()
    shipped += ship_audit(state, final=True)  # type: ignore[arg-type]
    lines = b"".join(store.objects[k] for k in sorted(store.objects)).decode().splitlines()
    assert shipped == len(store.objects) and all(k.startswith("audit/") for k in store.objects)
    assert sorted(json.loads(line)["request_id"] for line in lines) == [f"req-{n:04d}" for n in range(40)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["audit.jsonl"]  # shipped files deleted here
