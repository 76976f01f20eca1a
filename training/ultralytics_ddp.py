"""Ultralytics' own ``DetectionTrainer`` running as one rank of a Ray Train worker group.

Why the trainer and not a loop of ultralytics' parts: the trainer IS the
recipe (nominal-batch gradient accumulation, warmup of lr/momentum/bias-lr,
linear or cosine schedule, ModelEMA, close-mosaic, best-fitness selection,
NaN recovery, its checkpoint format and resume). A hand-written loop over
``DetectionModel``/``init_criterion``/``build_yolo_dataset`` would copy those
~300 lines and drift from them on every ultralytics release; a subclass keeps
them and overrides only what Ray already does. Both ways were measured to
work on this machine (see PLATFORM-NOTES); the subclass needs four small
overrides, each explained below, and nothing else of ultralytics is patched
(plus four for CPU speed: [5] channels-last memory, [6] weights written only
when a checkpoint will carry them, [7] fused optimizer steps, [8] bfloat16 autocast;
[9] rank 0's ``last.pt`` sent to the other ranks for ultralytics' NaN recovery; and [10] the GPU AMP
check without its download of pretrained weights).

Data parallelism stays ultralytics' own DDP path: with ``RANK``/``WORLD_SIZE``
set, ``build_dataloader`` puts a ``DistributedSampler`` (same seed on every
rank) in front of the dataset, the global batch is divided by the world size,
the loss is scaled by it, and ``DistributedDataParallel`` all-reduces the
gradients over the process group Ray created (gloo on CPU, NCCL on GPU).
"""

from __future__ import annotations

import hashlib
import math
import sys
from typing import Any
from unittest import mock

import torch
import ultralytics.engine.trainer as ultralytics_trainer
from torch.nn.parallel import DistributedDataParallel
from ultralytics.models.yolo.detect import DetectionTrainer
from ultralytics.nn.tasks import BaseModel

from core.durable import replace_durably
from training.config import CheckpointConfig

#: torch optimizers whose fused kernel runs on CPU (ultralytics picks among these by the recipe's name)
_FUSABLE_ON_CPU = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW)


def cpu_computes_bf16() -> bool:
    """Whether this CPU has native bfloat16 arithmetic (AMX or AVX512-BF16) that oneDNN uses.

    Elsewhere bfloat16 autocast is emulated and slower than fp32, so [8] falls back to fp32.
    Not ``torch.ops.mkldnn._is_mkldnn_bf16_supported()``: that says yes on any AVX-512 core,
    where oneDNN emulates bfloat16 (a convolution's pass ~3x slower than fp32, a review's check
    with ``ONEDNN_MAX_CPU_ISA=AVX512_CORE``).
    """
    return bool(
        torch.backends.mkldnn.is_available()
        and (torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())
    )


_ULTRALYTICS_AUTOCAST = ultralytics_trainer.autocast
_ULTRALYTICS_LOSS = BaseModel.loss
_ULTRALYTICS_CHECK_AMP = ultralytics_trainer.check_amp


def _check_amp_offline(model: torch.nn.Module) -> bool:
    """[10] Ultralytics' AMP check on a GPU, without its download: the closed network.

    The check compares a pretrained ``yolo26n.pt``'s detections in fp32 and fp16, fetching the
    weights from github.com on first use; ``YOLO_OFFLINE`` does not stop that (it is consulted
    only after a download failed), so every GPU training run tried to reach the internet. Here
    loading those weights fails as it does offline (ultralytics then skips the comparison and
    keeps AMP), and the check's other half, its list of GPUs that misbehave under AMP, still runs.
    """
    import ultralytics

    def offline(*_args: Any, **_kwargs: Any) -> Any:
        raise ConnectionError("no download on a closed network")

    with mock.patch.object(ultralytics, "YOLO", offline):
        return bool(_ULTRALYTICS_CHECK_AMP(model))


def _autocast_with_cpu_bf16(enabled: bool | torch.dtype, device: str = "cuda") -> Any:
    """Ultralytics' ``autocast`` helper, but bfloat16 allowed on a CPU (it raises for all but CUDA)."""
    if device == "cpu" and enabled is torch.bfloat16:
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return _ULTRALYTICS_AUTOCAST(enabled, device=device)


def _as_fp32(value: Any) -> Any:
    """Tensors (in dicts and lists, as a detection head returns them) in float32."""
    if torch.is_tensor(value):
        return value.float()
    if isinstance(value, dict):
        return {k: _as_fp32(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_as_fp32(v) for v in value)
    return value


def _loss_in_fp32(self: BaseModel, batch: dict[str, Any], preds: Any = None) -> Any:
    """Ultralytics' ``loss``: the network's forward under the loop's autocast, the criterion in fp32."""
    if preds is None:
        preds = self.forward(batch["img"])
    with torch.autocast("cpu", enabled=False):
        return _ULTRALYTICS_LOSS(self, batch, _as_fp32(preds))


def bind_ultralytics_rank(rank: int, local_rank: int, world_size: int) -> None:
    """Make every loaded ultralytics module see this Ray rank.

    Ultralytics reads ``RANK``/``LOCAL_RANK``/``WORLD_SIZE`` from the
    environment once, at import, into module constants that other modules copy
    (``from ultralytics.utils import RANK``). Ray sets the variables when the
    worker group starts, which may be after ultralytics was imported in that
    process, so the copies are rebound here.
    """
    values = {"RANK": rank, "LOCAL_RANK": local_rank, "WORLD_SIZE": world_size}
    for name, module in list(sys.modules.items()):
        if module is None or not (name == "ultralytics" or name.startswith("ultralytics.")):
            continue
        for key, value in values.items():
            if isinstance(getattr(module, key, None), int):
                setattr(module, key, value)


class _CpuSafeDDP(DistributedDataParallel):
    """DDP that accepts ultralytics' ``device_ids=[device.index]`` on CPU, where the index is None.

    Torch refuses ``device_ids=[None]``; for CPU modules it wants ``None``.
    ``find_unused_parameters`` is turned off: a YOLO11 detector uses every
    parameter in each forward (torch's reducer says so at run time), and the
    extra autograd traversal costs ~5% of a CPU step.
    """

    def __init__(self, module: torch.nn.Module, device_ids: Any = None, **kwargs: Any) -> None:
        if device_ids is not None and all(d is None for d in device_ids):
            device_ids = None
        kwargs["find_unused_parameters"] = False
        super().__init__(module, device_ids=device_ids, **kwargs)


def parameters_sha256(model: torch.nn.Module) -> str:
    """Hash of every trainable parameter's bytes: equal on all ranks iff the all-reduce kept them in sync.

    BatchNorm running statistics are buffers, not parameters: ultralytics turns
    DDP's buffer broadcast off, so each rank keeps its own (rank 0's are saved).
    """
    inner = model.module if isinstance(model, DistributedDataParallel) else model
    digest = hashlib.sha256()
    for name, param in sorted(inner.named_parameters()):
        digest.update(name.encode())
        digest.update(param.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


class RayDetectionTrainer(DetectionTrainer):
    """``DetectionTrainer`` for one rank of a process group that Ray already initialised."""

    def __init__(
        self,
        overrides: dict[str, Any],
        *,
        world_size: int,
        device: torch.device,
        channels_last: bool = False,
        fused_optimizer: bool = False,
        cpu_bf16: bool = False,
        checkpoints: CheckpointConfig | None = None,
    ) -> None:
        native_bf16 = device.type == "cpu" and cpu_computes_bf16()
        if cpu_bf16 and native_bf16:
            overrides = {**overrides, "amp": "bf16"}
        super().__init__(overrides=overrides)
        # A resumed run keeps its checkpoint's ``amp``, whatever this rank was asked; on CPU cores
        # without native bfloat16 it goes on in fp32 (ultralytics' loop would raise).
        if device.type == "cpu" and self.args.amp == "bf16" and not native_bf16:
            self.args.amp = False
        #: [8] the network's forward in bfloat16 on CPU cores that compute it natively
        self.cpu_bf16 = native_bf16 and self.args.amp == "bf16"
        self._cpu_channels_last = channels_last and device.type == "cpu"
        self._cpu_fused_optimizer = fused_optimizer and device.type == "cpu"
        #: the run's checkpoint cadence (default: every epoch, ultralytics' own writes)
        self.checkpoints = checkpoints or CheckpointConfig()
        # [1] ultralytics counts devices to decide on DDP; here the world is Ray's worker group.
        self.world_size = world_size
        self.ddp = False  # never spawn ultralytics' own torch.distributed.run subprocesses
        self._ray_device = device
        self.device = device
        #: primary image of every sample this rank trained on in the current epoch (for the shard audit)
        self.seen_files: list[str] = []

    def _setup_ddp(self) -> None:
        """[2] Ray's TorchConfig created the process group; only pick this rank's device."""
        self.device = self._ray_device
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)

    def _setup_train(self) -> None:
        """[3] Wrap DDP so CPU ranks pass ``device_ids=None`` (see :class:`_CpuSafeDDP`); [10] the AMP
        check without its download (:func:`_check_amp_offline`).

        [8] Ultralytics then broadcasts rank 0's ``amp`` to every rank. A CPU rank keeps its own
        decision instead: where rank 0 trains in bfloat16 and this rank's cores cannot, the
        broadcast would have this rank autocast in emulated bfloat16, the loss included.
        """
        with (
            mock.patch.object(torch.nn.parallel, "DistributedDataParallel", _CpuSafeDDP),
            mock.patch.object(ultralytics_trainer, "check_amp", _check_amp_offline),
        ):
            super()._setup_train()
        if self.device.type == "cpu":
            self.amp = self.cpu_bf16

    def _do_train(self) -> None:
        """[8] Ultralytics' loop with the network's forward in bfloat16 on CPU cores that compute it.

        Ultralytics has ``amp="bf16"`` (no loss scaler, no fp16 check) but its ``autocast`` helper
        raises unless the device is CUDA, so the loop gets one that allows the CPU. On these cores
        (AMX) an epoch at ``cpu-small.yaml``'s shape took 0.672 of the fp32 time
        (``python -m benchmarks.train_bench cpu_bf16``).
        The loss is computed in fp32 outside autocast: with it in bfloat16, as ultralytics does on
        CUDA, 75 epochs learnt no more than 50 fp32 ones in the same time (held-out mAP@0.5 0.382
        both), with it in fp32 they gave 0.444 (docs/benchmarks.md). Weights, gradients, the
        optimizer and the EMA stay fp32; validation runs the EMA in fp32, outside autocast.
        """
        if not self.cpu_bf16:
            super()._do_train()
            return
        with (
            mock.patch.object(ultralytics_trainer, "autocast", _autocast_with_cpu_bf16),
            mock.patch.object(BaseModel, "loss", _loss_in_fp32),
        ):
            super()._do_train()

    def set_model_attributes(self) -> None:
        """[5] On CPU, optionally lay the model out channels-last before DDP and the EMA copy wrap it.

        Ultralytics does this only on CUDA ("no benefit on CPU"); on these x86 cores oneDNN's
        convolutions skip their NCHW reorders and an epoch of the bootstrap recipe takes ~0.88 of
        the time (``python -m benchmarks.train_bench channels_last``). ``_setup_train`` calls this
        hook right after moving the model to its device, before anything holds its parameters.
        """
        super().set_model_attributes()
        if self._cpu_channels_last and isinstance(self.model, torch.nn.Module):
            self.model = self.model.to(memory_format=torch.channels_last)

    def build_optimizer(
        self,
        model: torch.nn.Module,
        name: str = "auto",
        lr: float = 0.001,
        momentum: float = 0.9,
        decay: float = 1e-5,
        iterations: float = 1e5,
    ) -> torch.optim.Optimizer:
        """[7] On CPU, the same optimizer and parameter groups, stepped by torch's fused kernel.

        Ultralytics passes ``fused=True`` only on CUDA; on CPU torch then loops over the ~250
        parameter tensors in Python, and an epoch of the bootstrap recipe takes ~1.2x as long
        (``python -m benchmarks.train_bench fused_optimizer``). The fused kernel computes the same
        update (within float rounding). ``fused`` must be given to the constructor, so the
        optimizer is rebuilt from ultralytics' groups without their ``fused``/``foreach``
        entries, which would override the constructor's choice.
        """
        optimizer = super().build_optimizer(model, name, lr, momentum, decay, iterations)
        if self._cpu_fused_optimizer and type(optimizer) in _FUSABLE_ON_CPU:
            groups = [
                {k: v for k, v in group.items() if k not in ("fused", "foreach")}
                for group in optimizer.param_groups
            ]
            optimizer = type(optimizer)(groups, fused=True)
        return optimizer

    def checkpoint_due(self, stopping: bool = False) -> bool:
        """Whether the epoch just finished leaves a checkpoint: every N epochs, the last, or a stop.

        The one decision both the epoch reporter (what Ray gets) and :meth:`save_model` (what
        ultralytics writes) follow; the reporter passes rank 0's stop flag, shared by all ranks.
        """
        return stopping or self.checkpoints.due(self.epoch, self.epochs)

    def save_model(self) -> bool:
        """[6] Write ``last.pt``/``best.pt`` only on epochs whose report carries a checkpoint.

        Ultralytics writes both every epoch (a deep copy of the EMA and of the optimizer state,
        pickled, written twice); the epoch reporter copies them into a Ray checkpoint only when
        :meth:`checkpoint_due` (here on rank 0, whose stop flag is already set), so the other
        writes were read by nobody. A recipe that validates every epoch keeps every write: its
        ``best.pt`` may come from any epoch. Resuming reads the Ray checkpoint, never this
        rank's folder.
        """
        if self.args.val or self.checkpoint_due(bool(self.stop)):
            return bool(super().save_model())
        return False

    def _handle_nan_recovery(self, epoch: int) -> bool:
        """[9] Ultralytics' NaN recovery on every rank, after rank 0 sent its ``last.pt`` to the others.

        Ultralytics restores each rank from ``last.pt`` in the rank's own folder, as in its own DDP
        where all ranks share one. Here each rank has a folder of its own and only rank 0 writes
        ``last.pt`` during a run (:meth:`save_model`); the others hold none, or, after a resume,
        the checkpoint the run resumed from. So a non-finite loss made them raise (and Ray restart
        the group from its last checkpoint) or restore older weights than rank 0 did. Rank 0 now
        decides as ultralytics' method will (its own loss or fitness not finite, ``epoch`` not the
        run's first, fewer than three recoveries in a row) and then broadcasts its file, or that it
        has none; the others write it as their own ``last.pt``, or remove theirs. Ultralytics'
        method then runs unchanged on every rank: all restore from the same file, or all raise.
        """
        if self.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            self._share_last_checkpoint(epoch)
        return bool(super()._handle_nan_recovery(epoch))

    def _share_last_checkpoint(self, epoch: int) -> None:
        """[9] Rank 0's ``last.pt``, or its absence, on every rank when the recovery will read it."""
        rank = torch.distributed.get_rank()
        payload: list[Any] = [None]  # None: no recovery this epoch; b"": rank 0 has no last.pt
        if rank == 0:
            # ultralytics' own tests of rank 0's epoch (trainer._handle_nan_recovery), which it then
            # broadcasts: the file goes only where that method will read it
            loss_nan = self.loss is not None and not bool(torch.isfinite(self.loss).all())
            fitness_nan = self.fitness is not None and not math.isfinite(float(self.fitness))
            will_load = epoch != self.start_epoch and self.nan_recovery_attempts < 3
            if (loss_nan or fitness_nan) and will_load:
                payload = [self.last.read_bytes() if self.last.exists() else b""]
        torch.distributed.broadcast_object_list(payload, 0)
        if rank == 0 or payload[0] is None:
            return
        if not payload[0]:
            self.last.unlink(missing_ok=True)  # then every rank raises, as rank 0 does
            return
        self.last.parent.mkdir(parents=True, exist_ok=True)
        replace_durably(self.last, payload[0])  # whole or absent when ultralytics reads it

    def preprocess_batch(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Record which images this rank drew, then ultralytics' own preprocessing."""
        self.seen_files.extend(str(f) for f in batch["im_file"])
        batch = super().preprocess_batch(batch)
        if self._cpu_channels_last:
            batch["img"] = batch["img"].contiguous(memory_format=torch.channels_last)
        return batch

    def final_eval(self) -> None:
        """[4] Skipped: it assumes CUDA on multi-rank runs and waits on the other ranks.

        The run is evaluated afterwards, on the driver, on the TEST split by
        ``training.evaluate`` (the same code that evaluates the ONNX export).
        """
