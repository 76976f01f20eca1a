"""Structured commit messages: a human subject and body, then git trailers machines parse.

Reviewers read the subject and the gate table; ``rollback`` and the tests read the
``Cxr-*`` trailers (``git interpret-trailers --parse`` reads them too), so the history of a
stage file is also the audit log of every promotion, rollback and canary step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Action = Literal["promote", "rollback", "canary-step"]
_PREFIX = "Cxr-"


@dataclass(frozen=True)
class DeliveryRecord:
    """What one delivery commit did: enough to audit it and to undo it."""

    action: Action
    model_name: str
    stage: str
    from_version: str
    to_version: str
    variant: str = ""  # the serving variant the stage now names ("" in records made before variants)
    canary_weight: int | None = None
    forced: bool = False
    reason: str = ""
    rolled_back_version: str = ""
    details: list[str] = field(default_factory=list)

    def subject(self) -> str:
        before = self.from_version or "none"
        after = self.to_version or "none"
        if self.action == "promote":
            served = after if self.variant in ("", "fp32") else f"{after} ({self.variant})"
            return f"promote {self.model_name} {served} to {self.stage} (was {before})"
        if self.action == "rollback":
            after = after if self.variant in ("", "fp32") else f"{after} ({self.variant})"
            return f"rollback {self.stage}: {self.model_name} {before} -> {after}"
        return f"canary step: {self.model_name} {after} weight {self.canary_weight}%"

    def trailers(self) -> dict[str, str]:
        values = {
            "Action": self.action,
            "Model": self.model_name,
            "Stage": self.stage,
            "From-Version": self.from_version or "none",
            "To-Version": self.to_version or "none",
            "Forced": "true" if self.forced else "false",
        }
        if self.variant:
            values["Variant"] = self.variant
        if self.canary_weight is not None:
            values["Canary-Weight"] = str(self.canary_weight)
        if self.rolled_back_version:
            values["Rolled-Back-Version"] = self.rolled_back_version
        if self.reason:
            values["Reason"] = " ".join(self.reason.split())  # a trailer is one line
        return {_PREFIX + k: v for k, v in values.items()}

    def render(self) -> str:
        body = "\n".join(self.details) if self.details else "No gates evaluated."
        trailers = "\n".join(f"{k}: {v}" for k, v in self.trailers().items())
        return f"{self.subject()}\n\n{body}\n\n{trailers}\n"


def parse_trailers(message: str) -> dict[str, str]:
    """The ``Cxr-*`` trailers of a commit message, keys without the prefix (empty if none)."""
    found: dict[str, str] = {}
    for line in message.splitlines():
        key, sep, value = line.partition(": ")
        if sep and key.startswith(_PREFIX) and " " not in key:
            found[key.removeprefix(_PREFIX)] = value.strip()
    return found


def parse_record(message: str) -> DeliveryRecord | None:
    """Rebuild the record of a delivery commit, or None for any other commit."""
    t = parse_trailers(message)
    if "Action" not in t or "Stage" not in t:
        return None

    def version(key: str) -> str:
        value = t.get(key, "none")
        return "" if value == "none" else value

    weight = t.get("Canary-Weight")
    action = t["Action"]
    if action not in ("promote", "rollback", "canary-step"):
        return None
    return DeliveryRecord(
        action=action,  # type: ignore[arg-type]  # checked just above
        model_name=t.get("Model", ""),
        stage=t["Stage"],
        from_version=version("From-Version"),
        to_version=version("To-Version"),
        variant=t.get("Variant", ""),
        canary_weight=int(weight) if weight is not None and weight.isdigit() else None,
        forced=t.get("Forced") == "true",
        reason=t.get("Reason", ""),
        rolled_back_version=t.get("Rolled-Back-Version", ""),
    )
