"""``pacs_roundtrip_vs_detect``: images per second of the PACS round trip over ``/v1/detect``'s, same run.

Three real servers on loopback: Orthanc (the PACS twin), our storage SCP
(``python -m serving.dimse``) and the gateway (ONNX Runtime backend, YOLO11n @640, the
model of ``serve_bench``), which sends SR + GSPS back to Orthanc by STOW-RS.

- **detect**: the study images POSTed to ``/v1/detect`` by ``CLIENTS`` concurrent clients;
  images / wall time.
- **round trip**: the same images (fresh UIDs, so nothing is deduplicated) uploaded to
  Orthanc beforehand, then Orthanc C-STOREs every study to our SCP in one job; timed
  from that request until Orthanc holds one SR and one GSPS per image of every study.
  Included: Orthanc's sending, the SCP's durable spool, the settle time
  (``CXR_STUDY_SETTLE_SECONDS``, 1 s here), STOW-RS to the gateway, inference, building the
  DICOM objects, the outbox and Orthanc storing them.

The two alternate ``ROUNDS`` times; each figure is the sum of images over the sum of time.
Run alone: ``python -m benchmarks.pacs_bench``; in ``make bench`` as the ``pacs`` suite.

``sr_document_vs_highdicom`` (also alone: ``python -m benchmarks.pacs_bench sr``): the study
SR of two phantoms built by ``serving.dicom.sr_document`` over the same built by
``highdicom.sr.ComprehensiveSR`` (the same file, see that module), alternated in one process,
with three boxes an image; and the milliseconds of one study's whole send-back bundle (SR and
two GSPS, built and written) with none and with three boxes an image.

``pacs_roundtrip_ceiling``: the ratio the CPU account allows if the gateway's round trip cost it
no more than ``/v1/detect`` does (its send-back free): ``/v1/detect``'s CPU an image over that plus
the SCP's and Orthanc's in the round trip. On these two shared cores the measured ratio follows the
CPU ratio, so a goal above this figure is out of reach unless the round trip costs the gateway less
than ``/v1/detect`` does (to about 0.01: the benchmark's own clients are not in the CPU account).

``python -m benchmarks.pacs_bench scp``: the storage SCP alone (no gateway, no forwarder) in a process
of its own, fed by a pynetdicom SCU: its CPU per received image (pynetdicom's protocol, the guarded
header read, the fsync'd spool), the same with the store handler doing nothing (pynetdicom alone),
and its CPU per second while an association is open and idle (pynetdicom's polling loops).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import secrets
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

log = logging.getLogger("cxr.bench.pacs")

REPO = Path(__file__).resolve().parents[1]
STUDIES = 40  # 80 images: the settle time and the last study's tail are amortised as in a day's traffic
IMAGES_PER_STUDY = 2
CLIENTS = 4
ROUNDS = 2
SETTLE_S = 1.0
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.33"
GSPS_CLASS = "1.2.840.10008.5.1.4.1.1.11.1"


class Proc:
    """A component started for the benchmark, with its log file; stopped by :meth:`stop`."""

    def __init__(self, component: Any, log_file: Path) -> None:
        from stack.components import wait_component

        self._log = log_file.open("wb")
        self.proc = subprocess.Popen(
            component.command,
            env={**os.environ, **component.env},
            cwd=REPO,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        wait_component(component, timeout=120, alive=lambda: self.proc.poll() is None, log_file=log_file)

    def stop(self) -> None:
        from benchmarks.serve_bench import stop_process

        stop_process(self.proc, self._log)


class CpuAccount:
    """CPU seconds each process spent over the phases measured with :meth:`measuring`."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.seconds = dict.fromkeys(pids, 0.0)

    @contextmanager
    def measuring(self) -> Iterator[None]:
        from benchmarks.serve_bench import process_cpu_s

        before = {name: process_cpu_s(pid) for name, pid in self.pids.items()}
        yield
        for name, pid in self.pids.items():
            self.seconds[name] += process_cpu_s(pid) - before[name]

    def per_item(self, items: float) -> dict[str, float]:
        """Milliseconds of CPU per item, per process."""
        return {name: round(1000 * s / items, 1) for name, s in self.seconds.items()} if items else {}


def phantoms(out: Path, n_images: int = STUDIES * IMAGES_PER_STUDY) -> list[bytes]:
    from data_pipeline.synth import SynthConfig, generate

    generate(SynthConfig(n_images=n_images, seed=19, size=1024, workers=1), out)
    return [p.read_bytes() for p in sorted((out / "dicom").glob("*.dicom"))]


def as_studies(images: list[bytes]) -> list[list[bytes]]:
    """The images grouped into studies with fresh Study/Series/SOP UIDs (a new round is new data)."""
    import pydicom
    from pydicom.uid import generate_uid

    studies = []
    for start in range(0, len(images), IMAGES_PER_STUDY):
        study, series = generate_uid(), generate_uid()
        group = []
        first = pydicom.dcmread(io.BytesIO(images[start]), stop_before_pixels=True)
        for data in images[start : start + IMAGES_PER_STUDY]:
            ds = pydicom.dcmread(io.BytesIO(data))
            ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
            for keyword in ("PatientID", "PatientName", "PatientBirthDate", "PatientSex"):
                if keyword in first:  # one patient's study: Orthanc files studies under patients
                    setattr(ds, keyword, getattr(first, keyword))
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            buf = io.BytesIO()
            ds.save_as(buf, enforce_file_format=True)
            group.append(buf.getvalue())
        studies.append(group)
    return studies


def detect_round(gateway: str, key: str, images: list[bytes]) -> tuple[int, float]:
    import httpx

    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/dicom"}
    with httpx.Client(timeout=120, trust_env=False, limits=httpx.Limits(max_connections=CLIENTS)) as client:

        def send(data: bytes) -> None:
            client.post(f"{gateway}/v1/detect", content=data, headers=headers).raise_for_status()

        start = time.perf_counter()
        with ThreadPoolExecutor(CLIENTS) as pool:
            list(pool.map(send, images))
        return len(images), time.perf_counter() - start


def roundtrip_round(
    orthanc: Any, images: list[bytes], cpu: CpuAccount | None = None, timeout_s: float = 240.0
) -> tuple[int, float]:
    """One round trip of ``images``; ``cpu`` accounts the timed part only (not the uploads before it)."""
    import pydicom

    studies = as_studies(images)
    uids = []
    for group in studies:
        for data in group:
            orthanc.upload(data)
        uids.append(str(pydicom.dcmread(io.BytesIO(group[0]), stop_before_pixels=True).StudyInstanceUID))
    ids = []
    for uid in uids:
        [orthanc_id] = orthanc.find("Study", {"StudyInstanceUID": uid})
        ids.append(orthanc_id)
    # one SR per study and one GSPS per image come back; counting Orthanc's instances is one
    # cheap call, where reading every study's tags while waiting would load the 2 cores it measures
    expected = orthanc.count_instances() + len(studies) + sum(len(g) for g in studies)
    with cpu.measuring() if cpu is not None else contextlib.nullcontext():
        start = time.perf_counter()
        orthanc.store_to_modality("cxr", ids)
        while orthanc.count_instances() < expected:
            if time.perf_counter() - start > timeout_s:
                raise RuntimeError(f"results not back in Orthanc after {timeout_s:.0f} s")
            time.sleep(0.05)
        elapsed = time.perf_counter() - start
    for group, uid in zip(studies, uids, strict=True):  # then, untimed: the right objects, per study
        held = orthanc.study_instances(uid)
        srs = sum(i.sop_class_uid == SR_CLASS for i in held)
        prs = sum(i.sop_class_uid == GSPS_CLASS for i in held)
        if srs != 1 or prs != len(group):
            raise RuntimeError(f"study {uid}: {srs} SR and {prs} GSPS back, expected 1 and {len(group)}")
    return sum(len(g) for g in studies), elapsed


def _study_response(source: Any, boxes: int) -> dict[str, Any]:
    """A detection response for ``source`` with ``boxes`` boxes of different findings."""
    detections = [
        {
            "class_id": i,
            "class_name": f"finding {i}",
            "confidence": 0.9,
            "box": [40.0 * i, 50.0, 40.0 * i + 90, 160.0],
        }
        for i in range(boxes)
    ]
    return {
        "model": {"name": "cxr-yolo", "version": "1", "variant": "fp32"},
        "image": {"sop_instance_uid": str(source.SOPInstanceUID)},
        "detections": detections,
    }


def sr_document_ratio(study: list[bytes], repeats: int = 15) -> dict[str, Any]:
    """Our SR document over highdicom's, and one study's send-back bundle in ms (see the module doc)."""
    import statistics

    import highdicom as hd

    from serving.dicom.sr import source_header, study_sr_arguments
    from serving.dicom.sr_document import comprehensive_sr
    from serving.dicom.study_objects import dataset_bytes, study_objects

    sources = [source_header(data) for data in study]

    def timed(build: Any, boxes: int) -> float:
        responses = [_study_response(s, boxes) for s in sources]
        start = time.perf_counter()
        build(responses)
        return time.perf_counter() - start

    def ours(responses: list[dict[str, Any]]) -> None:
        dataset_bytes(comprehensive_sr(**study_sr_arguments(sources, responses)))

    def theirs(responses: list[dict[str, Any]]) -> None:
        dataset_bytes(hd.sr.ComprehensiveSR(**study_sr_arguments(sources, responses)))

    def bundle(responses: list[dict[str, Any]]) -> None:
        triage = {"score": 0.5, "priority": False, "threshold": 0.6}
        for ds in study_objects(list(zip(sources, responses, strict=True)), triage):
            dataset_bytes(ds)

    for build in (ours, theirs, bundle):  # highdicom's tables and the imports, once
        timed(build, 1)
    ours_s, theirs_s, none_s, three_s = [], [], [], []
    for _ in range(repeats):
        ours_s.append(timed(ours, 3))
        theirs_s.append(timed(theirs, 3))
        none_s.append(timed(bundle, 0))
        three_s.append(timed(bundle, 3))
    return {
        "sr_document_vs_highdicom": round(statistics.median(ours_s) / statistics.median(theirs_s), 3),
        "send_back_bundle_ms": {
            "no_box": round(1000 * statistics.median(none_s), 1),
            "three_boxes_an_image": round(1000 * statistics.median(three_s), 1),
        },
    }


def run_pacs_benchmarks(workdir: Path | None = None) -> dict[str, Any]:
    if workdir is None:
        with tempfile.TemporaryDirectory(prefix="cxr-pacs-bench-") as tmp:
            return run_pacs_benchmarks(Path(tmp))
    from rich.console import Console

    from benchmarks.serve_bench import Server, _free_port, export_model, gateway_env
    from core.offline import apply_offline_env
    from stack.components import basic_auth, dimse_component
    from stack.orthanc import Modality, OrthancClient, orthanc_component, orthanc_missing

    missing = orthanc_missing()
    if missing is not None:
        return {"pacs_roundtrip_vs_detect": None, "pacs": {"skipped": missing}}
    console = Console(stderr=True)
    offline = apply_offline_env(workdir / "state")
    console.log("exporting YOLO11n @640 and rendering phantoms")
    model = export_model(workdir)
    images = phantoms(workdir / "phantoms")
    console.log("the study SR: ours against highdicom's constructor")
    documents = sr_document_ratio(as_studies(images)[0])
    password = secrets.token_urlsafe(16)
    http_port, dicom_port, scp_port = _free_port(), _free_port(), _free_port()
    orthanc_comp = orthanc_component(
        workdir / "orthanc",
        host="127.0.0.1",
        http_port=http_port,
        dicom_port=dicom_port,
        username="cxr",
        password=password,
        modalities={"cxr": Modality("CXR", "127.0.0.1", scp_port)},
    )
    assert orthanc_comp is not None
    orthanc_proc = Proc(orthanc_comp, workdir / "orthanc.log")
    dicomweb = f"http://127.0.0.1:{http_port}/dicom-web"
    destination = {
        "name": "orthanc",
        "kind": "stow",
        "url": dicomweb,
        "headers": {"Authorization": basic_auth("cxr", password)},
        "callers": ["*"],
    }
    env, key = gateway_env(workdir, model, offline)
    env["CXR_PACS_DESTINATIONS"] = json.dumps([destination])
    env["CXR_MAX_INFLIGHT_PER_STAGE"] = "64"
    procs: list[Any] = [orthanc_proc]
    try:
        console.log("starting the gateway and the storage SCP")
        gateway = Server("serving.gateway.app:create_app", env, "/readyz", workdir / "gateway.log")
        procs.append(gateway)
        scp_env = {
            **offline,
            "CXR_STACK_DIR": str(workdir / "scp"),
            "CXR_DIMSE_PORT": str(scp_port),
            "CXR_DIMSE_GATEWAY_URL": gateway.url,
            "CXR_DIMSE_API_KEY": key,
            "CXR_STUDY_SETTLE_SECONDS": str(SETTLE_S),
        }
        procs.append(
            Proc(
                dimse_component("127.0.0.1", scp_port, "CXR", Path(sys.executable), scp_env),
                workdir / "scp.log",
            )
        )
        orthanc = OrthancClient(f"http://127.0.0.1:{http_port}", "cxr", password)
        detect_round(gateway.url, key, images[:4])  # warm-up: model loaded, pools started
        detect_n = detect_s = trip_n = trip_s = 0.0
        pids = {"gateway": gateway.proc.pid, "scp": procs[-1].proc.pid, "orthanc": orthanc_proc.proc.pid}
        cpu = {"detect": CpuAccount(pids), "roundtrip": CpuAccount(pids)}
        for i in range(ROUNDS):
            console.log(f"round {i + 1}/{ROUNDS}: /v1/detect, then Orthanc -> SCP -> gateway -> Orthanc")
            with cpu["detect"].measuring():
                n, s = detect_round(gateway.url, key, images)
            detect_n, detect_s = detect_n + n, detect_s + s
            n, s = roundtrip_round(orthanc, images, cpu["roundtrip"])
            trip_n, trip_s = trip_n + n, trip_s + s
        orthanc.close()
    finally:
        for proc in reversed(procs):
            proc.stop()
    detect_rate, trip_rate = detect_n / detect_s, trip_n / trip_s
    cpu_ms = {"detect": cpu["detect"].per_item(detect_n), "roundtrip": cpu["roundtrip"].per_item(trip_n)}
    return {
        "pacs_roundtrip_vs_detect": round(trip_rate / detect_rate, 3),
        # the gateway's own CPU an image, /v1/detect over the round trip: the ratio's bound where the
        # PACS and the SCP have cores of their own (a cluster); here all three share two cores
        "pacs_gateway_cpu_vs_detect": round(cpu_ms["detect"]["gateway"] / cpu_ms["roundtrip"]["gateway"], 3),
        "pacs_roundtrip_ceiling": roundtrip_ceiling(cpu_ms),
        "sr_document_vs_highdicom": documents["sr_document_vs_highdicom"],
        "pacs": {
            "send_back_bundle_ms": documents["send_back_bundle_ms"],
            "images": len(images),
            "studies": STUDIES,
            "rounds": ROUNDS,
            "clients_detect": CLIENTS,
            "settle_s": SETTLE_S,
            "detect_img_s": round(detect_rate, 2),
            "roundtrip_img_s": round(trip_rate, 2),
            # each process's CPU (user + system) per image in each timed phase: where the round trip's
            # cost beyond /v1/detect goes (the detect phase's SCP and Orthanc figures are idle noise;
            # the round trip's leave out the untimed upload of the studies to Orthanc)
            "cpu_ms_per_image": cpu_ms,
            "image": "1024x1024 phantom DICOM (data_pipeline.synth)",
        },
    }


def roundtrip_ceiling(cpu_ms: dict[str, dict[str, float]]) -> float | None:
    """The ratio with the gateway's round trip as cheap as ``/v1/detect`` (module doc)."""
    detect = sum(cpu_ms["detect"].values())
    others = sum(ms for name, ms in cpu_ms["roundtrip"].items() if name != "gateway")
    bound = cpu_ms["detect"]["gateway"] + others
    return round(detect / bound, 3) if bound > 0 else None


def _scp_server(port: int, spool_dir: str, mode: str) -> None:
    """The SCP alone for :func:`scp_alone` (``scp-server PORT DIR MODE``); ``noop``: store nothing."""
    import threading

    from serving.dimse.scp import SUCCESS, ScpConfig, StorageScp
    from serving.dimse.service import configure_logging
    from serving.dimse.spool import InstanceSpool

    configure_logging()  # as `python -m serving.dimse` logs: a line per store costs CPU too
    scp = StorageScp(ScpConfig("CXR", "127.0.0.1", port), InstanceSpool(Path(spool_dir)))
    if mode == "noop":
        scp.handle_store = lambda event: SUCCESS  # type: ignore[method-assign]
    scp.start()
    print("ready", flush=True)
    threading.Event().wait()


def _await_ready(server: subprocess.Popen[bytes], timeout_s: float = 60.0) -> None:
    """Wait for the SCP child's "ready" line; raise (it is killed by the caller) if it never comes."""
    import select

    assert server.stdout is not None
    readable, _, _ = select.select([server.stdout], [], [], timeout_s)
    if not readable or server.stdout.readline().strip() != b"ready":  # its error, if any, is on stderr
        raise RuntimeError(f"the SCP did not start within {timeout_s:.0f} s (exit code {server.poll()})")


def _store(assoc: Any, path: Path) -> None:
    status = assoc.send_c_store(path)
    if not status or int(status.Status) != 0:
        raise RuntimeError(f"C-STORE refused: {status}")


def scp_alone(n_images: int = 40, repeats: int = 2, idle_s: float = 3.0) -> dict[str, Any]:
    """CPU of the SCP process per received image, and per second of an idle association (module doc).

    One untimed C-STORE first (the first store's imports and tables). The timed passes send the
    same instances again (the spool replaces them), and the SCP's idle polling between stores
    counts in the per-image figure, as in the round trip. ``scp_{mode}_spooled`` is the number of
    instances each spool holds at the end: every image for ``spool``, none for ``noop``.
    """
    import pydicom
    from pynetdicom import AE

    from benchmarks.serve_bench import _free_port, process_cpu_s

    logging.getLogger("pynetdicom").setLevel(logging.WARNING)  # a line per association and store
    found: dict[str, Any] = {"scp_images": n_images * repeats}
    with tempfile.TemporaryDirectory(prefix="cxr-scp-bench-") as tmp:
        images = phantoms(Path(tmp) / "phantoms", n_images)
        files = sorted((Path(tmp) / "phantoms" / "dicom").glob("*.dicom"))  # what phantoms() read
        pairs = set()
        for data in images:
            ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
            pairs.add((str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)))
        for mode in ("spool", "noop"):
            port = _free_port()
            spool = Path(tmp) / f"spool-{mode}"
            server = subprocess.Popen(
                [sys.executable, "-m", "benchmarks.pacs_bench", "scp-server", str(port), str(spool), mode],
                cwd=REPO,
                stdout=subprocess.PIPE,
                start_new_session=True,
            )
            assoc = None
            try:
                _await_ready(server)
                ae = AE("BENCH")
                for sop_class, syntax in sorted(pairs):  # a context per pair: the SCP accepts one syntax each
                    ae.add_requested_context(sop_class, [syntax])
                assoc = ae.associate("127.0.0.1", port, ae_title="CXR")
                if not assoc.is_established:
                    raise RuntimeError("the SCP refused the benchmark's association")
                _store(assoc, files[0])  # untimed: the first store's lazy work
                before = process_cpu_s(server.pid)
                for _ in range(repeats):
                    for f in files:
                        _store(assoc, f)
                received = process_cpu_s(server.pid)
                time.sleep(idle_s)
                idle = process_cpu_s(server.pid)
                assoc.release()
            finally:
                if assoc is not None and assoc.is_established:  # a failure mid-way: do not leave it open
                    assoc.abort()
                server.kill()
                server.wait()
            found[f"scp_{mode}_spooled"] = sum(1 for _ in spool.rglob("*.dcm"))
            per_image = (received - before) / (n_images * repeats)
            found[f"scp_{mode}_cpu_ms_per_image"] = round(1000 * per_image, 1)
            if mode == "spool":
                found["scp_idle_association_cpu_ms_per_s"] = round(1000 * (idle - received) / idle_s, 1)
    return found


def _sr_alone() -> dict[str, Any]:
    from data_pipeline.synth import SynthConfig, generate

    with tempfile.TemporaryDirectory(prefix="cxr-sr-bench-") as tmp:
        generate(SynthConfig(n_images=IMAGES_PER_STUDY, seed=19, size=1024, workers=1), Path(tmp))
        images = [p.read_bytes() for p in sorted((Path(tmp) / "dicom").glob("*.dicom"))]
    return sr_document_ratio(as_studies(images)[0])


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s level=%(levelname)s %(message)s")
    if sys.argv[1:2] == ["scp-server"]:
        _scp_server(int(sys.argv[2]), sys.argv[3], sys.argv[4])
    elif sys.argv[1:] == ["scp"]:
        print(json.dumps(scp_alone(), indent=2))
    else:
        print(json.dumps(_sr_alone() if sys.argv[1:] == ["sr"] else run_pacs_benchmarks(), indent=2))
