"""Ray Train launcher: N data-parallel ultralytics ranks, checkpoints in S3, resume after failures.

The driver only builds a ``TorchTrainer``; each worker runs
:func:`train_loop_per_worker`, which hands one rank of the process group to
ultralytics' own trainer (see :mod:`training.ultralytics_ddp` for why the
trainer and not a hand-written loop). Each epoch every rank reports its
metrics to Ray; every ``checkpoint.every_epochs`` epochs and at the last (or an
early stop) the report carries a checkpoint: rank 0's ultralytics
``last.pt``/``best.pt`` (weights, EMA, optimizer, epoch) and the metrics CSV,
every rank's audit file naming the images it trained on and the hash of its
parameters. Ray merges them into one checkpoint directory in the object store;
after a worker dies, Ray restarts the group (``FailureConfig``) and each rank
resumes from the latest checkpoint through ultralytics' own ``resume``,
redoing (and reporting again) the epochs since.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from queue import SimpleQueue
from typing import Any

from core.progress import BarHandle, FieldValue, reporting
from training.config import CheckpointConfig, TrainConfig, TrainSettings
from training.dataset import DatasetRef
from training.errors import DistributedTrainingError
from training.ray_worker_setup import quiet_local_ray_workers

log = logging.getLogger(__name__)

STATE_FILE = "state.json"
AUDIT_PATTERN = "rank_{rank}.json"
PROGRESS_QUEUE = "progress_queue"  # the train loop's config key of the driver's epoch queue
#: the train loop's config key of a prelaunched run's inputs (training/prelaunch.py): the workers
#: start, import and join the process group, then wait there for the rest of their config
RUN_INPUTS = "run_inputs"
#: what the driver sends instead of inputs when the run it prelaunched will not train after all
RUN_CANCELLED = "cancelled"
#: how long rank 0's last epochs may take to reach MLflow after training (see :class:`EpochLog`)
EPOCH_LOG_FLUSH_S = 60.0
# the numbers of an epoch worth a progress line (Ray metric name -> field of the train_epoch event)
EPOCH_FIELDS = {
    "train/box_loss": "box_loss",
    "train/cls_loss": "cls_loss",
    "train/dfl_loss": "dfl_loss",
    "val/mAP50": "map50",
    "val/mAP50-95": "map50_95",
    "epoch_seconds": "epoch_s",
}


@dataclass(frozen=True)
class DistributedRun:
    """What the driver gets back: the final checkpoint on local disk and its summary."""

    run_name: str
    checkpoint_dir: Path
    checkpoint_uri: str
    epochs_completed: int
    world_size: int
    metrics: dict[str, float]
    seconds: float

    @property
    def best_weights(self) -> Path:
        best = self.checkpoint_dir / "best.pt"
        return best if best.exists() else self.checkpoint_dir / "last.pt"

    @property
    def results_csv(self) -> Path:
        return self.checkpoint_dir / "results.csv"

    def audits(self) -> list[dict[str, Any]]:
        """Per-rank audit records of the final epoch (images seen, parameter hash)."""
        return [json.loads(p.read_text()) for p in sorted(self.checkpoint_dir.glob("rank_*.json"))]


def metric_name(key: str) -> str:
    """Ultralytics' metric keys to MLflow-safe names: ``metrics/mAP50(B)`` -> ``val/mAP50``."""
    return key.replace("metrics/", "val/").replace("(B)", "").replace(" ", "_")


def s3_filesystem(settings: TrainSettings) -> Any:
    """A pyarrow S3 filesystem on the project's store (SeaweedFS locally, MinIO in the cluster)."""
    from pyarrow import fs

    endpoint = settings.s3_endpoint
    scheme = "https" if endpoint.startswith("https://") else "http"
    host = endpoint.split("://", 1)[-1].rstrip("/")
    access, secret = settings.s3_keys()
    return fs.S3FileSystem(
        access_key=access or None,
        secret_key=secret or None,
        endpoint_override=host,
        scheme=scheme,
        region=settings.s3_region,
        allow_bucket_creation=False,
    )


# --------------------------------------------------------------------------- worker side


def _restore_from_checkpoint(checkpoint: Any, save_dir: Path) -> tuple[Path | None, dict[str, Any]]:
    """Copy the latest checkpoint's weights and CSV into this rank's run folder; return last.pt and state."""
    with checkpoint.as_directory() as ckpt_dir:
        ckpt = Path(ckpt_dir)
        state_file = ckpt / STATE_FILE
        state = json.loads(state_file.read_text()) if state_file.exists() else {}
        if not (ckpt / "last.pt").exists():
            return None, state
        weights = save_dir / "weights"
        weights.mkdir(parents=True, exist_ok=True)
        for name in ("last.pt", "best.pt"):
            if (ckpt / name).exists():
                shutil.copyfile(ckpt / name, weights / name)
        if (ckpt / "results.csv").exists():
            shutil.copyfile(ckpt / "results.csv", save_dir / "results.csv")
    return weights / "last.pt", state


def _epoch_metrics(trainer: Any, resumed_from: int, world_size: int) -> dict[str, float]:
    metrics: dict[str, float] = {"epoch": float(trainer.epoch + 1), "resumed_from_epoch": float(resumed_from)}
    if trainer.tloss is not None:
        metrics.update({metric_name(k): float(v) for k, v in trainer.label_loss_items(trainer.tloss).items()})
    for key, value in (trainer.metrics or {}).items():
        metrics[metric_name(key)] = float(value)
    for key, value in (getattr(trainer, "lr", None) or {}).items():
        metrics[metric_name(key)] = float(value)
    if trainer.fitness is not None:
        metrics["fitness"] = float(trainer.fitness)
    metrics["epoch_seconds"] = float(trainer.epoch_time or 0.0)
    metrics["world_size"] = float(world_size)
    return metrics


def _log_epoch_to_mlflow(
    uri: str, run_id: str, metrics: dict[str, float], step: int, timestamp_ms: int | None = None
) -> None:
    """Per-epoch metrics from rank 0 into the driver's run; an MLflow outage must not stop training."""
    if not run_id:
        return
    try:
        from mlflow.entities import Metric
        from mlflow.tracking import MlflowClient

        now = int(time.time() * 1000) if timestamp_ms is None else timestamp_ms
        MlflowClient(tracking_uri=uri).log_batch(
            run_id, metrics=[Metric(k, v, now, step) for k, v in metrics.items()]
        )
    except Exception as exc:  # tracking is best effort while the weights keep going to S3
        log.warning("event=mlflow_epoch_log_failed run_id=%s error=%s", run_id, exc)


class EpochLog:
    """Rank 0's per-epoch metrics into the driver's MLflow run, sent by a thread of their own.

    Sent from the epoch callback itself, an MLflow that was down held every epoch for minutes:
    the client retries a refused connection 7 times, backing off (over 4 minutes per epoch,
    measured against a closed port), and the other ranks wait for rank 0 at the next report or
    all-reduce, so the whole group stalled. The thread sends the epochs in order, each stamped
    with the time its epoch ended; :meth:`close` waits a bounded time for the last ones.
    """

    def __init__(self, uri: str, run_id: str) -> None:
        self._uri, self._run_id = uri, run_id
        self._pending: SimpleQueue[tuple[dict[str, float], int, int] | None] = SimpleQueue()
        self._thread: threading.Thread | None = None

    def post(self, metrics: Mapping[str, float], step: int) -> None:
        """Queue one epoch's metrics; never waits on MLflow."""
        if not self._run_id:
            return
        if self._thread is None:
            self._thread = threading.Thread(target=self._send_all, name="mlflow-epochs", daemon=True)
            self._thread.start()
        self._pending.put((dict(metrics), step, int(time.time() * 1000)))

    def _send_all(self) -> None:
        while (item := self._pending.get()) is not None:
            metrics, step, stamp = item
            _log_epoch_to_mlflow(self._uri, self._run_id, metrics, step, stamp)

    def close(self, timeout: float) -> bool:
        """Send what is queued, waiting at most ``timeout`` seconds; False: epochs left unsent."""
        if self._thread is None:
            return True
        self._pending.put(None)
        self._thread.join(timeout)
        if self._thread.is_alive():  # MLflow still down: the run's weights and Ray's metrics have them
            log.warning(
                "event=mlflow_epoch_log_unsent run_id=%s pending=%d", self._run_id, self._pending.qsize()
            )
            return False
        return True


def epoch_message(epoch: int, epochs: int, metrics: Mapping[str, float]) -> dict[str, Any]:
    """What rank 0 sends the driver at the end of an epoch: its number and the few numbers shown."""
    numbers = {name: float(metrics[key]) for key, name in EPOCH_FIELDS.items() if key in metrics}
    # an epoch without validation (``val_every_epoch: false``) reports zeros for every val/ number:
    # showing "map50=0" would read as a model that finds nothing, so leave them out
    if not any(float(v) for k, v in metrics.items() if k.startswith("val/")):
        numbers.pop("map50", None)
        numbers.pop("map50_95", None)
    return {"epoch": epoch, "epochs": epochs, "metrics": numbers}


def _post_epoch(queue: Any, message: dict[str, Any]) -> None:
    """Hand one epoch to the driver's progress bar; a lost update must never stop training."""
    if queue is None:
        return
    try:
        queue.put_nowait(message)
    except Exception as exc:  # the queue actor gone (driver interrupted) or full: the epoch goes on
        log.warning("event=epoch_progress_lost epoch=%s error=%s", message.get("epoch"), exc)


def show_epoch(bar: BarHandle, message: Mapping[str, Any]) -> None:
    """One epoch on the driver's bar: ``loss`` (the sum of the three) and validation mAP beside it."""
    numbers: dict[str, float] = dict(message.get("metrics") or {})
    losses = [numbers[k] for k in ("box_loss", "cls_loss", "dfl_loss") if k in numbers]
    fields: dict[str, FieldValue] = {"epoch": int(message["epoch"]), "epochs": bar.total}
    if losses:
        fields["loss"] = sum(losses)
    fields.update(numbers)
    shown = [f"loss {fields['loss']:.4g}"] if losses else []
    shown += [
        f"{label} {numbers[k]:.3f}"
        for k, label in (("map50", "mAP50"), ("map50_95", "mAP50-95"))
        if k in numbers
    ]
    bar.update(int(message["epoch"]), "  ".join(shown), **fields)


def feed_bar(
    take: Callable[[float], Mapping[str, Any] | None],
    bar: BarHandle,
    stop: threading.Event,
) -> None:
    """Move ``bar`` with each epoch ``take`` returns (``None``: none within the timeout) until ``stop``."""
    while not stop.is_set():
        message = take(0.5)
        if message is not None:
            show_epoch(bar, message)
    while (message := take(0.0)) is not None:  # the epochs that arrived while stopping
        show_epoch(bar, message)


def progress_queue() -> Any:
    """The zero-CPU Ray queue actor rank 0 sends its epochs through; None when Ray refuses one."""
    from ray.util.queue import Queue

    try:
        return Queue(actor_options={"num_cpus": 0})
    except Exception as exc:  # progress is a nicety: train without it
        log.warning("event=epoch_progress_unavailable error=%s", exc)
        return None


@contextmanager
def epoch_progress(run_name: str, epochs: int, workers: int, queue: Any = None) -> Iterator[Any]:
    """A bar of ``epochs`` on the command's reporter, fed by rank 0 through a Ray queue (yielded).

    The queue is a zero-CPU actor of the driver's, so it works the same when the workers run on
    other nodes (the RayJob's GPU pods); without one (a Ray that refuses it) the bar only ends.
    ``queue``: one made earlier (:func:`progress_queue`, a prelaunched run's), else one is made now.
    """
    from ray.util.queue import Empty

    if queue is None:
        queue = progress_queue()

    stop = threading.Event()
    lost: list[Exception] = []

    def take(timeout: float) -> Mapping[str, Any] | None:
        if queue is None or lost:  # the queue actor died: the run goes on without its bar
            stop.wait(timeout)
            return None
        try:
            item: Mapping[str, Any] = queue.get(block=timeout > 0, timeout=timeout or None)
        except Empty:
            return None
        except Exception as exc:
            lost.append(exc)
            log.warning("event=epoch_progress_lost error=%s", exc)
            return None
        return item

    with (
        reporting() as progress,
        progress.bar("train_epoch", f"train {run_name}", epochs, run=run_name, workers=workers) as bar,
    ):
        drain = threading.Thread(target=feed_bar, args=(take, bar, stop), daemon=True)
        drain.start()
        try:
            yield queue
        finally:
            stop.set()
            drain.join(timeout=5)
            if queue is not None:
                queue.shutdown()


def _make_epoch_reporter(
    cfg: dict[str, Any], rank: int, world_size: int, resumed_from: int, epoch_log: EpochLog | None = None
) -> Any:
    """The ``on_fit_epoch_end`` callback: report to Ray (all ranks; audit + checkpoint when due), log.

    ``epoch_log``: where rank 0's epochs go to MLflow (the caller closes it); else one of its own.
    """
    import ray.train

    if rank == 0 and epoch_log is None:
        epoch_log = EpochLog(cfg["mlflow_uri"], cfg["mlflow_run_id"])

    def report(trainer: Any) -> None:
        started = time.perf_counter()
        metrics = _epoch_metrics(trainer, resumed_from, world_size)
        # every rank decides alike, so a checkpoint holds every rank's audit: the trainer's cadence,
        # and rank 0's early-stop flag (ultralytics shares it with the others only after this callback)
        due = trainer.checkpoint_due() or _stopping(trainer, world_size)
        if rank == 0:
            log.info(
                "event=epoch_end epoch=%d/%d world_size=%d %s",
                trainer.epoch + 1,
                trainer.epochs,
                world_size,
                " ".join(f"{k}={v:.4g}" for k, v in metrics.items() if "/" in k),
            )
            if epoch_log is not None:
                epoch_log.post(metrics, trainer.epoch)
            _post_epoch(cfg.get(PROGRESS_QUEUE), epoch_message(trainer.epoch + 1, trainer.epochs, metrics))
        if due:
            with _checkpoint(trainer, rank, world_size, metrics) as checkpoint:
                ray.train.report(
                    metrics, checkpoint=checkpoint, checkpoint_dir_name=f"epoch_{trainer.epoch:04d}"
                )
        else:
            ray.train.report(metrics)
        trainer.seen_files.clear()
        if rank == 0:  # the ranks wait for each other in the report: this is what a checkpoint costs
            log.info(
                "event=epoch_reported epoch=%d checkpoint=%d seconds=%.2f",
                trainer.epoch + 1,
                int(due),
                time.perf_counter() - started,
            )

    return report


@contextmanager
def _checkpoint(trainer: Any, rank: int, world_size: int, metrics: dict[str, float]) -> Iterator[Any]:
    """This rank's share of a Ray checkpoint: its audit; on rank 0 also the weights, the CSV and the state."""
    import ray.train

    from training.ultralytics_ddp import parameters_sha256

    audit = {
        "rank": rank,
        "world_size": world_size,
        "epoch": trainer.epoch,
        "parameters_sha256": parameters_sha256(trainer.model),
        "samples": sorted(trainer.seen_files),
    }
    # in the run's folder (the rank's own; after a resume, rank 0's, which ultralytics reads back
    # from last.pt), not /tmp: a worker killed mid-report (a failure Ray recovers from) leaves
    # its ~20 MB with the run's files, not in /tmp for good
    Path(trainer.save_dir).mkdir(parents=True, exist_ok=True)  # ultralytics makes it on rank 0 only
    with tempfile.TemporaryDirectory(prefix="cxr-ckpt-", dir=trainer.save_dir) as tmp:
        out = Path(tmp)
        (out / AUDIT_PATTERN.format(rank=rank)).write_text(json.dumps(audit))
        if rank == 0:
            for src in (trainer.last, trainer.best, trainer.csv):
                if Path(src).exists():
                    shutil.copyfile(src, out / Path(src).name)
            state = {"epoch": trainer.epoch, "epochs": trainer.epochs, "metrics": metrics}
            (out / STATE_FILE).write_text(json.dumps(state))
        yield ray.train.Checkpoint.from_directory(str(out))


def _stopping(trainer: Any, world_size: int) -> bool:
    """Rank 0's ``trainer.stop`` (early stopping, time limit), the same on every rank."""
    import torch.distributed as dist

    stop = [bool(trainer.stop)]
    if world_size > 1 and dist.is_available() and dist.is_initialized():
        dist.broadcast_object_list(stop, src=0)
    return stop[0]


def _node_local_inputs(cfg: dict[str, Any], save_dir: Path) -> dict[str, str]:
    """The overrides that name driver-side files, made valid on this worker's node.

    The driver passes its own paths (data.yaml, base weights). On one machine they are there; a
    worker in another pod (the RayJob's GPU workers share nothing with the head but S3 and MLflow)
    fetches the dataset version and the base version's weights into its own ``CXR_STACK_DIR``.
    """
    updates: dict[str, str] = {}
    if not Path(cfg["data_yaml"]).exists():
        from training.dataset import resolve_dataset

        settings = TrainSettings()
        log.info("event=worker_dataset_fetch version=%s", cfg["dataset_version"])
        updates["data"] = str(
            resolve_dataset(cfg["dataset_version"], save_dir.parent, settings.dataset_cache).data_yaml
        )
    pretrained = cfg["overrides"].get("pretrained")
    if cfg.get("base_model_version") and isinstance(pretrained, str) and not Path(pretrained).exists():
        from training.registry import download_weights

        log.info("event=worker_base_weights_fetch version=%s", cfg["base_model_version"])
        dest = save_dir.parent / f"base-{save_dir.name}"
        updates["pretrained"] = str(download_weights(cfg["base_model_version"], dest, TrainSettings()))
    return updates


class RunInputs:
    """A zero-CPU actor holding a prelaunched run's inputs: every rank, and a rank Ray restarts, reads them.

    Not a queue: a queue hands each item to one reader, and a worker group restarted after a
    failure must read the same inputs again.
    """

    def __init__(self) -> None:
        import asyncio

        self._given = asyncio.Event()
        self._inputs: dict[str, Any] = {}

    async def get(self) -> dict[str, Any]:
        await self._given.wait()
        return self._inputs

    def put(self, inputs: dict[str, Any]) -> None:
        self._inputs = inputs
        self._given.set()


def await_run_inputs(cfg: dict[str, Any], rank: int) -> dict[str, Any] | None:
    """``cfg`` with a prelaunched run's inputs merged in, once the driver sends them; None: cancelled.

    A config without :data:`RUN_INPUTS` (every run but a prelaunched one) is returned as it is.
    """
    handle = cfg.get(RUN_INPUTS)
    if handle is None:
        return cfg
    import ray

    started = time.perf_counter()
    # no timeout: the data steps before train may take hours on real data, and the driver always
    # ends the wait, with inputs, a cancellation, or the Ray shutdown that ends this worker too
    inputs: dict[str, Any] = ray.get(handle.get.remote())
    if RUN_CANCELLED in inputs:
        log.info("event=prelaunch_cancelled rank=%d reason=%s", rank, inputs[RUN_CANCELLED])
        return None
    log.info("event=prelaunch_inputs rank=%d waited_s=%.1f", rank, time.perf_counter() - started)
    return {**cfg, **inputs}


def train_loop_per_worker(cfg: dict[str, Any]) -> None:
    """One Ray Train worker = one DDP rank running ultralytics' trainer."""
    import ray.train
    import ray.train.torch
    import torch

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    ctx = ray.train.get_context()
    rank, local_rank, world_size = ctx.get_world_rank(), ctx.get_local_rank(), ctx.get_world_size()

    # [1] ultralytics in DDP-rank mode, bound to Ray's rank (env for new imports, constants for loaded ones)
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(local_rank), "WORLD_SIZE": str(world_size)})
    from training.ultralytics_ddp import RayDetectionTrainer, bind_ultralytics_rank

    bind_ultralytics_rank(rank, local_rank, world_size)
    # a prelaunched run (training/prelaunch.py) gets its dataset, MLflow run and recipe only now
    awaited = await_run_inputs(cfg, rank)
    if awaited is None:
        return
    cfg = awaited
    torch.set_num_threads(int(cfg["torch_threads"]))
    device = ray.train.torch.get_device() if cfg["use_gpu"] else torch.device("cpu")

    # [2] resume from the latest checkpoint Ray has (after a failure), else start fresh
    save_dir = Path(cfg["work_dir"]) / f"rank{rank}"
    overrides = dict(cfg["overrides"])
    overrides.update(
        {
            "data": cfg["data_yaml"],
            "project": str(save_dir.parent),
            "name": save_dir.name,
            "exist_ok": True,
            "device": "cpu" if device.type == "cpu" else str(device.index or 0),
        }
    )
    overrides.update(_node_local_inputs(cfg, save_dir))
    resumed_from = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        last, state = _restore_from_checkpoint(checkpoint, save_dir)
        done_epoch = int(state.get("epoch", -1))
        if done_epoch + 1 >= int(state.get("epochs", cfg["overrides"]["epochs"])):
            log.info("event=already_complete rank=%d epoch=%d", rank, done_epoch + 1)
            return
        if last is not None:
            overrides["resume"] = str(last)
            resumed_from = done_epoch + 1
            log.info("event=resume rank=%d from_epoch=%d", rank, resumed_from)

    # [3] train; every epoch ends in the reporter (metrics to Ray, a checkpoint when due, MLflow on rank 0)
    trainer = RayDetectionTrainer(
        overrides,
        world_size=world_size,
        device=device,
        channels_last=bool(cfg["channels_last"]),
        fused_optimizer=bool(cfg["fused_optimizer"]),
        cpu_bf16=bool(cfg["cpu_bf16"]),
        checkpoints=CheckpointConfig.model_validate(cfg["checkpoint"]),
    )
    epoch_log = EpochLog(cfg["mlflow_uri"], cfg["mlflow_run_id"]) if rank == 0 else None
    reporter = _make_epoch_reporter(cfg, rank, world_size, resumed_from, epoch_log)
    trainer.add_callback("on_fit_epoch_end", reporter)
    try:
        trainer.train()
    finally:  # the last epochs reach MLflow before the driver reads the run, unless MLflow is down
        if epoch_log is not None:
            epoch_log.close(timeout=EPOCH_LOG_FLUSH_S)


# --------------------------------------------------------------------------- driver side


def ray_init_kwargs(
    cpus_needed: float,
    *,
    configured_address: str | None,
    environ: Mapping[str, str],
    cpu_count: int | None,
) -> dict[str, Any]:
    """The arguments of ``ray.init``: join the cluster an address names, else start a local Ray.

    An address comes from the settings (``CXR_RAY_ADDRESS``) or from ``RAY_ADDRESS``, which Ray
    sets for a job's entrypoint (the RayJob's ``cxr pipeline step train`` on the head). Joining a
    cluster takes no resource arguments (Ray raises ValueError for ``num_cpus``): the cluster's
    nodes have theirs. ``RAY_ADDRESS=local`` means "start one here", as it does for Ray.
    """
    if configured_address:
        return {"address": configured_address, "log_to_driver": True}
    env_address = environ.get("RAY_ADDRESS", "").strip()
    if env_address and env_address != "local":
        return {"address": "auto", "log_to_driver": True}  # Ray reads RAY_ADDRESS itself
    return {
        "num_cpus": max(int(cpus_needed + 0.999), cpu_count or 1),
        "include_dashboard": False,
        "log_to_driver": True,
        "configure_logging": True,
        "logging_level": logging.WARNING,
        # Ray starts one idle worker per CPU at init for tasks; Train's controller and workers are
        # actors in processes of their own, so on two cores those idle workers' imports only
        # compete with them (docs/benchmarks.md, "Ray's own start and stop")
        "_system_config": {"enable_worker_prestart": False, "prestart_worker_first_driver": False},
        # without the dashboard Train's placement-group cleaner warns every 2 s (ray_worker_setup.py)
        "runtime_env": {"worker_process_setup_hook": _hook_path(quiet_local_ray_workers)},
    }


def _hook_path(hook: Callable[[], None]) -> str:
    """A setup hook by module path: Ray imports it in each worker rather than unpickling a function."""
    return f"{hook.__module__}.{hook.__qualname__}"


def ray_init(settings: TrainSettings, cpus_needed: float) -> bool:
    """Start (or join) Ray; returns whether this call started it and must shut it down."""
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")  # before Ray starts: its workers inherit it
    kwargs = ray_init_kwargs(
        cpus_needed, configured_address=settings.ray_address, environ=os.environ, cpu_count=os.cpu_count()
    )
    log.info("event=ray_init address=%s", kwargs.get("address", "local"))
    ray.init(**kwargs)
    return True


@dataclass(frozen=True)
class RayStorage:
    """Where Ray keeps a run's checkpoints: S3 (the project's store) or a local/shared folder."""

    path: str
    filesystem: Any
    scheme: str

    def uri(self, *parts: str) -> str:
        return "/".join([f"{self.scheme}{self.path}", *parts])


def ray_storage(config: TrainConfig, settings: TrainSettings) -> RayStorage:
    """Checkpoints under ``CXR_RAY_STORAGE_DIR`` when set, else under the recipe's prefix in the bucket."""
    if settings.ray_storage_dir is not None:
        return RayStorage(str(settings.ray_storage_dir.resolve()), None, "file://")
    path = f"{settings.s3_bucket}/{config.checkpoint.s3_prefix.strip('/')}"
    return RayStorage(path, s3_filesystem(settings), "s3://")


def run_loop_inputs(
    config: TrainConfig,
    dataset: DatasetRef,
    *,
    run_name: str,
    settings: TrainSettings,
    mlflow_run_id: str = "",
    base_weights: Path | None = None,
) -> dict[str, Any]:
    """What the train loop needs of one run: recipe, dataset, run folder and MLflow run (picklable)."""
    scaling = config.scaling
    work_dir = (settings.work_dir / run_name).resolve()
    work_dir.mkdir(parents=True, exist_ok=True)
    overrides = config.ultralytics_overrides()
    if base_weights is not None:
        overrides["pretrained"] = str(base_weights)
    return {
        "overrides": overrides,
        "data_yaml": str(dataset.data_yaml.resolve()),
        "dataset_version": dataset.version,
        "base_model_version": config.base_model_version or "",
        "work_dir": str(work_dir),
        "mlflow_uri": settings.mlflow_uri,
        "mlflow_run_id": mlflow_run_id,
        "torch_threads": scaling.torch_threads,
        "channels_last": scaling.channels_last,
        "fused_optimizer": scaling.fused_optimizer,
        "cpu_bf16": scaling.cpu_bf16,
        "checkpoint": config.checkpoint.model_dump(),
        "use_gpu": scaling.use_gpu,
    }


def make_trainer(
    config: TrainConfig,
    dataset: DatasetRef | None,
    *,
    run_name: str,
    settings: TrainSettings,
    mlflow_run_id: str = "",
    base_weights: Path | None = None,
    callbacks: Sequence[Any] = (),
    train_loop: Callable[[dict[str, Any]], None] | None = None,
    loop_extras: Mapping[str, Any] | None = None,
) -> tuple[Any, RayStorage]:
    """The ``TorchTrainer`` of one run, not started: :func:`fit_distributed` and each Tune trial fit it.

    A Tune trial passes Tune's report callback in ``callbacks``, and a ``train_loop`` that wraps
    :func:`train_loop_per_worker` with ``loop_extras`` of its own (see :mod:`training.tune`).
    Without a ``dataset`` the run is prelaunched (:mod:`training.prelaunch`): its workers wait for
    :func:`run_loop_inputs` from the :class:`RunInputs` actor that ``loop_extras`` names.
    """
    from ray.train import CheckpointConfig as RayCheckpointConfig
    from ray.train import FailureConfig, RunConfig
    from ray.train import ScalingConfig as RayScaling
    from ray.train.torch import TorchConfig, TorchTrainer

    os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")  # pyarrow must never probe cloud metadata
    scaling = config.scaling
    inputs = (
        {}  # prelaunched: the inputs come later, through ``loop_extras``' RUN_INPUTS
        if dataset is None
        else run_loop_inputs(
            config,
            dataset,
            run_name=run_name,
            settings=settings,
            mlflow_run_id=mlflow_run_id,
            base_weights=base_weights,
        )
    )
    loop_config = {**inputs, **(loop_extras or {})}
    resources = {"CPU": scaling.cpus_per_worker}
    if scaling.use_gpu:
        resources["GPU"] = scaling.gpus_per_worker or 1.0
    storage = ray_storage(config, settings)
    trainer = TorchTrainer(
        train_loop or train_loop_per_worker,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if scaling.use_gpu else "gloo"),
        scaling_config=RayScaling(
            num_workers=scaling.num_workers, use_gpu=scaling.use_gpu, resources_per_worker=resources
        ),
        run_config=RunConfig(
            name=run_name,
            storage_path=storage.path,
            storage_filesystem=storage.filesystem,
            failure_config=FailureConfig(max_failures=config.checkpoint.max_failures),
            checkpoint_config=RayCheckpointConfig(num_to_keep=config.checkpoint.num_to_keep),
            callbacks=list(callbacks) or None,
        ),
    )
    return trainer, storage


def fit_distributed(
    config: TrainConfig,
    dataset: DatasetRef,
    *,
    run_name: str,
    settings: TrainSettings,
    mlflow_run_id: str = "",
    base_weights: Path | None = None,
) -> DistributedRun:
    """Train ``config`` on ``dataset`` with ``config.scaling.num_workers`` Ray workers; block until done."""
    import ray

    scaling = config.scaling
    work_dir = (settings.work_dir / run_name).resolve()
    started = ray_init(settings, scaling.cpus_per_worker * scaling.num_workers)
    t0 = time.perf_counter()
    try:
        with epoch_progress(run_name, config.epochs, scaling.num_workers) as queue:
            trainer, storage = make_trainer(
                config,
                dataset,
                run_name=run_name,
                settings=settings,
                mlflow_run_id=mlflow_run_id,
                base_weights=base_weights,
                loop_extras={PROGRESS_QUEUE: queue},
            )
            log.info(
                "event=ray_fit_start run=%s workers=%d global_batch=%d storage=%s",
                run_name,
                scaling.num_workers,
                config.global_batch,
                storage.uri(run_name),
            )
            try:
                result = trainer.fit()
            except Exception as exc:  # Ray wraps the worker's exception; keep its message for the person
                raise fit_failed(run_name, config, exc) from exc
        local = final_checkpoint(result, work_dir, run_name)
    finally:
        if started:
            ray.shutdown()
    return distributed_run(run_name, local, storage, result, scaling.num_workers, time.perf_counter() - t0)


def fit_failed(run_name: str, config: TrainConfig, cause: BaseException) -> DistributedTrainingError:
    """A failed fit, with Ray's message (it names the worker's exception) for the person."""
    return DistributedTrainingError(
        f"Ray Train run {run_name} failed (max_failures={config.checkpoint.max_failures}): {cause}"
    )


def final_checkpoint(result: Any, work_dir: Path, run_name: str) -> Path:
    """The fit's last checkpoint, copied from Ray's storage into ``<work_dir>/final_checkpoint``."""
    if result.checkpoint is None:
        raise DistributedTrainingError(f"Ray Train run {run_name} finished without a checkpoint")
    local = work_dir / "final_checkpoint"
    if local.exists():
        shutil.rmtree(local)
    result.checkpoint.to_directory(str(local))
    return local


def distributed_run(
    run_name: str, local: Path, storage: RayStorage, result: Any, world_size: int, seconds: float
) -> DistributedRun:
    """The driver's summary of a finished fit, read from the checkpoint's state file."""
    state = json.loads((local / STATE_FILE).read_text())
    return DistributedRun(
        run_name=run_name,
        checkpoint_dir=local,
        checkpoint_uri=storage.uri(run_name, Path(result.checkpoint.path).name),
        epochs_completed=int(state["epoch"]) + 1,
        world_size=world_size,
        metrics={k: float(v) for k, v in state.get("metrics", {}).items()},
        seconds=seconds,
    )
