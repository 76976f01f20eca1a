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
import warnings
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
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


Work = Callable[[ImageJob], ImageResult]
#: The error of an image whose worker process died (a codec's segfault, the kernel's OOM killer).
CRASHED = "decoder crashed (the worker process died)"


def run_images(
    jobs: list[ImageJob],
    workers: int,
    console: Console | None,
    *,
    executor: str = "process",
    description: str = "decode + export",
    work: Work = process_image,
) -> list[ImageResult]:
    """Run :func:`process_image` over ``jobs``; a rich progress bar when ``console`` is given.

    Every job gets a result: an exception, or a worker process that dies, makes that job's
    ``error`` (its image is quarantined), never the end of the run. ``work`` replaces
    :func:`process_image` (a module-level function: it is pickled to the workers).
    """
    if executor == "ray":
        return run_images_ray(jobs, workers, console, description, work)
    results: list[ImageResult] = []
    progress = progress_bar(console)
    if workers <= 1 or len(jobs) < 4:
        with progress:
            task = progress.add_task(description, total=len(jobs))
            for job in jobs:
                results.append(_run_one(work, job))
                progress.advance(task)
        return sorted(results, key=lambda r: r.image_id)
    with progress:
        task = progress.add_task(description, total=len(jobs))
        results = _run_pools(jobs, workers, work, lambda: progress.advance(task))
    return sorted(results, key=lambda r: r.image_id)


def _run_one(work: Work, job: ImageJob) -> ImageResult:
    try:
        return work(job)
    except Exception as exc:
        return _failed(job, exc)


def _failed(job: ImageJob, exc: BaseException) -> ImageResult:
    log.warning("event=image_failed image_id=%r error_type=%s", job.image_id[:64], type(exc).__name__)
    return ImageResult(image_id=job.image_id, error=f"{type(exc).__name__} while processing the image")


def _run_pools(
    jobs: list[ImageJob], workers: int, work: Work, advance: Callable[[], None]
) -> list[ImageResult]:
    """``jobs`` in a process pool; when a worker dies, the rest go on in a fresh one.

    A pool hands jobs out in order, so the job that killed a worker is among the first unfinished
    ones (those in flight: one running per worker, ``workers + 1`` queued). Those few are run again
    one at a time, where a crash names its job; the others go to a new pool of ``workers``.
    """
    results: list[ImageResult] = []
    queue = list(jobs)
    while queue:
        done, left = _pool_round(queue, workers, work, advance)
        results.extend(done)
        if not left:
            break
        log.warning("event=image_pool_broken unfinished=%d", len(left))
        in_flight = 2 * workers + 1
        results.extend(_isolate(left[:in_flight], work, advance))
        queue = left[in_flight:]
    return results


def _isolate(jobs: list[ImageJob], work: Work, advance: Callable[[], None]) -> list[ImageResult]:
    """Run ``jobs`` in one-worker pools: the first unfinished job of a broken one is the one that crashed."""
    results: list[ImageResult] = []
    while jobs:
        done, left = _pool_round(jobs, 1, work, advance)
        results.extend(done)
        if not left:
            break
        crashed, jobs = left[0], left[1:]
        log.warning("event=image_worker_crashed image_id=%r", crashed.image_id[:64])
        results.append(ImageResult(image_id=crashed.image_id, error=CRASHED))
        advance()
    return results


def _pool_round(
    jobs: list[ImageJob], workers: int, work: Work, advance: Callable[[], None]
) -> tuple[list[ImageResult], list[ImageJob]]:
    """One pool over ``jobs``: the results, and the jobs left unfinished (in order) if the pool broke."""
    results: dict[int, ImageResult] = {}
    with ProcessPoolExecutor(max_workers=workers, initializer=init_worker, mp_context=pool_context()) as pool:
        futures: dict[Future[ImageResult], int] = {}
        try:
            for i, job in enumerate(jobs):
                futures[pool.submit(work, job)] = i
        except BrokenProcessPool:
            pass  # a worker died while jobs were still handed out: the rest are left for the next pool
        for future in as_completed(futures):
            i = futures[future]
            try:
                results[i] = future.result()
            except BrokenProcessPool:
                break
            except Exception as exc:  # the work raised, or its result did not pickle
                results[i] = _failed(jobs[i], exc)
            advance()
    for future, i in futures.items():  # finished between the break and the pool's shutdown
        if i not in results and future.done() and not future.cancelled() and future.exception() is None:
            results[i] = future.result()
            advance()
    left = [job for i, job in enumerate(jobs) if i not in results]
    return list(results.values()), left


#: Jobs per Ray Data block: a worker that dies loses its block's results, which are then run again here.
RAY_BLOCK_JOBS = 16


def _ray_row(row: dict[str, Any], work: Work = process_image) -> dict[str, Any]:
    # ImageResult nests a dataclass and variable-length lists; a pickled blob keeps the
    # Arrow schema of the Ray dataset trivial (one binary column) and the round trip exact.
    init_worker()
    return {"image_id": row["image_id"], "result": pickle.dumps(_run_one(work, ImageJob(**row)))}


def run_images_ray(
    jobs: list[ImageJob],
    workers: int,
    console: Console | None,
    description: str = "decode + export (ray)",
    work: Work = process_image,
) -> list[ImageResult]:
    """The same work as Ray Data ``map``; starts a local Ray (``workers`` CPUs) unless one is running.

    A worker process that dies (a codec's segfault, the OOM killer) would be retried by Ray Data for
    ever (its tasks' default ``max_retries`` is -1: one hostile file hung the ingest). Its task is
    not retried here and its block is dropped (``max_errored_blocks``); the jobs of dropped blocks,
    at most :data:`RAY_BLOCK_JOBS` each, then run in this machine's process pools, which give the
    job that kills its worker :data:`CRASHED` and finish the others.
    """
    import ray
    from ray.data import DataContext

    if not ray.is_initialized():
        ray.init(num_cpus=workers or None, include_dashboard=False, log_to_driver=False)
    context = DataContext.get_current()
    errored_blocks, context.max_errored_blocks = context.max_errored_blocks, -1
    results: list[ImageResult] = []
    with progress_bar(console) as progress:
        task = progress.add_task(description, total=len(jobs))
        try:  # the context is the process's: put back whatever happens
            items = ray.data.from_items(
                [asdict(job) for job in jobs], override_num_blocks=max(1, -(-len(jobs) // RAY_BLOCK_JOBS))
            )
            with warnings.catch_warnings():
                # Ray 2.60 deprecates the free remote arguments without naming a way to pass max_retries
                warnings.simplefilter("ignore", DeprecationWarning)
                dataset = items.map(_ray_row, fn_kwargs={"work": work}, max_retries=0)
            for row in dataset.iter_rows():
                results.append(pickle.loads(row["result"]))
                progress.advance(task)
        finally:
            context.max_errored_blocks = errored_blocks
        done = {r.image_id for r in results}
        left = [job for job in jobs if job.image_id not in done]
        if left:
            log.warning("event=ray_blocks_failed jobs=%d", len(left))
            results.extend(_run_pools(left, max(workers, 1), work, lambda: progress.advance(task)))
    log.info("event=ray_images_done images=%d", len(results))
    return sorted(results, key=lambda r: r.image_id)
