"""Orthanc, the department's PACS twin: how it runs (one description) and a small REST client.

``cxr stack up`` and the test fixtures start Orthanc from the same :func:`orthanc_component`,
so the tests exercise exactly the configuration the stack uses, as
:mod:`stack.components` does for the other servers. Orthanc is optional, like Prometheus:
when Debian's ``orthanc`` or ``orthanc-dicomweb`` is missing the component is ``None`` and
the reason is logged.

Orthanc 1.10 has no option for the address it binds: it listens on every interface, for
HTTP and for DICOM. What keeps it a loopback server is its configuration:
``RemoteAccessAllowed: false`` refuses HTTP from any address but loopback, every DICOM peer
must be a registered modality whose host (checked, ``DicomCheckModalityHost``) is loopback,
and every peer it may call (modalities, DICOMweb servers) is refused here unless it is on
loopback, so the twin never opens a connection off this machine.
"""

from __future__ import annotations

import functools
import ipaddress
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import urlsplit

import httpx

from stack.components import Component, http_ok
from stack.credentials import write_private

log = logging.getLogger("cxr.stack")

ORTHANC_AET = "ORTHANC"
DICOMWEB_ROOT = "/dicom-web/"
_BINARY_FALLBACK = Path("/usr/sbin/Orthanc")  # Debian's, and /usr/sbin is not on every user's PATH
_PLUGIN_DIRS = (Path("/usr/share/orthanc/plugins"), Path("/usr/lib/orthanc"))
_DICOMWEB_PLUGIN = "libOrthancDicomWeb.so"
_LOOPBACK_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost"}


class Modality(NamedTuple):
    """A DICOM peer Orthanc knows by name: the AE title it calls and answers as, where it listens."""

    ae_title: str
    host: str
    port: int


class OrthancError(RuntimeError):
    """Orthanc refused a request; the message carries Orthanc's own explanation."""


def orthanc_binary() -> str | None:
    """Path of the ``Orthanc`` executable, ``None`` when the package is not installed."""
    found = shutil.which("Orthanc")
    if found:
        return found
    return str(_BINARY_FALLBACK) if os.access(_BINARY_FALLBACK, os.X_OK) else None


def dicomweb_plugin() -> Path | None:
    """The DICOMweb plugin's shared library (``orthanc-dicomweb``), ``None`` when absent."""
    for folder in _PLUGIN_DIRS:
        candidates = sorted(folder.glob(f"{_DICOMWEB_PLUGIN}*")) if folder.is_dir() else []
        if candidates:
            return candidates[0]
    return None


def orthanc_missing() -> str | None:
    """Why the twin cannot run here (a sentence with the fix), ``None`` when it can."""
    if orthanc_binary() is None:
        return "Orthanc is not installed (apt-get install orthanc orthanc-dicomweb)"
    if dicomweb_plugin() is None:
        return "Orthanc's DICOMweb plugin is not installed (apt-get install orthanc-dicomweb)"
    return None


def is_loopback(host: str) -> bool:
    host = host.strip("[]").lower()
    if host in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _require_loopback(what: str, host: str) -> None:
    if not is_loopback(host):
        raise ValueError(
            f"{what}: {host!r} is not a loopback address; the PACS twin only talks to this machine"
        )


def modality_entry(modality: Modality | tuple[str, str, int]) -> dict[str, object]:
    """Orthanc's object form of a modality: it may C-ECHO and C-STORE into Orthanc, nothing more.

    Our SCU sends results back by C-STORE, and our probes ping; query/retrieve is not
    part of the round trip, so it is not granted.
    """
    ae_title, host, port = modality
    _require_loopback(f"modality {ae_title}", host)
    return {
        "AET": ae_title,
        "Host": host,
        "Port": int(port),
        "AllowEcho": True,
        "AllowStore": True,
        "AllowFind": False,
        "AllowFindWorklist": False,
        "AllowGet": False,
        "AllowMove": False,
    }


def dicomweb_server_entry(url: str, headers: dict[str, str] | None = None) -> dict[str, object]:
    """Orthanc's object form of a DICOMweb server (its STOW target), e.g. our gateway's ``/dicomweb``."""
    _require_loopback(f"DICOMweb server {url}", urlsplit(url).hostname or "")
    return {"Url": url, "HttpHeaders": dict(headers or {}), "HasDelete": False}


def orthanc_config(
    state_dir: Path,
    *,
    host: str,
    http_port: int,
    dicom_port: int,
    aet: str = ORTHANC_AET,
    username: str,
    password: str,
    modalities: dict[str, Modality | tuple[str, str, int]] | None = None,
    dicomweb_servers: dict[str, dict[str, object]] | None = None,
) -> dict[str, Any]:
    """Orthanc's configuration: storage under ``state_dir``, loopback only, one user, DICOMweb on.

    ``dicomweb_servers`` values are :func:`dicomweb_server_entry` objects. Everything that
    could reach off this machine (proxy, peers, Lua, WebDAV) is off, jobs are not kept
    across restarts and an instance is "stable" two seconds after its last arrival, so
    tests and the demo see studies settle quickly.
    """
    _require_loopback("Orthanc's host", host)
    plugin = dicomweb_plugin()
    servers = dicomweb_servers or {}
    for name, entry in servers.items():
        _require_loopback(f"DICOMweb server {name}", urlsplit(str(entry.get("Url", ""))).hostname or "")
    return {
        "Name": "CXR PACS twin",
        "StorageDirectory": str(state_dir / "storage"),
        "IndexDirectory": str(state_dir / "index"),
        "StorageCompression": False,
        "Plugins": [str(plugin)] if plugin else [],
        "ConcurrentJobs": 2,
        "JobsHistorySize": 50,
        "SaveJobs": False,
        "OverwriteInstances": False,
        "StableAge": 2,
        "HttpServerEnabled": True,
        "HttpPort": http_port,
        "HttpThreadsCount": 10,
        "HttpDescribeErrors": True,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": True,
        "RegisteredUsers": {username: password},
        "SslEnabled": False,
        "WebDavEnabled": False,
        "ExecuteLuaEnabled": False,
        "LuaScripts": [],
        "HttpProxy": "",
        "HttpTimeout": 30,
        "DicomServerEnabled": True,
        "DicomAet": aet,
        "DicomPort": dicom_port,
        "DicomCheckCalledAet": True,
        "DicomCheckModalityHost": True,
        # A ping is harmless and lets any probe (make status, a person's echoscu) ask;
        # storing, querying and retrieving are for registered modalities only.
        "DicomAlwaysAllowEcho": True,
        "DicomAlwaysAllowStore": False,
        "DicomAlwaysAllowFind": False,
        "DicomAlwaysAllowFindWorklist": False,
        "DicomAlwaysAllowGet": False,
        "DicomAlwaysAllowMove": False,
        "DicomTlsEnabled": False,
        "DicomScuTimeout": 10,
        "DicomModalities": {name: modality_entry(m) for name, m in (modalities or {}).items()},
        # kept in the configuration, changed at run time through the REST API (PUT/DELETE)
        "DicomModalitiesInDatabase": False,
        "OrthancPeers": {},
        "OrthancPeersInDatabase": False,
        "DicomWeb": {
            "Enable": True,
            "Root": DICOMWEB_ROOT,
            "EnableWado": False,
            "Ssl": False,
            "Servers": servers,
        },
    }


def orthanc_component(
    state_dir: Path,
    *,
    host: str,
    http_port: int,
    dicom_port: int,
    username: str,
    password: str,
    aet: str = ORTHANC_AET,
    modalities: dict[str, Modality | tuple[str, str, int]] | None = None,
    dicomweb_servers: dict[str, dict[str, object]] | None = None,
) -> Component | None:
    """Orthanc as a stack component, ``None`` (reason logged) when it is not installed here.

    The configuration holds the password in clear (Orthanc's ``RegisteredUsers``), so it
    is written mode 0600. ``/system`` needs a login like every Orthanc route once
    authentication is on, so the health probe sends Basic credentials.
    """
    missing = orthanc_missing()
    binary = orthanc_binary()
    if missing is not None or binary is None:
        log.info("component=orthanc skipped=true reason=%r", missing)
        return None
    state_dir.mkdir(parents=True, exist_ok=True)
    config = orthanc_config(
        state_dir,
        host=host,
        http_port=http_port,
        dicom_port=dicom_port,
        aet=aet,
        username=username,
        password=password,
        modalities=modalities,
        dicomweb_servers=dicomweb_servers,
    )
    config_file = state_dir / "orthanc.json"
    # a temp file created 0600 and renamed over the old one: the password never lands in a file
    # an earlier run (or a copy) left readable by others, and Orthanc never reads half a file
    write_private(config_file, json.dumps(config, indent=2))
    health = f"http://{host}:{http_port}/system"
    return Component(
        name="orthanc",
        command=[binary, str(config_file)],  # logs to stdout: the stack's or the fixture's log file
        health_url=health,
        ports=(http_port, dicom_port),
        probe=functools.partial(http_ok, health, auth=(username, password)),
    )


# ------------------------------------------------------------------------------ client


@dataclass(frozen=True)
class StoredInstance:
    """One instance Orthanc holds, with the tags the round-trip checks look at."""

    orthanc_id: str
    sop_class_uid: str
    sop_instance_uid: str
    series_instance_uid: str
    modality: str
    # every ReferencedSOPInstanceUID anywhere in the dataset (what an SR or a GSPS points at)
    referenced_sop_instance_uids: tuple[str, ...]
    tags: dict[str, Any]


def _referenced_uids(value: object) -> set[str]:
    found: set[str] = set()
    if isinstance(value, dict):
        for key, item in value.items():
            if key == "ReferencedSOPInstanceUID" and isinstance(item, str):
                found.add(item)
            else:
                found |= _referenced_uids(item)
    elif isinstance(value, list):
        for item in value:
            found |= _referenced_uids(item)
    return found


class OrthancClient:
    """Orthanc's REST API as the tests, ``make demo`` and the benchmark use it (HTTP Basic)."""

    def __init__(self, url: str, username: str, password: str, timeout: float = 60.0) -> None:
        # trust_env=False: no proxy from the environment stands between us and a loopback server
        # no keep-alive: Orthanc closes an idle connection after about a second, and a request
        # sent on it just then fails with "server disconnected" (seen in the round-trip tests)
        self._http = httpx.Client(
            base_url=url.rstrip("/"),
            auth=(username, password),
            timeout=timeout,
            trust_env=False,
            limits=httpx.Limits(max_keepalive_connections=0),
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> OrthancClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self._http.request(method, path, **kwargs)
        if response.status_code >= 400:
            try:
                body = response.json()
                detail = body.get("Details") or body.get("Message") or response.text
            except ValueError:
                detail = response.text
            raise OrthancError(f"Orthanc {method} {path}: HTTP {response.status_code}: {detail}")
        if not response.content:
            return None
        return response.json() if "json" in response.headers.get("content-type", "") else response.content

    # -- content
    def system(self) -> dict[str, Any]:
        return dict(self._call("GET", "/system"))

    def upload(self, dicom_bytes: bytes) -> str:
        """Store one DICOM file; its Orthanc instance id (the same id again when already stored)."""
        answer = self._call(
            "POST", "/instances", content=dicom_bytes, headers={"Content-Type": "application/dicom"}
        )
        if answer.get("Status") not in ("Success", "AlreadyStored"):
            raise OrthancError(f"Orthanc did not store the instance: {answer}")
        return str(answer["ID"])

    def instances(self) -> list[str]:
        return list(self._call("GET", "/instances"))

    def count_instances(self) -> int:
        """How many instances Orthanc holds (``/statistics``: one cheap call, no listing)."""
        return int(self._call("GET", "/statistics")["CountInstances"])

    def find(self, level: str, query: dict[str, str], expand: bool = False) -> list[Any]:
        """``/tools/find`` at ``level`` (Patient, Study, Series, Instance): ids, or objects if ``expand``."""
        return list(
            self._call("POST", "/tools/find", json={"Level": level, "Query": query, "Expand": expand})
        )

    def instance_tags(self, instance_id: str) -> dict[str, Any]:
        return dict(self._call("GET", f"/instances/{instance_id}/tags", params={"simplify": ""}))

    def study_instances(self, study_uid: str) -> list[StoredInstance]:
        """Every instance of the study, with its SOP class, UIDs, modality and references."""
        rows = []
        for instance_id in self.find("Instance", {"StudyInstanceUID": study_uid}):
            tags = self.instance_tags(instance_id)
            rows.append(
                StoredInstance(
                    orthanc_id=instance_id,
                    sop_class_uid=str(tags.get("SOPClassUID", "")),
                    sop_instance_uid=str(tags.get("SOPInstanceUID", "")),
                    series_instance_uid=str(tags.get("SeriesInstanceUID", "")),
                    modality=str(tags.get("Modality", "")),
                    referenced_sop_instance_uids=tuple(sorted(_referenced_uids(tags))),
                    tags=tags,
                )
            )
        return rows

    def delete_all(self) -> None:
        """Empty the archive (patients take their studies, series and instances with them)."""
        for patient in self._call("GET", "/patients"):
            self._call("DELETE", f"/patients/{patient}")

    # -- peers, configured at run time (the fixtures know addresses only once servers start)
    def put_modality(self, name: str, modality: Modality | tuple[str, str, int]) -> None:
        self._call("PUT", f"/modalities/{name}", json=modality_entry(modality))

    def delete_modality(self, name: str) -> None:
        self._call("DELETE", f"/modalities/{name}")

    def modalities(self) -> list[str]:
        return list(self._call("GET", "/modalities"))

    def put_dicomweb_server(self, name: str, url: str, headers: dict[str, str] | None = None) -> None:
        self._call("PUT", f"/dicom-web/servers/{name}", json=dicomweb_server_entry(url, headers))

    def delete_dicomweb_server(self, name: str) -> None:
        self._call("DELETE", f"/dicom-web/servers/{name}")

    def dicomweb_servers(self) -> list[str]:
        return list(self._call("GET", "/dicom-web/servers"))

    # -- sending
    def echo(self, modality: str) -> bool:
        """Orthanc C-ECHOes the modality: True when it answered."""
        try:
            self._call("POST", f"/modalities/{modality}/echo", json={})
        except OrthancError:
            return False
        return True

    def store_to_modality(self, modality: str, resources: list[str]) -> dict[str, Any]:
        """C-STORE the resources (ids of any level) to the modality; returns when it is done."""
        body = {"Resources": list(resources), "Synchronous": True}
        return dict(self._call("POST", f"/modalities/{modality}/store", json=body) or {})

    def stow_to_server(self, server: str, resources: list[str]) -> dict[str, Any]:
        """STOW-RS the resources to the DICOMweb server; returns when it is done."""
        body = {"Resources": list(resources), "Synchronous": True}
        return dict(self._call("POST", f"/dicom-web/servers/{server}/stow", json=body) or {})
