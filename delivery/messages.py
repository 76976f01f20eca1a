"""Structured commit messages: a human subject and body, then git trailers machines parse.

Reviewers read the subject and the gate table; ``rollback`` and the tests read the
``Cxr-*`` trailers (``git interpret-trailers --parse`` reads them too), so the history of a
stage file is also the audit log of every promotion, rollback and canary step.

Only the message's last paragraph is its trailer block (as for git), and every text put into a
message (gate lines built from MLflow tags, the reason) has its control characters replaced by
spaces, one line each: what a tag says can never add a line, let alone a ``Cxr-*`` trailer.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field
from typing import Literal

Action = Literal["promote", "rollback", "canary-step"]
_PREFIX = "Cxr-"
_TRAILER = re.compile(r"(Cxr-[A-Za-z0-9-]+): (.*)")
_WEIGHT = re.compile(r"[0-9]{1,3}")
# Cc: C0/C1 controls (newline, carriage return, escape, NUL); Zl/Zp: the line and paragraph separators
_BREAKING = frozenset({"Cc", "Zl", "Zp"})


def one_line(text: str) -> str:
    """``text`` with every control character and line separator replaced by a space."""
    return "".join(" " if unicodedata.category(ch) in _BREAKING else ch for ch in text)


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
            "Model": one_line(self.model_name),
            "Stage": one_line(self.stage),
            "From-Version": one_line(self.from_version) or "none",
            "To-Version": one_line(self.to_version) or "none",
            "Forced": "true" if self.forced else "false",
        }
        if self.variant:
            values["Variant"] = one_line(self.variant)
        if self.canary_weight is not None:
            values["Canary-Weight"] = str(self.canary_weight)
        if self.rolled_back_version:
            values["Rolled-Back-Version"] = one_line(self.rolled_back_version)
        if self.reason:
            values["Reason"] = " ".join(one_line(self.reason).split())  # a trailer is one line
        return {_PREFIX + k: v for k, v in values.items()}

    def render(self) -> str:
        """Subject, the details (one line each, control characters replaced), then the trailers."""
        body = "\n".join(one_line(d).rstrip() for d in self.details) if self.details else ""
        trailers = "\n".join(f"{k}: {v}" for k, v in self.trailers().items())
        return f"{one_line(self.subject())}\n\n{body or 'No gates evaluated.'}\n\n{trailers}\n"


def parse_trailers(message: str) -> dict[str, str]:
    """The ``Cxr-*`` trailers of a commit message's last paragraph, keys without the prefix.

    Empty when that paragraph holds none: ``Cxr-*`` lines anywhere else (the gate table, a
    reviewer's note) are text, not trailers. Other trailers beside ours (``Signed-off-by``, a
    cherry-pick's note) are skipped.
    """
    paragraphs = re.split(r"\n[ \t]*\n", message.replace("\r\n", "\n").strip("\n"))
    found: dict[str, str] = {}
    if len(paragraphs) < 2:  # a subject alone has no trailer block
        return found
    for line in paragraphs[-1].split("\n"):
        match = _TRAILER.fullmatch(line.rstrip())
        if match:
            found[match.group(1).removeprefix(_PREFIX)] = match.group(2).strip()
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
        canary_weight=int(weight) if weight is not None and _WEIGHT.fullmatch(weight) else None,
        forced=t.get("Forced") == "true",
        reason=t.get("Reason", ""),
        rolled_back_version=t.get("Rolled-Back-Version", ""),
    )
