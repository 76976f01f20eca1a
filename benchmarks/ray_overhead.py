"""Ray Train's own cost on this machine: a 2-worker TorchTrainer whose workers do nothing.

``python -m benchmarks.ray_overhead [ROUNDS]`` times ``ray.init``, ``fit`` and ``shutdown`` of a
no-op run, alternately without and with the setting ``training.ray_trainer`` adds (no
prestarted task workers; both use its other ``ray.init`` arguments),
each in a fresh process (Ray starts once per process). It prints every run, and the medians of
init + fit and their ratio. It is a documented command, not part of ``make bench``: a round (two
runs) takes ~50 s of a quiet machine.
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


def _noop(_config: dict[str, Any]) -> None:
    import ray.train

    ray.train.report({"done": 1})


def one_run(ours: bool) -> dict[str, float]:
    """init, fit and shutdown seconds of one no-op run in this process."""
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    kwargs = ray_init_kwargs(2.0, configured_address=None, environ={}, cpu_count=2)
    if not ours:
        kwargs.pop("_system_config")
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


def main(rounds: int) -> dict[str, Any]:
    totals: dict[str, list[float]] = {"defaults": [], "ours": []}  # "defaults": without the setting
    for i in range(rounds):
        for label in ("defaults", "ours"):
            proc = subprocess.run(
                [sys.executable, "-m", "benchmarks.ray_overhead", "--one", label],
                capture_output=True,
                text=True,
                check=False,
            )
            if proc.returncode != 0:
                raise SystemExit(f"the {label} run failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
            run = json.loads(proc.stdout.strip().splitlines()[-1])
            totals[label].append(run["init_s"] + run["fit_s"])
            print(f"round {i + 1} {label}: {run}", file=sys.stderr)
    medians = {k: round(statistics.median(v), 2) for k, v in totals.items()}
    return {
        "ray_noop_init_fit_s": medians,
        "ray_noop_ratio_ours_defaults": round(medians["ours"] / medians["defaults"], 3),
    }


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--one":
        print(json.dumps(one_run(sys.argv[2] == "ours")))
    else:
        print(json.dumps(main(int(sys.argv[1]) if len(sys.argv) > 1 else 3), indent=2))
