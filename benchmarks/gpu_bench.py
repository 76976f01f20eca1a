"""``make bench-gpu``: the GPU figures of issue 20, one script, one JSON with the device name.

Written for the lent GPU machine as it is (one H100/H200 class GPU, 16 cores,
PyTorch with CUDA, no TensorRT / onnxruntime-gpu / Ray / tritonserver, nothing
fetchable): what it needs beyond that comes as wheels in ``--wheels DIR``
(ultralytics, ultralytics-thop, pydicom: pure Python) installed into a
throwaway folder. Three parts, each reported or skipped with a plain word:

1. the model alone: YOLO11n and YOLO11l at 1024 px (random weights from their
   yaml, fused, FP16, channels_last), batch 1 / 8 / 32, eager, CUDA graphs and
   ``torch.compile`` (batch 32 only: compiling is ~1 min a shape); TensorRT and
   ORT-CUDA where installed;
2. the serving path: 2048x2048 16-bit DICOMs decoded and letterboxed by the
   gateway's own code (``data_pipeline.dicom_io`` through the guarded reader,
   ``data_pipeline.geometry``) in a process pool on every core, batches of 32
   run by YOLO11n on the GPU; end-to-end images/s beside the model-only rate;
3. a training step on CUDA: ultralytics' DetectionModel and its loss under
   DDP with an NCCL process group of one rank, two epochs of synthetic
   batches. This is the step ``training/ray_trainer.py`` runs per worker, not
   that function itself (it needs Ray, which the machine lacks).

``--dry-run`` (run by ``make test`` on CPU) checks the imports, builds every
part's plan and writes the JSON without timing anything.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

MODELS = ("yolo11n", "yolo11l")
IMGSZ = 1024
BATCHES = (1, 8, 32)
COMPILE_BATCH = 32
SERVING_IMGSZ = 1024
SERVING_BATCH = 32


def install_wheels(folder: Path) -> Path | None:
    """pip-install the given wheels (no index, no deps) into a temp folder put first on sys.path."""
    wheels = sorted(folder.glob("*.whl")) if folder.exists() else []
    if not wheels:
        return None
    target = Path(tempfile.mkdtemp(prefix="cxr-gpu-wheels-"))
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target", str(target)]
    subprocess.run([*cmd, *map(str, wheels)], check=True)
    sys.path.insert(0, str(target))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(target), os.environ.get("PYTHONPATH")]))
    return target


def environment() -> dict[str, Any]:
    """What the machine has: versions, device, and each optional package (present or the word why not)."""
    info: dict[str, Any] = {"python": sys.version.split()[0], "cores": os.cpu_count()}
    for name in ("torch", "numpy", "cv2", "ultralytics", "pydicom", "tensorrt", "onnxruntime", "ray"):
        try:
            module = importlib.import_module(name)
            info[name] = str(getattr(module, "__version__", "present"))
        except Exception as exc:  # any import failure is "not usable here"
            info[name] = f"missing ({type(exc).__name__})"
    try:
        import torch

        info["cuda"] = bool(torch.cuda.is_available())
        info["device"] = torch.cuda.get_device_name(0) if info["cuda"] else "cpu"
        info["torch_cuda"] = str(torch.version.cuda)
    except Exception:
        info["cuda"], info["device"] = False, "no torch"
    return info


def _rate(run: Callable[[], Any], batch: int, budget_s: float = 1.5, warmup: int = 3) -> float:
    """Images/s of ``run`` (one batch per call), synchronised, over about ``budget_s``."""
    import torch

    for _ in range(warmup):
        run()
    torch.cuda.synchronize()
    start, n = time.perf_counter(), 0
    while time.perf_counter() - start < budget_s or n < 5:
        run()
        n += 1
    torch.cuda.synchronize()
    return round(batch * n / (time.perf_counter() - start), 1)


def build_model(name: str) -> Any:
    """YOLO11 from its yaml (random weights), 14 classes, fused, FP16, channels_last, on the GPU."""
    import torch
    from ultralytics.nn.tasks import DetectionModel

    model = DetectionModel(f"{name}.yaml", nc=14, verbose=False).fuse(verbose=False)
    return model.half().cuda().eval().to(memory_format=torch.channels_last)


def _graphed(model: Any, x: Any) -> Callable[[], Any]:
    """A CUDA graph of one forward at this shape: launch overhead gone (batch 1 is launch-bound)."""
    import torch

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.inference_mode():
        for _ in range(3):
            model(x)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.inference_mode():
        model(x)
    return graph.replay


def model_only(plan_only: bool = False) -> list[dict[str, Any]]:
    """Rows of (model, batch, mode, img/s)."""
    rows: list[dict[str, Any]] = []
    plan = [(m, b, mode) for m in MODELS for b in BATCHES for mode in ("eager", "cuda_graphs")]
    plan += [(m, COMPILE_BATCH, "torch_compile") for m in MODELS]
    if plan_only:
        return [{"model": m, "imgsz": IMGSZ, "batch": b, "mode": mode} for m, b, mode in plan]
    import torch

    for name in MODELS:
        model = build_model(name)
        for batch in BATCHES:
            x = torch.rand(batch, 3, IMGSZ, IMGSZ, device="cuda").half().to(memory_format=torch.channels_last)

            def eager(x: Any = x, m: Any = model) -> Any:
                with torch.inference_mode():
                    return m(x)

            rows.append(
                {"model": name, "imgsz": IMGSZ, "batch": batch, "mode": "eager", "img_s": _rate(eager, batch)}
            )
            replay = _graphed(model, x)
            rows.append(
                {
                    "model": name,
                    "imgsz": IMGSZ,
                    "batch": batch,
                    "mode": "cuda_graphs",
                    "img_s": _rate(replay, batch),
                }
            )
        x = (
            torch.rand(COMPILE_BATCH, 3, IMGSZ, IMGSZ, device="cuda")
            .half()
            .to(memory_format=torch.channels_last)
        )
        start = time.perf_counter()
        compiled = torch.compile(model)
        with torch.inference_mode():
            compiled(x)
        torch.cuda.synchronize()
        compile_s = round(time.perf_counter() - start, 1)

        def run_compiled(x: Any = x, m: Any = compiled) -> Any:
            with torch.inference_mode():
                return m(x)

        rows.append(
            {
                "model": name,
                "imgsz": IMGSZ,
                "batch": COMPILE_BATCH,
                "mode": "torch_compile",
                "img_s": _rate(run_compiled, COMPILE_BATCH),
                "compile_s": compile_s,
            }
        )
        del model, compiled
        torch.cuda.empty_cache()
    return rows


def optional_backends(env: dict[str, Any]) -> dict[str, str]:
    """TensorRT and ORT-CUDA: measured only where the cluster image has them; here a plain word."""
    out = {}
    out["tensorrt_fp16_int8"] = (
        "skipped: tensorrt is not installed on this machine"
        if "missing" in str(env.get("tensorrt"))
        else "present but not measured by this script yet"
    )
    try:
        import onnxruntime

        providers = onnxruntime.get_available_providers()
        out["ort_cuda"] = (
            "present but not measured by this script yet"
            if "CUDAExecutionProvider" in providers
            else f"skipped: onnxruntime has no CUDA provider here ({', '.join(providers)})"
        )
    except Exception:
        out["ort_cuda"] = "skipped: onnxruntime is not installed"
    return out


# ------------------------------------------------------------------------------ serving path


def make_dicom_2048(seed: int = 0) -> bytes:
    """A 2048x2048 16-bit DX (native pixels), written without pydicom (data_pipeline.hostile's writer)."""
    import numpy as np

    from data_pipeline import hostile

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:2048, 0:2048].astype(np.float32)
    img = 30000 + 8000 * np.sin(xx / 650) + rng.normal(0, 900, (2048, 2048))
    img[((xx - 700) / 300) ** 2 + ((yy - 1000) / 620) ** 2 < 1] -= 15000
    pixels = hostile.element(0x7FE0, 0x0010, b"OW", np.clip(img, 0, 65535).astype(np.uint16).tobytes())
    return hostile.file_meta(hostile.EXPLICIT_LE) + hostile.header(2048, 2048) + pixels


_UPLOAD: bytes = b""


def _worker_init(upload: bytes) -> None:
    """One decode thread per process (16 processes x cv2's own 16 threads would oversubscribe the cores)."""
    global _UPLOAD
    import cv2

    cv2.setNumThreads(1)
    _UPLOAD = upload


def _decode_upload(_: int) -> Any:
    return decode_and_letterbox(_UPLOAD)


def decode_and_letterbox(data: bytes) -> Any:
    """The gateway's CPU part for one upload: guarded decode, VOI, shrink, letterbox (uint8 plane)."""
    from data_pipeline.dicom_guard import DicomLimits
    from data_pipeline.dicom_io import decode_bytes
    from data_pipeline.geometry import letterbox, resize_longest

    image = decode_bytes(data, salt="bench", limits=DicomLimits())
    gray = resize_longest(image.to_uint8(), SERVING_IMGSZ)
    boxed, _ = letterbox(gray, SERVING_IMGSZ, pad_value=114)
    return boxed


def serving_path(model_rate: float, images: int = 512, plan_only: bool = False) -> dict[str, Any]:
    """End-to-end img/s: decode in a process pool on every core, batches of 32 to YOLO11n FP16 on the GPU."""
    workers = os.cpu_count() or 1
    if plan_only:
        return {
            "images": images,
            "workers": workers,
            "batch": SERVING_BATCH,
            "model": "yolo11n",
            "imgsz": SERVING_IMGSZ,
        }
    import numpy as np
    import torch

    data = make_dicom_2048()
    model = build_model("yolo11n")
    pinned = torch.empty(SERVING_BATCH, SERVING_IMGSZ, SERVING_IMGSZ, dtype=torch.uint8).pin_memory()
    start = time.perf_counter()
    done = 0
    decode_only = time.perf_counter()
    # spawn: the parent holds a CUDA context, which forked children must not inherit
    # the upload is handed to each worker once (an HTTP body arrives in its worker anyway): the
    # figure is decode + letterbox, not 8 MiB of pickling per image
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_worker_init, initargs=(data,)) as pool:
        list(pool.map(_decode_upload, range(workers * 4)))  # warm the workers (imports, first decode)
        decode_only = time.perf_counter()
        planes = list(pool.map(_decode_upload, range(workers * 16)))
        decode_rate = len(planes) / (time.perf_counter() - decode_only)
        start = time.perf_counter()
        batch: list[Any] = []
        for boxed in pool.map(_decode_upload, range(images)):
            batch.append(boxed)
            if len(batch) == SERVING_BATCH:
                pinned.copy_(torch.from_numpy(np.stack(batch)))
                x = pinned.cuda(non_blocking=True).half().div_(255).unsqueeze(1).expand(-1, 3, -1, -1)
                with torch.inference_mode():
                    model(x.contiguous(memory_format=torch.channels_last))
                done += len(batch)
                batch.clear()
        torch.cuda.synchronize()
    e2e = done / (time.perf_counter() - start)
    return {
        "images": done,
        "workers": workers,
        "batch": SERVING_BATCH,
        "model": "yolo11n",
        "imgsz": SERVING_IMGSZ,
        "decode_letterbox_img_s": round(decode_rate, 1),
        "end_to_end_img_s": round(e2e, 1),
        "model_only_img_s": model_rate,
        "end_to_end_vs_model_only": round(e2e / model_rate, 3) if model_rate else None,
    }


# ------------------------------------------------------------------------------ training step


def training_step(
    epochs: int = 2, steps: int = 20, batch: int = 16, imgsz: int = 640, plan_only: bool = False
) -> dict[str, Any]:
    """Two epochs of YOLO11n's loss step under DDP (NCCL, one rank) on synthetic batches."""
    plan = {"model": "yolo11n", "epochs": epochs, "steps_per_epoch": steps, "batch": batch, "imgsz": imgsz}
    if plan_only:
        return {**plan, "backend": "nccl", "world_size": 1}
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel
    from ultralytics.nn.tasks import DetectionModel
    from ultralytics.utils import DEFAULT_CFG

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29531")
    dist.init_process_group("nccl", rank=0, world_size=1)
    try:
        model = DetectionModel("yolo11n.yaml", nc=14, verbose=False).cuda().train()
        model.args = DEFAULT_CFG  # type: ignore[assignment]  # the loss reads its box/cls/dfl gains there
        criterion = model.init_criterion()
        ddp = DistributedDataParallel(model, device_ids=[0])
        opt = torch.optim.SGD(ddp.parameters(), lr=0.01, momentum=0.9)
        scaler = torch.amp.GradScaler("cuda")
        gen = torch.Generator(device="cuda").manual_seed(0)
        epoch_s = []
        for _ in range(epochs):
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(steps):
                imgs = torch.rand(batch, 3, imgsz, imgsz, device="cuda", generator=gen)
                n = batch * 3
                targets = {
                    "batch_idx": torch.arange(batch, device="cuda").repeat_interleave(3).float(),
                    "cls": torch.randint(0, 14, (n, 1), device="cuda", generator=gen).float(),
                    "bboxes": torch.rand(n, 4, device="cuda", generator=gen) * 0.4 + 0.2,
                }
                with torch.autocast("cuda", dtype=torch.float16):
                    preds = ddp(imgs)
                loss, _ = criterion(preds, targets)
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss.sum()).backward()
                scaler.step(opt)
                scaler.update()
            torch.cuda.synchronize()
            epoch_s.append(time.perf_counter() - start)
    finally:
        dist.destroy_process_group()
    return {
        **plan,
        "backend": "nccl",
        "world_size": 1,
        "epoch_s": [round(s, 2) for s in epoch_s],
        "img_s_last_epoch": round(batch * steps / epoch_s[-1], 1),
    }


# ------------------------------------------------------------------------------ main


#: ultralytics' settings folder when the caller names none; removed when the process exits
_SCRATCH: list[tempfile.TemporaryDirectory[str]] = []


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results-gpu.json"))
    parser.add_argument("--wheels", type=Path, default=None, help="folder of extra wheels to install first")
    parser.add_argument(
        "--dry-run", action="store_true", help="check imports and plans only (CPU, make test)"
    )
    args = parser.parse_args(argv)
    if args.wheels is not None:
        install_wheels(args.wheels)
    os.environ.setdefault("YOLO_OFFLINE", "1")  # closed network: ultralytics must not look anything up
    if "YOLO_CONFIG_DIR" not in os.environ:  # setdefault(..., mkdtemp()) left an empty folder per call
        _SCRATCH.append(tempfile.TemporaryDirectory(prefix="cxr-yolo-"))
        os.environ["YOLO_CONFIG_DIR"] = _SCRATCH[-1].name
    env = environment()
    plan_only = args.dry_run or not env.get("cuda")
    results: dict[str, Any] = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "dry_run": plan_only,
        "environment": env,
        "device": env.get("device"),
    }
    if not plan_only and "missing" in str(env.get("ultralytics")):
        results["error"] = "ultralytics is not importable: pass --wheels with its wheel"
        plan_only = True
    parts: list[tuple[str, Callable[[], Any]]] = [
        ("model_only", lambda: model_only(plan_only)),
        ("optional_backends", lambda: optional_backends(env)),
    ]
    for name, run in parts:
        print(f"gpu-bench: {name}", flush=True)
        results[name] = run()
    n32 = [
        r for r in results["model_only"] if r.get("model") == "yolo11n" and r.get("batch") == SERVING_BATCH
    ]
    best = max((r.get("img_s", 0.0) for r in n32), default=0.0)
    for name, run in (
        ("serving_path", lambda: serving_path(best, plan_only=plan_only)),
        ("training_step", lambda: training_step(plan_only=plan_only)),
    ):
        print(f"gpu-bench: {name}", flush=True)
        try:
            results[name] = run()
        except Exception as exc:  # one part failing still leaves the others' figures
            results[name] = {"error": f"{type(exc).__name__}: {exc}"}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
