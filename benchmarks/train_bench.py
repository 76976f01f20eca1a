"""Training benchmarks for ``make bench``: Ray data-parallel speed-up and a quality sanity check.

``ray_epoch_ratio_2w_1w``: the same dataset, recipe and GLOBAL batch trained
with 1 and with 2 Ray workers in this process, one after the other; the ratio
of their median epoch times (2 workers / 1 worker; the goal on 2 cores is
<= 0.7). Epoch times come from ultralytics' own results.csv, skipping the first
epoch (warm-up) and the last (it validates).

``channels_last_epoch_ratio``, ``fused_optimizer_epoch_ratio``,
``sparse_checkpoint_epoch_ratio``, ``cpu_bf16_epoch_ratio``: the bootstrap recipe's epoch (the
last at ``cpu-small.yaml``'s network, size and batch) with one CPU training choice on / off, fits
alternated in one run (``EPOCH_RATIOS``; each also alone as ``python -m benchmarks.train_bench NAME``).

``train_quality_map50``: ``training/configs/cpu-small.yaml`` on the default
synthetic dataset (300 phantoms), evaluated on its test split with the same
code as ``cxr train evaluate``; the goal is mAP@0.5 >= 0.65 within 15 minutes of
training (issue 18; not met, docs/benchmarks.md). It takes 8-20 min on 2 cores, with
the phantoms built: set ``CXR_BENCH_TRAIN_QUALITY=0`` to skip it.

``pass_seconds_yolo11-slim``, ``pass_seconds_yolo11n``: one forward and backward pass of each CPU
recipe's network (batch 4, 256 px, one thread), taken first: how fast the cores were in this run,
since the training seconds above move between days (``python -m benchmarks.train_bench pass``).

Checkpoints go to a local folder here (not S3) so the figures measure compute,
not the object store.
"""

from __future__ import annotations

import csv
import functools
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from training.config import TrainConfig, TrainSettings, load_config
from training.dataset import DatasetRef, open_dataset_dir

if TYPE_CHECKING:  # importing the evaluator loads torch: only the functions that run it do
    from training.evaluate import EvalReport

log = logging.getLogger(__name__)

CONFIGS = Path(__file__).resolve().parents[1] / "training" / "configs"
#: the held-out phantoms that recipes are compared on (``heldout_dataset``)
HELDOUT_IMAGES = 240
HELDOUT_SEED = 99


def build_synthetic_dataset(
    root: Path,
    n_images: int,
    size: int,
    max_side: int,
    seed: int = 0,
    *,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
) -> DatasetRef:
    """The data pipeline's own phantoms -> a versioned YOLO dataset (no S3 needed).

    The split fractions default to the pipeline's own (15 % each).
    """
    from data_pipeline.config import DataSettings
    from data_pipeline.ingest import build_dataset
    from data_pipeline.synth import SynthConfig, generate

    synth = generate(SynthConfig(n_images=n_images, seed=seed, size=size), root / "synth")
    build = build_dataset(
        synth.dicom_dir,
        synth.annotations_csv,
        root / "datasets",
        settings=DataSettings(
            stack_dir=root / "stack",
            max_side=max_side,
            val_fraction=val_fraction,
            test_fraction=test_fraction,
        ),
        store=None,
        feedback=False,
    )
    return open_dataset_dir(build.path, root / "work")


def heldout_dataset(root: Path, n_images: int = HELDOUT_IMAGES, seed: int = HELDOUT_SEED) -> DatasetRef:
    """Phantoms of their own seed (other patients), 85 % of them in the test split: a larger, fixed
    evaluation set than a recipe's own 35-60-image test split, whose figure moved by ~0.07 between
    patient salts (docs/benchmarks.md). Used to compare recipes, never trained on."""
    return build_synthetic_dataset(
        root, n_images, size=1024, max_side=1024, seed=seed, val_fraction=0.0, test_fraction=0.85
    )


def _epoch_seconds(results_csv: Path) -> list[float]:
    """Per-epoch durations from ultralytics' cumulative ``time`` column."""
    with results_csv.open() as handle:
        times = [float(row["time"]) for row in csv.DictReader(handle)]
    return [b - a for a, b in zip([0.0, *times[:-1]], times, strict=True)]


def _median_epoch(config: TrainConfig, dataset: DatasetRef, settings: TrainSettings, label: str) -> float:
    from training.ray_trainer import fit_distributed

    run = fit_distributed(config, dataset, run_name=f"bench-{label}-{int(time.time())}", settings=settings)
    epochs = _epoch_seconds(run.results_csv)
    steady = epochs[1:-1] or epochs
    log.info("event=bench_epochs label=%s epochs=%s", label, [round(e, 2) for e in epochs])
    return statistics.median(steady)


def ray_epoch_ratio(root: Path, *, n_images: int = 192, imgsz: int = 256, epochs: int = 4) -> dict[str, Any]:
    """Median epoch time with 2 workers / with 1 worker, same global batch, measured back to back.

    192 phantoms (~130 training images, ~8 optimizer steps per epoch): with 96 (5 steps) the
    per-epoch fixed costs that do not parallelise (dataloader start, rank 0's checkpoint
    report) were a fifth of an epoch and the ratio measured the overhead, not the training
    (measured 0.70-0.74 there). Real epochs are thousands of steps.
    """
    dataset = build_synthetic_dataset(root / "ratio", n_images, size=512, max_side=512)
    settings = TrainSettings(stack_dir=root / "stack", ray_storage_dir=root / "ray")
    base = {
        "name": "bench",
        "imgsz": imgsz,
        "epochs": epochs,
        "val_every_epoch": False,
        "optim": {"nbs": 16, "warmup_epochs": 1},
        "augment": {"close_mosaic": 1},
    }
    one = TrainConfig.model_validate({**base, "batch_per_worker": 16}).with_workers(1)
    two = TrainConfig.model_validate({**base, "batch_per_worker": 8}).with_workers(2)
    assert one.global_batch == two.global_batch
    t1 = _median_epoch(one, dataset, settings, "1w")
    t2 = _median_epoch(two, dataset, settings, "2w")
    return {
        "ray_epoch_ratio_2w_1w": round(t2 / t1, 3),
        "ray_epoch_seconds_1w": round(t1, 2),
        "ray_epoch_seconds_2w": round(t2, 2),
        "ray_bench_train_images": len(dataset.images("train")),
        "ray_bench_imgsz": imgsz,
        "ray_bench_global_batch": one.global_batch,
    }


@functools.cache
def _epoch_dataset(root: Path, n_images: int) -> DatasetRef:
    """The epoch ratios' phantoms, built once per run of the suite (each ratio used to rebuild them)."""
    return build_synthetic_dataset(root / "layout", n_images, size=1024, max_side=1024, seed=1)


def _alternated_epochs(
    root: Path,
    variants: dict[str, dict[str, Any]],
    *,
    n_images: int = 200,
    epochs: int = 4,
    rounds: int = 2,
) -> tuple[dict[str, float], int]:
    """Median steady epoch of the bootstrap recipe under each of ``variants`` (overrides), alternated.

    ``rounds`` rounds, each a fresh Ray Train fit per variant on the same phantoms, so drift on a
    shared machine falls on every side; the steady epochs (first and last dropped) of each side
    are pooled. Returns the medians by label and the number of training images.
    """
    dataset = _epoch_dataset(root, n_images)
    settings = TrainSettings(stack_dir=root / "stack", ray_storage_dir=root / "ray")
    recipe = load_config(CONFIGS / "bootstrap.yaml").model_dump()
    medians: dict[str, list[float]] = {label: [] for label in variants}
    for _ in range(rounds):
        for label, overrides in variants.items():
            config = TrainConfig.model_validate(_merged(recipe, {"epochs": epochs, **overrides}))
            medians[label].append(_median_epoch(config, dataset, settings, label))
    return {label: statistics.median(v) for label, v in medians.items()}, len(dataset.images("train"))


def _epoch_ratio(
    root: Path, name: str, base: tuple[str, dict[str, Any]], variant: dict[str, Any]
) -> dict[str, Any]:
    """Median steady epoch with ``variant``'s overrides / with ``base``'s (a label and overrides)."""
    base_label, base_overrides = base
    seconds, images = _alternated_epochs(root, {base_label: base_overrides, name: variant})
    return {
        f"{name}_epoch_ratio": round(seconds[name] / seconds[base_label], 3),
        f"{name}_epoch_seconds": round(seconds[name], 2),
        f"{base_label}_epoch_seconds": round(seconds[base_label], 2),
        f"{name}_train_images": images,
    }


def channels_last_ratio(root: Path) -> dict[str, Any]:
    """Channels-last CPU workers / NCHW ones: at 256 px with a checkpoint every epoch, as the figure
    in docs/benchmarks.md was measured (the recipe has since moved to 160 px, sparser checkpoints)."""
    pinned = {"imgsz": 256, "checkpoint": {"every_epochs": 1}}
    return _epoch_ratio(
        root,
        "channels_last",
        ("nchw", {**pinned, "scaling": {"channels_last": False}}),
        {**pinned, "scaling": {"channels_last": True}},
    )


def fused_optimizer_ratio(root: Path) -> dict[str, Any]:
    """Fused optimizer steps / torch's per-parameter loop on CPU workers, the bootstrap recipe as is.

    Its steady epochs write no checkpoint (every 4th epoch of 4), so they time the steps alone.
    """
    return _epoch_ratio(
        root,
        "fused_optimizer",
        ("loop_optimizer", {"scaling": {"fused_optimizer": False}}),
        {"scaling": {"fused_optimizer": True}},
    )


def sparse_checkpoint_ratio(root: Path) -> dict[str, Any]:
    """Epochs of the bootstrap recipe writing no checkpoint / writing one every epoch.

    A written checkpoint is ultralytics' ``last.pt``/``best.pt`` (skipped on the other epochs
    since the trainer writes them only when due) plus the Ray report that uploads them; here to a
    local folder, so S3's own share is not in the figure.
    """
    return _epoch_ratio(
        root,
        "sparse_checkpoint",
        ("every_checkpoint", {"checkpoint": {"every_epochs": 1}}),
        {"checkpoint": {"every_epochs": 4}},
    )


def pass_seconds(
    models: Sequence[str] = ("yolo11-slim", "yolo11n"), *, imgsz: int = 256, batch: int = 4, repeats: int = 10
) -> dict[str, Any]:
    """Seconds of one forward and backward pass per network, one thread, random input: the cores' speed.

    Why: these two-core machines compute at different speeds on different days (the same
    ``quality`` run trained in 566 s on 2026-12-04 and 1100 s on 2026-12-06, docs/benchmarks.md),
    so training seconds compare only within one run of the machine. This figure, taken beside
    them, tells how fast the cores were; it needs no data, no Ray and no MLflow. Median of
    ``repeats`` passes after two warm-up passes; the two networks are the CPU recipes' ones.
    """
    import torch
    from ultralytics.nn.tasks import DetectionModel

    from training.config import MODEL_FILES

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as a CPU rank trains (scaling.torch_threads: 1)
    found: dict[str, Any] = {"pass_imgsz": imgsz, "pass_batch": batch}
    try:
        for name in models:
            model = DetectionModel(str(MODEL_FILES.get(name, f"{name}.yaml")), nc=14, verbose=False)
            model.train()
            images = torch.rand(batch, 3, imgsz, imgsz)
            times = []
            for i in range(repeats + 2):
                started = time.perf_counter()
                outputs = model(images)
                outputs = outputs.values() if isinstance(outputs, dict) else outputs
                sum(o.float().sum() for o in outputs if torch.is_tensor(o)).backward()
                if i >= 2:
                    times.append(time.perf_counter() - started)
            found[f"pass_seconds_{name}"] = round(statistics.median(times), 3)
    finally:
        torch.set_num_threads(threads)
    return found


def _merged(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in overrides.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) else value
    return out


def train_quality(
    root: Path,
    n_images: int = 300,
    overrides: dict[str, Any] | None = None,
    *,
    recipe: str = "cpu-small.yaml",
    seed: int = 0,
    heldout: DatasetRef | None = None,
    dataset: DatasetRef | None = None,
    phantom_size: int = 1024,
) -> dict[str, Any]:
    """The CPU recipe (``overrides`` merged into it) on the default synthetic dataset: test mAP, per-class AP.

    The dataset builder reads ``CXR_*`` settings from the environment, so e.g.
    ``CXR_MIN_READER_SHARE=0`` builds the labels with every reader's box. ``recipe="bootstrap.yaml"``
    with ``BOOTSTRAP_IMAGES`` phantoms of seed 1 is what ``make up`` trains first (``stack/bootstrap.py``).
    ``heldout`` (:func:`heldout_dataset`) adds the figures on that larger set; ``dataset``, when
    given, is trained on instead of building the phantoms again (:func:`seed_spread`).
    """
    from training.evaluate import evaluate
    from training.predictors import TorchPredictor
    from training.ray_trainer import fit_distributed

    config = load_config(CONFIGS / recipe)
    if overrides:
        config = TrainConfig.model_validate(_merged(config.model_dump(), overrides))
    if dataset is None:
        dataset = build_synthetic_dataset(
            root / "quality", n_images, size=phantom_size, max_side=1024, seed=seed
        )
    settings = TrainSettings(stack_dir=root / "stack", ray_storage_dir=root / "ray")
    started = time.perf_counter()
    run = fit_distributed(config, dataset, run_name=f"bench-quality-{int(time.time())}", settings=settings)
    train_seconds = time.perf_counter() - started
    model = TorchPredictor.load(run.best_weights)
    found = _figures("train_quality", evaluate(model, dataset, config.eval, split="test"))
    found["train_quality_seconds"] = round(train_seconds, 1)
    if heldout is not None:
        found |= _figures("heldout", evaluate(model, heldout, config.eval, split="test", latency=False))
    return found


def seed_spread(
    root: Path,
    n_images: int,
    overrides: dict[str, Any] | None,
    seeds: Sequence[int],
    *,
    recipe: str,
    data_seed: int,
    heldout: DatasetRef | None = None,
    phantom_size: int = 1024,
) -> dict[str, Any]:
    """The same recipe trained once per TRAINING seed on one dataset: each run's figures, mean and sd.

    At the bootstrap's size a recipe's seed alone moved held-out mAP@0.5 from 0.243 to 0.302
    (docs/benchmarks.md), as much as any recipe change tried; a change is worth adopting only when
    it moves the mean by clearly more than that spread, so recipes are compared on several seeds.
    """
    dataset = build_synthetic_dataset(
        root / "quality", n_images, size=phantom_size, max_side=1024, seed=data_seed
    )
    runs = []
    for seed in seeds:
        log.info("event=seed_spread_run seed=%d of=%s", seed, ",".join(map(str, seeds)))
        found = train_quality(
            root,
            n_images,
            {**(overrides or {}), "seed": seed},
            recipe=recipe,
            seed=data_seed,
            heldout=heldout,
            dataset=dataset,
        )
        runs.append({"seed": seed, **found})
    summary: dict[str, Any] = {"seeds": list(seeds), "runs": runs}
    for key in ("train_quality_map50", "heldout_map50"):
        values = [run[key] for run in runs if key in run]
        if values:
            summary[f"{key}_mean"], summary[f"{key}_sd"] = mean_and_sd(values)
    return summary


def mean_and_sd(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0.0 for one value), rounded as the figures are."""
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return round(statistics.fmean(values), 4), round(sd, 4)


def _figures(prefix: str, report: EvalReport) -> dict[str, Any]:
    """One evaluation's figures under ``prefix``: mAPs, images, "No finding" AUC, AP by class, by subgroup."""
    return {
        f"{prefix}_map50": round(report.map50, 4),
        f"{prefix}_map40": round(report.map40, 4),
        f"{prefix}_map50_95": round(report.map50_95, 4),
        f"{prefix}_test_images": report.images,
        f"{prefix}_no_finding_auc": round(report.no_finding_auc or 0.0, 4),
        f"{prefix}_per_class_ap50": {c.class_name: round(c.ap50, 3) for c in report.per_class},
        # per subgroup: images, its mAP@0.4 and the overall AP over the same classes (training/subgroups.py)
        f"{prefix}_subgroup_map40": {
            f"{g.attribute}={g.value}": [g.images, _rounded(g.map40), _rounded(g.reference_map40)]
            for g in report.subgroups
        },
    }


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def cpu_bf16_ratio(root: Path) -> dict[str, Any]:
    """Epochs with the network's forward in bfloat16 / in fp32, at ``cpu-small.yaml``'s network, size
    and batch (the recipe that turns it on). At the bootstrap recipe's own (the slim network, 160 px,
    batch 4) the ratio was 1.03: too little work per convolution for AMX to pay. Where the cores
    have no native bfloat16 the option falls back to fp32 and the ratio is ~1."""
    recipe = load_config(CONFIGS / "cpu-small.yaml")
    small = {
        "model": recipe.model,
        "imgsz": recipe.imgsz,
        "batch_per_worker": recipe.batch_per_worker,
        "optim": {"nbs": recipe.optim.nbs},
    }
    return _epoch_ratio(
        root,
        "cpu_bf16",
        ("fp32", {**small, "scaling": {"cpu_bf16": False}}),
        {**small, "scaling": {"cpu_bf16": True}},
    )


#: the side-by-side epoch ratios, by the name ``python -m benchmarks.train_bench NAME`` runs one alone
EPOCH_RATIOS = {
    "channels_last": channels_last_ratio,
    "fused_optimizer": fused_optimizer_ratio,
    "sparse_checkpoint": sparse_checkpoint_ratio,
    "cpu_bf16": cpu_bf16_ratio,
}


def run_training_benchmarks() -> dict[str, Any]:
    """Entry point called by ``benchmarks/run.py``."""
    with tempfile.TemporaryDirectory(prefix="cxr-train-bench-") as tmp:
        root = Path(tmp)
        results = pass_seconds()
        results.update(ray_epoch_ratio(root))
        for ratio in EPOCH_RATIOS.values():
            results.update(ratio(root))
        if os.environ.get("CXR_BENCH_TRAIN_QUALITY", "1") != "0":
            results.update(train_quality(root))
    return results


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    from core.offline import apply_offline_env

    apply_offline_env(Path(os.environ.get("CXR_STACK_DIR", ".stack")))
    # `python -m benchmarks.train_bench quality '{"epochs": 35}'`: the quality run alone, recipe overridden,
    # also evaluated on the held-out phantoms;
    # the patient salt is fixed (CXR_PATIENT_SALT overrides it), so reruns and recipes are compared on
    # the same split of the 300 phantoms (each run had its own before: a class's AP moved with it)
    if len(sys.argv) > 1 and sys.argv[1] == "quality":
        os.environ.setdefault("CXR_PATIENT_SALT", "train-bench-quality")
        with tempfile.TemporaryDirectory(prefix="cxr-train-quality-") as tmp:
            extra = json.loads(sys.argv[2]) if len(sys.argv) > 2 else None
            # also on the 240 held-out phantoms: a 45-image split rests a class's AP on 2-6 boxes
            heldout = heldout_dataset(Path(tmp) / "heldout")
            print(json.dumps(train_quality(Path(tmp), overrides=extra, heldout=heldout), indent=2))
    # `python -m benchmarks.train_bench bootstrap '{"epochs": 16}' [N_IMAGES] [SEEDS]`: make up's first
    # model, recipe overridden, also evaluated on the held-out phantoms; the patient salt is fixed so
    # that reruns get the same split (CXR_PATIENT_SALT overrides it). SEEDS (e.g. 0,1,2,3) trains once
    # per training seed and adds mean and sd: compare recipes that way (seed_spread). A fifth argument
    # sets the phantoms' side (default: make up's, stack/bootstrap.py PHANTOM_SIZE; held out: 1024).
    # `python -m benchmarks.train_bench channels_last`: the CPU workers' memory layout, side by side
    # `... train_bench fused_optimizer`, `... sparse_checkpoint`, `... cpu_bf16`: other CPU epoch costs, alike
    # `python -m benchmarks.train_bench pass`: how fast this machine's cores are today (pass_seconds)
    elif len(sys.argv) > 1 and sys.argv[1] == "pass":
        print(json.dumps(pass_seconds(), indent=2))
    elif len(sys.argv) > 1 and sys.argv[1] in EPOCH_RATIOS:
        with tempfile.TemporaryDirectory(prefix=f"cxr-train-{sys.argv[1]}-") as tmp:
            print(json.dumps(EPOCH_RATIOS[sys.argv[1]](Path(tmp)), indent=2))
    elif len(sys.argv) > 1 and sys.argv[1] == "bootstrap":
        from stack.bootstrap import BOOTSTRAP_IMAGES, BOOTSTRAP_SEED, PHANTOM_SIZE

        os.environ.setdefault("CXR_PATIENT_SALT", "train-bench-bootstrap")
        with tempfile.TemporaryDirectory(prefix="cxr-train-bootstrap-") as tmp:
            extra = json.loads(sys.argv[2]) if len(sys.argv) > 2 else None
            n_images = int(sys.argv[3]) if len(sys.argv) > 3 else BOOTSTRAP_IMAGES
            size = int(sys.argv[5]) if len(sys.argv) > 5 else PHANTOM_SIZE
            heldout = heldout_dataset(Path(tmp) / "heldout")
            if len(sys.argv) > 4 and sys.argv[4]:
                seeds = [int(s) for s in sys.argv[4].split(",")]
                found = seed_spread(
                    Path(tmp),
                    n_images,
                    extra,
                    seeds,
                    recipe="bootstrap.yaml",
                    data_seed=BOOTSTRAP_SEED,
                    heldout=heldout,
                    phantom_size=size,
                )
            else:
                found = train_quality(
                    Path(tmp),
                    n_images,
                    extra,
                    recipe="bootstrap.yaml",
                    seed=BOOTSTRAP_SEED,
                    heldout=heldout,
                    phantom_size=size,
                )
            print(json.dumps(found, indent=2))
    else:
        print(run_training_benchmarks())
