"""Secrets stay out of argv, error messages and files others can read.

Each test names one place a secret leaked before (the MLflow Deployment's command line, a refused
setting's error text, supervisord's refusal of an environment value, Orthanc's configuration
written in place) and checks the leak's general form, so a new manifest or setting of the same
kind is caught too.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

import stack.orthanc
from stack.components import Component
from stack.supervisor import render_config

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[3]
K8S = ROOT / "k8s"
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|API_KEY|ACCESS_KEY|PRIVATE_KEY|CREDENTIAL", re.IGNORECASE)
NOT_A_VALUE = ("_FILE", "_DIR", "_PATH")  # where a secret is mounted, not the secret


def _documents() -> Iterator[tuple[Path, Any]]:
    for path in sorted(K8S.rglob("*.yaml")):
        try:
            docs = list(yaml.safe_load_all(path.read_text()))
        except yaml.YAMLError:  # a template for another tool: not a manifest
            continue
        for doc in docs:
            if doc is not None:
                yield path, doc


def _containers(node: Any) -> Iterator[dict[str, Any]]:
    """Every container spec at any depth (Pods, Jobs, CronJobs, Argo templates, RayJobs ...)."""
    if isinstance(node, dict):
        if "image" in node and ("command" in node or "args" in node or "env" in node):
            yield node
        for value in node.values():
            yield from _containers(value)
    elif isinstance(node, list):
        for item in node:
            yield from _containers(item)


def _secret_env_names(container: dict[str, Any]) -> set[str]:
    names = set()
    for var in container.get("env") or []:
        value_from = var.get("valueFrom") or {}
        if "secretKeyRef" in value_from:
            names.add(var["name"])
    return names


def test_k8s_manifests_put_no_secret_on_a_command_line() -> None:
    """Kubernetes expands ``$(VAR)`` in command/args into the process's argv: a secret there is in
    /proc/PID/cmdline, which every user of the node can read (``ps``). MLflow's backend store URI
    carried ``$(PGPASSWORD)``; libpq takes it from the environment instead."""
    leaks = []
    containers = 0
    for path, doc in _documents():
        for container in _containers(doc):
            containers += 1
            secret_vars = _secret_env_names(container)
            words = [str(w) for w in (container.get("command") or []) + (container.get("args") or [])]
            for word in words:
                for ref in re.findall(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", word):
                    if ref in secret_vars or SECRET_NAME.search(ref):
                        leaks.append(f"{path.relative_to(ROOT)}: {container.get('name')}: $({ref}) in argv")
    assert containers > 10  # the walk found the manifests' containers
    assert not leaks, "\n".join(leaks)


def test_k8s_manifests_hold_no_literal_secret_value() -> None:
    """A variable named like a secret comes from a Secret (valueFrom), never a literal in git."""
    literals = []
    for path, doc in _documents():
        for container in _containers(doc):
            for var in container.get("env") or []:
                name = str(var.get("name", ""))
                if SECRET_NAME.search(name) and not name.endswith(NOT_A_VALUE) and var.get("value"):
                    literals.append(f"{path.relative_to(ROOT)}: {container.get('name')}: {var['name']}")
        if isinstance(doc, dict) and doc.get("kind") == "ConfigMap":
            for key in doc.get("data") or {}:
                if SECRET_NAME.search(key):
                    literals.append(f"{path.relative_to(ROOT)}: ConfigMap key {key}")
        if isinstance(doc, dict) and doc.get("kind") == "Kustomization":
            for generator in doc.get("configMapGenerator") or []:
                for literal in generator.get("literals") or []:
                    if SECRET_NAME.search(str(literal).split("=", 1)[0]):
                        literals.append(f"{path.relative_to(ROOT)}: configMapGenerator literal {literal}")
    assert not literals, "\n".join(literals)


def test_a_refused_setting_never_quotes_its_secret_value(monkeypatch: pytest.MonkeyPatch) -> None:
    """pydantic echoes ``input_value`` in a ValidationError: a CXR_WORKLIST_URL with the wrong scheme
    printed its password, a wrong CXR_PACS_DESTINATIONS entry part of its Authorization header, on
    the console and in the gateway's log. Every package's settings inherit the switch that hides it."""
    from serving.config import ServingSettings

    monkeypatch.setenv("CXR_WORKLIST_URL", "mysql://cxr:worklist-pw-0123456789@db:5432/worklist")
    monkeypatch.setenv(
        "CXR_PACS_DESTINATIONS",
        '[{"name":"p","kind":"stow","url":"ftp://pacs","callers":["*"],'
        '"headers":{"Authorization":"Basic pacs-pw-0123456789"}}]',
    )
    with pytest.raises(ValidationError) as caught:
        ServingSettings()
    text = str(caught.value)
    assert "worklist_url" in text and "pacs_destinations" in text  # both refused, by name
    for fragment in ("worklist-pw", "0123456789", "pacs-pw", "cxr:"):
        assert fragment not in text


def test_every_packages_settings_hide_refused_values() -> None:
    from core.settings import CoreSettings
    from data_pipeline.config import DataSettings
    from serving.config import ServingSettings
    from stack.config import StackSettings
    from training.config import TrainSettings
    from workflows.config import WorkflowSettings

    for cls in (CoreSettings, DataSettings, ServingSettings, StackSettings, TrainSettings, WorkflowSettings):
        assert cls.model_config.get("hide_input_in_errors") is True, cls.__name__


def test_supervisord_refuses_an_unquotable_value_by_name_not_by_value(tmp_path: Path) -> None:
    """The refusal reached ``cxr stack up``'s console with the value's first 40 characters: an S3
    secret or PACS header someone set with both kinds of quotes was printed in clear."""
    secret = "'s3-secret-\"0123456789abcdef\"-end'"
    comp = Component("mlflow", ["/bin/true"], None, env={"AWS_SECRET_ACCESS_KEY": secret})
    with pytest.raises(ValueError, match="cannot carry") as caught:
        render_config(tmp_path, [comp])
    assert "AWS_SECRET_ACCESS_KEY" in str(caught.value)
    assert "s3-secret" not in str(caught.value) and "0123456789" not in str(caught.value)


def test_no_stack_component_carries_a_secret_on_its_command_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every secret the stack generates reaches its servers by environment or a 0600 file, never by
    argv (``ps`` shows it to every user), and the supervisord config holding that environment is 0600."""
    import stack.manager
    from core.credentials import StackCredentials
    from stack.config import StackSettings
    from stack.supervisor import Supervisor

    def fake_triton(state: Path, stage: str, host: str, port: int, venv: Path, **_: object) -> Component:
        return Component(f"triton-{stage}", ["/bin/true", f"--http-port={port}"], None)

    monkeypatch.setattr(stack.manager, "triton_component", fake_triton)
    monkeypatch.setattr(stack.manager, "orthanc_missing", lambda: None)
    monkeypatch.setattr(stack.orthanc, "orthanc_missing", lambda: None)
    monkeypatch.setattr(stack.orthanc, "orthanc_binary", lambda: "/usr/sbin/Orthanc")
    monkeypatch.setattr(stack.manager, "prometheus_component", lambda *a, **k: None)
    monkeypatch.setenv("CXR_STACK_DIR", str(tmp_path / "stack"))
    settings = StackSettings()
    creds = StackCredentials(
        s3_access_key="cxr-access-key-1234",
        s3_secret_key="s3-secret-key-5678",
        api_keys={role: f"api-key-{role}-9012" for role in ("pacs", "radiologist", "operator", "admin")},
        deid_secret="deid-secret-3456",
        orthanc_password="orthanc-pw-7890",
    )
    components = stack.manager.build_components(settings, creds)
    secrets = [creds.s3_access_key, creds.s3_secret_key, creds.deid_secret, creds.orthanc_password]
    secrets += list(creds.api_keys.values())
    assert {c.name for c in components} >= {"s3", "mlflow", "orthanc", "gateway"}
    for comp in components:
        argv = " ".join(comp.command)
        assert not [s for s in secrets if s in argv], comp.name
    supervisor = Supervisor(settings.state)
    supervisor.write_config(components)
    assert supervisor.config.stat().st_mode & 0o777 == 0o600


def test_orthanc_config_replaces_the_old_file_instead_of_writing_into_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The config holds Orthanc's password. It was truncated and rewritten in place, then chmod'ed:
    a file an earlier run or a restore left 0644 held the new password, readable by everyone, until
    the chmod, and a crash mid-write left Orthanc half a file. Now a 0600 temp file is renamed over
    it: the old inode (here seen through a second link) never receives the password."""
    monkeypatch.setattr(stack.orthanc, "orthanc_missing", lambda: None)
    monkeypatch.setattr(stack.orthanc, "orthanc_binary", lambda: "/usr/sbin/Orthanc")
    state = tmp_path / "orthanc"
    state.mkdir()
    config = state / "orthanc.json"
    config.write_text("{}")
    config.chmod(0o644)
    old_inode = tmp_path / "old-inode"
    os.link(config, old_inode)
    comp = stack.orthanc.orthanc_component(
        state, host="127.0.0.1", http_port=18042, dicom_port=14242, username="cxr", password="orthanc-pw-1234"
    )
    assert comp is not None
    assert "orthanc-pw-1234" in config.read_text()
    assert config.stat().st_mode & 0o777 == 0o600
    assert "orthanc-pw-1234" not in old_inode.read_text()
    assert not [p.name for p in state.iterdir() if p.name.startswith(".tmp-")]


def test_what_the_stacks_components_write_is_the_owners_alone(tmp_path: Path) -> None:
    """The state holds identified radiographs (the result journal, the DIMSE spool, the outbox,
    Orthanc's storage). Before, components wrote with the login shell's umask (0644 files) in a
    0755 state folder: any local user could read the sources. A real supervisord starts one
    component that writes a file."""
    import stat
    import time

    from stack.supervisor import Supervisor

    state = tmp_path / "state"
    state.mkdir(mode=0o755)
    written = state / "written-by-a-component"
    supervisor = Supervisor(state)
    old_umask = os.umask(0o022)  # a login shell's usual one, passed to supervisord
    try:
        supervisor.write_config(
            [Component("writer", ["/bin/sh", "-c", f"echo x > {written}; exec sleep 30"], None)]
        )
        supervisor.start()
        deadline = time.monotonic() + 10
        while not written.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert stat.S_IMODE(written.stat().st_mode) == 0o600
        log = next((state / "logs").glob("writer*"))
        assert stat.S_IMODE(log.stat().st_mode) & 0o077 == 0
    finally:
        os.umask(old_umask)
        supervisor.shutdown(timeout=10)


def test_stack_up_makes_the_state_folder_the_owners_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Also a state folder an earlier version created 0755: ``up`` stops at its first step here."""
    import stat

    from stack import manager
    from stack.config import StackSettings

    state = tmp_path / "state"
    state.mkdir(mode=0o755)

    class Stop(Exception):
        pass

    def stop(*_args: Any, **_kwargs: Any) -> None:
        raise Stop

    monkeypatch.setattr(manager, "apply_offline_env", stop)
    with pytest.raises(Stop):
        manager.up(StackSettings(stack_dir=state))
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
