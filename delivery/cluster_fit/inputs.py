"""The checkout's own files the checks read (YAML, Terraform): one that does not parse stops the check.

A broken ``variables.tf``, Ansible group_vars file or ``docker-compose.yaml`` was a traceback from
deep in a parser, naming no file; now it is a :class:`RenderError` naming the file and the place.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml


class RenderError(RuntimeError):
    """A folder does not render, or a file the checks read does not parse; the checks cannot run."""


def read_yaml(path: Path) -> Any:
    """``path``'s YAML document; :class:`RenderError` naming the file when it cannot be read or parsed."""
    try:
        with path.open(encoding="utf-8") as handle:  # the stream's name puts the file in the error
            return yaml.safe_load(handle)
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        problem = " ".join(str(exc).split())
        raise RenderError(f"{path} cannot be read as YAML: {problem}") from exc


def read_hcl(path: Path) -> dict[str, Any]:
    """``path`` parsed by python-hcl2; :class:`RenderError` naming the file when it does not parse."""
    import hcl2
    from lark.exceptions import LarkError, UnexpectedInput

    try:
        with path.open(encoding="utf-8") as handle:
            parsed: dict[str, Any] = hcl2.load(handle)
    except UnexpectedInput as exc:  # its text lists every token the grammar expected there
        raise RenderError(f"{path} is not valid HCL at line {exc.line}, column {exc.column}") from exc
    except (OSError, UnicodeDecodeError, LarkError) as exc:
        raise RenderError(f"{path} cannot be read as HCL: {str(exc).splitlines()[0]}") from exc
    return parsed


def read_mapping(path: Path) -> dict[str, Any]:
    """``path``'s YAML mapping ({} when empty); :class:`RenderError` when it holds anything else."""
    data = read_yaml(path)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise RenderError(f"{path} holds a YAML {type(data).__name__}, not the mapping the checks read")
    return data
