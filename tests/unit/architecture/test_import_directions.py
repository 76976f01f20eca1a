"""The packages form layers, and no module imports one above its own (docs/architecture.md).

Every ``import`` in the project's code counts, the ones inside functions too (a lazy import
is still a dependency), so a wrong-way import fails here before it becomes a cycle.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[3]

# package -> the project packages it may import (besides itself), lowest layer first
ALLOWED: dict[str, set[str]] = {
    "core": set(),
    "data_pipeline": {"core"},
    "training": {"core", "data_pipeline"},
    "serving": {"core", "data_pipeline"},
    "delivery": {"core", "data_pipeline", "training", "serving"},
    "workflows": {"core", "data_pipeline", "training", "delivery"},
    "stack": {"core", "data_pipeline", "training", "serving", "delivery", "workflows"},
    "cxr": {"core", "data_pipeline", "training", "serving", "delivery", "workflows", "stack"},
    # benchmarks measure what the stack runs (bootstrap recipe, variant gate); nothing imports them
    "benchmarks": {"core", "data_pipeline", "training", "serving", "delivery", "stack"},
}

# inside serving: the shared modules at its root, then the subpackages that build on them
SERVING_ROOT = {
    "config",
    "errors",
    "contract",
    "metrics",
    "results",
    "limits",
    "logsafe",
    "pacs_destinations",
    "__init__",
}
SERVING_ALLOWED: dict[str, set[str]] = {
    "<root>": {"<root>"},
    "triage": {"<root>"},  # the worklist: inference records each analysed study in it
    "inference": {"<root>", "triage"},
    "dicom": {"<root>", "inference"},  # the STOW use case runs each part through inference
    "feedback": {"<root>", "dicom"},
    "observability": {"<root>"},
    # send-back builds DICOM objects of detection replies, or of a study the worklist knows
    "pacs": {"<root>", "dicom", "inference", "triage"},
    "dimse": {"<root>", "dicom"},  # its own process: hands studies to the gateway over HTTP
    "gateway": {"<root>", "dicom", "inference", "feedback", "triage", "pacs"},
    "cli": {"<root>", "gateway"},
    "__main__": {"cli"},
}


def _modules(package: str) -> Iterator[tuple[str, Path]]:
    for path in sorted((REPO / package).rglob("*.py")):
        yield ".".join(path.relative_to(REPO).with_suffix("").parts), path


def _imports(path: Path) -> Iterator[tuple[int, str]]:
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.lineno, node.module
            for alias in node.names:  # `from serving import x` imports serving.x
                yield node.lineno, f"{node.module}.{alias.name}"


def _serving_part(module: str) -> str:
    parts = module.split(".")
    if len(parts) < 2 or parts[1] in SERVING_ROOT:
        return "<root>"
    return parts[1]


def _violations() -> list[str]:
    found = []
    for package, allowed in ALLOWED.items():
        for module, path in _modules(package):
            for line, target in _imports(path):
                top = target.split(".")[0]
                if top in ALLOWED and top != package and top not in allowed:
                    found.append(f"{path.relative_to(REPO)}:{line} {module} imports {target}")
                if package == "serving" and top == "serving":
                    mine, theirs = _serving_part(module), _serving_part(target)
                    if theirs != mine and theirs not in SERVING_ALLOWED[mine]:
                        found.append(f"{path.relative_to(REPO)}:{line} {module} imports {target}")
    return sorted(set(found))


def test_no_package_imports_one_above_it() -> None:
    assert _violations() == []


def test_every_package_is_in_the_layer_map() -> None:
    """A new top-level package must be placed in a layer before it can import anything."""
    packages = {p.parent.name for p in REPO.glob("*/__init__.py")}
    assert packages - {"tests"} <= set(ALLOWED), sorted(packages - {"tests"} - set(ALLOWED))
    serving_parts = {
        _serving_part(f"serving.{p.stem if p.suffix else p.name}") for p in (REPO / "serving").iterdir()
    }
    assert serving_parts - {"static", "__pycache__"} <= set(SERVING_ALLOWED)


def test_the_check_sees_a_wrong_way_import(tmp_path: Path) -> None:
    """The walk finds imports inside functions too (a check that cannot fail proves nothing)."""
    module = tmp_path / "lazy.py"
    module.write_text("def f():\n    from delivery.promote import promote_version\n")
    assert ("delivery.promote") in {target for _, target in _imports(module)}
