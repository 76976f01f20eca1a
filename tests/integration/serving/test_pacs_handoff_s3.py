"""The PACS outbox's hand-off between replicas against the real object store (SeaweedFS S3).

tests/unit/serving/test_pacs_handoff.py proves the gateway's side on an in-memory store; here the
same hand-off and adoption list, read and delete real S3 keys (a listing's order and prefixes are
the store's own).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from serving.pacs import handoff
from serving.pacs.outbox import Outbox

pytestmark = pytest.mark.integration

SR = "1.2.840.10008.5.1.4.1.1.88.33"


def test_objects_handed_off_by_one_replica_are_adopted_by_another_through_s3(
    s3_store, tmp_path: Path
) -> None:
    store = s3_store.store()
    leaving, staying = Outbox(tmp_path / "a"), Outbox(tmp_path / "b")
    for n in range(3):
        leaving.put("pacs", SR, f"1.2.3.{n}", f"object {n}".encode() * 1000)
    [victim, *waiting] = leaving.items()
    leaving.refused(victim, "no such SOP class at this PACS")
    expected = sorted(i.data() for i in waiting)
    assert handoff.hand_off(leaving, store) == 3
    assert len(store.list_prefix(handoff.PREFIX)) == 6  # each item: its object and its meta

    assert handoff.adopt(staying, store) == 3
    assert sorted(i.data() for i in staying.items()) == expected
    assert [d.sop_instance_uid for d in staying.dead_letters()] == [victim.sop_instance_uid]
    assert store.list_prefix(handoff.PREFIX) == []
