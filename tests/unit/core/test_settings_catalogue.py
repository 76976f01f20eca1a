"""docs/settings.md and the settings classes agree: every variable listed, every default as documented.

And no page of the README or docs names a ``CXR_*`` variable nothing reads: an operator who sets
one the code does not know gets no error, only a setting that silently does nothing.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel
from pydantic_settings import BaseSettings

from core.settings import CoreSettings
from data_pipeline.config import DataSettings
from serving.config import ServingSettings
from stack.config import StackSettings
from training.config import TrainSettings
from workflows.config import WorkflowSettings

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[3]
CATALOGUE = REPO / "docs" / "settings.md"
CLASSES: tuple[type[BaseSettings], ...] = (
    CoreSettings,
    StackSettings,
    ServingSettings,
    DataSettings,
    TrainSettings,
    WorkflowSettings,
)
#: measurement history, not instructions: it names settings tried and not kept
NOT_CHECKED = {"benchmarks.md"}
VARIABLE = re.compile(r"CXR_[A-Z0-9_]*[A-Z0-9]")
#: a written name that starts like one, ``CXR_TRITON_{PRODUCTION,CANARY,STAGING}_PORT`` or ``CXR_S3_*``
MENTION = re.compile(r"CXR_[A-Z0-9_]*(?:\{[A-Z0-9_,]+\}[A-Z0-9_]*)?\*?")
#: CXR_* words that are not variables: the GSPS graphic layer of docs/pacs.md
NOT_VARIABLES = {"CXR_DETECT"}


def _render(value: Any) -> str:
    """A default as the catalogue writes it."""
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, str):
        return value or '""'
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return str(value)


def _code_defaults() -> dict[str, set[str]]:
    """Every variable the settings classes read -> its default(s), as rendered."""
    out: dict[str, set[str]] = {}
    for cls in CLASSES:
        prefix = str(cls.model_config.get("env_prefix", ""))
        nested = cls.model_config.get("env_nested_delimiter")
        for name, field in cls.model_fields.items():
            default = field.get_default(call_default_factory=True)
            variable = (prefix + name).upper()
            if isinstance(default, BaseModel) and nested:
                for sub, value in default.model_dump().items():
                    out.setdefault(f"{variable}{nested}{sub.upper()}", set()).add(_render(value))
            else:
                out.setdefault(variable, set()).add(_render(default))
    return out


def _catalogue_rows() -> dict[str, str | None]:
    """Variable -> documented default (None where the default is words, not a value)."""
    rows: dict[str, str | None] = {}
    for line in CATALOGUE.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 3 or not cells[0].startswith("`CXR_"):
            continue
        names = re.findall(r"`(CXR_[A-Z0-9_]+)`", cells[0])
        values = re.findall(r"`([^`]*)`", cells[1])
        if not re.fullmatch(r"`[^`]*`(, `[^`]*`)*", cells[1]):  # words, e.g. "the Python running `cxr`"
            values = []
        if cells[1] == "unset":
            values = ["unset"] * len(names)
        for i, name in enumerate(names):
            rows[name] = values[i] if len(values) == len(names) else None
    return rows


def _not_settings() -> set[str]:
    section = CATALOGUE.read_text().split("## Variables that are not settings", 1)[1]
    return set(VARIABLE.findall(section))


def test_the_catalogue_lists_every_setting_the_code_reads() -> None:
    documented = _catalogue_rows()
    missing = sorted(set(_code_defaults()) - set(documented))
    assert not missing, f"settings missing from docs/settings.md: {missing}"


def test_the_catalogue_lists_no_setting_the_code_does_not_read() -> None:
    extra = sorted(set(_catalogue_rows()) - set(_code_defaults()) - _not_settings())
    assert not extra, f"docs/settings.md lists variables no settings class reads: {extra}"


def test_every_documented_default_is_the_code_default() -> None:
    code = _code_defaults()
    wrong = {
        name: (documented, sorted(code[name]))
        for name, documented in _catalogue_rows().items()
        if documented is not None and name in code and code[name] != {documented}
    }
    assert not wrong, f"docs/settings.md default != code default (documented, code): {wrong}"


def _named(text: str) -> set[str]:
    """The variables a page names, braces expanded; a ``*`` pattern must match one."""
    names: set[str] = set()
    for mention in MENTION.findall(text):
        braces = re.fullmatch(r"(CXR_[A-Z0-9_]*)\{([A-Z0-9_,]+)\}([A-Z0-9_]*)", mention)
        if braces:
            names |= {braces[1] + part + braces[3] for part in braces[2].split(",")}
        else:
            names.add(mention)
    return names


def test_the_docs_name_only_variables_something_reads() -> None:
    known = set(_code_defaults()) | _not_settings() | NOT_VARIABLES
    pages = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    unknown = {
        f"{page.relative_to(REPO)}: {name}"
        for page in pages
        if page.name not in NOT_CHECKED
        for name in _named(page.read_text())
        if name not in known
        and name != "CXR_"  # the prefix itself
        and not (name.endswith("*") and any(k.startswith(name[:-1]) for k in known))
    }
    assert not unknown, f"the docs name CXR_* variables nothing reads: {sorted(unknown)}"
