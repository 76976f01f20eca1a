"""The SCP's forwarder against an in-process gateway: images analysed on arrival, results once settled."""

from __future__ import annotations

import io
import json
import re
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from fastapi.testclient import TestClient
from pydicom.uid import generate_uid

from serving.config import ServingSettings
from serving.dimse.forwarder import Forwarder
from serving.dimse.spool import InstanceSpool, SpooledStudy
from tests.unit.serving.dimse_support import GSPS_CLASS, SR_CLASS, down_pacs_gateway, sent_back
from tests.unit.serving.serving_support import make_dicom, stow_body

pytestmark = pytest.mark.unit

OTHER_TENANT_KEY = f"cxr_pacs_{uuid.uuid4().hex}"


@pytest.fixture(scope="module")
def gateway(
    onnx_model: Path, gitops_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[TestClient, ServingSettings]]:
    """A gateway whose one PACS destination is down, with a pacs key of another tenant too."""
    root = tmp_path_factory.mktemp("forwarder")
    with down_pacs_gateway(onnx_model, gitops_dir, root, other_keys={OTHER_TENANT_KEY: "elsewhere"}) as pair:
        yield pair


@pytest.fixture
def forwarder(tmp_path: Path) -> Forwarder:
    """A forwarder over an empty spool of its own, studies settling after 5 s."""
    return Forwarder(InstanceSpool(tmp_path), gateway_url="", api_key="", settle_s=5.0)


def _spool_study(spool: InstanceSpool, images: int, seed: int) -> tuple[str, list[str]]:
    study = generate_uid()
    sops = []
    for i in range(images):
        data = make_dicom(seed=seed + i, study_uid=study)
        sop = str(pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True).SOPInstanceUID)
        spool.write(study, sop, data)
        sops.append(sop)
    return study, sops


def _answered_study(spool: InstanceSpool, images: int, seed: int) -> tuple[SpooledStudy, list[str]]:
    """A spooled study whose images are marked answered for, without the gateway having seen them."""
    _, sops = _spool_study(spool, images, seed)
    [study] = spool.studies()
    spool.mark_analysed(study, list(study.files))
    [study] = spool.studies()
    assert study.pending == ()
    return study, sops


def test_images_are_analysed_on_arrival_and_the_study_is_sent_back_once_settled(
    gateway: tuple[TestClient, ServingSettings], forwarder: Forwarder
) -> None:
    client, settings = gateway
    spool = forwarder.spool
    _, sops = _spool_study(spool, 2, seed=21)
    now = time.time()
    [arrived] = forwarder.due(now)  # not settled, but its images are due at once
    assert len(arrived.pending) == 2
    assert forwarder.forward(client, arrived)
    [analysed] = spool.studies()
    assert analysed.pending == () and len(analysed.files) == 2  # kept until its results are out
    assert sent_back(settings, sops) == {}  # nothing goes back before the study settles
    assert forwarder.due(now) == []
    [settled] = forwarder.due(now + 10)
    assert forwarder.forward(client, settled)
    assert spool.studies() == []
    # one SR covering both images, one presentation state per image: as a STOW-RS of the whole study
    assert sent_back(settings, sops) == {SR_CLASS: 1, GSPS_CLASS: 2}


def test_an_instance_sent_again_is_analysed_again_and_one_that_arrives_late_is_kept(
    gateway: tuple[TestClient, ServingSettings], forwarder: Forwarder
) -> None:
    client, _ = gateway
    spool = forwarder.spool
    study, sops = _spool_study(spool, 1, seed=31)
    [first] = spool.studies()
    assert forwarder.forward(client, first)
    assert spool.studies()[0].pending == ()
    spool.write(study, sops[0], make_dicom(seed=32, study_uid=study))  # the PACS resends it (a new copy)
    [resent] = spool.studies()
    assert len(resent.pending) == 1
    # a copy replaced after the listing the forwarder acted on is neither marked nor removed
    spool.write(study, sops[0], make_dicom(seed=33, study_uid=study))
    spool.mark_analysed(resent, list(resent.pending))
    spool.remove(resent)
    [kept] = spool.studies()
    assert len(kept.files) == 1 and len(kept.pending) == 1


def test_a_study_with_no_analysed_image_has_nothing_to_send_back(
    gateway: tuple[TestClient, ServingSettings], tmp_path: Path
) -> None:
    client, _ = gateway
    response = client.post(f"/v1/studies/{generate_uid()}/send-back")
    assert response.status_code == 404 and response.json()["error"]["code"] == "study_not_analysed"
    assert client.post("/v1/studies/1.2.abc/send-back").status_code in (400, 422)
    # a study whose every image is refused leaves the spool, after one more try of its images
    spool = InstanceSpool(tmp_path)
    spool.write("1.2.826.0.1.3680043.8.498.1", "1.2.826.0.1.3680043.8.498.2", b"not a dicom at all")
    forwarder = Forwarder(spool, gateway_url="", api_key="", settle_s=0.0)
    for _ in range(2):
        [study] = spool.studies()
        assert forwarder.forward(client, study)  # analysed: the gateway answered (the instance failed)
        [study] = spool.studies()
        assert study.pending == ()
        done = forwarder.forward(client, study)  # 404
    assert done and spool.studies() == []


def test_a_study_the_gateway_forgot_is_analysed_again_not_dropped(
    gateway: tuple[TestClient, ServingSettings], forwarder: Forwarder
) -> None:
    """The images were answered for, then the gateway lost them (its worklist wiped): no result lost."""
    client, settings = gateway
    spool = forwarder.spool
    study, sops = _answered_study(spool, 2, seed=41)  # as if analysed by a gateway that forgot since
    assert not forwarder.forward(client, study)  # 404: the images go again, the study stays
    [study] = spool.studies()
    assert len(study.pending) == 2
    assert forwarder.forward(client, study)
    assert forwarder.forward(client, spool.studies()[0])
    assert spool.studies() == []
    assert sent_back(settings, sops) == {SR_CLASS: 1, GSPS_CLASS: 2}


def test_another_tenants_key_cannot_send_a_study_back(
    gateway: tuple[TestClient, ServingSettings], forwarder: Forwarder
) -> None:
    client, settings = gateway
    study, sops = _spool_study(forwarder.spool, 1, seed=51)
    assert forwarder.forward(client, forwarder.spool.studies()[0])  # analysed under "hospital"
    other = client.post(
        f"/v1/studies/{study}/send-back", headers={"Authorization": f"Bearer {OTHER_TENANT_KEY}"}
    )
    assert other.status_code == 404 and other.json()["error"]["code"] == "study_not_analysed"
    assert sent_back(settings, sops) == {}


def _audited(client: TestClient, response: Any) -> dict[str, Any]:
    lines = client.app.state.cxr.audit.path.read_text().splitlines()  # type: ignore[attr-defined]
    rid = response.headers["X-Request-ID"]
    return next(e for e in map(json.loads, lines) if e["request_id"] == rid)


def _stow(client: TestClient, send_back: str, *parts: bytes) -> tuple[Any, list[str]]:
    body, ctype = stow_body(*parts)
    r = client.post(f"/dicomweb/studies?send_back={send_back}", content=body, headers={"Content-Type": ctype})
    assert r.status_code == 200, r.text
    return r, re.findall(r"/v1/results/([0-9a-f]{32})/sr", r.text)


def test_a_send_back_is_audited_naming_the_results_it_sent_and_the_study_by_hash(
    gateway: tuple[TestClient, ServingSettings],
) -> None:
    """Who received result X: the line of the send-back names every result its objects are built from."""
    client, _ = gateway
    study = generate_uid()
    stowed, made = _stow(
        client, "false", make_dicom(seed=61, study_uid=study), make_dicom(seed=62, study_uid=study)
    )
    assert sorted(_audited(client, stowed)["result_ids"]) == sorted(made) and len(made) == 2
    sent = client.post(f"/v1/studies/{study}/send-back")
    assert sent.status_code == 200 and sent.json()["objects_queued"] > 0, sent.text
    entry = _audited(client, sent)
    assert sorted(entry["result_ids"]) == sorted(made) and entry["result_id"] is None
    assert entry["study_hashes"] == [entry["study_hash"]] and entry["study_hash"]
    assert study not in client.app.state.cxr.audit.path.read_text()  # type: ignore[attr-defined]


def test_a_stow_sent_back_is_audited_naming_the_studys_earlier_results_it_sent_too(
    gateway: tuple[TestClient, ServingSettings],
) -> None:
    client, _ = gateway
    study = generate_uid()
    _, earlier = _stow(client, "false", make_dicom(seed=63, study_uid=study))
    sent, made = _stow(client, "true", make_dicom(seed=64, study_uid=study))
    assert sent.headers.get("X-CXR-Sent-Back") == "pacs"
    entry = _audited(client, sent)
    assert entry["result_ids"][: len(made)] == made  # what it created first, then what else went back
    assert sorted(entry["result_ids"]) == sorted(made + earlier)


def test_a_404_that_is_not_the_gateways_answer_is_retried_never_taken_as_done(forwarder: Forwarder) -> None:
    """A proxy, or a gateway without the route, answers 404 too: the acknowledged images must stay."""
    import httpx

    spool = forwarder.spool
    study, _ = _answered_study(spool, 2, seed=61)
    answers = iter([httpx.Response(404, text="Not Found"), httpx.Response(404, json={"detail": "Not Found"})])
    with httpx.Client(
        transport=httpx.MockTransport(lambda request: next(answers)), base_url="http://gw"
    ) as proxy:
        for _ in range(2):
            assert not forwarder.forward(proxy, study)
    [kept] = spool.studies()
    assert len(kept.files) == 2 and kept.pending == ()  # nothing dropped, nothing to analyse again


def test_a_409_that_is_not_the_gateways_stow_answer_is_retried_never_taken_as_analysed(
    forwarder: Forwarder,
) -> None:
    """The gateway's 409 carries the FailedSOPSequence; a proxy's or load balancer's does not.
    Before, any 409 marked the images analysed: unanalysed, and dropped with the study later."""
    import httpx

    spool = forwarder.spool
    _spool_study(spool, 2, seed=71)
    [study] = spool.studies()
    answers = iter(
        [
            httpx.Response(409, text="<html>Conflict</html>"),
            httpx.Response(409, json={"error": {"code": "conflict", "message": "upstream"}}),
        ]
    )
    with httpx.Client(
        transport=httpx.MockTransport(lambda request: next(answers)), base_url="http://gw"
    ) as proxy:
        for _ in range(2):
            assert not forwarder.analyse(proxy, study)
    [kept] = spool.studies()
    assert len(kept.pending) == 2  # still to be analysed


def test_a_gateway_down_for_a_day_keeps_the_studys_backoff_capped_instead_of_overflowing(
    forwarder: Forwarder,
) -> None:
    """``retry_s * 2**(n-1)`` is a float: past ~1024 failures (17 h at the 60 s cap) it raised
    OverflowError in the pool, no next try was set, and the loop retried the study at once, again and
    again, spinning against a gateway still down."""
    import httpx

    def down(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    _spool_study(forwarder.spool, 1, seed=81)
    [study] = forwarder.spool.studies()
    key = study.folder.name
    forwarder._failures[key] = 5000
    now = time.time()
    with httpx.Client(transport=httpx.MockTransport(down), base_url="http://gw") as client:
        assert not forwarder._attempt(client, study, now)
    assert forwarder._failures[key] == 5001
    assert forwarder._next_try[key] == pytest.approx(now + forwarder.max_backoff_s)


def test_a_study_received_before_the_clock_stepped_back_is_not_held_for_the_step(
    forwarder: Forwarder,
) -> None:
    """Arrivals are file mtimes (they outlive a restart). Spooled while the clock was a day ahead (a bad
    RTC at boot, then NTP), a study neither settled nor was overdue until the clock caught up; and a
    retry time set then held it as long. Neither waits more than the maximum wait / backoff now."""
    import os

    _spool_study(forwarder.spool, 1, seed=91)
    [study] = forwarder.spool.studies()
    ahead = time.time() + 86400.0
    for path in [*study.folder.iterdir()]:
        os.utime(path, (ahead, ahead))
    [study] = forwarder.spool.studies()
    forwarder.spool.mark_analysed(study, list(study.files))  # the marker names the copy as it is now
    now = time.time()
    [study] = forwarder.spool.studies()
    assert study.pending == () and study.first_arrival >= ahead
    assert [s.folder for s in forwarder.due(now)] == [study.folder], "its send-back is due"
    assert forwarder.overdue(study, now)
    forwarder._next_try[study.folder.name] = ahead  # a retry time set while the clock was ahead
    started: list[Any] = []

    class Pool:
        def submit(self, *args: Any) -> None:
            started.append(args)

    forwarder._pool = Pool()  # type: ignore[assignment]
    assert forwarder.run_once(None, now) == 1  # type: ignore[arg-type]
