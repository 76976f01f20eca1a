"""``hostile_corpus``: the gateway under hostile DICOM traffic, beside valid traffic, in one run.

One gateway process (in-process ONNX backend, YOLO11n @256) is started as the
stack starts it. Valid 2048x2048 16-bit DICOMs are sent by 8 clients, in
windows alternating between "valid only" and "valid + 2 clients looping over
the hostile corpus" (``data_pipeline/hostile.py``), so both sides see the
same machine; the two hostile clients send one case each every 0.2 s (about
the valid clients' own rate: a flood is the rate limiter's job, not this
figure's). Reported: how many hostile requests were sent and how many ended
5xx or killed the gateway (goal 0), the gateway's peak RSS (VmHWM) after the
first valid-only window and over the whole run, and valid req/s with hostile
traffic divided by valid req/s without (goal >= 0.8).

Run alone with ``python -m benchmarks.run hostile``.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.serve_bench import Server, export_model, gateway_env, make_dicom_2048


def _memory_mib(pid: int, field: str = "VmHWM") -> float:
    """``VmHWM`` (peak resident set since start) or ``VmRSS`` (now) of a process, in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def _window(
    url: str,
    headers: dict[str, str],
    valid: bytes,
    hostile: list[bytes],
    seconds: float,
    clients: int = 8,
    pace_s: float = 0.2,
) -> dict[str, Any]:
    import httpx

    done, valid_errors, hostile_sent = 0, 0, 0
    hostile_status: dict[int, int] = {}
    deadline = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:

        async def good() -> None:
            nonlocal done, valid_errors
            while time.perf_counter() < deadline:
                r = await client.post(f"{url}/v1/detect", content=valid, headers=headers)
                if r.status_code == 200 and time.perf_counter() <= deadline:
                    done += 1
                elif r.status_code != 200:
                    valid_errors += 1

        async def bad(offset: int) -> None:
            nonlocal hostile_sent
            i = offset
            while time.perf_counter() < deadline:
                await asyncio.sleep(pace_s)  # paced, not a flood: a flood is what the rate limit is for
                try:
                    r = await client.post(
                        f"{url}/v1/detect", content=hostile[i % len(hostile)], headers=headers
                    )
                    code = r.status_code
                except httpx.HTTPError:
                    code = 599  # connection dropped: counted with the 5xx
                hostile_status[code] = hostile_status.get(code, 0) + 1
                hostile_sent += 1
                i += 1

        tasks = [good() for _ in range(clients)] + ([bad(0), bad(len(hostile) // 2)] if hostile else [])
        await asyncio.gather(*tasks)
    return {
        "rps": done / seconds,
        "valid_errors": valid_errors,
        "hostile": hostile_status,
        "sent": hostile_sent,
    }


def run_hostile_benchmarks(*, seconds: float = 8.0, rounds: int = 2) -> dict[str, Any]:
    """The ``hostile_corpus`` figures (see the module docstring)."""
    from rich.console import Console

    from core.offline import apply_offline_env
    from data_pipeline.hostile import corpus

    console = Console(stderr=True)
    with tempfile.TemporaryDirectory(prefix="cxr-hostile-bench-") as tmpdir:
        tmp = Path(tmpdir)
        offline = apply_offline_env(tmp / "state")
        model = export_model(tmp, imgsz=256)
        env, key = gateway_env(tmp, model, offline)
        cases = [c.data for c in corpus(seed=0)]
        valid = make_dicom_2048()
        headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/dicom"}
        console.log(
            f"hostile corpus: {len(cases)} cases; {rounds} x ({seconds:g} s clean + {seconds:g} s hostile)"
        )
        gateway = Server("serving.gateway.app:create_app", env, "/readyz", tmp / "gateway.log")
        idle = _memory_mib(gateway.proc.pid, "VmRSS")  # started and warmed up, nothing sent yet
        try:
            clean, mixed = [], []
            clean_peak = float("nan")
            for i in range(rounds):
                clean.append(asyncio.run(_window(gateway.url, headers, valid, [], seconds)))
                if i == 0:  # the high-water mark before any hostile byte arrived
                    clean_peak = _memory_mib(gateway.proc.pid)
                mixed.append(asyncio.run(_window(gateway.url, headers, valid, cases, seconds)))
            alive = gateway.proc.poll() is None
            peak = _memory_mib(gateway.proc.pid) if alive else float("nan")
        finally:
            gateway.stop()
    statuses: dict[int, int] = {}
    for window in mixed:
        for code, n in window["hostile"].items():
            statuses[code] = statuses.get(code, 0) + n
    clean_rps = sum(w["rps"] for w in clean) / rounds
    mixed_rps = sum(w["rps"] for w in mixed) / rounds
    figures = {
        "cases": len(cases),
        "requests_sent": sum(w["sent"] for w in mixed),
        "ended_5xx": sum(n for code, n in statuses.items() if code >= 500),
        "gateway_killed": not alive,
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "idle_rss_mib": round(idle, 1),
        "peak_rss_mib": round(peak, 1),
        "peak_rss_valid_only_mib": round(clean_peak, 1),
        "valid_rps_clean": round(clean_rps, 2),
        "valid_rps_with_hostile": round(mixed_rps, 2),
        "valid_throughput_ratio": round(mixed_rps / clean_rps, 3) if clean_rps else None,
        "valid_errors": sum(w["valid_errors"] for w in clean + mixed),
    }
    console.log(f"hostile_corpus: {figures}")
    return {"hostile_corpus": figures}
