"""A ``result.json`` that is no result (another shape, no ``created``) is never served: a 404, not a 500.

It raised out of the read (``AttributeError``, ``KeyError``): a 500 for any caller of any tenant,
which told a stranger the id exists. One without ``created`` was dated "now" on every read, so a
read never found it past its retention.
"""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from serving.errors import NotFound
from serving.results import ResultRecord, ResultStore, Retention
from tests.unit.serving.serving_support import MemoryStore

pytestmark = pytest.mark.unit

RETENTION = Retention(timedelta(days=30), timedelta(hours=24))
RID = "0123456789abcdef0123456789abcdef"
GOOD = ResultRecord(RID, {"request_id": RID, "detections": []}, "dicom", None).meta()
NOT_A_RESULT: list[Any] = [
    [],
    "text",
    {"tenant": "default"},  # no response
    {**GOOD, "response": []},
    {k: v for k, v in GOOD.items() if k != "created"},
    {**GOOD, "created": "yesterday"},
    {**GOOD, "created": 12},
]


@pytest.mark.parametrize("meta", NOT_A_RESULT)
@pytest.mark.parametrize("where", ["journal", "store"])
def test_a_result_json_that_is_no_result_is_a_404(meta: Any, where: str, tmp_path: Path) -> None:
    store = MemoryStore()
    results = ResultStore(
        store if where == "store" else None, local_dir=tmp_path / "results", retention=RETENTION
    )
    if where == "journal":
        (tmp_path / "results" / RID).mkdir(parents=True)
        (tmp_path / "results" / RID / "result.json").write_text(json.dumps(meta))
    else:
        store.put_bytes(f"results/{RID}/result.json", json.dumps(meta).encode())
    with pytest.raises(NotFound):
        results.get(RID, "default")


def test_a_whole_result_is_still_served(tmp_path: Path) -> None:
    results = ResultStore(None, local_dir=tmp_path / "results", retention=RETENTION)
    (tmp_path / "results" / RID).mkdir(parents=True)
    (tmp_path / "results" / RID / "result.json").write_text(json.dumps(GOOD))
    assert results.get(RID, "default").response["request_id"] == RID
