"""Closed-network defaults for every component.

Hospitals run closed networks: no process of this project may open a
connection off loopback. Each library below phones home unless told not to;
this module is the one place that knows how to silence each of them. The
stack passes these variables to every child it starts, the ``cxr`` CLI
applies them to itself, and the test suite applies them at session start.
It lives in the lowest package so that every CLI (data, training, serving,
workflows) can import it without importing a package above its own.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path

from core.durable import replace_durably

# A TTF that ultralytics accepts in place of Arial.ttf, which it would otherwise
# download on first plot. DejaVu ships with matplotlib, a dependency already.
_FONT_NAMES = ("Arial.ttf", "Arial.Unicode.ttf")


def _bundled_font() -> Path | None:
    try:
        import matplotlib
    except ImportError:  # pragma: no cover - matplotlib is a hard dependency of ultralytics
        return None
    font = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
    return font if font.exists() else None


#: ultralytics' switches for what leaves the machine (sync: usage events and crash reports) or logs
#: elsewhere (mlflow: our own tracking logs to MLflow; ultralytics' callback would duplicate it)
_OFFLINE_SETTINGS: dict[str, object] = {
    "sync": False,
    "clearml": False,
    "comet": False,
    "dvc": False,
    "mlflow": False,
    "raytune": False,
    "tensorboard": False,
    "wandb": False,
    "vscode_msg": False,
    "openvino_msg": False,
}


def prepare_yolo_config_dir(config_dir: Path) -> Path:
    """Create ultralytics' config dir with fonts and offline settings, idempotently.

    A ``settings.json`` already there (a caller's own ``YOLO_CONFIG_DIR``, which ultralytics may
    have filled with its defaults) keeps its other values but has the switches turned off.
    """
    target = config_dir / "Ultralytics"
    target.mkdir(parents=True, exist_ok=True)
    font = _bundled_font()
    if font is not None:
        for name in _FONT_NAMES:
            dest = target / name
            if not dest.exists():
                shutil.copyfile(font, dest)
    settings = target / "settings.json"
    # Every key of ultralytics' settings schema (v0.0.8), so it never rewrites the
    # file with its defaults (sync and the third-party loggers on).
    values: dict[str, object] = {
        "settings_version": "0.0.8",
        "datasets_dir": str(config_dir / "datasets"),
        "weights_dir": str(config_dir / "weights"),
        "runs_dir": str(config_dir / "runs"),
        "uuid": "cxr-offline",
        "api_key": "",
        "openai_api_key": "",
        **_OFFLINE_SETTINGS,
    }
    try:
        existing = json.loads(settings.read_text())
    except (OSError, ValueError):
        existing = None
    if isinstance(existing, dict):
        # A file ultralytics (or a person) wrote first keeps its folders but gets the switches off:
        # its own defaults have sync and every logger on, and "only when missing" left them so.
        if all(existing.get(key) == value for key, value in _OFFLINE_SETTINGS.items()):
            return config_dir
        values = {**existing, **_OFFLINE_SETTINGS}
    # whole or not at all: ultralytics resets a file it cannot parse to its defaults (sync on)
    replace_durably(settings, (json.dumps(values, indent=2) + "\n").encode())
    return config_dir


#: Loopback as proxy exclusion lists name it (a host, not a CIDR: gRPC's C core matches hosts only).
_LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")
_PROXY_EXCLUSION_LISTS = ("NO_PROXY", "no_proxy", "no_grpc_proxy")


def _no_proxy_with_loopback(environ: Mapping[str, str]) -> str:
    """The caller's proxy exclusions (``NO_PROXY`` and ``no_proxy`` together) plus loopback.

    A hospital machine often has a proxy in its environment (``http_proxy``) and its own
    ``no_proxy`` list. requests, httpx and urllib read the lowercase list when both exist, and
    gRPC's C core (tritonclient's channel to Triton) reads only lowercase names: with loopback in
    neither list, a request to a server of this stack on 127.0.0.1 travels through the proxy,
    off this machine. Keeping the caller's entries means their own exclusions still hold.
    """
    entries: list[str] = []
    for raw in (environ.get("NO_PROXY", ""), environ.get("no_proxy", ""), ",".join(_LOOPBACK_NAMES)):
        for entry in (part.strip() for part in raw.split(",")):
            if entry and entry not in entries:
                entries.append(entry)
    return ",".join(entries)


def _proxy_exclusions(environ: Mapping[str, str]) -> dict[str, str]:
    """Loopback in every proxy exclusion list a library here reads (see :func:`_no_proxy_with_loopback`).

    gRPC reads ``no_grpc_proxy`` instead of ``no_proxy`` when it is set, so a caller's one gets
    loopback too; an unset one stays unset.
    """
    merged = _no_proxy_with_loopback(environ)
    lists = {"NO_PROXY": merged, "no_proxy": merged}
    if "no_grpc_proxy" in environ:
        lists["no_grpc_proxy"] = _no_proxy_with_loopback({"NO_PROXY": environ["no_grpc_proxy"]})
    return lists


def offline_env(state_dir: Path) -> dict[str, str]:
    """Environment variables that switch off telemetry and online checks.

    The proxy exclusions start from this process's own (``os.environ``): a component's
    environment is laid over the one it inherits, so its lists must keep what was there.
    """
    yolo_dir = prepare_yolo_config_dir(state_dir / "yolo")
    return {
        "YOLO_OFFLINE": "1",
        "YOLO_CONFIG_DIR": str(yolo_dir),
        "YOLO_VERBOSE": os.environ.get("YOLO_VERBOSE", "False"),
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_AUTH_MODE": "disabled",
        "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0",
        # One-machine Ray: every Ray process binds and advertises 127.0.0.1 instead of
        # the address it would otherwise discover with a UDP "connect" to 8.8.8.8.
        # (KubeRay pods in the cluster do not get this variable.)
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        # FastAPI >= 0.165 adds OTLP exporters at startup when this is "true" (MLflow's server is
        # a FastAPI app); "false" overrides an inherited "true" for every process the stack starts
        "FASTAPI_OTEL_AUTO_CONFIGURE": "false",
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        "DO_NOT_TRACK": "1",
        "HF_HUB_OFFLINE": "1",
        "GIT_PYTHON_REFRESH": "quiet",
        # boto3/pyarrow without keys ask the cloud's metadata address (169.254.169.254) for some:
        # off this machine; training set it for itself only, the stack's other processes did not
        "AWS_EC2_METADATA_DISABLED": "true",
        **_proxy_exclusions(os.environ),
    }


def ensure_ray_bootstrap_marker(home: Path | None = None) -> None:
    """Ray's dashboard probes cloud metadata (169.254.169.254) unless this file exists."""
    marker = (home or Path.home()) / "ray_bootstrap_config.yaml"
    if not marker.exists():
        marker.write_text("# created by cxr: tells Ray it is not on a cloud VM (no metadata probes)\n")


def apply_offline_env(state_dir: Path) -> dict[str, str]:
    """Apply :func:`offline_env` to this process without overriding explicit settings.

    The proxy exclusion lists are the one exception to "set only what is unset": they are
    replaced by the caller's entries plus loopback, which drops nothing the caller set.
    """
    env = offline_env(state_dir)
    for key, value in env.items():
        if key in _PROXY_EXCLUSION_LISTS:
            os.environ[key] = value
        else:
            os.environ.setdefault(key, value)
    # A caller's own YOLO_CONFIG_DIR wins, so make sure that one is prepared too.
    prepare_yolo_config_dir(Path(os.environ["YOLO_CONFIG_DIR"]))
    ensure_ray_bootstrap_marker()
    return env
