"""Start a run's Ray workers before its dataset exists, so that their start overlaps the data steps.

Why: on two cores, starting Ray Train took 30 s of the first ``make up`` (from the train step's
start to the workers' train function: ``ray.init``; Train's controller, placement group and two
worker actors; the process group; the workers' imports of torch and ultralytics), all of it
after the dataset build, and none of it needs the dataset (docs/benchmarks.md, "The train step's
start beside the data steps"). So the local runner (``cxr pipeline run``,
:mod:`workflows.runner`) prelaunches the run as its first act: a thread of this process starts
Ray and fits a ``TorchTrainer`` whose workers, once started, wait at a
:class:`~training.ray_trainer.RunInputs` actor. The train step then hands them what only it
knows (dataset version, MLflow run, the recipe with its base weights, the progress queue:
:func:`~training.ray_trainer.run_loop_inputs`) and waits for the fit as
:func:`~training.ray_trainer.fit_distributed` would. A run that fails before its train step
cancels the workers (they end without training) and shuts its Ray down.

Only where Ray is local: on a cluster (``CXR_RAY_ADDRESS`` or ``RAY_ADDRESS``) the workers
would hold the cluster's GPUs idle for as long as the data steps take, and the cluster's steps
are pods of their own anyway (workflows/retrain.py).
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from training.config import TrainConfig, TrainSettings
from training.dataset import DatasetRef
from training.errors import DistributedTrainingError
from training.ray_trainer import (
    PROGRESS_QUEUE,
    RUN_CANCELLED,
    RUN_INPUTS,
    DistributedRun,
    RayStorage,
    RunInputs,
    distributed_run,
    epoch_progress,
    final_checkpoint,
    fit_failed,
    make_trainer,
    progress_queue,
    ray_init,
    ray_init_kwargs,
    run_loop_inputs,
)

log = logging.getLogger(__name__)

#: how long a cancel waits for the workers to read it and the fit to end before Ray is shut down
CANCEL_WAIT_S = 120.0


def make_run_name(config: TrainConfig) -> str:
    """Unique, sortable, and the same string for Ray and MLflow (here: a prelaunched run is named first)."""
    return f"{config.name}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{secrets.token_hex(2)}"


def prelaunch(
    config: TrainConfig, workers: int | None = None, *, settings: TrainSettings | None = None
) -> PrelaunchedFit | None:
    """Start the Ray workers of the run ``train_and_register`` will train, before its dataset exists.

    None where Ray is not local (see the module's docstring). Pass the result to
    :func:`training.run.train_and_register` with the same ``config`` and ``workers``, or cancel it.
    Light to call: this module does not import torch, ultralytics or mlflow; Ray is imported and
    started in the run's own thread.
    """
    settings = settings or TrainSettings()
    if not ray_is_local(settings):
        return None
    if workers is not None:
        config = config.with_workers(workers)
    return PrelaunchedFit(config, make_run_name(config), settings).start()


def ray_is_local(settings: TrainSettings, environ: Mapping[str, str] | None = None) -> bool:
    """True when training would start its own Ray here (no cluster address in the settings or env)."""
    env = os.environ if environ is None else environ
    kwargs = ray_init_kwargs(1.0, configured_address=settings.ray_address, environ=env, cpu_count=1)
    return "address" not in kwargs


class PrelaunchedFit:
    """One run's Ray Train fit, started in a thread of this process before its inputs exist.

    :meth:`run` gives the inputs and returns the finished fit; :meth:`cancel` ends it unused.
    Either shuts down the Ray this object started; both are safe to call after the other.
    """

    def __init__(self, config: TrainConfig, run_name: str, settings: TrainSettings) -> None:
        self.config = config
        self.run_name = run_name
        self.settings = settings
        self._ready = threading.Event()  # set once the inputs actor exists, or the launch failed
        self._fitted = threading.Event()  # set once the fit returned (trained, cancelled or failed)
        self._released = threading.Event()  # set by _close once Ray is shut down: the thread may end
        self._inputs: Any = None
        self._queue: Any = None
        self._storage: RayStorage | None = None
        self._result: Any = None
        self._error: BaseException | None = None
        self._started_ray = False
        self._closed = False
        self._lock = threading.Lock()  # _started_ray and _closed, between the thread and _close
        self._thread = threading.Thread(target=self._launch, name=f"prelaunch-{run_name}", daemon=True)

    def start(self) -> PrelaunchedFit:
        log.info("event=prelaunch_start run=%s workers=%d", self.run_name, self.config.scaling.num_workers)
        self._thread.start()
        return self

    def _launch(self) -> None:
        """The thread: start Ray, the inputs actor and the fit; the workers then wait for :meth:`run`.

        The thread outlives the fit until :meth:`_close` has shut Ray down: the processes
        ``ray.init`` starts ask Linux to kill them when their parent ends (``PR_SET_PDEATHSIG``),
        and that parent is the thread that started them, not the process. Ending with the fit
        left the driver's ``ray.shutdown`` talking to a dead GCS (a 5 s timeout, in the first
        ``make up``).
        """
        try:
            import ray

            scaling = self.config.scaling
            started = ray_init(self.settings, scaling.cpus_per_worker * scaling.num_workers)
            with self._lock:
                self._started_ray, closed = started, self._closed
            if closed:  # cancelled while Ray started: _close could not shut it down, so shut it here
                if started:
                    ray.shutdown()
                raise DistributedTrainingError(f"run {self.run_name} was cancelled while Ray started")
            self._inputs = ray.remote(num_cpus=0)(RunInputs).remote()
            self._queue = progress_queue()  # its process starts now too, not when the epochs begin
            trainer, self._storage = make_trainer(
                self.config,
                None,
                run_name=self.run_name,
                settings=self.settings,
                loop_extras={RUN_INPUTS: self._inputs},
            )
        except Exception as exc:  # reported by run(), which the train step calls
            self._error = exc
            self._ready.set()
            self._fitted.set()
            self._released.wait()
            return
        self._ready.set()
        try:
            self._result = trainer.fit()
        except Exception as exc:
            self._error = exc
        finally:
            self._fitted.set()
            self._released.wait()

    def _same_job(self, config: TrainConfig) -> None:
        """The train step's recipe may differ only in what the inputs carry (model, base version)."""
        fixed = ("scaling", "checkpoint", "epochs")
        changed = [f for f in fixed if getattr(config, f) != getattr(self.config, f)]
        if changed:
            raise DistributedTrainingError(
                f"run {self.run_name} was prelaunched with other {', '.join(changed)} than the train step "
                "asks for; rerun the pipeline (this is a bug of the caller, not of the recipe)"
            )

    def run(
        self,
        config: TrainConfig,
        dataset: DatasetRef,
        *,
        mlflow_run_id: str = "",
        base_weights: Path | None = None,
    ) -> DistributedRun:
        """Hand the waiting workers their inputs, show the epochs, and return the finished fit."""
        import ray

        if self._closed:
            raise DistributedTrainingError(f"run {self.run_name} was cancelled before its train step")
        try:
            self._same_job(config)
            self._ready.wait()
            if self._inputs is None:
                raise DistributedTrainingError(
                    f"Ray Train run {self.run_name} could not start: {self._error}"
                ) from self._error
            t0 = time.perf_counter()
            scaling = config.scaling
            with epoch_progress(self.run_name, config.epochs, scaling.num_workers, self._queue) as queue:
                inputs = run_loop_inputs(
                    config,
                    dataset,
                    run_name=self.run_name,
                    settings=self.settings,
                    mlflow_run_id=mlflow_run_id,
                    base_weights=base_weights,
                )
                ray.get(self._inputs.put.remote({**inputs, PROGRESS_QUEUE: queue}))
                log.info(
                    "event=ray_fit_start run=%s workers=%d global_batch=%d prelaunched=1",
                    self.run_name,
                    scaling.num_workers,
                    config.global_batch,
                )
                self._fitted.wait()
            if self._error is not None:
                raise fit_failed(self.run_name, config, self._error) from self._error
            assert self._storage is not None  # set before the fit started
            work_dir = (self.settings.work_dir / self.run_name).resolve()
            local = final_checkpoint(self._result, work_dir, self.run_name)
            seconds = time.perf_counter() - t0
            return distributed_run(
                self.run_name, local, self._storage, self._result, scaling.num_workers, seconds
            )
        finally:
            self._close()

    def cancel(self, reason: str) -> None:
        """End the run unused: the workers read ``reason`` and return, then this Ray is shut down."""
        if self._closed:
            return
        self._ready.wait(timeout=CANCEL_WAIT_S)
        if self._inputs is not None and not self._fitted.is_set():
            try:
                import ray

                ray.get(self._inputs.put.remote({RUN_CANCELLED: reason}), timeout=30)
            except Exception as exc:  # Ray already going: the shutdown below ends the workers too
                log.warning("event=prelaunch_cancel_unsent run=%s error=%s", self.run_name, exc)
            self._fitted.wait(timeout=CANCEL_WAIT_S)
        log.info("event=prelaunch_cancelled run=%s reason=%s", self.run_name, reason)
        self._close()

    def _close(self) -> None:
        """Shut down the Ray this run started, then let its thread end (see :meth:`_launch`)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            started = self._started_ray
        try:
            if started:
                import ray

                ray.shutdown()
        finally:
            self._released.set()
            if self._thread.ident is not None:
                self._thread.join(timeout=30)
