"""The gateway's one bounded pool of worker threads for blocking work.

Decoding, letterbox, NMS, multipart parsing, DICOM headers, SR rendering and
disk I/O all run here so the event loop only waits: numpy, OpenCV, pydicom's
decoders and ONNX Runtime release the GIL for their heavy parts, so threads
overlap on every core. Its threads are named ``cxr-cpu-*``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")


class CpuPool:
    def __init__(self, workers: int, *, name: str = "cxr-cpu") -> None:
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=name)

    async def run(self, fn: Callable[..., T], *args: object) -> T:
        """``fn(*args)`` in a worker thread; the caller's task waits without blocking the loop."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
