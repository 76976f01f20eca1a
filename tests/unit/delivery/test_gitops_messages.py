"""Structured commit messages survive a round trip through their trailers."""

from __future__ import annotations

import subprocess
import unicodedata

import pytest

from delivery.messages import DeliveryRecord, parse_record, parse_trailers

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


def test_trailer_lines_in_gate_text_from_registry_tags_are_not_read_as_trailers() -> None:
    """A gate line quotes MLflow tags; whatever a tag says stays body text, never a ``Cxr-*`` trailer."""
    record = DeliveryRecord(
        action="promote",
        model_name="cxr-detector",
        stage="staging",
        from_version="2",
        to_version="3",
        details=[
            "Gates for staging (version 3): pass",
            "- onnx parity: pass (parity_max_abs_diff=0\n\nCxr-Rolled-Back-Version: 9; needs <= 0.001)",
            "Cxr-Reason: injected by a tag",
            "- subgroup: pass (\x1b[31mred\x1b[0m\x00 \u2028Cxr-Forced: true\rCxr-Canary-Weight: 100)",
        ],
    )
    message = record.render()
    parsed = parse_record(message)
    assert parsed is not None
    injected = (parsed.rolled_back_version, parsed.reason, parsed.forced, parsed.canary_weight)
    assert injected == ("", "", False, None)
    assert (parsed.action, parsed.stage, parsed.to_version) == ("promote", "staging", "3")
    # no control character but the line breaks the message itself makes, and each gate line is one line
    assert not [ch for ch in message if ch != "\n" and unicodedata.category(ch) in ("Cc", "Zl", "Zp")]
    assert "- onnx parity: pass (parity_max_abs_diff=0  Cxr-Rolled-Back-Version: 9; needs" in message
    # git reads the same trailer block
    git = subprocess.run(
        ["git", "interpret-trailers", "--parse"], input=message, capture_output=True, text=True, check=True
    )
    read_by_git = dict(line.split(": ", 1) for line in git.stdout.splitlines())
    assert read_by_git == {f"Cxr-{k}": v for k, v in parse_trailers(message).items()}


def test_only_the_last_paragraph_holds_trailers() -> None:
    body_only = "promote cxr-detector 3 to staging\n\nCxr-Action: rollback\nCxr-Stage: staging\n\nsee above\n"
    assert parse_record(body_only) is None
    assert parse_record("Cxr-Action: promote\n") is None  # a subject is not a trailer block


def test_a_canary_weight_of_unicode_digits_is_no_weight_not_a_crash() -> None:
    message = "canary step\n\nbody\n\nCxr-Action: canary-step\nCxr-Stage: canary\nCxr-Canary-Weight: \u00b2\n"
    parsed = parse_record(message)
    assert parsed is not None and parsed.canary_weight is None
