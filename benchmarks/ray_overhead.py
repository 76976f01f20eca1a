"""Ray Train's own cost on this machine: a 2-worker TorchTrainer whose workers do nothing.

``python -m benchmarks.ray_overhead [ROUNDS] [KEY]`` times ``ray.init``, ``fit`` and ``shutdown``
of a no-op run, alternately without and with one of the ``ray.init`` arguments
``training.ray_trainer`` adds for a local Ray (both arms keep all its others), each in a fresh
process (Ray starts once per process). KEY is ``_system_config`` (the default: no prestarted task
workers) or ``runtime_env`` (the worker setup hook that filters Train's placement-group cleaner
warning, training/ray_worker_setup.py). It prints every run with the number of those warnings in
its output, and the medians of init + fit and their ratio. It is a documented command, not part
of ``make bench``: a round (two runs) takes ~50 s of a quiet machine.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from typing import Any

from training.ray_trainer import ray_init_kwargs
from training.ray_worker_setup import UNREACHABLE_STATE_API


def _noop(_config: dict[str, Any]) -> None:
    import ray.train

    ray.train.report({"done": 1})


def one_run(ours: bool, key: str) -> dict[str, float]:
    """init, fit and shutdown seconds of one no-op run in this process (without ``key`` unless ours)."""
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    kwargs = ray_init_kwargs(2.0, configured_address=None, environ={}, cpu_count=2)
    if not ours:
        kwargs.pop(key)
    t0 = time.perf_counter()
    ray.init(**kwargs)
    t1 = time.perf_counter()
    storage = f"/tmp/cxr-ray-overhead-{os.getpid()}"
    trainer = TorchTrainer(
        _noop,
        scaling_config=ScalingConfig(num_workers=2, use_gpu=False, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(storage_path=storage, name="noop"),
    )
    trainer.fit()
    t2 = time.perf_counter()
    ray.shutdown()
    t3 = time.perf_counter()
    shutil.rmtree(storage, ignore_errors=True)
    return {"init_s": round(t1 - t0, 2), "fit_s": round(t2 - t1, 2), "shutdown_s": round(t3 - t2, 2)}


def main(rounds: int, key: str = "_system_config") -> dict[str, Any]:
    totals: dict[str, list[float]] = {"defaults": [], "ours": []}  # "defaults": without ``key``
    for i in range(rounds):
        for label in ("defaults", "ours"):
            proc = subprocess.run(
                [sys.executable, "-m", "benchmarks.ray_overhead", "--one", label, key],
                capture_output=True,
                text=True,
                check=False,
            )
            if proc.returncode != 0:
                raise SystemExit(f"the {label} run failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
            run = json.loads(proc.stdout.strip().splitlines()[-1])
            run["cleaner_warnings"] = (proc.stdout + proc.stderr).count(UNREACHABLE_STATE_API)
            totals[label].append(run["init_s"] + run["fit_s"])
            print(f"round {i + 1} {label}: {run}", file=sys.stderr)
    medians = {k: round(statistics.median(v), 2) for k, v in totals.items()}
    return {
        "without": key,
        "ray_noop_init_fit_s": medians,
        "ray_noop_ratio_ours_defaults": round(medians["ours"] / medians["defaults"], 3),
    }


if __name__ == "__main__":
    if len(sys.argv) > 3 and sys.argv[1] == "--one":
        print(json.dumps(one_run(sys.argv[2] == "ours", sys.argv[3])))
    else:
        rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 3
        print(json.dumps(main(rounds, *sys.argv[2:3]), indent=2))
