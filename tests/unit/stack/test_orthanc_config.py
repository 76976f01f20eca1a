"""Orthanc's configuration keeps the twin on loopback, and the stack wires both sides of the round trip."""

from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import urlsplit

import pytest

import stack.manager
from core.credentials import ORTHANC_USERNAME
from stack.config import StackSettings
from stack.credentials import load_or_create
from stack.manager import build_components, pacs_env
from stack.orthanc import dicomweb_server_entry, is_loopback, orthanc_config

pytestmark = pytest.mark.unit


def _config(tmp_path: Path) -> dict:
    return orthanc_config(
        tmp_path,
        host="127.0.0.1",
        http_port=8042,
        dicom_port=4242,
        username="cxr",
        password="pw",
        modalities={"cxr": ("CXR", "127.0.0.1", 11112)},
        dicomweb_servers={"cxr": dicomweb_server_entry("http://127.0.0.1:8080/dicomweb", {"A": "b"})},
    )


def test_orthanc_talks_only_to_loopback_peers_and_needs_a_login(tmp_path: Path) -> None:
    config = _config(tmp_path)
    assert config["RemoteAccessAllowed"] is False and config["AuthenticationEnabled"] is True
    assert config["RegisteredUsers"] == {"cxr": "pw"}
    assert config["HttpProxy"] == "" and config["OrthancPeers"] == {} and config["LuaScripts"] == []
    assert not config["DicomAlwaysAllowStore"] and config["DicomCheckModalityHost"]
    assert all(is_loopback(str(m["Host"])) for m in config["DicomModalities"].values())
    servers = config["DicomWeb"]["Servers"]
    assert all(is_loopback(urlsplit(s["Url"]).hostname or "") for s in servers.values())
    assert [Path(p).name.split(".so")[0] for p in config["Plugins"]] in ([], ["libOrthancDicomWeb"])
    assert config["DicomWeb"]["Root"] == "/dicom-web/" and servers["cxr"]["HttpHeaders"] == {"A": "b"}
    assert config["StorageDirectory"].startswith(str(tmp_path))


@pytest.mark.parametrize("host", ["192.0.2.1", "pacs.example.org", "0.0.0.0"])
def test_a_peer_off_loopback_is_refused(tmp_path: Path, host: str) -> None:
    with pytest.raises(ValueError, match="loopback"):
        dicomweb_server_entry(f"http://{host}:8080/dicomweb")
    with pytest.raises(ValueError, match="loopback"):
        orthanc_config(
            tmp_path,
            host="127.0.0.1",
            http_port=1,
            dicom_port=2,
            username="u",
            password="p",
            modalities={"far": ("FAR", host, 104)},
        )


def test_the_stack_points_orthanc_and_the_gateway_at_each_other(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(stack.manager, "orthanc_missing", lambda: None)
    settings = StackSettings(stack_dir=tmp_path, triton_venv=tmp_path / "no-triton")
    creds = load_or_create(settings.credentials_file, settings.api_keys_file)
    env = pacs_env(settings, creds)
    (destination,) = json.loads(env["CXR_PACS_DESTINATIONS"])
    assert destination["url"] == env["CXR_PACS_DICOMWEB_URL"] == "http://127.0.0.1:8042/dicom-web"
    assert destination["callers"] == ["*"] and destination["kind"] == "stow"
    assert json.loads(env["CXR_PACS_DICOMWEB_HEADERS"]) == destination["headers"]
    assert creds.orthanc_password and json.loads(settings.credentials_file.read_text())["orthanc"] == {
        "username": ORTHANC_USERNAME,
        "password": creds.orthanc_password,
    }
    assert env["CXR_DIMSE_PORT"] == "11112" and env["CXR_DIMSE_GATEWAY_URL"] == "http://127.0.0.1:8080"


def test_without_orthanc_the_stack_sets_no_pacs_variables(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(stack.manager, "orthanc_missing", lambda: "Orthanc is not installed")
    settings = StackSettings(stack_dir=tmp_path)
    creds = load_or_create(settings.credentials_file, settings.api_keys_file)
    assert not any(key.startswith("CXR_PACS_") for key in pacs_env(settings, creds))
    assert stack.manager.orthanc_skipped(settings) == "Orthanc is not installed"
    off = StackSettings(stack_dir=tmp_path, orthanc=False)
    assert "CXR_ORTHANC=false" in (stack.manager.orthanc_skipped(off) or "")


def test_build_components_with_defaults_includes_the_scp_probed_by_c_echo(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Default settings build every component; the SCP's health is a C-ECHO, Orthanc's a logged-in GET."""
    monkeypatch.setattr(stack.manager, "orthanc_missing", lambda: None)
    monkeypatch.setattr(stack.manager, "triton_component", _fake_triton)
    settings = StackSettings(stack_dir=tmp_path)
    creds = load_or_create(settings.credentials_file, settings.api_keys_file)
    components = {c.name: c for c in build_components(settings, creds)}
    dimse = components["dimse"]
    assert dimse.command[-2:] == ["-m", "serving.dimse"] and dimse.ports == (11112,)
    assert dimse.health_url == "dicom://CXR@127.0.0.1:11112" and dimse.probe is not None
    assert dimse.env["CXR_DIMSE_PORT"] == "11112"
    if "orthanc" in components:  # orthanc_component itself still needs the binary
        assert components["orthanc"].ports == (8042, 4242) and components["orthanc"].probe is not None
        config = tmp_path.resolve() / "orthanc" / "orthanc.json"
        assert config.stat().st_mode & 0o777 == 0o600


def _fake_triton(
    state: Path, stage: str, host: str, port: int, venv: Path, python: Path | None = None
) -> object:
    from stack.components import Component

    return Component(f"triton-{stage}", ["true"], f"http://{host}:{port}/v2/health/live", ports=(port,))
