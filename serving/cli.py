"""``cxr serve``: run the gateway under uvicorn.

A plain function (the root ``cxr`` command mounts it as a command) plus a Typer
``app`` so ``python -m serving`` works alone.
"""

from __future__ import annotations

import logging
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from core.offline import apply_offline_env
from serving.errors import ServingError


class BackendName(StrEnum):
    triton = "triton"
    onnx = "onnx"


class LogLevel(StrEnum):
    critical = "critical"
    error = "error"
    warning = "warning"
    info = "info"
    debug = "debug"
    trace = "trace"


def serve(
    backend: Annotated[
        BackendName, typer.Option(help="triton: per-stage Triton servers; onnx: in-process ORT")
    ] = BackendName.triton,
    model: Annotated[Path | None, typer.Option(help="ONNX file for --backend onnx")] = None,
    host: Annotated[str, typer.Option(help="bind address")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="HTTP port")] = 8080,
    log_level: Annotated[LogLevel, typer.Option(help="uvicorn log level")] = LogLevel.info,
) -> None:
    """Serve the detection gateway (REST, DICOMweb STOW-RS, review page, /metrics)."""
    import uvicorn

    from serving.config import ServingSettings
    from serving.gateway.app import create_app

    console = Console(stderr=True)
    if model is not None and not model.is_file():
        what = "is a folder, not a file" if model.is_dir() else "does not exist"
        console.print(f"[red]ONNX model {escape(str(model))} {what}:[/red] pass --model the model.onnx file")
        raise typer.Exit(2)
    # the options override their CXR_* variables; everything else comes from the environment
    overrides: dict[str, object] = {"backend": backend.value}
    if model is not None:
        overrides["onnx_model"] = model.resolve()
    try:
        settings = ServingSettings(**overrides)  # type: ignore[arg-type]
    except ValueError as exc:
        console.print(f"[red]invalid gateway settings:[/red] {escape(str(exc))}")
        raise typer.Exit(2) from exc
    if settings.backend == "onnx" and settings.onnx_model is None:
        console.print("[red]--backend onnx needs --model PATH (or CXR_ONNX_MODEL)[/red]")
        raise typer.Exit(2)
    apply_offline_env(settings.stack_dir)
    keys_file = settings.resolved_api_keys_file
    if settings.auth_enabled and not keys_file.exists():
        console.print(
            f"[red]API keys file {keys_file} is missing:[/red] run `cxr stack up` or set CXR_API_KEYS_FILE"
        )
        raise typer.Exit(2)
    if settings.auth_enabled:
        _check_keys_file(keys_file, console)
    # logging has no TRACE level: uvicorn's own (below DEBUG) is for its loggers only
    level_name = LogLevel(log_level).value  # a plain string too, for callers of this function
    level = "DEBUG" if level_name == "trace" else level_name.upper()
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    try:
        # the app gets this settings object itself, not environment variables to read again
        gateway = create_app(settings)
    except ServingError as exc:  # e.g. --model names a file ONNX Runtime cannot load
        console.print(f"[red]cannot start the gateway:[/red] {escape(exc.message)}")
        raise typer.Exit(2) from exc
    console.print(f"gateway on http://{host}:{port} backend={backend.value}")
    uvicorn.run(
        gateway,
        host=host,
        port=port,
        log_level=level_name,
        access_log=False,
        timeout_graceful_shutdown=10,
        # uvicorn by default believes X-Forwarded-For/-Proto from 127.0.0.1: on the one-machine stack
        # every caller is on loopback, so a key guesser could name a new client address per request
        # and never meet the failed-login limit. Behind a proxy the public URL is a setting
        # (CXR_PUBLIC_BASE_URL) and the limit is per proxy address, which errs on the safe side.
        proxy_headers=False,
    )


def _check_keys_file(path: Path, console: Console) -> None:
    """Read the keys file once before the app: garbled JSON, bytes that are no UTF-8 or a folder
    ended ``create_app`` in a ``ValueError`` or ``IsADirectoryError`` traceback."""
    from serving.gateway.auth import KeyStore

    try:
        KeyStore.from_file(path)
    except ValueError as exc:  # names the file and what is wrong with it
        console.print(f"[red]{escape(str(exc))}:[/red] fix it, or run `cxr stack up` to write a new one")
        raise typer.Exit(2) from exc
    except OSError as exc:
        console.print(
            f"[red]API keys file {escape(str(path))} cannot be read ({escape(exc.strerror or str(exc))}):"
            "[/red] set CXR_API_KEYS_FILE to the stack's api_keys.json"
        )
        raise typer.Exit(2) from exc


app = typer.Typer(help="CXR Detect serving gateway", no_args_is_help=True, add_completion=False)
app.command("serve")(serve)


@app.callback()
def main() -> None:
    """CXR Detect serving gateway."""
