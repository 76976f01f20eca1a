"""Structured commit messages survive a round trip through their trailers."""

from __future__ import annotations

import pytest

from delivery.messages import DeliveryRecord, parse_record

pytestmark = pytest.mark.unit


def test_record_round_trips_through_the_rendered_message() -> None:
    record = DeliveryRecord(
        action="promote",
        model_name="cxr-detector",
        stage="canary",
        from_version="2",
        to_version="3",
        canary_weight=10,
        forced=True,
        reason="hotfix\nfor PACS",
        details=["- onnx parity: pass"],
    )
    message = record.render()
    assert message.splitlines()[0] == "promote cxr-detector 3 to canary (was 2)"
    parsed = parse_record(message)
    assert parsed is not None
    assert (parsed.action, parsed.stage, parsed.from_version, parsed.to_version) == (
        "promote",
        "canary",
        "2",
        "3",
    )
    assert parsed.canary_weight == 10 and parsed.forced
    assert parsed.reason == "hotfix for PACS"  # one line: a trailer cannot span lines


def test_empty_version_is_written_as_none_and_read_back_empty() -> None:
    record = DeliveryRecord(
        action="rollback",
        model_name="cxr-detector",
        stage="canary",
        from_version="3",
        to_version="",
        rolled_back_version="3",
    )
    message = record.render()
    assert "Cxr-To-Version: none" in message
    parsed = parse_record(message)
    assert parsed is not None and parsed.to_version == "" and parsed.rolled_back_version == "3"


def test_ordinary_commit_is_not_a_delivery_record() -> None:
    assert parse_record("fix typo in README\n\nSigned-off-by: someone\n") is None
