"""The PACS round trip against a real Orthanc: DIMSE and DICOMweb in, SR + GSPS back into the PACS.

One module-scoped gateway (uvicorn, the real Triton of the serving tests) sends results back
to the session's Orthanc by STOW-RS; our storage SCP runs as its own process
(``python -m serving.dimse``, the stack's component) so it can be killed and restarted. Each
test checks what a PACS administrator would check: which objects Orthanc holds for the
study, and that they reference the source images.
"""

from __future__ import annotations

import io
import re
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE

from stack.components import basic_auth, dimse_component
from stack.orthanc import Modality, OrthancClient, StoredInstance
from tests.fixtures.orthanc import OrthancServer
from tests.fixtures.servers import HOST, RunningProcess, free_port
from tests.unit.serving.serving_support import LiveServer, make_dicom

pytestmark = pytest.mark.integration

SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.33"
GSPS_CLASS = "1.2.840.10008.5.1.4.1.1.11.1"
SETTLE_S = 1.0


@dataclass
class RoundTrip:
    gateway: str
    pacs_key: str
    orthanc: OrthancServer
    root: Path
    scp_env: dict[str, str]
    scp_port: int

    def scp(self, name: str, **env: str) -> RunningProcess:
        comp = dimse_component(HOST, self.scp_port, "CXR", Path(sys.executable), {**self.scp_env, **env})
        return RunningProcess(comp, self.root / f"{name}.log")


@pytest.fixture(scope="module")
def roundtrip(
    _shared_orthanc: OrthancServer,
    production_triton: Any,
    serving_keys: tuple[Path, dict[str, str]],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[RoundTrip]:
    from serving.config import ServingSettings
    from serving.gateway.app import create_app
    from tests.unit.serving.serving_support import write_stage_files

    orthanc = _shared_orthanc
    root = tmp_path_factory.mktemp("pacs-roundtrip")
    gitops = root / "gitops"
    write_stage_files(gitops, production="7")
    auth = {"Authorization": basic_auth(*orthanc.auth)}
    settings = ServingSettings(
        backend="triton",
        triton_production_url=production_triton.http_url,
        api_keys_file=serving_keys[0],
        gitops_dir=gitops,
        stack_dir=root / "state",
        triton_timeout_s=20.0,
        pacs_destinations=[
            {
                "name": "orthanc",
                "kind": "stow",
                "url": orthanc.dicomweb_url,
                "headers": auth,
                "callers": ["*"],
            }
        ],
        pacs_dicomweb_url=orthanc.dicomweb_url,
        pacs_dicomweb_headers=auth,
        outbox_retry_s=0.2,
        outbox_max_backoff_s=1.0,
    )
    app = create_app(settings, use_store=False)
    key = serving_keys[1]["pacs"]
    with LiveServer(app, free_port()) as server:
        scp_env = {
            "CXR_STACK_DIR": str(root / "scp-state"),
            "CXR_DIMSE_GATEWAY_URL": server.url,
            "CXR_DIMSE_API_KEY": key,
            "CXR_DIMSE_HOST": HOST,
            "CXR_STUDY_SETTLE_SECONDS": str(SETTLE_S),
        }
        port = free_port()
        scp_env["CXR_DIMSE_PORT"] = str(port)
        yield RoundTrip(server.url, key, orthanc, root, scp_env, port)


@pytest.fixture
def pacs(roundtrip: RoundTrip) -> RoundTrip:
    roundtrip.orthanc.reset()
    return roundtrip


def _study(orthanc: OrthancClient, n: int = 2) -> tuple[str, list[str], str]:
    """Upload an n-image study to Orthanc: (StudyInstanceUID, SOP Instance UIDs, Orthanc study id)."""
    study = generate_uid()
    sops = []
    for i in range(n):
        data = make_dicom(160, 128, seed=i, study_uid=study)
        sops.append(str(pydicom.dcmread(io.BytesIO(data)).SOPInstanceUID))
        orthanc.upload(data)
    [orthanc_id] = orthanc.find("Study", {"StudyInstanceUID": study})
    return study, sops, orthanc_id


def _results(orthanc: OrthancClient, study: str, images: int, timeout: float = 90.0) -> list[StoredInstance]:
    """Wait until Orthanc holds the study's SR and one GSPS per image; every instance of the study."""
    deadline = time.monotonic() + timeout
    held: list[StoredInstance] = []
    while time.monotonic() < deadline:
        held = orthanc.study_instances(study)
        srs = [i for i in held if i.sop_class_uid == SR_CLASS]
        prs = [i for i in held if i.sop_class_uid == GSPS_CLASS]
        if srs and len(prs) >= images:
            return held
        time.sleep(0.2)
    raise AssertionError(f"Orthanc holds {[(i.modality, i.sop_class_uid) for i in held]} after {timeout} s")


def _check_results(held: list[StoredInstance], sources: list[str]) -> None:
    srs = [i for i in held if i.sop_class_uid == SR_CLASS]
    prs = [i for i in held if i.sop_class_uid == GSPS_CLASS]
    assert len(srs) == 1, "one SR per study"
    assert set(sources) <= set(srs[0].referenced_sop_instance_uids)
    assert len(prs) == len(sources), "one GSPS per image"
    assert sorted(ref for p in prs for ref in p.referenced_sop_instance_uids) == sorted(sources)
    assert {i.modality for i in srs} == {"SR"} and {i.modality for i in prs} == {"PR"}


def test_orthanc_c_store_to_our_scp_brings_back_one_sr_and_a_gsps_per_image(pacs: RoundTrip) -> None:
    scp = pacs.scp("scp-cstore")
    scp.start(timeout=60)
    try:
        client = pacs.orthanc.client
        client.put_modality("cxr", Modality("CXR", HOST, pacs.scp_port))
        assert client.echo("cxr")
        study, sops, orthanc_id = _study(client)
        client.store_to_modality("cxr", [orthanc_id])
        _check_results(_results(client, study, len(sops)), sops)
    finally:
        scp.stop()


def test_orthanc_stow_rs_to_the_gateway_is_sent_back_by_the_callers_destination(pacs: RoundTrip) -> None:
    client = pacs.orthanc.client
    client.put_dicomweb_server(
        "cxr", f"{pacs.gateway}/dicomweb", headers={"Authorization": f"Bearer {pacs.pacs_key}"}
    )
    study, sops, orthanc_id = _study(client)
    client.stow_to_server("cxr", [orthanc_id])
    _check_results(_results(client, study, len(sops)), sops)


def test_dicomweb_pull_of_a_study_only_orthanc_holds(pacs: RoundTrip) -> None:
    client = pacs.orthanc.client
    study, sops, _ = _study(client)
    response = httpx.post(
        f"{pacs.gateway}/v1/studies/{study}/analyze",
        headers={"Authorization": f"Bearer {pacs.pacs_key}"},
        timeout=120,
        trust_env=False,
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert sorted(r["image"]["sop_instance_uid"] for r in body["results"]) == sorted(sops)
    assert body["sent_to"] == ["orthanc"] and body["objects_queued"] == 3
    assert 0.0 <= body["triage"]["score"] <= 1.0
    _check_results(_results(client, study, len(sops)), sops)
    # our own SR and GSPS are in the study now: a second pull analyses the radiographs only
    again = httpx.post(
        f"{pacs.gateway}/v1/studies/{study}/analyze",
        headers={"Authorization": f"Bearer {pacs.pacs_key}"},
        timeout=120,
        trust_env=False,
    )
    assert again.status_code == 200 and len(again.json()["results"]) == 2
    _check_results(_results(client, study, len(sops)), sops)  # same UIDs: still one SR, two GSPS

    missing = httpx.post(
        f"{pacs.gateway}/v1/studies/{generate_uid()}/analyze",
        headers={"Authorization": f"Bearer {pacs.pacs_key}"},
        timeout=60,
        trust_env=False,
    )
    assert missing.status_code == 404 and "no radiograph" in missing.json()["error"]["message"]
    bad = httpx.post(
        f"{pacs.gateway}/v1/studies/1.2.abc/analyze",
        headers={"Authorization": f"Bearer {pacs.pacs_key}"},
        timeout=60,
        trust_env=False,
    )
    assert bad.status_code == 400


def _metric(gateway: str, sample: str) -> float:
    """One sample of the gateway's /metrics (0 when absent)."""
    for line in httpx.get(f"{gateway}/metrics", timeout=10, trust_env=False).text.splitlines():
        if line.startswith(sample + " "):
            return float(line.split()[-1])
    return 0.0


def _wait_metric(gateway: str, sample: str, predicate: Any, timeout: float = 60.0) -> float:
    deadline = time.monotonic() + timeout
    while True:
        value = _metric(gateway, sample)
        if predicate(value):
            return value
        assert time.monotonic() < deadline, f"{sample} = {value} after {timeout} s"
        time.sleep(0.1)


def _stow(pacs: RoundTrip, study: str, datasets: list[bytes]) -> httpx.Response:
    from serving.dimse.forwarder import related_body

    body, content_type = related_body(datasets)
    return httpx.post(
        f"{pacs.gateway}/dicomweb/studies/{study}",
        content=body,
        headers={"Authorization": f"Bearer {pacs.pacs_key}", "Content-Type": content_type},
        timeout=60,
        trust_env=False,
    )


DEPTH = 'cxr_pacs_outbox_depth{destination="orthanc"}'
RETRIED = 'cxr_pacs_outbox_sent_total{destination="orthanc",outcome="retry"}'
DELIVERED = 'cxr_pacs_outbox_sent_total{destination="orthanc",outcome="delivered"}'


def test_send_back_waits_in_the_outbox_while_orthanc_is_down_and_is_delivered_once(pacs: RoundTrip) -> None:
    client = pacs.orthanc.client
    study = generate_uid()
    datasets = [make_dicom(160, 128, seed=i, study_uid=study) for i in range(2)]
    sources = [str(pydicom.dcmread(io.BytesIO(d)).SOPInstanceUID) for d in datasets]
    # what earlier tests queued (a second pull re-sends the same objects) is delivered first
    _wait_metric(pacs.gateway, DEPTH, lambda v: v == 0)
    retried = _metric(pacs.gateway, RETRIED)
    pacs.orthanc.process.stop()
    try:
        stored = _stow(pacs, study, datasets)
        assert stored.status_code == 200, stored.text
        assert stored.headers["X-CXR-Sent-Back"] == "orthanc"
        assert _metric(pacs.gateway, DEPTH) == 3  # SR + 2 GSPS, on disk before the answer
        _wait_metric(pacs.gateway, RETRIED, lambda v: v >= retried + 3)  # tried against the stopped PACS
        assert _metric(pacs.gateway, DEPTH) == 3
    finally:
        pacs.orthanc.process.start(timeout=30)
    held = _results(client, study, 2)
    ours = [i for i in held if i.sop_class_uid in (SR_CLASS, GSPS_CLASS)]
    assert len(ours) == 3
    assert {ref for i in ours for ref in i.referenced_sop_instance_uids} >= set(sources)
    _wait_metric(pacs.gateway, DEPTH, lambda v: v == 0)
    # the same study again (a resend from the PACS): the same SOP Instance UIDs, no second copy
    delivered = _metric(pacs.gateway, DELIVERED)
    _stow(pacs, study, datasets).raise_for_status()
    _wait_metric(pacs.gateway, DELIVERED, lambda v: v >= delivered + 3)
    again = [i for i in client.study_instances(study) if i.sop_class_uid in (SR_CLASS, GSPS_CLASS)]
    assert sorted(i.sop_instance_uid for i in again) == sorted(i.sop_instance_uid for i in ours)


def _c_store(port: int, data: list[bytes]) -> list[int]:
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.1.1", [ExplicitVRLittleEndian])
    assoc = ae.associate(HOST, port, ae_title="CXR")
    assert assoc.is_established
    try:
        return [int(assoc.send_c_store(pydicom.dcmread(io.BytesIO(d))).Status) for d in data]
    finally:
        assoc.release()


def _analysed(log: Path) -> int:
    """Instances the SCP's log says the gateway answered for (its ``dimse_instances_analysed`` lines)."""
    return sum(int(n) for n in re.findall(r"dimse_instances_analysed instances=(\d+)", log.read_text()))


def test_a_study_acknowledged_before_a_crash_is_analysed_after_the_restart(pacs: RoundTrip) -> None:
    study = generate_uid()
    datasets = [make_dicom(160, 128, seed=10 + i, study_uid=study) for i in range(2)]
    sources = [str(pydicom.dcmread(io.BytesIO(d)).SOPInstanceUID) for d in datasets]
    first = pacs.scp("scp-crash", CXR_STUDY_SETTLE_SECONDS="3600")  # would wait an hour to send back
    first.start(timeout=60)
    try:
        assert _c_store(pacs.scp_port, datasets) == [0, 0]
        # the images are analysed as they arrive, long before the study settles ...
        deadline = time.monotonic() + 60
        while _analysed(pacs.root / "scp-crash.log") < 2:
            assert time.monotonic() < deadline, "the SCP did not hand the images over on arrival"
            time.sleep(0.1)
    finally:
        assert first.proc is not None
        first.proc.send_signal(signal.SIGKILL)  # no clean shutdown: the spool is all that is left
        first.proc.wait(timeout=10)
    assert pacs.orthanc.client.study_instances(study) == []
    second = pacs.scp("scp-restarted")
    second.start(timeout=60)
    try:
        _check_results(_results(pacs.orthanc.client, study, 2), sources)
    finally:
        second.stop()
    # ... and the restarted SCP knew it: it only sent the study's results back, analysing nothing again
    assert "dimse_instances_analysed" not in (pacs.root / "scp-restarted.log").read_text()
    # the SCP logs what it did, never which patient's study it did it to
    for log, event in (("scp-crash.log", "dimse_store_ok"), ("scp-restarted.log", "dimse_study_forwarded")):
        text = (pacs.root / log).read_text()
        assert event in text  # the log holds what each process did ...
        assert study not in text and not any(sop in text for sop in sources)
