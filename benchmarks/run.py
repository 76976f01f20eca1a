"""``make bench``: every side-by-side measurement of the project, one table, one JSON.

Each package owns its benchmark module (``data_bench``, ``train_bench``,
``serve_bench``, ``hostile_bench``, ``pacs_bench``); this runner only calls them, adds the
machine's description and the date, prints a table and writes ``benchmarks/results.json``. The figures
are ratios of runs made in the same process on the same machine, because these
machines are shared and absolute times drift.
"""

from __future__ import annotations

import datetime as dt
import importlib
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from core.offline import apply_offline_env

RESULTS = Path(__file__).resolve().parent / "results.json"
SUITES = (
    ("data", "benchmarks.data_bench", "run_data_benchmarks"),
    ("training", "benchmarks.train_bench", "run_training_benchmarks"),
    ("serving", "benchmarks.serve_bench", "run_serving_benchmarks"),
    ("hostile", "benchmarks.hostile_bench", "run_hostile_benchmarks"),
    ("pacs", "benchmarks.pacs_bench", "run_pacs_benchmarks"),
)


def machine() -> dict[str, Any]:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cores": os.cpu_count(), "cpu_model": cpu, "python": platform.python_version()}


def main(selected: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s level=%(levelname)s %(message)s")
    apply_offline_env(Path(os.environ.get("CXR_STACK_DIR", ".stack")))
    console = Console()
    results: dict[str, Any] = {
        "machine": machine(),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    failures = 0
    for name, module, func in SUITES:
        if selected and name not in selected:
            continue
        console.rule(f"benchmark: {name}")
        start = time.perf_counter()
        try:
            figures = getattr(importlib.import_module(module), func)()
        except Exception as exc:  # a failed suite is reported, the others still run
            console.print(f"[red]{name} failed:[/] {exc!r}")
            results[f"{name}_error"] = repr(exc)
            failures += 1
            continue
        results.update(figures)
        results[f"{name}_bench_seconds"] = round(time.perf_counter() - start, 1)
    table = Table(title="make bench (ratios measured side by side in this run)")
    table.add_column("key")
    table.add_column("value")
    for key, value in results.items():
        if not isinstance(value, dict | list):
            table.add_row(key, f"{value:.3f}" if isinstance(value, float) else str(value))
    console.print(table)
    RESULTS.write_text(json.dumps(results, indent=2, default=str) + "\n")
    console.print(f"wrote {RESULTS}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
