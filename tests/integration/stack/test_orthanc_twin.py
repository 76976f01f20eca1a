"""Orthanc, the PACS twin, as the stack runs it: DICOM ping, REST upload, QIDO-RS, C-STORE out."""

from __future__ import annotations

import io
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import httpx
import pydicom
import pytest
from dicomweb_client.api import DICOMwebClient
from dicomweb_client.session_utils import create_session_from_user_pass
from pydicom.dataset import Dataset
from pynetdicom import AE, AllStoragePresentationContexts, VerificationPresentationContexts, evt
from pynetdicom.sop_class import DigitalXRayImageStorageForPresentation  # type: ignore[attr-defined]

from serving.dimse.echo import c_echo
from stack.components import basic_auth
from stack.orthanc import OrthancError
from tests.fixtures.orthanc import OrthancServer
from tests.fixtures.servers import HOST, free_port
from tests.unit.serving.serving_support import make_dicom

pytestmark = pytest.mark.integration


@dataclass
class StorageScp:
    """A pynetdicom storage SCP that keeps what it receives (the peer Orthanc sends to)."""

    ae_title: str
    port: int
    received: list[Dataset] = field(default_factory=list)
    arrived: threading.Event = field(default_factory=threading.Event)


@pytest.fixture
def storage_scp() -> Iterator[StorageScp]:
    scp = StorageScp("TESTSCP", free_port())

    def on_store(event: evt.Event) -> int:
        dataset = event.dataset
        dataset.file_meta = event.file_meta
        scp.received.append(dataset)
        scp.arrived.set()
        return 0x0000

    ae = AE(ae_title=scp.ae_title)
    ae.supported_contexts = AllStoragePresentationContexts + VerificationPresentationContexts
    server = ae.start_server((HOST, scp.port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    assert server is not None
    yield scp
    server.shutdown()


def test_orthanc_answers_c_echo_only_under_its_own_ae_title(orthanc: OrthancServer) -> None:
    assert c_echo(orthanc.host, orthanc.dicom_port, orthanc.aet)
    assert not c_echo(orthanc.host, orthanc.dicom_port, "NOT-ORTHANC")


def test_orthanc_refuses_anonymous_http_and_a_store_from_an_unregistered_ae(orthanc: OrthancServer) -> None:
    assert httpx.get(f"{orthanc.url}/system", trust_env=False).status_code == 401
    ae = AE(ae_title="STRANGER")
    ae.add_requested_context(DigitalXRayImageStorageForPresentation)
    # anyone may ping (so the association opens), only a registered modality may store
    stored = False
    assoc = ae.associate(orthanc.host, orthanc.dicom_port, ae_title=orthanc.aet)
    if assoc.is_established:
        status = assoc.send_c_store(pydicom.dcmread(io.BytesIO(make_dicom())))
        stored = "Status" in status and int(status.Status) == 0x0000  # empty: Orthanc aborted
        assoc.release()
    assert not stored
    assert orthanc.client.instances() == []


def test_an_upload_over_rest_is_served_back_by_qido_rs(orthanc: OrthancServer) -> None:
    dicom = make_dicom(seed=3)
    source = pydicom.dcmread(io.BytesIO(dicom))
    instance_id = orthanc.client.upload(dicom)
    assert orthanc.client.instances() == [instance_id]
    assert orthanc.client.upload(dicom) == instance_id  # stored once (OverwriteInstances off)

    session = create_session_from_user_pass(orthanc.username, orthanc.password)
    session.trust_env = False
    web = DICOMwebClient(url=orthanc.dicomweb_url, session=session)
    found = web.search_for_instances(study_instance_uid=source.StudyInstanceUID)
    assert [Dataset.from_json(f).SOPInstanceUID for f in found] == [source.SOPInstanceUID]

    (stored,) = orthanc.client.study_instances(source.StudyInstanceUID)
    assert (stored.orthanc_id, stored.sop_instance_uid) == (instance_id, source.SOPInstanceUID)
    assert stored.sop_class_uid == source.SOPClassUID and stored.modality == "DX"


def test_a_modality_configured_at_run_time_receives_a_c_store(
    orthanc: OrthancServer, storage_scp: StorageScp
) -> None:
    dicom = make_dicom(seed=4)
    instance_id = orthanc.client.upload(dicom)
    with pytest.raises(OrthancError):
        orthanc.client.store_to_modality("scp", [instance_id])  # not configured yet

    orthanc.client.put_modality("scp", (storage_scp.ae_title, HOST, storage_scp.port))
    assert orthanc.client.echo("scp")
    orthanc.client.store_to_modality("scp", [instance_id])

    assert storage_scp.arrived.wait(10)
    (received,) = storage_scp.received
    assert received.SOPInstanceUID == pydicom.dcmread(io.BytesIO(dicom)).SOPInstanceUID


def test_the_twin_refuses_a_peer_off_loopback(orthanc: OrthancServer) -> None:
    with pytest.raises(ValueError, match="loopback"):
        orthanc.client.put_modality("far", ("FAR", "192.0.2.10", 104))
    with pytest.raises(ValueError, match="loopback"):
        orthanc.client.put_dicomweb_server("far", "http://pacs.example.org/dicomweb")
    assert orthanc.client.modalities() == [] and orthanc.client.dicomweb_servers() == []


def test_stow_to_a_dicomweb_server_sends_the_configured_auth_header(
    orthanc: OrthancServer, orthanc_factory: Callable[..., OrthancServer]
) -> None:
    """Orthanc STOWs with the headers of its server entry: here to a second Orthanc that needs a login
    (as our gateway needs its Bearer key)."""
    receiver = orthanc_factory()
    instance_id = orthanc.client.upload(make_dicom(seed=5))
    orthanc.client.put_dicomweb_server("peer", receiver.dicomweb_url, {"Authorization": "Basic bm8="})
    with pytest.raises(OrthancError):
        orthanc.client.stow_to_server("peer", [instance_id])
    orthanc.client.put_dicomweb_server(
        "peer", receiver.dicomweb_url, {"Authorization": basic_auth(*receiver.auth)}
    )
    orthanc.client.stow_to_server("peer", [instance_id])
    assert len(receiver.client.instances()) == 1
