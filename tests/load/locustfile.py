"""Load profile of the gateway: PACS integrations and radiologists (``make loadtest``).

PACS-like users mostly send single DICOM detects, some batches and some STOW-RS
stores; radiologist-like users detect and then send feedback. Keys come from
``CXR_LOAD_PACS_KEY`` / ``CXR_LOAD_RADIOLOGIST_KEY`` or the stack's
``credentials.json``; the studies are synthetic DICOMs generated once per run.
Only the loopback gateway is ever targeted (``--host``).
"""

from __future__ import annotations

import json
import os
import random
import tempfile
import uuid
from functools import lru_cache
from pathlib import Path

from locust import HttpUser, between, task


@lru_cache(maxsize=1)
def studies() -> tuple[bytes, ...]:
    """A few synthetic radiographs (512 px, real DICOM encodings), made once per process."""
    from data_pipeline.synth import SynthConfig, generate

    count = int(os.environ.get("CXR_LOAD_IMAGES", "4"))
    with tempfile.TemporaryDirectory(prefix="cxr-load-") as tmp:  # the bytes are kept, not the files
        out = Path(tmp)
        generate(SynthConfig(n_images=count, seed=11, size=512, workers=1), out)
        return tuple(p.read_bytes() for p in sorted((out / "dicom").glob("*.dicom")))


@lru_cache(maxsize=1)
def keys() -> dict[str, str]:
    pacs, radiologist = os.environ.get("CXR_LOAD_PACS_KEY"), os.environ.get("CXR_LOAD_RADIOLOGIST_KEY")
    if pacs and radiologist:
        return {"pacs": pacs, "radiologist": radiologist}
    creds = Path(os.environ.get("CXR_STACK_DIR", ".stack")) / "credentials.json"
    return dict(json.loads(creds.read_text())["api_keys"])


def _stow_body(instances: list[bytes], boundary: str) -> bytes:
    parts = [
        f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + data + b"\r\n"
        for data in instances
    ]
    return b"".join(parts) + f"--{boundary}--\r\n".encode()


class PacsUser(HttpUser):
    """A PACS/RIS integration: mostly one image at a time."""

    weight = 3
    wait_time = between(0.2, 1.0)

    def on_start(self) -> None:
        self.client.headers["Authorization"] = f"Bearer {keys()['pacs']}"

    @task(8)
    def detect(self) -> None:
        self.client.post(
            "/v1/detect",
            data=random.choice(studies()),
            headers={"Content-Type": "application/dicom"},
            name="/v1/detect",
        )

    @task(1)
    def batch(self) -> None:
        files = [("file", (f"{i}.dcm", data, "application/dicom")) for i, data in enumerate(studies()[:3])]
        self.client.post("/v1/detect/batch", files=files, name="/v1/detect/batch")

    @task(1)
    def stow(self) -> None:
        boundary = uuid.uuid4().hex
        self.client.post(
            "/dicomweb/studies",
            data=_stow_body(list(studies()[:2]), boundary),
            headers={
                "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
                "Accept": "application/dicom+json",
            },
            name="/dicomweb/studies",
        )


class RadiologistUser(HttpUser):
    """A radiologist on the review page: look at the boxes, correct them."""

    weight = 1
    wait_time = between(1.0, 3.0)

    def on_start(self) -> None:
        self.client.headers["Authorization"] = f"Bearer {keys()['radiologist']}"

    @task
    def detect_then_feedback(self) -> None:
        resp = self.client.post(
            "/v1/detect",
            data=random.choice(studies()),
            headers={"Content-Type": "application/dicom"},
            name="/v1/detect",
        )
        if resp.status_code != 200:
            return
        result = resp.json()
        reviews = [{"index": i, "action": "accept"} for i in range(len(result["detections"]))]
        self.client.post(
            "/v1/feedback",
            json={
                "request_id": result["request_id"],
                "reviews": reviews,
                "new_boxes": [{"class_id": 3, "box": [100.0, 200.0, 300.0, 380.0]}],
                "comment": "load test",
            },
            name="/v1/feedback",
        )
