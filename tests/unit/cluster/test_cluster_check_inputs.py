"""``cxr cluster check`` on a checkout whose Terraform or YAML does not parse: one line naming the file.

A broken ``variables.tf`` was lark's ``UnexpectedToken``, a broken group_vars file or
``docker-compose.yaml`` a ``yaml`` error or an ``AttributeError``: a traceback naming no file.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from typer.testing import CliRunner

from delivery.cluster_fit.cli import app

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[3]
TREE_PARTS = ("k8s", "iac/ansible", "iac/terraform/envs", "workflows/permissions.yaml", "docker-compose.yaml")


def _append(path: str, text: str) -> Callable[[Path], None]:
    def apply(root: Path) -> None:
        with (root / path).open("a") as handle:
            handle.write(text)

    return apply


def _replace(path: str, text: str) -> Callable[[Path], None]:
    return lambda root: (root / path).write_text(text)


BROKEN = {
    "variables.tf": (
        _append("iac/terraform/envs/dev/variables.tf", 'variable "x" { default = \n'),
        "iac/terraform/envs/dev/variables.tf is not valid HCL at line",
    ),
    "group_vars": (
        _append("iac/ansible/inventory/group_vars/all.yml", "broken: [\n"),
        "iac/ansible/inventory/group_vars/all.yml cannot be read as YAML",
    ),
    "compose-list": (
        _replace("docker-compose.yaml", "- a\n- b\n"),
        "docker-compose.yaml holds a YAML list, not the mapping",
    ),
}


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_a_file_that_does_not_parse_is_one_error_line_naming_it(name: str, tmp_path: Path) -> None:
    root = tmp_path / "tree"
    for part in TREE_PARTS:
        src = REPO / part
        if src.is_dir():
            shutil.copytree(src, root / part, ignore=shutil.ignore_patterns(".terraform", "__pycache__"))
        else:
            (root / part).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, root / part)
    break_it, expected = BROKEN[name]
    break_it(root)
    result = CliRunner().invoke(app, ["--root", str(root)])  # one command: Typer runs it without its name
    assert result.exit_code == 2, result.output
    assert expected.replace(" ", "") in "".join(result.output.split()), result.output  # rich wraps the path
    assert isinstance(result.exception, SystemExit), result.exception
