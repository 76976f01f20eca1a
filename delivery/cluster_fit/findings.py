"""What a check reports: one line a platform engineer can act on, and the check that found it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Finding:
    """One misfit between parts of the cluster path."""

    check: str
    where: str
    problem: str

    def line(self) -> str:
        return f"[{self.check}] {self.where}: {self.problem}"
