"""A real uvicorn gateway process: the hostile corpus never kills it or grows it past a bound,
and what it answered survives ``kill -9``.

One gateway process per module (in-process ONNX backend, the test model), started
like the stack starts it (``uvicorn --factory serving.gateway.app:create_app``).
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from data_pipeline import hostile
from stack.components import gateway_component
from tests.fixtures.servers import RunningProcess, free_port
from tests.unit.serving.serving_support import make_dicom, write_stage_files

pytestmark = pytest.mark.integration

#: the bound this suite holds the gateway's peak resident memory to (docs/security.md states it)
RSS_BOUND_BYTES = int(1.5 * 1024**3)


def peak_rss(pid: int) -> int:
    """VmHWM: the process's peak resident set since it started, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc status")


@pytest.fixture(scope="module")
def gateway(
    serving_model: Path, serving_keys: tuple[Path, dict[str, str]], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningProcess]:
    root = tmp_path_factory.mktemp("gateway-survives")
    write_stage_files(root / "gitops", production="1")
    port = free_port()
    env = {
        "CXR_BACKEND": "onnx",
        "CXR_ONNX_MODEL": str(serving_model),
        "CXR_API_KEYS_FILE": str(serving_keys[0]),
        "CXR_GITOPS_DIR": str(root / "gitops"),
        "CXR_STACK_DIR": str(root / "state"),
        "CXR_S3_ENDPOINT": f"http://127.0.0.1:{free_port()}",  # no store: the local journal must suffice
        "CXR_STORE_RESULTS": "false",
        "CXR_RATE_LIMIT_PER_S": "10000",
        "CXR_RATE_LIMIT_BURST": "10000",
    }
    process = RunningProcess(
        gateway_component("127.0.0.1", port, Path(sys.executable), env), root / "gateway.log"
    )
    process.start()
    yield process
    process.stop()


def _url(process: RunningProcess) -> str:
    return process.component.health_url.rsplit("/", 1)[0]  # type: ignore[union-attr]


def test_hostile_corpus_never_gets_a_5xx_kills_or_bloats_the_gateway(
    gateway: RunningProcess, serving_keys: tuple[Path, dict[str, str]]
) -> None:
    url, key = _url(gateway), serving_keys[1]["pacs"]
    cases = hostile.corpus(seed=11, mutations=40)
    h = {"Authorization": f"Bearer {key}", "Content-Type": "application/dicom"}

    def send(case: hostile.HostileCase) -> tuple[str, int]:
        with httpx.Client(timeout=60) as client:
            return case.name, client.post(f"{url}/v1/detect", content=case.data, headers=h).status_code

    with ThreadPoolExecutor(max_workers=8) as pool:  # 8 at once, as a busy PACS would
        statuses = dict(pool.map(send, cases))
    assert gateway.proc is not None and gateway.proc.poll() is None, "the gateway died"
    server_errors = {name: code for name, code in statuses.items() if code >= 500}
    assert not server_errors, server_errors
    assert httpx.get(f"{url}/healthz").status_code == 200
    valid = httpx.post(f"{url}/v1/detect", content=make_dicom(seed=5), headers=h, timeout=60)
    assert valid.status_code == 200
    assert peak_rss(gateway.proc.pid) < RSS_BOUND_BYTES, f"peak RSS {peak_rss(gateway.proc.pid) >> 20} MiB"


def test_a_result_answered_before_kill_9_is_served_after_restart(
    gateway: RunningProcess, serving_keys: tuple[Path, dict[str, str]]
) -> None:
    url, key = _url(gateway), serving_keys[1]["pacs"]
    h = {"Authorization": f"Bearer {key}"}
    r = httpx.post(
        f"{url}/v1/detect",
        content=make_dicom(seed=9),
        headers={**h, "Content-Type": "application/dicom"},
        timeout=60,
    )
    assert r.status_code == 200
    assert gateway.proc is not None
    os.killpg(gateway.proc.pid, signal.SIGKILL)  # no shutdown hook runs: only what was on disk survives
    gateway.proc.wait(timeout=10)
    gateway.start()
    rid = r.json()["request_id"]
    again = httpx.get(f"{url}/v1/results/{rid}", headers=h, timeout=30)
    assert again.status_code == 200 and again.json() == r.json()
    sr = httpx.get(f"{url}/v1/results/{rid}/sr", headers=h, timeout=30)
    assert sr.status_code == 200 and sr.headers["content-type"] == "application/dicom"
