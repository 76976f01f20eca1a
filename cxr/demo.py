"""``cxr demo`` / ``make demo``: a guided walk through the running stack, as a PACS would use it.

Generates a few synthetic studies, sends them through ``POST /v1/detect`` and
STOW-RS (``dicomweb-client``, the client a PACS integration would use), and
writes what a person wants to look at: one DICOM SR per image, the image with
its boxes drawn on it, and a table of findings. It ends with the review page's
address and a radiologist key to use there.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
from PIL import Image, ImageDraw
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from core.credentials import credentials_path, read_credentials
from core.errors import CxrError
from core.settings import CoreSettings

console = Console()


class DemoError(RuntimeError):
    """The demo could not talk to the stack; the message says what to start."""


@dataclass(frozen=True)
class StackAccess:
    gateway: str
    pacs_key: str
    radiologist_key: str

    @classmethod
    def from_stack(cls) -> StackAccess:
        stack = CoreSettings().stack_dir
        creds = read_credentials(stack)
        if creds is None or not {"pacs", "radiologist"} <= set(creds.api_keys):
            raise DemoError(f"{credentials_path(stack)} not found: start the stack with `make up` first")
        keys = creds.api_keys
        # `cxr` has loaded the stack's stack.env (its callback), so this is the running stack's
        gateway = os.environ.get("CXR_GATEWAY_URL", "http://127.0.0.1:8080")
        return cls(gateway, keys["pacs"], keys["radiologist"])


def draw_overlay(source_png: bytes, detections: list[dict[str, Any]], out: Path) -> None:
    """The preview image with each box, its class and its confidence drawn on it."""
    import io

    image = Image.open(io.BytesIO(source_png)).convert("RGB")
    draw = ImageDraw.Draw(image)
    width = max(2, image.width // 400)
    for det in detections:
        x0, y0, x1, y1 = det["box"]
        draw.rectangle((x0, y0, x1, y1), outline=(255, 64, 64), width=width)
        draw.text(
            (x0 + 4, max(0, y0 - 14)), f"{det['class_name']} {det['confidence']:.2f}", fill=(255, 255, 0)
        )
    image.save(out)


def run_demo(out: Path, n_images: int, conf: float, seed: int) -> list[dict[str, Any]]:
    from dicomweb_client.api import DICOMwebClient

    from data_pipeline.output import ensure_output_folder
    from data_pipeline.synth import SynthConfig, generate

    access = StackAccess.from_stack()
    ensure_output_folder(out)  # a file or an unwritable place: one line (CxrError), not a traceback
    headers = {"Authorization": f"Bearer {access.pacs_key}"}
    rows: list[dict[str, Any]] = []
    with httpx.Client(base_url=access.gateway, headers=headers, timeout=60) as client:
        try:  # before the phantoms: a stack that is down was said so only after drawing them
            client.get("/healthz").raise_for_status()
        except httpx.HTTPError as exc:
            raise DemoError(
                f"the gateway at {access.gateway} does not answer ({exc}): run `make up`"
            ) from exc
        studies = out / "studies"
        generate(SynthConfig(n_images=n_images, seed=seed, size=1024, workers=1), studies)
        files = sorted((studies / "dicom").glob("*.dicom"))
        for path in files:
            resp = client.post(
                "/v1/detect",
                params={"conf": conf},
                files={"file": (path.name, path.read_bytes(), "application/dicom")},
            )
            if resp.status_code != 200:
                raise DemoError(f"/v1/detect answered {resp.status_code}: {resp.text[:300]}")
            result = resp.json()
            rid = result["request_id"]
            sr = client.get(f"/v1/results/{rid}/sr")
            sr.raise_for_status()
            (out / f"{path.stem}-sr.dcm").write_bytes(sr.content)
            preview = client.get(
                f"/v1/results/{rid}/preview.png",
                headers={"Authorization": f"Bearer {access.radiologist_key}"},
            )
            preview.raise_for_status()
            draw_overlay(preview.content, result["detections"], out / f"{path.stem}-overlay.png")
            (out / f"{path.stem}.json").write_text(json.dumps(result, indent=2))
            rows.append({**result, "image": path.stem, "via": "detect"})  # the reply has its own "image"
    stow = DICOMwebClient(url=f"{access.gateway}/dicomweb", headers=headers)
    import pydicom

    stored = stow.store_instances([pydicom.dcmread(p) for p in files[:2]])
    for ref in stored.ReferencedSOPSequence:
        rows.append({"image": ref.ReferencedSOPInstanceUID[-16:], "via": "STOW-RS", "url": ref.RetrieveURL})
    return rows


@dataclass(frozen=True)
class RoundTripResult:
    study_uid: str
    images: int
    srs: int
    presentation_states: int
    seconds: float
    explorer: str


def pacs_round_trip(files: list[Path], timeout_s: float = 180.0) -> RoundTripResult | None:
    """One study from the PACS twin to us by C-STORE, and its SR + GSPS back into the twin.

    None when the stack runs without Orthanc (``CXR_PACS_DICOMWEB_URL`` unset in stack.env).
    The images become one two-image study (a new StudyInstanceUID), as a modality would send it.
    """
    import io
    import time

    import pydicom
    from pydicom.uid import generate_uid

    from core.credentials import ORTHANC_USERNAME
    from stack.orthanc import OrthancClient

    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per poll would bury the result
    dicomweb = os.environ.get("CXR_PACS_DICOMWEB_URL", "")
    creds = read_credentials(CoreSettings().stack_dir)
    if not dicomweb or creds is None or not creds.orthanc_password:
        return None
    base = dicomweb.removesuffix("/").removesuffix("/dicom-web")
    study = generate_uid()
    with OrthancClient(base, ORTHANC_USERNAME, creds.orthanc_password) as orthanc:
        patient = pydicom.dcmread(files[0], stop_before_pixels=True)
        for path in files:
            ds = pydicom.dcmread(path)
            ds.StudyInstanceUID = study  # one study of one patient, as a modality sends it
            for keyword in ("PatientID", "PatientName", "PatientBirthDate", "PatientSex"):
                if keyword in patient:
                    setattr(ds, keyword, getattr(patient, keyword))
            buf = io.BytesIO()
            ds.save_as(buf, enforce_file_format=True)
            orthanc.upload(buf.getvalue())
        [orthanc_study] = orthanc.find("Study", {"StudyInstanceUID": study})
        start = time.monotonic()
        orthanc.store_to_modality("cxr", [orthanc_study])  # Orthanc -> our SCP, over DIMSE
        while True:
            held = orthanc.study_instances(study)
            srs = sum(i.modality == "SR" for i in held)
            prs = sum(i.modality == "PR" for i in held)
            if srs and prs >= len(files):
                break
            if time.monotonic() - start > timeout_s:
                raise DemoError(
                    f"Orthanc holds {srs} SR and {prs} presentation states after {timeout_s:.0f} s: "
                    "see `make logs C=dimse` and `make logs C=gateway`"
                )
            time.sleep(0.5)
    return RoundTripResult(
        study,
        len(files),
        srs,
        prs,
        time.monotonic() - start,
        f"{base}/app/explorer.html#study?uuid={orthanc_study}",
    )


def demo(
    out: Annotated[Path, typer.Option(help="where SRs, overlays and JSON results go")] = Path("demo-out"),
    n_images: Annotated[int, typer.Option(min=1, max=50)] = 4,
    conf: Annotated[float, typer.Option(min=0.0, max=1.0, help="confidence threshold")] = 0.1,
    seed: Annotated[int, typer.Option(min=0, help="phantoms' seed (numpy's: not negative)")] = 2026,
) -> None:
    """Send synthetic studies through the running stack; write SRs and overlays to OUT."""
    try:
        rows = run_demo(out, n_images, conf, seed)
    except (DemoError, CxrError) as exc:  # CxrError: e.g. a garbled credentials.json
        console.print(f"[red]demo failed:[/] {escape(str(exc))}")
        raise typer.Exit(1) from exc
    table = Table(title="Findings per image")
    for col in ("image", "via", "model", "findings"):
        table.add_column(col)
    for row in rows:
        if row["via"] == "STOW-RS":
            table.add_row(row["image"], "STOW-RS", "", f"stored; SR at {row['url']}")
            continue
        model = f"{row['model']['name']} v{row['model']['version']} ({row['model']['stage']})"
        dets = row["detections"]
        findings = ", ".join(f"{d['class_name']} {d['confidence']:.2f}" for d in dets) or "no finding"
        table.add_row(row["image"][:16], "detect", model, findings)
    console.print(table)
    files = sorted((out / "studies" / "dicom").glob("*.dicom"))[:2]
    try:
        trip = pacs_round_trip(files)
    except (DemoError, CxrError) as exc:  # CxrError: e.g. a garbled credentials.json
        console.print(f"[red]PACS round trip failed:[/] {escape(str(exc))}")
        raise typer.Exit(1) from exc
    if trip is None:
        console.print(
            "PACS round trip skipped: the stack runs without Orthanc "
            "(apt-get install orthanc orthanc-dicomweb, then make up)"
        )
    else:
        console.print(
            f"PACS round trip: a {trip.images}-image study went from Orthanc to our SCP (C-STORE) and "
            f"{trip.srs} SR + {trip.presentation_states} presentation states came back in "
            f"{trip.seconds:.1f} s (settle time included).\nOpen it in Orthanc: {trip.explorer} "
            "(user cxr, password in .stack/credentials.json under orthanc)"
        )
    access = StackAccess.from_stack()
    console.print(
        f"wrote SRs, overlays and JSON to {out}/\n"
        f"review page: {access.gateway}/  — radiologist key: {access.radiologist_key}"
    )
