"""What k8s/, k8s/workflows and docker-compose.yaml run fits the code inside the project image.

Each container of the project image is read the way it will start: the Dockerfile's ENTRYPOINT,
ENV, WORKDIR and user, then the manifest's command, args, envFrom and env over them. The checks
hold it against the code: every ``CXR_*`` variable is a settings field (or a CLI option's
envvar) with a valid value, every command parses with the Typer app it names, servers listen
where their Services and probes look, the folders the code writes at start-up are writable, and
each client's MLflow Host header is one the server admits.
"""

from __future__ import annotations

import math
import os
import re
import shlex
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any
from unittest import mock
from urllib.parse import urlsplit

import pytest
import typer
import yaml
from mlflow.server.security_utils import is_allowed_host_header
from pydantic_settings import BaseSettings
from typer.exceptions import TyperException

from cxr.cli import app as cxr_app
from data_pipeline.config import DataSettings
from delivery.cli import app as delivery_app
from delivery.cluster_fit.tree import Tree, load_tree, parse_manifest
from serving.config import ServingSettings
from serving.dimse.scp import ScpConfig, StorageScp
from serving.dimse.spool import InstanceSpool
from stack.config import StackSettings
from tests.fixtures.servers import free_port
from training.config import TrainSettings
from workflows.config import WorkflowSettings

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[3]
PROJECT_IMAGE = "ghcr.io/cxr-detect/cxr-detect:"
SETTINGS: tuple[type[BaseSettings], ...] = (
    ServingSettings,
    DataSettings,
    TrainSettings,
    WorkflowSettings,
    StackSettings,
)
LOOPBACK = {"127.0.0.1", "localhost", "::1"}


@dataclass(frozen=True)
class Image:
    """What the Dockerfile's runtime stage gives every container of the project image."""

    entrypoint: list[str]
    env: dict[str, str]
    workdir: str
    home: str  # the passwd home of the image's user, HOME when nothing sets it


@dataclass
class Box:
    """One project-image container as a deployment starts it."""

    where: str
    argv: list[str]
    env: dict[str, str | None]  # None: from a Secret or the downward API (a value only at run time)
    read_only: bool
    writable: list[str]  # mount paths of writable volumes (emptyDir, PVC, tmpfs, named volume)
    ports: dict[str, int] = field(default_factory=dict)
    probe_ports: set[str | int] = field(default_factory=set)  # httpGet and tcpSocket probes
    durable: list[str] = field(default_factory=list)  # mount paths of volume claims (outlive the pod)
    labels: dict[str, str] = field(default_factory=dict)  # the pod's

    def runs_project_code(self) -> bool:
        return self.argv[:1] == ["cxr"] or self.argv[:2] == ["python", "-m"]


def read_image() -> Image:
    text = (REPO / "Dockerfile").read_text().replace("\\\n", " ")
    runtime = text.split(" AS runtime", 1)[1]
    env: dict[str, str] = {}
    for line in re.findall(r"^ENV (.+)$", runtime, flags=re.M):
        env.update(dict(part.split("=", 1) for part in shlex.split(line)))
    entrypoint = yaml.safe_load(re.findall(r"^ENTRYPOINT (.+)$", runtime, flags=re.M)[-1])
    workdir = re.findall(r"^WORKDIR (\S+)$", runtime, flags=re.M)[-1]
    user = re.search(r"useradd [^&\n]*--create-home[^&\n]*?\s(\w+)\s*$", runtime, flags=re.M)
    assert user, "the runtime stage creates its user with a home"
    return Image(entrypoint, env, workdir, f"/home/{user.group(1)}")


def _k8s_boxes(tree: Tree, image: Image) -> Iterator[Box]:
    config_maps = {o.name: o.doc.get("data", {}) for o in tree.of_kind("ConfigMap")}
    secrets = {
        str(o.doc["spec"]["target"]["name"]): [d["secretKey"] for d in o.doc["spec"].get("data", [])]
        for o in tree.of_kind("ExternalSecret")
    }
    # a StatefulSet's claims are volumes of its pods, by the claim template's name
    claims = {
        o.ref(): {t["metadata"]["name"] for t in o.doc["spec"].get("volumeClaimTemplates", [])}
        for o in tree.of_kind("StatefulSet")
    }
    for pod in tree.pods:
        volumes = {v["name"]: v for v in pod.spec.get("volumes", [])}
        volumes.update({name: {"persistentVolumeClaim": {}} for name in claims.get(pod.owner, ())})
        for c in pod.containers():
            if not str(c.get("image", "")).startswith(PROJECT_IMAGE):
                continue
            env: dict[str, str | None] = dict(image.env)
            for src in c.get("envFrom", []):
                if "configMapRef" in src:
                    env.update(config_maps.get(src["configMapRef"]["name"], {}))
                if "secretRef" in src:
                    env.update(dict.fromkeys(secrets.get(src["secretRef"]["name"], [])))
            for e in c.get("env", []):
                env[e["name"]] = e.get("value") if "valueFrom" not in e else None
            argv = [*c["command"], *c.get("args", [])] if "command" in c else [*image.entrypoint]
            if "command" not in c:
                argv += c.get("args", [])
            if " RayJob " in pod.owner and "command" not in c:
                argv = ["ray", "start"]  # KubeRay gives the Ray pods their command
            writable = [
                m["mountPath"]
                for m in c.get("volumeMounts", [])
                if not m.get("readOnly")
                and any(k in volumes.get(m["name"], {}) for k in ("emptyDir", "persistentVolumeClaim"))
            ]
            durable = [
                m["mountPath"]
                for m in c.get("volumeMounts", [])
                if not m.get("readOnly") and "persistentVolumeClaim" in volumes.get(m["name"], {})
            ]
            probes = [
                c.get(p, {}).get(how, {})
                for p in ("startupProbe", "livenessProbe", "readinessProbe")
                for how in ("httpGet", "tcpSocket")
            ]
            yield Box(
                f"{pod.owner} container {c.get('name', '?')}",
                [str(a) for a in argv],
                env,
                bool((c.get("securityContext") or {}).get("readOnlyRootFilesystem")),
                writable,
                {p.get("name", str(p["containerPort"])): int(p["containerPort"]) for p in c.get("ports", [])},
                {p["port"] for p in probes if p},
                durable,
                dict(pod.labels),
            )


def _compose_boxes(image: Image) -> Iterator[Box]:
    compose = yaml.safe_load((REPO / "docker-compose.yaml").read_text())
    for name, service in compose["services"].items():
        if not str(service.get("image", "")).startswith(PROJECT_IMAGE):
            continue
        argv = [*(service.get("entrypoint") or image.entrypoint), *service.get("command", [])]
        env: dict[str, str | None] = {
            **image.env,
            **{k: str(v) for k, v in service.get("environment", {}).items()},
        }
        writable = [*service.get("tmpfs", [])]
        writable += [v.split(":")[1] for v in service.get("volumes", []) if not v.endswith(":ro")]
        yield Box(f"docker-compose.yaml service {name}", argv, env, bool(service.get("read_only")), writable)


@pytest.fixture(scope="module")
def image() -> Image:
    return read_image()


@pytest.fixture(scope="module")
def tree() -> Tree:
    return load_tree(REPO)


@pytest.fixture(scope="module")
def boxes(tree: Tree, image: Image) -> list[Box]:
    found = [*_k8s_boxes(tree, image), *_compose_boxes(image)]
    assert len(found) >= 20, [b.where for b in found]
    return found


#: ``python -m`` modules whose main() parses no arguments: each reads only its settings, so an
#: argument given to it would be silently ignored (it looks configured and is not)
SETTINGS_ONLY_MODULES: dict[str, type[BaseSettings]] = {"serving.dimse": ServingSettings}


def _settings_only(module: str) -> Any:
    """A module of SETTINGS_ONLY_MODULES as the Click command it amounts to: one taking no arguments."""
    app = typer.Typer(add_completion=False)

    @app.command(name=module)
    def main() -> None:  # pragma: no cover - parsed, never run
        """Reads its CXR_* settings only."""

    return typer.main.get_command(app)


def _command(argv: list[str]) -> tuple[Any, list[str]] | None:
    """The Click command an argv runs, with the arguments left for it; None for a foreign program."""
    if argv[:1] == ["cxr"]:
        group, rest = typer.main.get_command(cxr_app), argv[1:]
    elif argv[:3] == ["python", "-m", "delivery"]:
        group, rest = typer.main.get_command(delivery_app), argv[3:]
    elif argv[:2] == ["python", "-m"] and argv[2] in SETTINGS_ONLY_MODULES:
        group, rest = _settings_only(argv[2]), argv[3:]
    elif argv[:2] == ["python", "-m"]:
        pytest.fail(f"no Typer app known for `python -m {argv[2]}`: add it to _command")
    else:
        return None
    cmd: Any = group  # Typer's own Click: a group has .commands
    while hasattr(cmd, "commands"):
        sub = cmd.commands.get(rest[0]) if rest else None
        assert sub is not None, f"`{' '.join(argv)}`: no command {rest[:1]} under {cmd.name}"
        cmd, rest = sub, rest[1:]
    return cmd, rest


def _parse(argv: list[str], env: dict[str, str | None]) -> dict[str, Any] | None:
    found = _command(argv)
    if found is None:
        return None
    cmd, rest = found
    # what kubelet and Argo substitute before the process starts
    rest = [re.sub(r"\$\((\w+)\)", lambda m: str(env.get(m.group(1)) or "staging"), a) for a in rest]
    rest = [re.sub(r"\{\{[^}]*\}\}", "1", a) for a in rest]
    return cmd.make_context(cmd.name, rest).params


def _cli_envvars() -> set[str]:
    names: set[str] = set()

    def walk(cmd: Any) -> None:
        for param in cmd.params:
            envvar = getattr(param, "envvar", None)
            names.update([envvar] if isinstance(envvar, str) else envvar or [])
        if hasattr(cmd, "commands"):
            for sub in cmd.commands.values():
                walk(sub)

    walk(typer.main.get_command(cxr_app))
    return names


def _setting_names() -> set[str]:
    return {f"CXR_{name.upper()}" for cls in SETTINGS for name in cls.model_fields}


def _cxr_env(box: Box) -> dict[str, str]:
    """The box's CXR_* values as settings would read them (run-time values as a stand-in)."""
    out = {}
    for key, value in box.env.items():
        if key.startswith("CXR_"):
            out[key] = "run-time-value" if value is None else re.sub(r"\{\{[^}]*\}\}", "1", value)
    return out


def test_every_cxr_variable_a_deployment_sets_is_read_by_the_code(boxes: list[Box]) -> None:
    """A name no settings class (or CLI option) reads is silently ignored: a typo looks configured."""
    known = _setting_names() | _cli_envvars()
    problems = []
    for box in boxes:
        for key in _cxr_env(box):
            substituted = any(f"$({key})" in a for a in box.argv)  # kubelet expands it in the command
            if key not in known and not substituted:
                problems.append(f"{box.where}: {key} is read by no settings class or CLI option")
    assert not problems, "\n".join(problems)


def test_every_cxr_value_a_deployment_sets_is_valid_for_every_settings_class(boxes: list[Box]) -> None:
    problems = []
    for box in boxes:
        env = _cxr_env(box)
        clean = {k: v for k, v in os.environ.items() if not k.startswith("CXR_")}
        with mock.patch.dict(os.environ, {**clean, **env}, clear=True):
            for cls in SETTINGS:
                try:
                    cls()
                except ValueError as exc:
                    problems.append(f"{box.where}: {cls.__name__}: {exc}")
    assert not problems, "\n".join(problems)


def test_every_project_command_parses_with_the_typer_app_it_names(boxes: list[Box]) -> None:
    parsed = 0
    for box in boxes:
        if box.runs_project_code():
            try:
                _parse(box.argv, box.env)
            except TyperException as exc:
                pytest.fail(f"{box.where}: `{' '.join(box.argv)}`: {exc.format_message()}")
            parsed += 1
    assert parsed >= 15


def test_the_gateway_listens_where_its_service_and_probes_look_not_on_loopback(boxes: list[Box]) -> None:
    """``cxr serve`` binds 127.0.0.1 unless told otherwise; probes and the Service reach the pod IP."""
    gateways = [b for b in boxes if b.argv[:2] == ["cxr", "serve"]]
    assert {b.where.split()[0] for b in gateways} >= {
        "Deployment/cxr-gateway-production",
        "docker-compose.yaml",
    }
    for box in gateways:
        params = _parse(box.argv, box.env)
        assert params is not None
        assert params["host"] not in LOOPBACK, f"{box.where}: `{' '.join(box.argv)}` binds {params['host']}"
        if box.ports:  # a pod: its named port, and every probe through it, is where uvicorn listens
            assert box.ports.get("http") == params["port"], (box.where, box.ports, params["port"])
            assert box.probe_ports <= {"http", params["port"]}, (box.where, box.probe_ports)


def _under(path: str, mounts: list[str]) -> bool:
    p = PurePosixPath(path)
    return any(p == PurePosixPath(m) or PurePosixPath(m) in p.parents for m in mounts)


def test_what_the_code_writes_at_start_lies_on_a_writable_volume_under_a_read_only_root(
    boxes: list[Box], image: Image
) -> None:
    """Every ``cxr`` command prepares CXR_STACK_DIR, YOLO_CONFIG_DIR and a marker in HOME first
    (core/offline.py): on a read-only root each must be on a mounted volume or the pod crashes."""
    problems = []
    checked = 0
    for box in boxes:
        if not (box.read_only and box.runs_project_code()):
            continue
        checked += 1
        stack_dir = str(box.env.get("CXR_STACK_DIR") or ".stack")
        wanted = {
            "CXR_STACK_DIR": str(PurePosixPath(image.workdir) / stack_dir),
            "HOME": str(box.env.get("HOME") or image.home),
            "YOLO_CONFIG_DIR": str(box.env.get("YOLO_CONFIG_DIR") or PurePosixPath(stack_dir) / "yolo"),
        }
        problems += [
            f"{box.where}: {name}={path} is on the read-only root (writable: {box.writable})"
            for name, path in wanted.items()
            if not _under(path, box.writable)
        ]
    assert checked >= 10
    assert not problems, "\n".join(problems)


def test_a_container_given_the_object_store_address_is_given_its_keys(boxes: list[Box]) -> None:
    """Without CXR_S3_ACCESS_KEY/_SECRET_KEY the store client falls back to the stack's
    credentials.json, which no pod has: every read (a golden set, a dataset) is refused."""
    problems = [
        f"{box.where}: CXR_S3_ENDPOINT without {key}"
        for box in boxes
        if "CXR_S3_ENDPOINT" in box.env and box.runs_project_code()
        for key in ("CXR_S3_ACCESS_KEY", "CXR_S3_SECRET_KEY")
        if key not in box.env
    ]
    assert not problems, "\n".join(problems)


def _mlflow_allowed_hosts(argv: list[str]) -> list[str]:
    for i, arg in enumerate(argv):
        if arg.startswith("--allowed-hosts"):
            value = arg.split("=", 1)[1] if "=" in arg else argv[i + 1]
            return [h.strip() for h in value.split(",")]
    return []


def _host_header(url: str) -> str:
    """The Host header an HTTP client sends for ``url`` (the port unless it is the scheme's default)."""
    parts = urlsplit(url)
    default = {"http": 80, "https": 443}[parts.scheme]
    host = str(parts.hostname)
    return host if parts.port in (None, default) else f"{host}:{parts.port}"


@pytest.mark.parametrize("deployment", ["k8s", "docker-compose.yaml"])
def test_mlflow_admits_the_host_header_of_every_client(
    boxes: list[Box], tree: Tree, image: Image, deployment: str
) -> None:
    """MLflow answers 403 to a Host header --allowed-hosts does not list; a header carries the port."""
    mine = [b for b in boxes if b.where.startswith("docker-compose.yaml") == (deployment != "k8s")]
    servers = [b for b in mine if b.argv[:2] == ["mlflow", "server"]]
    assert len(servers) == 1, [b.where for b in servers]
    allowed = _mlflow_allowed_hosts(servers[0].argv)
    assert allowed, f"{servers[0].where}: no --allowed-hosts (MLflow then admits only localhost)"
    urls = {str(b.env["CXR_MLFLOW_URI"]) for b in mine if b.env.get("CXR_MLFLOW_URI")}
    if deployment == "k8s":
        urls.add(WorkflowSettings().cluster_mlflow_uri)
        for obj in tree.of_kind("WorkflowTemplate"):  # the RayJob's pods
            for template in obj.doc["spec"]["templates"]:
                if "resource" in template:
                    text = yaml.safe_dump(parse_manifest(template["resource"]["manifest"]))
                    urls.update(re.findall(r"value: (http://mlflow[^\s'\"]*)", text))
    assert len(urls) >= 1
    refused = [
        f"{url} (Host: {_host_header(url)})"
        for url in sorted(urls)
        if not is_allowed_host_header(allowed, _host_header(url))
    ]
    assert not refused, f"{servers[0].where} --allowed-hosts={','.join(allowed)} refuses {refused}"


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def test_the_series_the_alerts_read_from_the_mlflow_exporter_are_scraped_in_the_cluster(tree: Tree) -> None:
    """CxrProductionModelStale and the training alerts read cxr_registry_* / cxr_training_*, which only
    `cxr observability mlflow-exporter` exports: the local stack ran it, the cluster did not."""
    rules = (REPO / "k8s/monitoring/rules/cxr-alerts.yaml").read_text()
    assert re.search(r"\bcxr_(registry|training)_\w+", rules), "the rules read the exporter's series"
    services = tree.of_kind("Service")
    scraped: list[list[str]] = []
    for monitor in tree.of_kind("ServiceMonitor"):
        selector = monitor.doc["spec"]["selector"].get("matchLabels", {})
        ports = {e["port"] for e in monitor.doc["spec"]["endpoints"]}
        for service in services:
            if not _selects(selector, service.doc["metadata"].get("labels", {})):
                continue
            if not ports & {p.get("name") for p in service.doc["spec"]["ports"]}:
                continue
            for pod in tree.pods:
                if _selects(service.doc["spec"].get("selector", {}), pod.labels):
                    scraped += [[*c.get("command", []), *c.get("args", [])] for c in pod.containers()]
    assert any("mlflow-exporter" in argv for argv in scraped), (
        "no ServiceMonitor scrapes a pod running `cxr observability mlflow-exporter`"
    )


# ------------------------------------------------------------------- the DIMSE storage SCP


def _settings_of(box: Box, cls: type[BaseSettings] = ServingSettings) -> Any:
    """The settings the box's process reads (Secret values as a stand-in string)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("CXR_")}
    with mock.patch.dict(os.environ, {**clean, **_cxr_env(box)}, clear=True):
        return cls()


def _dimse_scps(boxes: list[Box]) -> list[Box]:
    scps = [
        b for b in boxes if b.argv == ["python", "-m", "serving.dimse"] and not b.where.startswith("docker")
    ]
    assert [b.where.split()[0] for b in scps] == ["StatefulSet/cxr-dimse-production"], (
        "the cluster runs one DIMSE storage SCP, beside the production gateway"
    )
    return scps


def _services_selecting(tree: Tree, labels: dict[str, str]) -> list[dict[str, Any]]:
    return [
        o.doc
        for o in tree.of_kind("Service")
        if o.namespace == "cxr" and _selects(o.doc["spec"].get("selector") or {}, labels)
    ]


def test_a_settings_only_module_is_refused_an_argument_it_would_ignore() -> None:
    """`python -m serving.dimse` reads no argv: `--port 104` would look configured and change nothing."""
    assert _parse(["python", "-m", "serving.dimse"], {}) == {}
    with pytest.raises(TyperException):
        _parse(["python", "-m", "serving.dimse", "--port", "104"], {})


def test_the_dimse_scp_listens_on_the_pod_address_where_its_service_and_probes_look(
    boxes: list[Box], tree: Tree
) -> None:
    """The SCP binds 127.0.0.1 unless told otherwise; the Service and kubelet's probes reach the pod IP,
    and the hospital network reaches it through a node port that keeps the PACS's address."""
    for box in _dimse_scps(boxes):
        settings = _settings_of(box)
        assert settings.dimse_host not in LOOPBACK, f"{box.where}: CXR_DIMSE_HOST={settings.dimse_host}"
        assert box.ports.get("dicom") == settings.dimse_port, (box.where, box.ports, settings.dimse_port)
        assert box.probe_ports and box.probe_ports <= {"dicom", settings.dimse_port}, box.probe_ports
        services = _services_selecting(tree, box.labels)
        assert services, f"{box.where}: no Service selects the SCP"
        for service in services:
            for port in service["spec"]["ports"]:
                assert port["targetPort"] in ("dicom", settings.dimse_port), (service["metadata"], port)
        outside = [s for s in services if s["spec"].get("type") in ("NodePort", "LoadBalancer")]
        assert outside, "no Service takes the SCP's port out of the cluster to the hospital's PACS"
        # Cluster would masquerade the caller to a node address: the NetworkPolicy's PACS block
        # could then not tell the PACS from anything else
        assert all(s["spec"].get("externalTrafficPolicy") == "Local" for s in outside)


def test_the_dimse_spool_is_on_a_volume_claim_because_success_means_it_cannot_be_lost(
    boxes: list[Box],
) -> None:
    """C-STORE Success is answered once the instance is fsync'd in the spool: on an emptyDir it would
    go with the pod, after the PACS was told it was stored."""
    for box in _dimse_scps(boxes):
        spool = str(_settings_of(box).resolved_dimse_spool_dir)
        assert _under(spool, box.durable), (
            f"{box.where}: spool {spool} is not on a volume claim {box.durable}"
        )


def test_the_dimse_scp_hands_images_to_a_service_port_that_reaches_the_gateway(
    boxes: list[Box], tree: Tree
) -> None:
    """CXR_DIMSE_GATEWAY_URL names a Service of namespace cxr whose port leads to where `cxr serve`
    listens in the pods it selects (the gateway replicas share worklist and results: any may answer)."""
    gateways = {b.where.rsplit(" container ", 1)[0]: b for b in boxes if b.argv[:2] == ["cxr", "serve"]}
    for box in _dimse_scps(boxes):
        url = urlsplit(_settings_of(box).dimse_gateway_url)
        assert url.scheme == "http" and url.hostname and url.port, url
        name, _, rest = url.hostname.partition(".")
        assert rest in ("", "cxr", "cxr.svc", "cxr.svc.cluster.local"), f"{url.hostname}: not namespace cxr"
        service = next(
            (o.doc for o in tree.of_kind("Service") if o.name == name and o.namespace == "cxr"), None
        )
        assert service is not None, f"{box.where}: no Service {name}"
        port = next((p for p in service["spec"]["ports"] if p["port"] == url.port), None)
        assert port is not None, f"Service {name} has no port {url.port}"
        selected = [
            gateways[p.owner]
            for p in tree.pods
            if p.owner in gateways and _selects(service["spec"].get("selector") or {}, p.labels)
        ]
        assert selected, f"Service {name} selects no gateway pod"
        for gateway in selected:
            listening = _parse(gateway.argv, gateway.env)
            assert listening is not None
            target = port.get("targetPort", port["port"])
            assert gateway.ports.get(str(target), target) == listening["port"], (name, port, gateway.ports)


def test_the_dimse_scp_calls_with_the_pacs_key_whose_hash_the_gateway_holds(
    boxes: list[Box], tree: Tree
) -> None:
    """The key comes from a Secret (never a literal), which Ansible fills from the same file as the
    pacs hash in cxr-gateway: another key would be refused with 401, each study spooled for ever."""
    for box in _dimse_scps(boxes):
        assert "CXR_DIMSE_API_KEY" in box.env and box.env["CXR_DIMSE_API_KEY"] is None, box.where
    (source,) = [
        item["remoteRef"]
        for o in tree.of_kind("ExternalSecret")
        if o.doc["spec"]["target"]["name"] == "cxr-dimse"
        for item in o.doc["spec"].get("data", [])
        if item["secretKey"] == "api_key"
    ]
    assert source == {"key": "cxr-dimse", "property": "api_key"}
    role = REPO / "iac/ansible/roles/argocd"
    assert "pacs" in yaml.safe_load((role / "defaults/main.yml").read_text())["argocd_gateway_roles"]
    tasks = yaml.safe_load((role / "tasks/secrets.yml").read_text())
    documents = [doc for task in tasks for doc in task.get("loop", []) if isinstance(doc, dict)]
    hashed = next(d for d in documents if d["metadata"]["name"] == "cxr-gateway")
    assert "argocd_api_key_entries" in hashed["stringData"]["api_keys.json"]
    hashing = next(t for t in tasks if "argocd_api_key_entries" in t.get("ansible.builtin.set_fact", {}))
    fact = " ".join(hashing["ansible.builtin.set_fact"]["argocd_api_key_entries"].split())
    clear = " ".join(
        next(d for d in documents if d["metadata"]["name"] == "cxr-dimse")["stringData"]["api_key"].split()
    )
    # the same password lookup, with the role's item fixed to pacs
    lookup = re.search(r"lookup\('ansible\.builtin\.password', .*?\)", fact)
    assert lookup, fact
    assert lookup.group(0).replace("'/api-key-' ~ item", "'/api-key-pacs'") in clear, (lookup.group(0), clear)


def test_the_cluster_scp_lists_the_calling_aes_it_accepts(boxes: list[Box]) -> None:
    """An empty list admits any calling AE (the one-machine stack, on loopback); a cluster install,
    open to the hospital network, lists its PACS and modalities (shared/DESIGN.md)."""
    for box in _dimse_scps(boxes):
        settings = _settings_of(box)
        assert settings.dimse_allowed_aes, f"{box.where}: CXR_DIMSE_ALLOWED_AES is empty (any AE)"
        assert box.env.get("CXR_DIMSE_ALLOWED_AES") is not None, "a site value from git, not a Secret"


def test_the_gateway_reads_the_sites_pacs_destinations_and_the_scp_its_ae_title(
    boxes: list[Box], tree: Tree
) -> None:
    """One per-site place (the production overlay's cxr-pacs ConfigMap) gives the gateway where results
    go back (default: nowhere) and the SCP its AE title and allowed callers."""
    (pacs,) = [o for o in tree.of_kind("ConfigMap") if o.name.startswith("cxr-pacs-production")]
    data = pacs.doc["data"]
    assert {"CXR_PACS_DESTINATIONS", "CXR_DIMSE_AE_TITLE", "CXR_DIMSE_ALLOWED_AES"} <= set(data)
    gateway = next(b for b in boxes if b.where.startswith("Deployment/cxr-gateway-production"))
    assert gateway.env.get("CXR_PACS_DESTINATIONS") == data["CXR_PACS_DESTINATIONS"]
    assert _settings_of(gateway).pacs_destinations == []  # the default until a site lists its PACS
    for box in _dimse_scps(boxes):
        assert box.env.get("CXR_DIMSE_AE_TITLE") == data["CXR_DIMSE_AE_TITLE"]


def _scp_template(tree: Tree) -> tuple[dict[str, Any], dict[str, Any]]:
    """The SCP's StatefulSet and its one container, as the production overlay renders them."""
    (sts,) = [o.doc for o in tree.of_kind("StatefulSet") if o.name == "cxr-dimse-production"]
    (container,) = sts["spec"]["template"]["spec"]["containers"]
    return sts, container


def test_kubelets_tcp_probes_leave_the_scp_most_of_its_association_slots(
    boxes: list[Box], tree: Tree, tmp_path: Path
) -> None:
    """kubelet's tcpSocket probe connects and closes without a byte of DICOM. pynetdicom holds such a
    connection as an association until its ACSE timer ends it, and refuses one beyond
    CXR_DIMSE_MAX_ASSOCIATIONS ("local limit exceeded"): probes every 10 s and 20 s held ~5 of the 8
    slots a PACS and its modalities share. Shown on the SCP itself, then counted for the manifest."""
    scp = StorageScp(
        ScpConfig("CXR", "127.0.0.1", free_port(), allowed_aes=("PACS",)), InstanceSpool(tmp_path)
    )
    scp.start()
    try:
        socket.create_connection(("127.0.0.1", scp.config.port), timeout=5).close()  # what kubelet does
        deadline = time.monotonic() + 5
        while not scp.ae.active_associations and time.monotonic() < deadline:
            time.sleep(0.01)
        left = time.monotonic()
        while time.monotonic() < left + 1.0:  # the prober is long gone; the slot stays taken
            assert len(scp.ae.active_associations) == 1
            time.sleep(0.05)
        held_s = scp.ae.acse_timeout
    finally:
        scp.stop()  # the held slot's thread (a daemon) ends with its timer
    assert held_s and held_s >= 30
    (box,) = _dimse_scps(boxes)
    slots = _settings_of(box).dimse_max_associations
    _, container = _scp_template(tree)
    held = {
        probe: math.ceil(held_s / container[probe].get("periodSeconds", 10))
        for probe in ("readinessProbe", "livenessProbe")  # the startup probe stops at its first success
        if "tcpSocket" in container.get(probe, {})
    }
    assert sum(held.values()) <= slots // 4, (
        f"the SCP's TCP probes hold {held} of its {slots} association slots ({held_s} s each)"
    )


def test_a_reverted_scp_setting_replaces_the_pod_it_crashed_without_a_manual_delete(tree: Tree) -> None:
    """Every pacs.env commit rolls the SCP (its ConfigMap's name is hashed). One that crashes it (an AE
    list that is no JSON) leaves a pod that never turns Ready; under the default OrderedReady the
    StatefulSet controller replaces no such pod, so the revert would wait for someone to delete it
    (Kubernetes' "forced rollback"). Parallel lets the revert replace it."""
    sts, container = _scp_template(tree)
    reads = [s["configMapRef"]["name"] for s in container.get("envFrom", []) if "configMapRef" in s]
    assert any(name.startswith("cxr-pacs-production-") for name in reads), reads
    assert sts["spec"].get("replicas", 1) == 1
    assert sts["spec"].get("podManagementPolicy", "OrderedReady") == "Parallel"


def test_a_node_port_service_is_not_said_to_have_a_health_check_node_port(tree: Tree) -> None:
    """Kubernetes allocates spec.healthCheckNodePort only to a Service of type LoadBalancer with
    externalTrafficPolicy Local: a site's balancer told to health-check it on the SCP's NodePort
    Service checks a port nothing serves, and marks every node down."""
    node_ports = [o for o in tree.of_kind("Service") if o.doc["spec"].get("type") == "NodePort"]
    assert any(o.name == "cxr-dimse-production" for o in node_ports)
    assert not any("healthCheckNodePort" in o.doc["spec"] for o in node_ports)
    texts = {
        "k8s/base/dimse/service.yaml": (REPO / "k8s/base/dimse/service.yaml").read_text(),
        "docs/cluster.md": (REPO / "docs/cluster.md").read_text(),
    }
    # "its health check on the Service's healthCheckNodePort", "healthCheckNodePort as its health check"
    advice = re.compile(
        r"health[ -]check[^.]*?\b(on|at)\b[^.]*?healthCheckNodePort|healthCheckNodePort\W+as its health",
        re.I | re.S,
    )
    wrong = [name for name, text in texts.items() if advice.search(text)]
    assert not wrong, f"{wrong} tell a balancer to check the NodePort Service's healthCheckNodePort"


def test_a_stopping_gateway_keeps_serving_while_it_leaves_the_endpoints_then_has_time_to_hand_on() -> None:
    """uvicorn closes its listener at SIGTERM; the endpoints learn of the stop a moment later."""
    import yaml as _yaml

    doc = _yaml.safe_load((REPO / "k8s" / "base" / "gateway" / "deployment.yaml").read_text())
    spec = doc["spec"]["template"]["spec"]
    [gateway] = spec["containers"]
    command = gateway["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pause = float(command[1])
    graceful = 10  # `cxr serve`'s timeout_graceful_shutdown (serving/cli.py)
    env = {e["name"]: e.get("value") for e in gateway["env"]}
    assert env.get("CXR_EPHEMERAL_DISK") == "true"
    assert spec["terminationGracePeriodSeconds"] >= pause + graceful + 30  # and 30 s for the hand-off
