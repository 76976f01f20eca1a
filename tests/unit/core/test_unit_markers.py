"""`make test` runs the `unit` marker on two processes and everything else one at a time.

A test module under tests/unit/ without the marker would still run (in the second, serial
run), but `make test-fast` would skip it silently; a server-backed module with the marker
would run beside another test's servers on the machine's two cores. Both mistakes are
caught here, by reading the modules rather than trusting a conftest to add the marker.
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

TESTS = Path(__file__).resolve().parents[2]
MARK = "pytest.mark.unit"


def _modules(folder: Path) -> list[Path]:
    return sorted(folder.rglob("test_*.py"))


def test_every_unit_test_module_carries_the_unit_marker() -> None:
    modules = _modules(TESTS / "unit")
    assert len(modules) > 50
    unmarked = [str(m.relative_to(TESTS)) for m in modules if MARK not in m.read_text()]
    assert not unmarked, f"add `pytestmark = pytest.mark.unit` to: {unmarked}"


def test_no_server_backed_test_module_carries_the_unit_marker() -> None:
    modules = [m for m in _modules(TESTS) if not m.is_relative_to(TESTS / "unit")]
    assert len(modules) > 10
    marked = [str(m.relative_to(TESTS)) for m in modules if MARK in m.read_text()]
    assert not marked, f"these start servers and must not run in the parallel unit run: {marked}"
