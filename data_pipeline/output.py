"""The output folder a command writes into, checked before any work: one clear error, not a traceback."""

from __future__ import annotations

from pathlib import Path

from data_pipeline.errors import DataPipelineError


def ensure_output_folder(out_dir: Path, folder: Path | None = None) -> None:
    """Create ``folder`` (default ``out_dir``) under the ``--out`` folder ``out_dir``, or say why not.

    ``--out`` naming a file, or a place this user cannot write, raised ``FileExistsError`` or
    ``NotADirectoryError`` from deep inside the command after its inputs were read.
    """
    if out_dir.exists() and not out_dir.is_dir():
        raise DataPipelineError(f"output {out_dir} is a file, not a folder: pass --out a folder")
    target = folder or out_dir
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a place this user cannot write
        raise DataPipelineError(
            f"cannot create the output folder {target} ({exc.strerror}): pass --out a folder you can write"
        ) from exc
