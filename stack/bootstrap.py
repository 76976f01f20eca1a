"""First-run bootstrap: make sure a newcomer's first ``make up`` serves a model.

When no version of ``cxr-detector`` is registered yet, run the small default
pipeline against the stack that just came up: synthetic phantoms → dataset
version → short Ray training → ONNX export with parity → registration →
promote to staging, canary and production with ``--force`` and a stated reason
(the floors are for real data, a fresh stack has no production model to compare
with and no canary traffic to analyse). Every promotion is a commit in
the stack's GitOps checkout, exactly as later promotions are (the three in one
``cxr promote --through``). Each heavy step runs as a ``cxr`` sub-process so its progress
shows and its memory is returned; the light promotion runs in this process (:func:`_promote`).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

from dotenv import dotenv_values

from core.errors import CxrError
from core.progress import reporting
from core.stage_file import read_stage_file
from core.stages import PROMOTION_ORDER
from stack.components import http_ok
from stack.config import StackSettings

MODEL_NAME = "cxr-detector"
BOOTSTRAP_CONFIG = Path("training") / "configs" / "bootstrap.yaml"
#: a test split of ~60 (>= 30, CXR_MIN_TEST_IMAGES) at the default 15 %; 400 phantoms learnt more than
#: more epochs on fewer (training/configs/bootstrap.yaml, docs/benchmarks.md "The first model")
BOOTSTRAP_IMAGES = 400
BOOTSTRAP_SEED = 1
#: the phantoms' side in pixels. The generator draws anatomy and findings on a canvas of at most
#: 512 px and scales it up (data_pipeline/synth.py), so 1024 px phantoms held no more of either
#: while costing four times the pixels to write, encode, ingest and cache; the bootstrap trains at
#: a fraction of either size (training/configs/bootstrap.yaml; docs/benchmarks.md)
PHANTOM_SIZE = 512
GOLDEN_IMAGES = 100  # CXR_GOLDEN_MIN_IMAGES' default: the smallest set that tells two models apart
GOLDEN_SEED = 7  # not the training phantoms' seed: other patients, other images
REASON = "bootstrap: first model of a new one-machine stack (no production model or canary traffic yet)"
#: how long the first training dataset's split may wait for the golden set built beside it
GOLDEN_WAIT_S = 600
#: how long an interrupted ``cxr`` sub-process may take to clean up: a prelaunched run's cancel waits
#: for Ray to start and for its workers to end (training/prelaunch.py CANCEL_WAIT_S, twice) and stops Ray
INTERRUPT_WAIT_S = 330


class BootstrapFailed(RuntimeError):
    """A bootstrap step failed; the message names the step and the command to rerun it."""


def _env(settings: StackSettings) -> dict[str, str]:
    env = dict(os.environ)
    env.update({k: v for k, v in dotenv_values(settings.env_file).items() if v is not None})
    return env


def _cxr(settings: StackSettings, step: str, *args: str, log: Path | None = None) -> None:
    """One ``cxr`` sub-process as a ``bootstrap_step``: its own progress shows (no spinner over it).

    With ``log`` it runs beside another step: its output goes to that file instead of over the
    other's progress, and the caller reports it.
    """
    command = [str(settings.python), "-m", "cxr.cli", *args]
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("ab") as out:
            result = subprocess.run(
                command, env=_env(settings), stdout=out, stderr=subprocess.STDOUT, check=False
            )
        if result.returncode != 0:
            raise _failed(step, result.returncode, args, f"; its output is in {log}")
        return
    label = f"bootstrap {step}: cxr {' '.join(args[:2])}"
    with reporting() as progress, progress.task("bootstrap_step", label, spinner=False, step=step) as task:
        result = subprocess.run(command, env=_env(settings), check=False)
        if result.returncode != 0:
            task.done("failed", exit_code=result.returncode)
            raise _failed(step, result.returncode, args)


def _wait_golden(golden: Future[None], log: Path) -> BaseException | None:
    """Wait, on screen, for the golden set built beside the phantoms; its error, or None."""
    label = f"bootstrap golden set (built beside the phantoms; output in {log})"
    with (
        reporting() as progress,
        progress.task("bootstrap_step", label, spinner=False, step="golden") as task,
    ):
        error = golden.exception()
        if error is not None:
            task.done("failed")
    return error


def _run_pipeline_beside(
    settings: StackSettings, args: tuple[str, ...], wait_golden: Callable[[], BaseException | None]
) -> None:
    """``cxr pipeline run`` started now, while ``wait_golden`` waits for the golden set it needs at its split.

    A golden set that fails interrupts the pipeline (SIGINT: it cancels its prelaunched Ray
    workers and ends, training/prelaunch.py) and its error is raised; so is a pipeline that fails.
    """
    command = [str(settings.python), "-m", "cxr.cli", *args]
    label = f"bootstrap pipeline: cxr {' '.join(args[:2])}"
    with (
        reporting() as progress,
        progress.task("bootstrap_step", label, spinner=False, step="pipeline") as task,
    ):
        pipeline = subprocess.Popen(command, env=_env(settings))
        try:
            golden_error = wait_golden()
        except BaseException:  # Ctrl-C: it reached the pipeline too (one foreground process group)
            _wait_or_kill(pipeline)
            raise
        if golden_error is not None:
            _interrupt(pipeline)
            task.done("failed", exit_code=pipeline.returncode)
            raise golden_error
        code = pipeline.wait()
        if code != 0:
            task.done("failed", exit_code=code)
            raise _failed("pipeline", code, args)


def _interrupt(process: subprocess.Popen[bytes]) -> None:
    """Ctrl-C for a ``cxr`` sub-process (it cleans up: a prelaunched Ray is shut down), then wait."""
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
    _wait_or_kill(process)


def _wait_or_kill(process: subprocess.Popen[bytes]) -> None:
    """Give an interrupted ``cxr`` sub-process the time its clean-up may take, then kill it."""
    try:
        process.wait(timeout=INTERRUPT_WAIT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _failed(step: str, code: int, args: tuple[str, ...], where: str = "") -> BootstrapFailed:
    return BootstrapFailed(
        f"bootstrap step {step!r} failed (exit {code}{where}); rerun it with: cxr {' '.join(args)}"
    )


def _phantoms(
    settings: StackSettings, step: str, out: Path, n_images: int, seed: int, log: Path | None = None
) -> None:
    """``cxr data synth`` into ``out`` unless an earlier (interrupted) bootstrap already made them."""
    if (out / "annotations.csv").exists():
        return
    args = ["--out", str(out), "--n-images", str(n_images), "--seed", str(seed), "--size", str(PHANTOM_SIZE)]
    _cxr(settings, step, "data", "synth", *args, log=log)


def registered_versions(mlflow_uri: str) -> list[str]:
    """The usable versions: not one a failed training run left marked incomplete (training/registry.py),
    which every read refuses. Counted, such a leftover (a first ``make up`` killed while registering)
    skipped the bootstrap on every later ``make up``, and the stack served nothing for good."""
    from mlflow import MlflowClient

    from training.registry import INCOMPLETE, INCOMPLETE_TAG

    client = MlflowClient(tracking_uri=mlflow_uri, registry_uri=mlflow_uri)
    return [
        v.version
        for v in client.search_model_versions(f"name='{MODEL_NAME}'")
        if (v.tags or {}).get(INCOMPLETE_TAG) != INCOMPLETE
    ]


def _skipped(settings: StackSettings, versions: list[str]) -> tuple[str, str | None]:
    """Why the bootstrap did not run, and what to do when production serves nothing; and what
    production serves ("" nothing, None unknown).

    A first ``make up`` whose promotion failed (the error named the command) leaves a registered
    version and no production model; the next ``make up`` skipped the bootstrap with only the
    versions' numbers, and the gateway answered 503 with nothing on screen saying why.
    """
    line = f"[yellow]-[/] bootstrap skipped: {MODEL_NAME} has versions {', '.join(versions)}"
    try:
        production = read_stage_file(settings.gitops_checkout, PROMOTION_ORDER[-1])
    except (OSError, CxrError):  # not readable here: the stack's own checks say so
        return line, None
    if production.serves:
        return line, production.model_version
    newest = max(versions, key=lambda v: int(v) if v.isdigit() else -1)
    return (
        f"{line}, but production serves none. To serve the newest: "
        f"cxr promote {newest} --to production --through --force --reason '...'",
        "",
    )


def ensure_served_model(settings: StackSettings, timeout_s: float = 180.0) -> str | None:
    """Run the bootstrap pipeline when the registry is empty; return the served version."""
    env = _env(settings)
    versions = registered_versions(env["CXR_MLFLOW_URI"])
    if versions:
        text, production = _skipped(settings, versions)
        with reporting() as progress:
            progress.event(
                "bootstrap_skipped",
                text,
                reason="registry-has-versions",
                versions=",".join(versions),
                production=None if production is None else production or "none",
            )
        return None
    work = settings.state / "bootstrap"
    synth = work / "synth"
    golden_log = work / "golden.log"
    summary_dir = work / "pipeline"
    pipeline_args = (
        "pipeline",
        "run",
        "--source",
        str(synth),
        "--config",
        str(BOOTSTRAP_CONFIG),
        "--base-model",
        "none",
        "--no-feedback",
        "--no-promote",
        "--run-name",
        "bootstrap",
        "--work-dir",
        str(summary_dir),
        "--golden-wait",
        str(GOLDEN_WAIT_S),
    )
    # The golden set and the training phantoms are independent until the training dataset's split,
    # which needs the golden pin. Side by side on two cores, each fills the other's idle moments
    # (process starts, the single-threaded report, the upload, the pin commit), and the pipeline
    # starts as soon as its phantoms exist: its Ray workers start, and its data steps decode and
    # fuse, while the golden set finishes (docs/benchmarks.md).
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="bootstrap-golden") as pool:
        golden = pool.submit(ensure_golden_set, settings, env, work, golden_log)
        try:
            _phantoms(settings, "synth", synth, BOOTSTRAP_IMAGES, BOOTSTRAP_SEED)
        except BaseException as exc:  # Ctrl-C included: the golden build is waited for, on screen
            golden_error = _wait_golden(golden, golden_log)
            if golden_error is not None:
                exc.add_note(f"the golden set failed too: {golden_error}")
            raise
        _run_pipeline_beside(settings, pipeline_args, lambda: _wait_golden(golden, golden_log))
    summary = json.loads((summary_dir / "summary.json").read_text())
    version = str(summary["model_version"])
    _promote(settings, version)
    with reporting() as progress, progress.task("bootstrap_step", "gateway ready", step="ready") as task:
        wait_ready(env["CXR_GATEWAY_URL"], timeout_s)
        task.done("healthy", f"serving {MODEL_NAME} v{version}", model_version=version)
    return version


def _promote(settings: StackSettings, version: str) -> None:
    """``cxr promote VERSION --to production --through --force`` in this process, not a sub-process.

    The promotion is seconds of work (gates from tags plus one ONNX latency check on the model's
    fetched file, three commits, three Triton loads), while a ``cxr`` sub-process first paid
    Python's start and the imports of mlflow and the delivery code: 9.6 s -> 6.2 s of the first
    ``make up`` on two cores (this process has mlflow imported already, :func:`registered_versions`).
    It runs with the stack's settings in the environment, as the sub-process would, and any
    failure, expected or not, is a :class:`BootstrapFailed` that names the command to rerun.
    """
    import typer

    from delivery.cli import promote

    last = PROMOTION_ORDER[-1]
    args = ("promote", version, "--to", last, "--through", "--force", "--reason", REASON)
    label = f"bootstrap promote: cxr promote {version} --to {last} --through"
    with (
        _stack_environ(settings),
        reporting() as progress,
        progress.task("bootstrap_step", label, spinner=False, step="promote") as task,
    ):
        try:
            promote(version, to=last, through=True, force=True, reason=REASON)
        except typer.Exit as exc:
            if exc.exit_code:
                task.done("failed", exit_code=exc.exit_code)
                raise _failed("promote", exc.exit_code, args) from exc
        except Exception as exc:  # not a refusal the command reports itself: say so, keep the cause
            task.done("failed", exit_code=1)
            raise _failed("promote", 1, args, f"; {type(exc).__name__}: {exc}") from exc


@contextmanager
def _stack_environ(settings: StackSettings) -> Iterator[None]:
    """This process's environment as a ``cxr`` sub-process of the bootstrap gets it, restored after.

    Only the keys the env file adds or changes are touched, and put back one by one (the
    environment is never empty, even for a moment).
    """
    stack_env = _env(settings)
    saved = {key: os.environ.get(key) for key in stack_env}
    os.environ.update(stack_env)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def ensure_golden_set(
    settings: StackSettings, env: dict[str, str], work: Path, log: Path | None = None
) -> None:
    """Build, publish and pin (by a commit in the stack's checkout) a golden set of phantoms, once.

    Its own seed gives it its own patients; it is built before the first training dataset, whose
    ingest then keeps those patients out of every split. Later promotions to canary and
    production compare candidate and production on it (delivery/golden_gate.py).
    """
    from data_pipeline.golden import read_pin

    if read_pin(Path(env["CXR_GITOPS_DIR"])) is not None:
        return
    golden = work / "golden"
    _phantoms(settings, "golden-synth", golden, GOLDEN_IMAGES, GOLDEN_SEED, log)
    _cxr(
        settings,
        "golden-build",
        "data",
        "golden",
        "build",
        "--dicom-dir",
        str(golden / "dicom"),
        "--annotations",
        str(golden / "annotations.csv"),
        "--out",
        str(work / "datasets"),
        "--upload",
        "yes",
        log=log,
    )


def wait_ready(gateway_url: str, timeout_s: float) -> None:
    """Poll the gateway's /readyz: ready once production's Triton has the model loaded."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if http_ok(f"{gateway_url}/readyz"):
            return
        time.sleep(0.5)
    raise BootstrapFailed(f"the gateway did not report ready within {timeout_s:.0f} s ({gateway_url}/readyz)")
