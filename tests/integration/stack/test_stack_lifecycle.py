"""`cxr stack up | status | down` on free loopback ports, under the network audit.

One stack is started for the module (it takes ~20 s); the tests then prove it
is healthy, that ``up`` is idempotent, that nothing it or a short pipeline does
leaves loopback, and that ``down`` leaves no process behind.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from stack.orthanc import orthanc_missing
from tests.fixtures.servers import REPO_ROOT
from tests.fixtures.stack import CXR, StackRun, client_env, stack_env

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _watch_remote_connections(stop: threading.Event, found: list[str], state: Path) -> None:
    """Non-Python servers (weed, tritonserver, prometheus, Orthanc) are outside the audit hook:
    sample the sockets of the stack's processes and of this test's children instead,
    and note any remote end off loopback (other processes on a shared machine are not ours)."""
    me = psutil.Process()
    while not stop.is_set():
        ours = set(_stack_pids(state)) | {p.pid for p in me.children(recursive=True)}
        for conn in psutil.net_connections(kind="inet"):
            if conn.pid in ours and conn.raddr and not _loopback(conn.raddr.ip):
                found.append(f"pid={conn.pid} {conn.laddr} -> {conn.raddr}")
        stop.wait(0.5)


def _loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip.split("%")[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.is_loopback


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StackRun]:
    state = tmp_path_factory.mktemp("stack")
    audit = state / "net-audit.jsonl"
    run = StackRun(stack_env(state / "state", audit), state / "state", audit, [])
    stop = threading.Event()
    watcher = threading.Thread(
        target=_watch_remote_connections, args=(stop, run.remote_connections, run.state)
    )
    watcher.start()
    try:
        run.cxr("stack", "up", "--no-bootstrap")
        yield run
    finally:
        run.cxr("stack", "down", check=False)
        stop.set()
        watcher.join()


def _stack_pids(state: Path) -> list[int]:
    pids = []
    for proc in psutil.process_iter(["cmdline"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        if str(state) in cmd:
            pids.append(proc.pid)
            with contextlib.suppress(psutil.NoSuchProcess):
                pids += [child.pid for child in proc.children(recursive=True)]
    return pids


def test_up_reports_every_component_healthy(stack: StackRun) -> None:
    result = stack.cxr("stack", "status")
    for name in (
        "s3",
        "mlflow",
        "triton-production",
        "triton-canary",
        "triton-staging",
        "gateway",
        "dimse",
        "reconcile",
        "scheduler",
        "mlflow-exporter",
        "prometheus",
        *(["orthanc"] if orthanc_missing() is None else []),
    ):
        assert name in result.stdout, result.stdout
    assert "FATAL" not in result.stdout
    creds = stack.state / "credentials.json"
    assert creds.stat().st_mode & 0o777 == 0o600
    keys = json.loads(creds.read_text())["api_keys"]
    assert set(keys) == {"pacs", "radiologist", "operator", "admin"}


def test_up_again_is_idempotent_and_keeps_the_same_processes(stack: StackRun) -> None:
    before = sorted(_stack_pids(stack.state))
    stack.cxr("stack", "up", "--no-bootstrap")
    after = sorted(_stack_pids(stack.state))
    assert before and before == after


def test_short_pipeline_work_opens_no_connection_off_loopback(stack: StackRun) -> None:
    # The libraries that phone home by default, each exercised in a child process
    # that inherits the audit hook and the stack's closed-network settings.
    script = (
        "import mlflow, os, ray\n"
        "from ultralytics import YOLO\n"
        "from core.offline import apply_offline_env\n"
        "from pathlib import Path\n"
        "apply_offline_env(Path(os.environ['CXR_STACK_DIR']))\n"
        "mlflow.set_tracking_uri(os.environ['CXR_MLFLOW_URI'])\n"
        "with mlflow.start_run():\n"
        "    mlflow.log_metric('x', 1.0)\n"
        "YOLO('yolo11n.yaml')\n"
        "ray.init(num_cpus=1, include_dashboard=False)\n"
        "ray.get(ray.remote(lambda: 1).remote())\n"
        "ray.shutdown()\n"
    )
    env = dict(stack.env)
    env.update({k: v for k, v in client_env(stack.state).items() if k not in env})
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    time.sleep(1.0)  # one more sample of the connection watcher after the run
    attempts = stack.audit_log.read_text().splitlines() if stack.audit_log.exists() else []
    assert attempts == [], "connections off loopback:\n" + "\n".join(attempts)
    assert stack.remote_connections == []


def test_up_fails_naming_the_component_whose_port_is_taken(tmp_path: Path) -> None:
    env = stack_env(tmp_path / "state", tmp_path / "audit.jsonl")
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", int(env["CXR_MLFLOW_PORT"])))
    blocker.listen()
    try:
        result = subprocess.run(
            [*CXR, "stack", "up", "--no-bootstrap"],
            env=env,
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        blocker.close()
        subprocess.run([*CXR, "stack", "down"], env=env, cwd=REPO_ROOT, capture_output=True, timeout=120)
    assert result.returncode != 0
    assert "mlflow" in result.stdout and env["CXR_MLFLOW_PORT"] in result.stdout


def test_down_leaves_no_process_behind(tmp_path_factory: pytest.TempPathFactory, stack: StackRun) -> None:
    pids = _stack_pids(stack.state)
    assert pids
    stack.cxr("stack", "down")
    alive = [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    assert alive == []
    assert stack.cxr("stack", "status", check=False).returncode == 3
