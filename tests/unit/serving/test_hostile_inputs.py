"""Hostile DICOM and crossing patients through the gateway: 4xx problem+json, never 5xx; ids made here."""

from __future__ import annotations

import json
import os
import random
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from data_pipeline import hostile
from serving.gateway.auth import hash_key
from tests.unit.serving.serving_support import make_dicom, make_png, onnx_settings, stow_body

pytestmark = pytest.mark.unit


def _detect(client: TestClient, key: str, data: bytes, **headers: str) -> object:
    return client.post(
        "/v1/detect",
        content=data,
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/dicom", **headers},
    )


@pytest.mark.parametrize(
    ("data", "limit"),
    [
        (hostile.deep_nesting(5000), "CXR_DICOM_MAX_DEPTH"),
        (hostile.jpeg_bomb(10000, 10000, header_rows=10000, header_cols=10000), "CXR_DICOM_MAX_PIXELS"),
        (hostile.jpeg_bomb(60000, 60000), "CXR_DICOM_MAX_PIXELS"),
        (hostile.deflate_bomb(200 << 20), "CXR_DICOM_MAX_INFLATED_BYTES"),
    ],
    ids=["nested-5000", "jpeg-10000-declared", "jpeg-sof-60000", "deflate-bomb"],
)
def test_a_limit_refusal_is_a_422_problem_json_naming_the_limit_and_counted(
    onnx_client: TestClient, keys: dict[str, str], data: bytes, limit: str
) -> None:
    r = _detect(onnx_client, keys["pacs"], data)
    assert r.status_code == 422, r.text  # type: ignore[attr-defined]
    assert r.headers["content-type"].startswith("application/problem+json")  # type: ignore[attr-defined]
    body = r.json()  # type: ignore[attr-defined]
    assert (
        body["limit"] == limit and body["status"] == 422 and body["error"]["code"] == "input_limit_exceeded"
    )
    metrics = onnx_client.get("/metrics").text
    assert f'cxr_gateway_input_refused_total{{limit="{limit}"}}' in metrics


def test_every_case_of_the_hostile_corpus_ends_below_500(
    onnx_client: TestClient, keys: dict[str, str]
) -> None:
    statuses = {}
    for case in hostile.corpus(seed=3, mutations=12):
        r = _detect(onnx_client, keys["pacs"], case.data)
        statuses[case.name] = r.status_code  # type: ignore[attr-defined]
        assert r.status_code < 500, (case.name, r.text)  # type: ignore[attr-defined]
    assert statuses["invalid-dates"] == 200 and statuses["nesting-5000-undefined"] == 422
    assert onnx_client.get("/healthz").status_code == 200


def test_a_reused_x_request_id_never_names_or_overwrites_a_result(
    onnx_client: TestClient, keys: dict[str, str]
) -> None:
    """The result id is the server's; a second caller with the same X-Request-ID gets its own result."""
    first = _detect(onnx_client, keys["pacs"], make_dicom(seed=61), **{"X-Request-ID": "study-4711"})
    second = _detect(onnx_client, keys["radiologist"], make_dicom(seed=62), **{"X-Request-ID": "study-4711"})
    a, b = first.json(), second.json()  # type: ignore[attr-defined]
    assert first.headers["X-Request-ID"] == "study-4711"  # type: ignore[attr-defined]
    assert a["request_id"] != b["request_id"] and "study-4711" not in (a["request_id"], b["request_id"])
    uuid.UUID(hex=a["request_id"])
    kept = onnx_client.get(f"/v1/results/{a['request_id']}", headers={"X-API-Key": keys["pacs"]})
    assert kept.json() == a
    assert onnx_client.get("/v1/results/study-4711", headers={"X-API-Key": keys["pacs"]}).status_code == 404


def test_stow_parts_are_split_and_read_off_the_event_loop(
    onnx_client: TestClient, keys: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from serving.dicom import stow

    threads: list[str] = []
    real_uids, real_split = stow.instance_uids, stow.split_related

    def uids(data: bytes) -> tuple[str, str, str]:
        threads.append(threading.current_thread().name)
        return real_uids(data)

    def split(*args: object, **kwargs: object) -> list[bytes]:
        threads.append(threading.current_thread().name)
        return real_split(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(stow, "instance_uids", uids)
    monkeypatch.setattr(stow, "split_related", split)
    body, ctype = stow_body(make_dicom(seed=70), b"\0" * (4 << 20), hostile.deep_nesting(5000))
    r = onnx_client.post(
        "/dicomweb/studies",
        content=body,
        headers={
            "Authorization": f"Bearer {keys['pacs']}",
            "Content-Type": ctype,
        },
    )
    assert r.status_code == 202, r.text  # one stored, two failed
    assert len(threads) == 4 and all(name.startswith("cxr-cpu") for name in threads), threads


#: CI runs a short fuzz; ``CXR_FUZZ_EXAMPLES=2000`` is the long run (docs/security.md)
FUZZ_EXAMPLES = int(os.environ.get("CXR_FUZZ_EXAMPLES", "40")) // 4 or 1

_FAMILIES = [
    lambda n: hostile.deep_nesting(n % 40),
    lambda n: hostile.many_elements(n * 500),
    lambda n: hostile.giant_text(n * 50_000),
    lambda n: hostile.jpeg_bomb(8 + n * 400, 8 + n * 7),
    lambda n: hostile.j2k_bomb(8 + n * 900, 8 + n),
    lambda n: hostile.huge_native(64 + n * 300, 64 + n * 300),
    lambda n: hostile.valid(n),
]


@settings(
    max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(family=st.integers(0, len(_FAMILIES) - 1), size=st.integers(0, 40), seed=st.integers(0, 10**6))
def test_fuzzed_hostile_uploads_never_get_a_5xx(
    onnx_client: TestClient, keys: dict[str, str], family: int, size: int, seed: int
) -> None:
    rng = random.Random(seed)
    data = hostile.flipped(_FAMILIES[family](size), rng, rng.randrange(0, 4))
    r = _detect(onnx_client, keys["pacs"], data)
    assert r.status_code < 500, r.text  # type: ignore[attr-defined]


# ----------------------------------------------------------------- tenants


@pytest.fixture(scope="module")
def two_tenants(
    onnx_model: Path, gitops_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[TestClient, dict[str, str]]]:
    from serving.gateway.app import create_app

    root = tmp_path_factory.mktemp("tenants")
    plain = {name: f"cxr_{name}_{uuid.uuid4().hex}" for name in ("a-pacs", "a-rad", "b-pacs", "b-rad")}
    entries = [
        {"id": name, "role": name.split("-")[1].replace("rad", "radiologist"), "sha256": hash_key(key)}
        | {"tenant": f"hospital-{name[0]}"}
        for name, key in plain.items()
    ]
    (root / "keys.json").write_text(json.dumps({"keys": entries}))
    settings = onnx_settings(onnx_model, root / "keys.json", root, gitops_dir=gitops_dir, conf_threshold=0.0)
    with TestClient(create_app(settings, use_store=False), raise_server_exceptions=False) as client:
        yield client, plain


def test_another_tenants_key_cannot_read_a_result_its_sr_preview_or_send_feedback(
    two_tenants: tuple[TestClient, dict[str, str]],
) -> None:
    client, keys = two_tenants
    rid = _detect(client, keys["a-pacs"], make_dicom(seed=80)).json()["request_id"]  # type: ignore[attr-defined]
    a_rad, b_rad = {"X-API-Key": keys["a-rad"]}, {"X-API-Key": keys["b-rad"]}
    for path in (
        f"/v1/results/{rid}",
        f"/v1/results/{rid}/sr",
        f"/v1/results/{rid}/preview.png",
        f"/v1/results/{rid}/pixels",
    ):
        assert client.get(path, headers=a_rad).status_code == 200, path
        denied = client.get(path, headers=b_rad)
        assert denied.status_code == 404 and "not yours" in denied.json()["error"]["message"], path
    feedback = {"request_id": rid, "no_finding": True}
    assert client.post("/v1/feedback", json=feedback, headers=b_rad).status_code == 404
    assert client.post("/v1/feedback", json=feedback, headers=a_rad).status_code in (200, 202)


def test_png_results_are_scoped_too(two_tenants: tuple[TestClient, dict[str, str]]) -> None:
    client, keys = two_tenants
    r = client.post(
        "/v1/detect", content=make_png(), headers={"X-API-Key": keys["b-pacs"], "Content-Type": "image/png"}
    )
    rid = r.json()["request_id"]
    assert client.get(f"/v1/results/{rid}", headers={"X-API-Key": keys["a-pacs"]}).status_code == 404
    assert client.get(f"/v1/results/{rid}", headers={"X-API-Key": keys["b-pacs"]}).status_code == 200
