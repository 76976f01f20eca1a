"""The storage SCP process (``python -m serving.dimse``) ends within its grace when it is told to stop.

Its stoppers kill it soon after SIGTERM (``cxr stack down`` after 10 s, supervisord after 20 s, a
pod after its grace): a process that lingers is killed mid-work, and while it lingered it went on
acknowledging instances after it had logged ``dimse_scp_stopped``. Seen with the real process: a
modality holding its association open stored a second instance 40 s after the SIGTERM, and a
forward waiting on a slow gateway kept the process until the gateway answered (45 s).
"""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE

from tests.unit.serving.serving_support import make_dicom

pytestmark = pytest.mark.unit

DX = "1.2.840.10008.5.1.4.1.1.1.1"
STACK_DOWN_WAITS_S = 10  # stack/manager.py down(): then SIGKILL


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _HeldGateway(ThreadingHTTPServer):
    """A gateway that takes each request and answers only once released (a slow analysis)."""

    daemon_threads = True

    def __init__(self) -> None:
        self.received = threading.Event()
        self.release = threading.Event()
        gateway = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                gateway.received.set()
                gateway.release.wait(120)
                body = b"{}"
                self.send_response(200)
                self.send_header("Content-Type", "application/dicom+json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)


@pytest.fixture
def held_gateway() -> Iterator[_HeldGateway]:
    server = _HeldGateway()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.release.set()
    server.shutdown()
    server.server_close()


def test_the_scp_ends_within_its_grace_with_an_association_open_and_a_forward_in_flight(
    held_gateway: _HeldGateway, tmp_path: Path
) -> None:
    port = _free_port()
    env = dict(
        os.environ,
        CXR_STACK_DIR=str(tmp_path / "state"),
        CXR_DIMSE_PORT=str(port),
        CXR_DIMSE_GATEWAY_URL=f"http://127.0.0.1:{held_gateway.server_address[1]}",
        CXR_DIMSE_API_KEY="a-key",
    )
    log = tmp_path / "dimse.log"
    with log.open("wb") as out:
        scp = subprocess.Popen(
            [sys.executable, "-m", "serving.dimse"], env=env, stdout=out, stderr=subprocess.STDOUT
        )
    try:
        modality = AE(ae_title="MODALITY")
        modality.add_requested_context(DX)
        deadline = time.monotonic() + 30
        while True:
            assoc = modality.associate("127.0.0.1", port, ae_title="CXR")
            if assoc.is_established:
                break
            assert time.monotonic() < deadline and scp.poll() is None, log.read_text()
            time.sleep(0.1)
        status = assoc.send_c_store(pydicom.dcmread(io.BytesIO(make_dicom(seed=1))))
        assert status.Status == 0x0000
        assert held_gateway.received.wait(30), "the instance was never forwarded"
        # the modality keeps its association open; the gateway has not answered the forward yet

        stopped = time.monotonic()
        scp.send_signal(signal.SIGTERM)
        try:
            code = scp.wait(STACK_DOWN_WAITS_S)
        except subprocess.TimeoutExpired:
            late = time.monotonic() - stopped
            pytest.fail(f"the SCP still runs {late:.0f} s after SIGTERM\n{log.read_text()}")
        assert code == 0, log.read_text()
        assert not assoc.is_established, "the association outlived the SCP"
        assert "dimse_scp_stopped associations_aborted=1 forwards_cut=1" in log.read_text()
        # the cut forward's study waits in the spool for the next start
        assert len(list((tmp_path / "state" / "dimse" / "studies").glob("*/*.dcm"))) == 1
    finally:
        if scp.poll() is None:
            scp.kill()
            scp.wait()
