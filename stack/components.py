"""How each real server of the one-machine stack is launched and probed.

One description per component (command line, environment, health URL) shared by
``cxr stack up`` (which hands them to supervisord) and the test fixtures (which
start them directly on free ports). Keeping both on the same description means
the tests exercise exactly the flags the stack uses.
"""

from __future__ import annotations

import base64
import functools
import json
import shutil
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from core.offline import offline_env
from stack.credentials import write_private
from stack.triton_launch import STUB_NAME, backends_dir


class ComponentFailed(RuntimeError):
    """A component did not become healthy; the message names it and shows its log tail."""


@dataclass(frozen=True)
class Component:
    """One long-running server: what to run and how to tell it is healthy."""

    name: str
    command: list[str]
    health_url: str | None
    env: dict[str, str] = field(default_factory=dict)
    cwd: Path | None = None
    ports: tuple[int, ...] = ()
    stop_signal: str = "TERM"
    # endpoints that start listening after ``health_url`` answers and must be up too
    also_listening: tuple[str, ...] = ()
    # How to ask ``health_url`` when a plain GET cannot (a C-ECHO, a login); ``health_url``
    # then only names the endpoint for ``status`` and the logs.
    probe: Callable[[], bool] | None = field(default=None, compare=False)
    # seconds alive before supervisord counts a start as good (its ``startsecs``)
    startsecs: int = 1

    def healthy(self) -> bool:
        """One health check now: the probe when there is one, else a GET of ``health_url``."""
        if self.probe is not None:
            return self.probe()
        return self.health_url is not None and http_ok(self.health_url)


@dataclass(frozen=True)
class S3Credentials:
    access_key: str
    secret_key: str


@dataclass(frozen=True)
class WeedPorts:
    """SeaweedFS ``weed mini`` runs master, volume, filer and S3 servers in one process."""

    s3: int
    master: int
    volume: int
    filer: int

    def all(self) -> tuple[int, ...]:
        # gRPC twins are the HTTP ports + 10000 (SeaweedFS' convention); set explicitly below.
        return (
            self.s3,
            self.master,
            self.volume,
            self.filer,
            *tuple(p + 10000 for p in (self.s3, self.master, self.volume, self.filer)),
        )


def http_ok(url: str, timeout: float = 2.0, auth: tuple[str, str] | None = None) -> bool:
    """True when ``url`` answers 2xx (a plain stdlib GET: no proxies, loopback only).

    ``auth`` (user, password) sends HTTP Basic credentials, for servers such as Orthanc
    that have no anonymous health endpoint.
    """
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    request = urllib.request.Request(url)
    if auth is not None:
        request.add_header("Authorization", basic_auth(*auth))
    try:
        with opener.open(request, timeout=timeout) as resp:
            return 200 <= resp.status < 300
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return False


def basic_auth(username: str, password: str) -> str:
    """The value of an ``Authorization`` header for HTTP Basic."""
    return "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()


def wait_healthy(
    name: str,
    url: str,
    *,
    timeout: float,
    alive: Callable[[], bool] = lambda: True,
    log_file: Path | None = None,
    probe: Callable[[], bool] | None = None,
) -> float:
    """Poll ``url`` (through ``probe`` when given) until healthy; return seconds waited or raise
    :class:`ComponentFailed`."""
    check = probe or (lambda: http_ok(url))
    start = time.monotonic()
    delay = 0.05
    while time.monotonic() - start < timeout:
        if check():
            return time.monotonic() - start
        if not alive():
            raise ComponentFailed(f"{name} exited before becoming healthy ({url}).{log_tail(log_file)}")
        time.sleep(delay)
        delay = min(delay * 1.5, 0.5)
    raise ComponentFailed(f"{name} not healthy after {timeout:.0f} s ({url}).{log_tail(log_file)}")


def wait_component(
    comp: Component, *, timeout: float, alive: Callable[[], bool], log_file: Path | None = None
) -> float:
    """Wait for ``comp.health_url`` (via its probe) and then every ``comp.also_listening`` URL;
    seconds waited in all."""
    waited = 0.0
    if comp.health_url is not None:
        waited += wait_healthy(
            comp.name, comp.health_url, timeout=timeout, alive=alive, log_file=log_file, probe=comp.probe
        )
    for url in comp.also_listening:
        waited += wait_healthy(comp.name, url, timeout=timeout, alive=alive, log_file=log_file)
    return waited


def log_tail(log_file: Path | None, lines: int = 15) -> str:
    if log_file is None or not log_file.exists():
        return ""
    text = log_file.read_text(errors="replace").splitlines()[-lines:]
    return f"\nLast lines of {log_file}:\n  " + "\n  ".join(text)


# ---------------------------------------------------------------- object store


def s3_identities(creds: S3Credentials) -> dict[str, object]:
    """SeaweedFS identity file: one identity with full rights, so auth is ON."""
    return {
        "identities": [
            {
                "name": "cxr",
                "credentials": [{"accessKey": creds.access_key, "secretKey": creds.secret_key}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"],
            }
        ]
    }


def s3_component(
    state: Path, host: str, ports: WeedPorts, creds: S3Credentials, buckets: tuple[str, ...]
) -> Component:
    data = state / "s3"
    data.mkdir(parents=True, exist_ok=True)
    identities = state / "s3-identities.json"
    write_private(identities, json.dumps(s3_identities(creds)))  # the S3 keys: 0600 from the start
    weed = shutil.which("weed", path=str(Path(sys.executable).parent)) or shutil.which("weed") or "weed"
    command = [
        weed,
        "mini",
        f"-dir={data}",
        f"-ip={host}",
        f"-ip.bind={host}",
        "-master.telemetry=false",
        "-webdav=false",
        "-admin.ui=false",
        f"-s3.port={ports.s3}",
        f"-s3.port.grpc={ports.s3 + 10000}",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        f"-master.port={ports.master}",
        f"-master.port.grpc={ports.master + 10000}",
        f"-volume.port={ports.volume}",
        f"-volume.port.grpc={ports.volume + 10000}",
        f"-filer.port={ports.filer}",
        f"-filer.port.grpc={ports.filer + 10000}",
        f"-s3.config={identities}",
        f"-bucket={','.join(buckets)}",
    ]
    # S3 answers 403 to an anonymous GET once auth is on; /status is SeaweedFS' own probe.
    return Component(
        name="s3",
        command=command,
        health_url=f"http://{host}:{ports.s3}/status",
        ports=ports.all(),
    )


# ---------------------------------------------------------------------- MLflow


def mlflow_component(
    state: Path, host: str, port: int, s3_endpoint: str, creds: S3Credentials, bucket: str, python: Path
) -> Component:
    data = state / "mlflow"
    data.mkdir(parents=True, exist_ok=True)
    env = {
        "MLFLOW_S3_ENDPOINT_URL": s3_endpoint,
        "AWS_ACCESS_KEY_ID": creds.access_key,
        "AWS_SECRET_ACCESS_KEY": creds.secret_key,
        "AWS_DEFAULT_REGION": "us-east-1",
        **offline_env(state),
    }
    command = [
        str(python),
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        f"sqlite:///{data / 'mlflow.db'}",
        "--artifacts-destination",
        f"s3://{bucket}/",
        "--host",
        host,
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    return Component(
        name="mlflow", command=command, health_url=f"http://{host}:{port}/health", env=env, ports=(port,)
    )


# ---------------------------------------------------------------------- Triton


def triton_paths(triton_venv: Path) -> tuple[Path, Path]:
    """(tritonserver binary, pytriton package dir) inside Triton's own environment."""
    python = triton_venv / "bin" / "python"
    matches = sorted((triton_venv / "lib").glob("python3*/site-packages/pytriton/tritonserver"))
    if not python.exists() or not matches:
        raise ComponentFailed(
            f"Triton's environment is missing at {triton_venv}: run `make venv` "
            "(it installs nvidia-pytriton with numpy<2 there)."
        )
    return matches[0] / "bin" / "tritonserver", matches[0]


def prepare_triton_backends(state: Path, triton_venv: Path) -> Path:
    """Backend folder holding the bundled Python backend plus a stub for this Python."""
    _, root = triton_paths(triton_venv)
    backends = backends_dir(state)
    python_dir = backends / "python"
    python_dir.mkdir(parents=True, exist_ok=True)
    src = root / "backends" / "python"
    for name in ("libtriton_python.so", "triton_python_backend_utils.py"):
        if not (python_dir / name).exists():
            shutil.copy2(src / name, python_dir / name)
    stub = python_dir / STUB_NAME
    if not stub.exists():
        shutil.copy2(root / "python_backend_stubs" / "3.11" / STUB_NAME, stub)
        stub.chmod(0o755)
    return backends


def triton_env(triton_venv: Path) -> dict[str, str]:
    """PATH and LD_LIBRARY_PATH the Python backend stub needs (see PLATFORM-NOTES)."""
    _, root = triton_paths(triton_venv)
    site = root.parent.parent
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    libs = [libdir, str(site / "nvidia_pytriton.libs")]
    return {
        "PATH": f"{(triton_venv / 'bin').resolve()}:/usr/local/bin:/usr/bin:/bin",
        "LD_LIBRARY_PATH": ":".join(p for p in libs if p),
        "VIRTUAL_ENV": str(triton_venv.resolve()),
    }


def triton_component(
    state: Path,
    stage: str,
    host: str,
    http_port: int,
    triton_venv: Path,
    repo: Path | None = None,
    python: Path | None = None,
) -> Component:
    binary, _ = triton_paths(triton_venv)
    backends = prepare_triton_backends(state, triton_venv)
    repository = repo or state / "triton" / stage
    repository.mkdir(parents=True, exist_ok=True)
    # the launcher kills the stubs a killed Triton left behind, then execs the server (triton_launch.py)
    command = [
        str(python or sys.executable),
        "-m",
        "stack.triton_launch",
        str(backends),
        "--",
        str(binary),
        f"--model-repository={repository}",
        f"--backend-directory={backends}",
        "--model-control-mode=explicit",
        f"--http-address={host}",
        f"--http-port={http_port}",
        f"--grpc-address={host}",
        f"--grpc-port={http_port + 1}",
        f"--metrics-address={host}",
        f"--metrics-port={http_port + 2}",
        "--allow-gpu-metrics=false",
        "--exit-timeout-secs=5",
        "--log-verbose=0",
    ]
    return Component(
        name=f"triton-{stage}",
        command=command,
        health_url=f"http://{host}:{http_port}/v2/health/live",
        env=triton_env(triton_venv),
        ports=(http_port, http_port + 1, http_port + 2),
        # the metrics service listens ~40 ms after the server reports live (Prometheus scrapes it)
        also_listening=(f"http://{host}:{http_port + 2}/metrics",),
    )


# --------------------------------------------------------------- gateway, Prometheus


def gateway_component(host: str, port: int, python: Path, env: dict[str, str]) -> Component:
    command = [
        str(python),
        "-m",
        "uvicorn",
        "--factory",
        "serving.gateway.app:create_app",
        "--host",
        host,
        "--port",
        str(port),
        "--no-access-log",
        # as `cxr serve` (10 s there): an open request holds the stop 5 s at most, then the lifespan's
        # shutdown runs (supervisord kills at 20 s, `cxr stack down` at 10 s)
        "--timeout-graceful-shutdown",
        "5",
    ]
    return Component(
        name="gateway", command=command, health_url=f"http://{host}:{port}/healthz", env=env, ports=(port,)
    )


def dicom_echo_ok(host: str, port: int, ae_title: str) -> bool:
    """C-ECHO as a health check (imported on use: only DIMSE components need pynetdicom)."""
    from serving.dimse.echo import c_echo

    return c_echo(host, port, ae_title, timeout=2.0)


def dimse_component(host: str, port: int, ae_title: str, python: Path, env: dict[str, str]) -> Component:
    """Our storage SCP (``python -m serving.dimse``), healthy when it answers C-ECHO.

    A DICOM port speaks no HTTP, so the probe is the DICOM ping itself; ``health_url``
    only names the endpoint (``dicom://AE@host:port``) for ``status``.
    """
    return Component(
        name="dimse",
        command=[str(python), "-m", "serving.dimse"],
        health_url=f"dicom://{ae_title}@{host}:{port}",
        env=env,
        ports=(port,),
        probe=functools.partial(dicom_echo_ok, host, port, ae_title),
    )


#: ``startsecs`` of a component without a health endpoint. supervisord restarts a process that
#: lived ``startsecs`` for ever, so with 1 s one that fails after its start-up (the scheduler on a bad
#: CXR_SCHEDULER_CRON exits after 1.7 s) looped for ever, RUNNING a second at a time, and ``make
#: status``, having only that state to go by, called it healthy whenever it looked then. One that
#: must live 5 s runs out of retries and goes FATAL, which ``make up`` and ``make status`` report.
UNWATCHED_STARTSECS = 5


def reconcile_component(python: Path, env: dict[str, str]) -> Component:
    """The local twin of ArgoCD: keeps each stage's Triton on the version its file names.

    ``git revert`` of a promote commit changes only the file; this watcher is what
    makes the one-machine stack follow it, as ArgoCD's sync does in the cluster.
    """
    command = [str(python), "-m", "delivery", "reconcile", "--watch"]
    return Component(
        name="reconcile", command=command, health_url=None, env=env, startsecs=UNWATCHED_STARTSECS
    )


def scheduler_component(python: Path, env: dict[str, str]) -> Component:
    """The local twin of Argo's CronWorkflow controller: keeps the rendered retrain schedules.

    Without it feedback piles up on one machine until someone types ``cxr pipeline run``;
    it runs that same command when ``cxr-retrain-weekly`` fires or enough feedback waits
    (workflows/scheduler.py). Healthy while running, like ``reconcile``.
    """
    command = [str(python), "-m", "workflows", "schedule"]
    return Component(
        name="scheduler", command=command, health_url=None, env=env, startsecs=UNWATCHED_STARTSECS
    )


def mlflow_exporter_component(host: str, port: int, python: Path, env: dict[str, str]) -> Component:
    """Training runs and registry versions from MLflow as Prometheus metrics (for the
    training dashboard and the model-stale alert)."""
    command = [
        str(python),
        "-m",
        "serving.observability",
        "mlflow-exporter",
        "--host",
        host,
        "--port",
        str(port),
    ]
    return Component(
        name="mlflow-exporter",
        command=command,
        health_url=f"http://{host}:{port}/metrics",
        env=env,
        ports=(port,),
    )


def prometheus_config(targets: dict[str, list[str]], rule_files: list[Path], interval: str = "5s") -> str:
    """A scrape config with one job per component kind (YAML is a superset of JSON)."""
    config = {
        "global": {"scrape_interval": interval, "evaluation_interval": interval},
        "rule_files": [str(p) for p in rule_files],
        "scrape_configs": [
            {"job_name": job, "static_configs": [{"targets": addrs}]} for job, addrs in targets.items()
        ],
    }
    return json.dumps(config, indent=2)


def prometheus_component(
    state: Path,
    host: str,
    port: int,
    targets: dict[str, list[str]],
    rule_files: list[Path],
    interval: str = "5s",
) -> Component | None:
    binary = shutil.which("prometheus")
    if binary is None:
        return None
    data = state / "prometheus"
    data.mkdir(parents=True, exist_ok=True)
    config = data / "prometheus.yml"
    config.write_text(prometheus_config(targets, rule_files, interval))
    command = [
        binary,
        f"--config.file={config}",
        f"--storage.tsdb.path={data / 'tsdb'}",
        f"--web.listen-address={host}:{port}",
        "--web.enable-lifecycle",
        "--storage.tsdb.retention.time=2d",
    ]
    return Component(
        name="prometheus", command=command, health_url=f"http://{host}:{port}/-/ready", ports=(port,)
    )


def ensure_buckets(
    endpoint: str, creds: S3Credentials, buckets: tuple[str, ...], timeout: float = 60.0
) -> None:
    """Create the buckets once the S3 API (not just the process) answers with our keys.

    ``weed mini`` reports ``/status`` before its filer takes writes, so this polls a
    real authenticated call, which is also the check that the credentials work.
    """
    from minio import Minio
    from minio.error import S3Error

    client = Minio(
        endpoint.removeprefix("http://"), creds.access_key, creds.secret_key, secure=False, region="us-east-1"
    )
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            for bucket in buckets:
                if not client.bucket_exists(bucket):
                    client.make_bucket(bucket)
            return
        except (S3Error, OSError, ValueError) as exc:
            last = exc
            time.sleep(0.2)
    raise ComponentFailed(f"s3 did not accept bucket creation within {timeout:.0f} s: {last}")
