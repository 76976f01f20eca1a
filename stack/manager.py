"""``cxr stack up | down | status | logs``: the one-machine stack under supervisord.

``up`` is idempotent: it (re)writes the supervisord config from the settings,
starts what is not running, waits on each component's health endpoint in
dependency order and fails with the name and log tail of the first component
that does not come up. ``down`` stops everything by PID and cleans the
leftovers Triton's Python backend is known to leave behind.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from core.credentials import ORTHANC_USERNAME, StackCredentials
from core.errors import CredentialsError
from core.offline import apply_offline_env, offline_env
from core.progress import reporting
from core.stages import STAGES
from stack import triton_launch
from stack.components import (
    Component,
    ComponentFailed,
    S3Credentials,
    WeedPorts,
    basic_auth,
    dimse_component,
    ensure_buckets,
    gateway_component,
    log_tail,
    mlflow_component,
    mlflow_exporter_component,
    prometheus_component,
    reconcile_component,
    s3_component,
    scheduler_component,
    triton_component,
    wait_component,
)
from stack.config import StackSettings
from stack.credentials import load_or_create, write_env_file
from stack.gitops_checkout import ensure_checkout
from stack.orthanc import dicomweb_server_entry, orthanc_component, orthanc_missing
from stack.supervisor import Supervisor
from workflows.config import WorkflowSettings

RULES_DIR = Path("k8s") / "monitoring" / "rules"


@dataclass(frozen=True)
class ComponentStatus:
    name: str
    state: str
    pid: int
    healthy: bool
    url: str


class StackError(RuntimeError):
    """The stack could not be brought up; the message says which part and why."""


def _weed_ports(settings: StackSettings) -> WeedPorts:
    return WeedPorts(
        s3=settings.s3_port,
        master=settings.weed_master_port,
        volume=settings.weed_volume_port,
        filer=settings.weed_filer_port,
    )


def client_env(settings: StackSettings, creds: StackCredentials) -> dict[str, str]:
    """The ``CXR_*`` variables every client of the stack needs (CLI, gateway, pipeline)."""
    host = settings.host
    env = {
        "CXR_STACK_DIR": str(settings.state),
        "CXR_S3_ENDPOINT": f"http://{host}:{settings.s3_port}",
        "CXR_S3_ACCESS_KEY": creds.s3_access_key,
        "CXR_S3_SECRET_KEY": creds.s3_secret_key,
        "CXR_S3_REGION": settings.s3_region,
        "CXR_S3_BUCKET": settings.s3_bucket,
        "CXR_MLFLOW_URI": f"http://{host}:{settings.mlflow_port}",
        "CXR_API_KEYS_FILE": str(settings.api_keys_file),
        "CXR_GITOPS_DIR": str(settings.gitops_checkout),
        "CXR_GATEWAY_URL": f"http://{host}:{settings.gateway_port}",
        "CXR_PROMETHEUS_URL": f"http://{host}:{settings.prometheus_port}",
    }
    for stage in STAGES:
        env[f"CXR_TRITON_{stage.upper()}_URL"] = f"{host}:{settings.triton_http_port(stage)}"
    return env


def orthanc_skipped(settings: StackSettings) -> str | None:
    """Why the stack runs without Orthanc (switched off, or not installed); ``None`` when it runs it."""
    if not settings.orthanc:
        return "switched off (CXR_ORTHANC=false)"
    return orthanc_missing()


def pacs_env(settings: StackSettings, creds: StackCredentials) -> dict[str, str]:
    """The PACS round trip's ``CXR_*`` variables: our storage SCP, and Orthanc's side when it runs.

    Orthanc is where results go back to (one STOW-RS destination for every caller) and
    where ``cxr pacs analyze`` pulls studies from. Kept apart from :func:`client_env`
    because the twin is optional and the container stack (docker-compose) has none.
    """
    host = settings.host
    env = {
        "CXR_DIMSE_HOST": host,
        "CXR_DIMSE_PORT": str(settings.dimse_port),
        "CXR_DIMSE_AE_TITLE": settings.dimse_ae_title,
        "CXR_DIMSE_GATEWAY_URL": f"http://{host}:{settings.gateway_port}",
    }
    if orthanc_skipped(settings) is not None:
        return env
    dicomweb = f"http://{host}:{settings.orthanc_http_port}/dicom-web"
    headers = {"Authorization": basic_auth(ORTHANC_USERNAME, creds.orthanc_password)}
    destination = {"name": "orthanc", "kind": "stow", "url": dicomweb, "headers": headers, "callers": ["*"]}
    env.update(
        {
            "CXR_PACS_DESTINATIONS": _compact_json([destination]),
            "CXR_PACS_DICOMWEB_URL": dicomweb,
            "CXR_PACS_DICOMWEB_HEADERS": _compact_json(headers),
        }
    )
    return env


def _compact_json(value: object) -> str:
    """JSON without spaces, so each value stays one word in stack.env (read by python-dotenv)."""
    return json.dumps(value, separators=(",", ":"))


def build_components(settings: StackSettings, creds: StackCredentials) -> list[Component]:
    """Every component, in the order ``up`` waits for them."""
    state, host = settings.state, settings.host
    s3_creds = S3Credentials(creds.s3_access_key, creds.s3_secret_key)
    s3_endpoint = f"http://{host}:{settings.s3_port}"
    clients = client_env(settings, creds)
    components = [
        s3_component(
            state, host, _weed_ports(settings), s3_creds, (settings.s3_bucket, settings.mlflow_bucket)
        ),
        mlflow_component(
            state,
            host,
            settings.mlflow_port,
            s3_endpoint,
            s3_creds,
            settings.mlflow_bucket,
            settings.python,
        ),
    ]
    components += [
        triton_component(
            state, stage, host, settings.triton_http_port(stage), settings.triton_venv, python=settings.python
        )
        for stage in STAGES
    ]
    if orthanc_skipped(settings) is None:
        # Orthanc calls our SCP (modality cxr) and STOWs to our gateway (DICOMweb server cxr)
        orthanc = orthanc_component(
            state / "orthanc",
            host=host,
            http_port=settings.orthanc_http_port,
            dicom_port=settings.orthanc_dicom_port,
            username=ORTHANC_USERNAME,
            password=creds.orthanc_password,
            modalities={"cxr": (settings.dimse_ae_title, host, settings.dimse_port)},
            dicomweb_servers={
                "cxr": dicomweb_server_entry(
                    f"http://{host}:{settings.gateway_port}/dicomweb",
                    {"Authorization": f"Bearer {creds.api_keys.get('pacs', '')}"},
                )
            },
        )
        if orthanc is not None:
            components.append(orthanc)
    service_env = {**offline_env(state), **clients, **pacs_env(settings, creds)}
    components.append(gateway_component(host, settings.gateway_port, settings.python, service_env))
    components.append(
        dimse_component(host, settings.dimse_port, settings.dimse_ae_title, settings.python, service_env)
    )
    components.append(reconcile_component(settings.python, service_env))
    if WorkflowSettings().scheduler:  # CXR_SCHEDULER=false: retrains only by hand
        components.append(scheduler_component(settings.python, service_env))
    components.append(
        mlflow_exporter_component(host, settings.mlflow_exporter_port, settings.python, service_env)
    )
    targets = {
        "gateway": [f"{host}:{settings.gateway_port}"],
        "triton": [f"{host}:{settings.triton_http_port(stage) + 2}" for stage in STAGES],
        "mlflow-exporter": [f"{host}:{settings.mlflow_exporter_port}"],
    }
    rules = sorted(p.resolve() for p in RULES_DIR.glob("*.yaml")) if RULES_DIR.is_dir() else []
    prometheus = prometheus_component(state, host, settings.prometheus_port, targets, rules)
    if prometheus is not None:
        components.append(prometheus)
    return components


def _port_in_use(host: str, port: int) -> bool:
    with socket.socket() as probe:
        # Like the servers themselves, ignore connections lingering in TIME_WAIT.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            return exc.errno == errno.EADDRINUSE
    return False


def _preflight(settings: StackSettings, components: list[Component]) -> None:
    for comp in components:
        for port in comp.ports:
            if _port_in_use(settings.host, port):
                raise StackError(
                    f"{comp.name}: port {settings.host}:{port} is already in use by another process. "
                    f"Stop that process or choose another port (see `cxr stack up --help`, "
                    f"CXR_* port settings)."
                )


def _credentials(settings: StackSettings) -> StackCredentials:
    """The stack's secrets; a file that cannot be read is a :class:`StackError` (one line, no traceback)."""
    try:
        return load_or_create(settings.credentials_file, settings.api_keys_file)
    except CredentialsError as exc:
        raise StackError(str(exc)) from exc


def up(settings: StackSettings) -> list[ComponentStatus]:
    """Start (or complete) the stack and wait until every component is healthy."""
    state = settings.state
    # the stack's state holds identified radiographs (the result journal, the DIMSE spool, the
    # outbox, Orthanc's storage): the owner's alone, also when an earlier version made it 0755
    state.mkdir(mode=0o700, parents=True, exist_ok=True)
    state.chmod(0o700)
    apply_offline_env(state)
    creds = _credentials(settings)
    write_env_file(settings.env_file, {**client_env(settings, creds), **pacs_env(settings, creds)})
    ensure_checkout(Path.cwd(), settings.gitops_checkout)
    try:
        components = build_components(settings, creds)
    except ComponentFailed as exc:
        raise StackError(str(exc)) from exc
    supervisor = Supervisor(state)
    if supervisor.running():
        supervisor.write_config(components)
        supervisor.update()
    else:
        _preflight(settings, components)
        supervisor.write_config(components)
        supervisor.start()
    wait_in_order(settings, components, supervisor, creds)
    return status(settings)


def wait_in_order(
    settings: StackSettings, components: list[Component], supervisor: Supervisor, creds: StackCredentials
) -> None:
    """Wait for each component in dependency order, reporting each as it turns healthy.

    A ``stack_component`` task per component (a spinner on a terminal, ``event=stack_component_done
    component=NAME state=healthy seconds=...`` in logs); one without a health endpoint is
    ``started`` once supervisord runs it. The first that fails ends ``state=failed`` and raises
    :class:`StackError` with its log tail.
    """
    with reporting() as progress:
        for comp in components:
            with progress.task("stack_component", comp.name, component=comp.name) as task:
                log_file = settings.state / "logs" / f"{comp.name}.log"
                if comp.health_url is None:
                    try:
                        waited = _wait_running(supervisor, comp, settings.health_timeout_s, log_file)
                    except ComponentFailed as exc:
                        task.done("failed", str(exc).splitlines()[0])
                        raise StackError(f"component {exc}") from exc
                    task.done("started", f"running under supervisord after {waited:.1f} s of waiting")
                    continue

                def alive(name: str = comp.name) -> bool:
                    proc = supervisor.process_state(name)
                    return proc is not None and proc.state not in {"FATAL", "EXITED", "STOPPED"}

                try:
                    waited = wait_component(
                        comp, timeout=settings.health_timeout_s, alive=alive, log_file=log_file
                    )
                    if comp.name == "s3":
                        ensure_buckets(
                            f"http://{settings.host}:{settings.s3_port}",
                            S3Credentials(creds.s3_access_key, creds.s3_secret_key),
                            (settings.s3_bucket, settings.mlflow_bucket),
                        )
                except ComponentFailed as exc:
                    task.done("failed", str(exc).splitlines()[0])
                    raise StackError(f"component {exc}") from exc
                task.done("healthy", f"after {waited:.1f} s of waiting", url=comp.health_url)


def _wait_running(supervisor: Supervisor, comp: Component, timeout: float, log_file: Path) -> float:
    """Wait until supervisord counts ``comp``'s start as good (alive ``startsecs``): seconds waited.

    All a component without a health endpoint has to show; one that dies at start-up ends FATAL
    once its retries are spent (:data:`~stack.components.UNWATCHED_STARTSECS`), named here with its
    log tail instead of "started" and a crash loop behind it.
    """
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        proc = supervisor.process_state(comp.name)
        if proc is not None and proc.state == "RUNNING":
            return time.monotonic() - start
        if proc is None or proc.state in {"FATAL", "EXITED", "STOPPED"}:
            state = proc.state if proc is not None else "unknown to supervisord"
            raise ComponentFailed(f"{comp.name} did not keep running ({state}).{log_tail(log_file)}")
        time.sleep(0.2)
    raise ComponentFailed(f"{comp.name} not running after {timeout:.0f} s.{log_tail(log_file)}")


def status(settings: StackSettings) -> list[ComponentStatus]:
    supervisor = Supervisor(settings.state)
    if not supervisor.running():
        return []
    creds = _credentials(settings)
    try:
        components = {c.name: c for c in build_components(settings, creds)}
    except ComponentFailed as exc:
        raise StackError(str(exc)) from exc
    rows = []
    for proc in supervisor.processes():
        comp = components.get(proc.name)
        url = comp.health_url or "" if comp else ""
        if comp and url:
            # Only while supervisord runs it: a FATAL gateway's port may be answered by a stray process.
            healthy = proc.state in {"STARTING", "RUNNING"} and comp.healthy()
        else:  # no health endpoint (reconcile, scheduler): healthy while running, each start 5 s alive
            healthy = proc.state == "RUNNING"
        rows.append(ComponentStatus(proc.name, proc.state, proc.pid, healthy, url))
    return rows


def down(settings: StackSettings) -> list[int]:
    """Stop every component and supervisord; return PIDs that had to be killed."""
    supervisor = Supervisor(settings.state)
    pids = supervisor.shutdown()
    survivors = []
    deadline = time.monotonic() + 10
    for pid in pids:
        while time.monotonic() < deadline and _alive(pid):
            time.sleep(0.1)
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)
            survivors.append(pid)
    triton_launch.reap(triton_launch.backends_dir(settings.state))  # stubs of a Triton killed earlier
    _clean_triton_leftovers()
    return survivors


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _clean_triton_leftovers() -> None:
    """Triton's Python backend leaves shared memory and env folders after an unclean stop."""
    in_use = _mapped_shm()
    for shm in Path("/dev/shm").glob("triton_python_backend_shm_region_*"):
        if str(shm) not in in_use:  # another Triton (another stack, a test) may still use it
            shm.unlink(missing_ok=True)
    for env_dir in Path("/tmp").glob("python_env_*"):
        shutil.rmtree(env_dir, ignore_errors=True)


def _mapped_shm() -> set[str]:
    mapped: set[str] = set()
    for maps in Path("/proc").glob("[0-9]*/maps"):
        try:
            text = maps.read_text()
        except OSError:
            continue
        mapped.update(line.split()[-1] for line in text.splitlines() if "/dev/shm/triton" in line)
    return mapped


def logs(settings: StackSettings, component: str | None, lines: int) -> str:
    folder = settings.state / "logs"
    files = [folder / f"{component}.log"] if component else sorted(folder.glob("*.log"))
    missing = [f for f in files if not f.exists()]
    if missing:
        known = ", ".join(sorted(p.stem for p in folder.glob("*.log"))) or "none yet"
        raise StackError(f"no log for {component!r}; known logs: {known}")
    return "\n".join(log_tail(f, lines).lstrip("\n") for f in files)
