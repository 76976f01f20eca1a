"""Where the per-image work of an ingest runs: a local process pool or Ray Data.

Both run the same pure function (:func:`data_pipeline.export.process_image`)
over the same jobs and return results sorted by image id, so the dataset
version does not depend on the executor. The process pool suits one machine;
Ray Data spreads a 15k-image VinDr ingest over a cluster's workers (the jobs'
``dest`` paths must then be on storage every worker sees).
"""

from __future__ import annotations

import logging
import multiprocessing
import pickle
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict
from multiprocessing.context import BaseContext
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from data_pipeline.export import ImageJob, ImageResult, init_worker, process_image

log = logging.getLogger(__name__)


def pool_context() -> BaseContext:
    """Start method for worker pools: ``forkserver`` with this package preloaded.

    Plain ``fork`` deadlocked when the parent had already imported a library
    that runs threads (Ray's gRPC, seen here: the pool never returned). The
    fork server is a clean single-threaded process, so its children are safe,
    and preloading our modules there keeps worker start-up at fork speed.
    """
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["data_pipeline.export", "data_pipeline.synth"])
    return context


def progress_bar(console: Console | None) -> Progress:
    """The pipeline's bar (description, bar, n/m, elapsed) on ``console``; off when it is None."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console or Console(stderr=True),
        disable=console is None,
    )


def run_images(
    jobs: list[ImageJob],
    workers: int,
    console: Console | None,
    *,
    executor: str = "process",
    description: str = "decode + export",
) -> list[ImageResult]:
    """Run :func:`process_image` over ``jobs``; a rich progress bar when ``console`` is given."""
    if executor == "ray":
        return run_images_ray(jobs, workers, console, description)
    results: list[ImageResult] = []
    progress = progress_bar(console)
    if workers <= 1 or len(jobs) < 4:
        with progress:
            task = progress.add_task(description, total=len(jobs))
            for job in jobs:
                results.append(process_image(job))
                progress.advance(task)
        return sorted(results, key=lambda r: r.image_id)
    # every job is submitted (so every worker forked) before the progress thread starts
    with ProcessPoolExecutor(max_workers=workers, initializer=init_worker, mp_context=pool_context()) as pool:
        futures = [pool.submit(process_image, job) for job in jobs]
        with progress:
            task = progress.add_task(description, total=len(jobs))
            for future in as_completed(futures):
                results.append(future.result())
                progress.advance(task)
    return sorted(results, key=lambda r: r.image_id)


def _ray_row(row: dict[str, Any]) -> dict[str, Any]:
    # ImageResult nests a dataclass and variable-length lists; a pickled blob keeps the
    # Arrow schema of the Ray dataset trivial (one binary column) and the round trip exact.
    init_worker()
    return {"image_id": row["image_id"], "result": pickle.dumps(process_image(ImageJob(**row)))}


def run_images_ray(
    jobs: list[ImageJob], workers: int, console: Console | None, description: str = "decode + export (ray)"
) -> list[ImageResult]:
    """The same work as Ray Data ``map``; starts a local Ray (``workers`` CPUs) unless one is running."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=workers or None, include_dashboard=False, log_to_driver=False)
    dataset = ray.data.from_items([asdict(job) for job in jobs]).map(_ray_row)
    results: list[ImageResult] = []
    with progress_bar(console) as progress:
        task = progress.add_task(description, total=len(jobs))
        for row in dataset.iter_rows():
            results.append(pickle.loads(row["result"]))
            progress.advance(task)
    log.info("event=ray_images_done images=%d", len(results))
    return sorted(results, key=lambda r: r.image_id)
