"""The gateway's HTTP surface as a hostile client and an auditor see it: rate limit, audit, headers."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from httpx import Response
from pydicom.uid import generate_uid

from serving.errors import Overloaded
from serving.gateway.audit import uid_hash
from serving.inference.detector import DetectionReply
from tests.unit.serving.serving_support import make_dicom, onnx_settings, stow_body, write_stage_files

pytestmark = pytest.mark.unit


@pytest.fixture()
def tight_limit(onnx_client: TestClient) -> Iterator[None]:
    """The shared client's per-key limit at a burst of 3 tokens that do not come back during the test."""
    limiter = onnx_client.app.state.cxr.limiter  # type: ignore[attr-defined]
    saved = (limiter.rate, limiter.burst)
    limiter.rate, limiter.burst = 0.001, 3
    limiter._buckets.clear()
    try:
        yield
    finally:
        limiter.rate, limiter.burst = saved
        limiter._buckets.clear()


def test_a_stow_costs_one_rate_limit_token_per_instance_like_a_batch(
    onnx_client: TestClient, keys: dict[str, str], tight_limit: None
) -> None:
    """Before, a STOW-RS of 64 instances cost one token: 64 inferences a token where a batch gives one."""
    limiter = onnx_client.app.state.cxr.limiter  # type: ignore[attr-defined]

    def stow(n: int) -> Response:
        body, ctype = stow_body(*(make_dicom(seed=90 + i) for i in range(n)))
        return onnx_client.post(
            "/dicomweb/studies?send_back=false",
            content=body,
            headers={"X-API-Key": keys["pacs"], "Content-Type": ctype},
        )

    assert stow(3).status_code == 200  # exactly the burst
    limiter._buckets.clear()
    refused = stow(4)
    assert refused.status_code == 429, refused.text[:200]
    assert refused.json()["error"]["code"] == "rate_limited" and int(refused.headers["Retry-After"]) >= 1


class _FakePull:
    """Stands in for :class:`serving.pacs.pull.PacsPull`: the study's instances, no PACS needed."""

    bodies: list[bytes] = []
    fetched: list[str] = []  # the studies whose instances were retrieved

    def __init__(self, settings: Any) -> None:
        pass

    def instances(self, study_uid: str) -> list[Any]:
        from serving.pacs.pull import RemoteInstance

        cr = "1.2.840.10008.5.1.4.1.1.1"
        return [RemoteInstance("1.2.3", f"1.2.3.{i}", cr) for i in range(len(self.bodies))]

    def fetch_study(self, study_uid: str, listed: list[Any] | None = None) -> list[bytes]:
        self.fetched.append(study_uid)
        return list(self.bodies)


@pytest.fixture()
def fake_pacs(monkeypatch: pytest.MonkeyPatch) -> type[_FakePull]:
    import serving.gateway.routes.pacs as pacs_route

    monkeypatch.setattr(pacs_route, "PacsPull", _FakePull)
    monkeypatch.setattr(_FakePull, "fetched", [])
    return _FakePull


def test_a_study_pull_costs_one_rate_limit_token_per_instance(
    onnx_client: TestClient, keys: dict[str, str], tight_limit: None, fake_pacs: type[_FakePull]
) -> None:
    study = generate_uid()
    fake_pacs.bodies = [make_dicom(seed=100 + i, study_uid=study) for i in range(4)]
    r = onnx_client.post(f"/v1/studies/{study}/analyze?send_back=false", headers={"X-API-Key": keys["pacs"]})
    assert r.status_code == 429, r.text[:200]
    assert r.json()["error"]["code"] == "rate_limited"
    assert fake_pacs.fetched == [], "refused before any instance was retrieved from the PACS"


def test_a_study_pull_that_fails_midway_is_audited_naming_the_study_and_the_result_it_stored(
    onnx_model: Path,
    api_keys: tuple[Path, dict[str, str]],
    tmp_path: Path,
    fake_pacs: type[_FakePull],
) -> None:
    """One image stored, the next refused 503: the stored result exists and must be on the audit line.

    The STOW-RS route names each result as it is stored; the pull route named them only after the
    whole study went through, so a 503 midway left a stored result (and the study) off the line.
    """
    from serving.gateway.app import create_app

    study = generate_uid()
    fake_pacs.bodies = [make_dicom(seed=110, study_uid=study), make_dicom(seed=111, study_uid=study)]
    settings = onnx_settings(onnx_model, api_keys[0], tmp_path, audit_log=tmp_path / "audit.jsonl")
    write_stage_files(tmp_path / "gitops", production="1")
    stored: list[str] = []
    with TestClient(create_app(settings, use_store=False), raise_server_exceptions=False) as client:
        state = client.app.state.cxr  # type: ignore[attr-defined]
        original = state.detector.detect
        first_done = asyncio.Event()

        async def detect(payloads: list[bytes], **kw: Any) -> list[DetectionReply]:
            if not stored and not first_done.is_set() and payloads[0] == fake_pacs.bodies[0]:
                replies: list[DetectionReply] = await original(payloads, **kw)
                stored.append(replies[0].record.request_id)
                first_done.set()
                return replies
            await first_done.wait()
            raise Overloaded("stage 'production' is full; retry later", retry_after_s=1)

        state.detector.detect = detect
        url = f"/v1/studies/{study}/analyze?send_back=false"
        r = client.post(url, headers={"X-API-Key": api_keys[1]["pacs"]})
        assert r.status_code == 503, r.text
        assert len(stored) == 1
        audit = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
        entry = next(e for e in audit if e["request_id"] == r.headers["X-Request-ID"])
        assert entry["result_ids"] == stored
        assert entry["study_hash"] == uid_hash(study, state.secret)
        assert study not in (tmp_path / "audit.jsonl").read_text()


def test_a_content_length_too_long_for_int_is_a_413_not_a_500(
    onnx_client: TestClient, keys: dict[str, str]
) -> None:
    """Python refuses int() of a string over 4300 digits: the middleware's size check raised (500)."""
    r = onnx_client.post(
        "/v1/detect",
        content=b"x",
        headers={
            "X-API-Key": keys["pacs"],
            "Content-Type": "application/dicom",
            "Content-Length": "9" * 5_000,
        },
    )
    assert r.status_code == 413, r.text
    assert r.json()["error"]["code"] == "payload_too_large"
    assert len(r.json()["error"]["message"]) < 300  # the 5000 digits are not echoed back


def test_a_401_names_the_bearer_scheme_in_www_authenticate(onnx_client: TestClient) -> None:
    """RFC 9110 11.6.1 / 15.5.2: a 401 MUST carry WWW-Authenticate naming how to authenticate."""
    for headers in ({}, {"Authorization": "Bearer not-a-key"}, {"Authorization": "Basic dXNlcjpwdw=="}):
        r = onnx_client.get("/v1/models", headers=headers)
        assert r.status_code == 401
        assert r.headers.get("WWW-Authenticate", "").startswith("Bearer"), r.headers
        assert r.json()["error"]["code"] == "unauthorized"


@pytest.mark.parametrize("rid", ["x" * 5000, "abc\u0000def", "\uff21" * 40])
def test_a_result_id_the_server_never_gives_is_a_404_that_does_not_quote_it(
    onnx_client: TestClient, keys: dict[str, str], rid: str
) -> None:
    """The 404 quoted whatever came in: 5,000 characters, a NUL, full-width look-alikes back to the caller."""
    from urllib.parse import quote

    r = onnx_client.get(f"/v1/results/{quote(rid)}", headers={"X-API-Key": keys["radiologist"]})
    assert r.status_code == 404, r.text[:200]
    assert len(r.text) < 500 and rid not in r.text and "not an id this server gives" in r.text
