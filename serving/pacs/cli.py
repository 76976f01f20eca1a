"""``cxr pacs analyze STUDY_UID``: ask the running gateway to pull a study from the PACS and analyse it."""

from __future__ import annotations

import os
from typing import Annotated

import httpx
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from core.credentials import read_credentials
from core.errors import CredentialsError
from core.settings import CoreSettings
from core.urls import AddressError, http_url

app = typer.Typer(help="The PACS round trip: pull a study by DICOMweb, analyse it, send results back.")
console = Console()


def _pacs_key() -> str:
    key = os.environ.get("CXR_API_KEY", "")
    if key:
        # an HTTP header carries ASCII only: httpx raised UnicodeEncodeError with a traceback
        if not (key.isascii() and key.isprintable()):
            raise typer.BadParameter(
                "CXR_API_KEY holds characters an API key never has (non-ASCII, spaces or control "
                "characters): copy the pacs key from the stack's credentials.json again"
            )
        return key
    try:
        creds = read_credentials(CoreSettings().stack_dir)
    except CredentialsError as exc:
        raise typer.BadParameter(f"no pacs key: {exc}") from exc
    if creds is None or "pacs" not in creds.api_keys:
        raise typer.BadParameter("no pacs key: set CXR_API_KEY or start the stack (`make up`) first")
    return creds.api_keys["pacs"]


@app.command("analyze")
def analyze(
    study_uid: Annotated[str, typer.Argument(help="StudyInstanceUID of a study the PACS holds")],
    send_back: Annotated[bool, typer.Option(help="send SR + presentation states to the PACS")] = True,
    gateway: Annotated[str, typer.Option(envvar="CXR_GATEWAY_URL")] = "http://127.0.0.1:8080",
    timeout_s: Annotated[
        # the socket's limit: 1e308 raised OverflowError from deep in the connection, a traceback
        float,
        typer.Option(min=1.0, max=86400.0, help="how long to wait for the whole study (seconds)"),
    ] = 300.0,
) -> None:
    """Pull STUDY_UID from CXR_PACS_DICOMWEB_URL (QIDO-RS/WADO-RS), analyse it, send results back."""
    from pydicom.uid import UID

    if not study_uid or len(study_uid) > 64 or not UID(study_uid).is_valid:
        # it goes into the URL's path: "../x" would reach another route of the gateway
        raise typer.BadParameter(
            f"{study_uid!r} is not a DICOM UID (digits and dots, at most 64 characters)",
            param_hint="'STUDY_UID'",
        )
    try:
        gateway = http_url(gateway, "--gateway / CXR_GATEWAY_URL", "http://127.0.0.1:8080").rstrip("/")
    except AddressError as exc:
        raise typer.BadParameter(str(exc), param_hint="'--gateway'") from exc
    headers = {"Authorization": f"Bearer {_pacs_key()}"}
    try:
        with console.status(f"pulling and analysing the study through {gateway} ..."):
            response = httpx.post(
                f"{gateway}/v1/studies/{study_uid}/analyze",
                params={"send_back": str(send_back).lower()},
                headers=headers,
                timeout=timeout_s,
                trust_env=False,
            )
    except httpx.ConnectError as exc:  # nothing listens there: the usual cause is a stack not started
        console.print(
            f"[red]the gateway at {escape(gateway)} did not answer:[/] {escape(str(exc))}; "
            "start the stack with `make up` (or point --gateway / CXR_GATEWAY_URL at the gateway)"
        )
        raise typer.Exit(1) from exc
    except httpx.HTTPError as exc:
        console.print(f"[red]the gateway at {escape(gateway)} did not answer:[/] {escape(str(exc))}")
        raise typer.Exit(1) from exc
    if response.status_code != 200:
        try:
            message = response.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = response.text[:300]
        console.print(f"[red]analysis refused ({response.status_code}):[/] {message}")
        raise typer.Exit(1)
    try:
        body = response.json()
        results = body["results"]
    except (ValueError, KeyError, TypeError) as exc:  # --gateway names some other server
        console.print(
            f"[red]{escape(gateway)} answered 200 but not with a study analysis:[/] is --gateway "
            "(CXR_GATEWAY_URL) the CXR Detect gateway?"
        )
        raise typer.Exit(1) from exc
    table = Table(title=f"Study {study_uid}")
    for col in ("image", "model", "findings"):
        table.add_column(col)
    for result in results:
        model = f"{result['model']['name']} v{result['model']['version']} ({result['model']['stage']})"
        findings = ", ".join(f"{d['class_name']} {d['confidence']:.2f}" for d in result["detections"])
        table.add_row(result["image"].get("sop_instance_uid", "")[-20:], model, findings or "no finding")
    console.print(table)
    triage = body.get("triage") or {}
    if triage:
        flag = "[bold red]PRIORITY[/]" if triage.get("priority") else "routine"
        console.print(f"abnormality score {triage['score']:.3f} (threshold {triage['threshold']}): {flag}")
    if body["sent_to"]:
        console.print(f"{body['objects_queued']} objects queued for {', '.join(body['sent_to'])}")
    if body["failed"]:
        console.print(f"[yellow]{body['failed']} instance(s) could not be analysed[/]")
