"""Faults on the running one-machine stack: what a hospital operator would see.

A real stack (`cxr stack up`) serves a tiny registered detector from production;
then its parts are killed or stopped under supervisord, and the tests check
that requests fail fast and clearly, that nothing is lost and that the stack
heals itself without touching the gateway.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest

from stack.supervisor import Supervisor
from stack.triton_launch import backends_dir, orphaned_stubs, stub_parents
from tests.fixtures.stack import StackRun, api_keys, client_env, stack_env
from tests.integration.delivery.gitops_helpers import register_version, tiny_detector
from tests.unit.serving.serving_support import make_dicom

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


@dataclass
class Served:
    run: StackRun
    env: dict[str, str]
    keys: dict[str, str]
    supervisor: Supervisor
    version: str

    def client(self, role: str = "pacs") -> httpx.Client:
        return httpx.Client(
            base_url=self.env["CXR_GATEWAY_URL"],
            headers={"Authorization": f"Bearer {self.keys[role]}"},
            timeout=30,
        )

    def pid(self, name: str) -> int:
        proc = self.supervisor.process_state(name)
        assert proc is not None and proc.pid, f"{name} is not running"
        return proc.pid


def _wait(what: str, check, timeout: float = 90.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.3)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def _ready(served: Served) -> bool:
    try:
        return httpx.get(f"{served.env['CXR_GATEWAY_URL']}/readyz", timeout=5).status_code == 200
    except httpx.HTTPError:  # a restarting gateway refuses connections for a moment
        return False


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    root = tmp_path_factory.mktemp("faults")
    run = StackRun(stack_env(root / "state", root / "audit.jsonl"), root / "state", root / "audit.jsonl")
    try:
        run.cxr("stack", "up", "--no-bootstrap", timeout=240)
        env = client_env(run.state)
        onnx = tiny_detector(root / "model" / "model.onnx", score=0.9)
        version = register_version(env["CXR_MLFLOW_URI"], "cxr-detector", onnx)
        run.cxr("promote", version, "--to", "production", "--force", "--reason", "fault tests")
        served = Served(run, env, api_keys(run.state), Supervisor(run.state), version)
        _wait("production to serve the model", lambda: _ready(served))
        yield served
    finally:
        run.cxr("stack", "down", check=False, timeout=120)


def test_killed_production_triton_fails_fast_with_503_then_heals_without_the_gateway(served: Served) -> None:
    gateway_pid = served.pid("gateway")
    triton_pid = served.pid("triton-production")
    backends = backends_dir(served.run.state)
    stubs = [pid for pid, parent in stub_parents(backends).items() if parent == triton_pid]
    assert stubs, "production's Triton runs its model in a Python backend stub"
    os.kill(triton_pid, signal.SIGKILL)
    statuses: list[int] = []
    with served.client() as client:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            start = time.monotonic()
            resp = client.post(
                "/v1/detect", content=make_dicom(96, 80), headers={"Content-Type": "application/dicom"}
            )
            assert time.monotonic() - start < 15, "a request hung on the dead Triton"
            statuses.append(resp.status_code)
            if resp.status_code == 503:
                assert resp.headers.get("Retry-After"), resp.headers
                assert resp.json()["error"]["message"]
                # a client backs off on 503; retrying in a tight loop exceeds the key's rate limit (429)
                time.sleep(0.2)
            elif resp.status_code == 200 and 503 in statuses:
                assert resp.json()["model"] == {
                    "name": "cxr-detector",
                    "version": served.version,
                    "stage": "production",
                    "variant": "fp32",
                }
                break
            else:
                assert resp.status_code in (200, 503), resp.text
    assert 503 in statuses and statuses[-1] == 200, statuses
    assert served.pid("gateway") == gateway_pid  # healed by supervisord + reconcile, gateway untouched
    # the killed Triton's stubs did not outlive it (they would hold its model and shared memory)
    assert set(stubs).isdisjoint(stub_parents(backends))
    assert orphaned_stubs(backends) == []


def test_store_down_keeps_detection_and_spools_feedback_across_a_gateway_kill(served: Served) -> None:
    from data_pipeline.store import ObjectStore

    env = served.env
    store = ObjectStore(
        env["CXR_S3_ENDPOINT"],
        env["CXR_S3_ACCESS_KEY"],
        env["CXR_S3_SECRET_KEY"],
        env["CXR_S3_BUCKET"],
        env["CXR_S3_REGION"],
    )
    served.supervisor.stop_process("s3")
    try:
        with served.client("radiologist") as client:
            detected = client.post(
                "/v1/detect",
                content=make_dicom(96, 80, seed=3),
                headers={"Content-Type": "application/dicom"},
            )
            assert detected.status_code == 200, detected.text  # detection does not need the store
            feedback = client.post(
                "/v1/feedback",
                json={
                    "request_id": detected.json()["request_id"],
                    "feedback_id": "fault-spool-1",
                    "new_boxes": [{"class_id": 10, "box": [10.0, 40.0, 60.0, 75.0]}],
                },
            )
            assert feedback.status_code in (200, 201, 202), feedback.text
            assert feedback.json()["status"] == "spooled"
            stored_id = feedback.json()["feedback_id"]  # made by the server; "fault-spool-1" only dedups
        gateway_pid = served.pid("gateway")
        os.kill(gateway_pid, signal.SIGKILL)
        _wait(
            "supervisord to restart the gateway",
            lambda: served.pid("gateway") != gateway_pid and _ready(served),
        )
    finally:
        served.supervisor.start_process("s3")
    _wait(
        "the restarted gateway to deliver the spooled feedback",
        lambda: any(stored_id in key for key in store.list_prefix("feedback/")),
        timeout=120,
    )


def test_mlflow_down_leaves_serving_alone_and_promote_fails_naming_it(served: Served) -> None:
    served.supervisor.stop_process("mlflow")
    try:
        with served.client() as client:
            resp = client.post(
                "/v1/detect",
                content=make_dicom(96, 80, seed=5),
                headers={"Content-Type": "application/dicom"},
            )
            assert resp.status_code == 200, resp.text
        result = served.run.cxr("promote", served.version, "--to", "staging", check=False, timeout=180)
        assert result.returncode != 0
        assert "mlflow" in (result.stdout + result.stderr).lower(), result.stdout + result.stderr
        assert "Traceback" not in result.stdout + result.stderr
    finally:
        served.supervisor.start_process("mlflow")
