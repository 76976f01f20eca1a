"""What the DIMSE forwarder's tests share: a gateway whose one PACS is down, and what it queued for it."""

from __future__ import annotations

import contextlib
import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import pydicom
from fastapi.testclient import TestClient

from serving.config import ServingSettings
from serving.gateway.auth import hash_key
from serving.pacs.outbox import Outbox
from tests.unit.serving.serving_support import onnx_settings

SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.33"
GSPS_CLASS = "1.2.840.10008.5.1.4.1.1.11.1"


@contextlib.contextmanager
def down_pacs_gateway(
    onnx_model: Path, gitops_dir: Path, root: Path, *, other_keys: dict[str, str] | None = None
) -> Iterator[tuple[TestClient, ServingSettings]]:
    """An in-process gateway whose one PACS is down: what it sends back stays in its outbox to be read.

    Its client carries the key of a pacs caller of tenant "hospital" (as the SCP's does);
    ``other_keys`` adds pacs keys of other tenants (key -> tenant).
    """
    from serving.gateway.app import create_app

    key = f"cxr_pacs_{uuid.uuid4().hex}"
    entries = [{"id": "scp", "role": "pacs", "sha256": hash_key(key), "tenant": "hospital"}]
    entries += [
        {"id": f"other-{i}", "role": "pacs", "sha256": hash_key(k), "tenant": tenant}
        for i, (k, tenant) in enumerate((other_keys or {}).items())
    ]
    (root / "keys.json").write_text(json.dumps({"keys": entries}))
    down = {"name": "pacs", "kind": "stow", "url": "http://127.0.0.1:9/dicom-web", "callers": ["*"]}
    settings = onnx_settings(
        onnx_model,
        root / "keys.json",
        root,
        gitops_dir=gitops_dir,
        pacs_destinations=[down],
        outbox_retry_s=3600,  # one failed try, then the items wait for the test to read them
    )
    with TestClient(create_app(settings, use_store=False), raise_server_exceptions=False) as client:
        client.headers["Authorization"] = f"Bearer {key}"  # the SCP's client carries its key the same way
        yield client, settings


def sent_back(settings: ServingSettings, sops: list[str]) -> dict[str, int]:
    """SOP classes of the outbox items built from the ``sops`` sources only, counted."""
    counts: dict[str, int] = {}
    for item in Outbox(settings.resolved_outbox_dir).items():
        ds = pydicom.dcmread(item.folder / "object.dcm", stop_before_pixels=True)
        referenced = {
            str(ref.ReferencedSOPInstanceUID)
            for series in ds.get("ReferencedSeriesSequence", [])
            for ref in series.ReferencedImageSequence
        } | {
            str(ref.ReferencedSOPInstanceUID)
            for evidence in ds.get("CurrentRequestedProcedureEvidenceSequence", [])
            for series in evidence.ReferencedSeriesSequence
            for ref in series.ReferencedSOPSequence
        }
        if referenced and referenced <= set(sops):
            counts[item.sop_class_uid] = counts.get(item.sop_class_uid, 0) + 1
    return counts
