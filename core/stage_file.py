"""The stage model files: ``k8s/overlays/<stage>/model.yaml``, the GitOps truth of what each stage serves.

Only ``promote``/``rollback``/``canary step`` write them, always followed by one git commit, so a
promotion is a one-line diff a reviewer reads in seconds and ``git revert`` undoes it. The gateway
and the reconciler read them; Kustomize turns each into the stage's ConfigMap in the cluster.
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from core.durable import fsync_dir, make_dirs, replace_durably
from core.errors import StageFileError
from core.stages import PROMOTION_ORDER, Stage
from core.variants import DEFAULT_VARIANT, Variant

DEFAULT_MODEL_NAME = "cxr-detector"
#: an MLflow version number: ASCII digits only (``str.isdigit`` also accepts "²" and "٣")
VERSION_PATTERN = re.compile(r"[0-9]+")
#: a registered model's name: it becomes a folder of the published Triton repository and an
#: unquoted line of the file, so no path separator, no "." or ".." alone, no space or line break
MODEL_NAME_PATTERN = re.compile(r"(?!\.{1,2}\Z)[A-Za-z0-9_.-]{1,128}\Z")

_HEADER = (
    "# Model served by the {stage} stage: the only file `cxr promote` / `cxr rollback` edit.\n"
    "# Change it through a commit (ArgoCD syncs it; the one-machine stack follows it).\n"
)


class StageFile(BaseModel):
    """Contents of one stage's ``model.yaml``; ``canary_weight`` exists in the canary file only."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    stage: Stage
    model_name: str = DEFAULT_MODEL_NAME
    model_version: str = Field(default="", description='registry version, "" when the stage serves nothing')
    canary_weight: int | None = Field(default=None, ge=0, le=100, description="% of production traffic")
    # a file written before variants existed has no such line: it served the fp32 export
    variant: Variant = Field(default=DEFAULT_VARIANT, description="serving precision (core/variants.py)")

    @field_validator("model_version", mode="before")
    @classmethod
    def _version_as_text(cls, value: object) -> object:
        # YAML reads an unquoted 3 as int; the registry's versions are strings.
        if value is None:
            return ""
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else value

    @field_validator("model_name")
    @classmethod
    def _name_is_safe(cls, value: str) -> str:
        if not MODEL_NAME_PATTERN.match(value):
            raise ValueError(f"model_name must be letters, digits, '.', '_' or '-', got {value!r}")
        return value

    @field_validator("model_version")
    @classmethod
    def _version_is_number(cls, value: str) -> str:
        if value and not VERSION_PATTERN.fullmatch(value):
            raise ValueError(f"model_version must be an MLflow version number or empty, got {value!r}")
        return value

    @model_validator(mode="before")
    @classmethod
    def _canary_weight_defaults_to_zero(cls, data: object) -> object:
        if isinstance(data, dict) and data.get("stage") == "canary" and data.get("canary_weight") is None:
            return {**data, "canary_weight": 0}
        return data

    @model_validator(mode="after")
    def _weight_only_on_canary(self) -> StageFile:
        if self.stage != "canary" and self.canary_weight is not None:
            raise ValueError(f"canary_weight belongs in the canary file only, not in {self.stage}")
        return self

    @property
    def serves(self) -> bool:
        """Whether the stage names a model version at all."""
        return bool(self.model_version)


def stage_file_path(gitops_dir: Path, stage: Stage) -> Path:
    """Where a stage's model file lives inside the GitOps repository."""
    if stage not in PROMOTION_ORDER:
        raise StageFileError(f"unknown stage {stage!r}; use one of {', '.join(PROMOTION_ORDER)}")
    return Path(gitops_dir) / "k8s" / "overlays" / stage / "model.yaml"


def parse_stage_file(text: str, stage: Stage, source: str = "model.yaml") -> StageFile:
    """Validate a stage file's YAML text (from disk or from ``git show``)."""
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise StageFileError(f"{source} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise StageFileError(f"{source} must be a mapping with stage/model_name/model_version")
    try:
        parsed = StageFile.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'file'}: {e['msg']}" for e in exc.errors())
        raise StageFileError(f"{source} is invalid: {problems}") from exc
    if parsed.stage != stage:
        raise StageFileError(f"{source} says stage {parsed.stage!r} but lives in the {stage!r} overlay")
    return parsed


def read_stage_text(gitops_dir: Path, stage: Stage) -> str | None:
    """A stage file's text; None when there is no file (the stage serves nothing).

    :class:`StageFileError` when it is not UTF-8; an ``OSError`` when it cannot be read.
    """
    path = stage_file_path(gitops_dir, stage)
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except UnicodeDecodeError as exc:
        raise StageFileError(f"{path} is not UTF-8 text: {exc}") from exc


def stage_file_from_text(text: str | None, stage: Stage, source: str = "model.yaml") -> StageFile:
    """What :func:`read_stage_text` gave, validated: no file means the stage serves nothing."""
    return StageFile(stage=stage) if text is None else parse_stage_file(text, stage, source)


def read_stage_file(gitops_dir: Path, stage: Stage) -> StageFile:
    """Read and validate a stage's model file; a missing file means the stage serves nothing."""
    text = read_stage_text(gitops_dir, stage)
    return stage_file_from_text(text, stage, str(stage_file_path(gitops_dir, stage)))


def render_stage_file(content: StageFile) -> str:
    """The file's text: fixed key order and a quoted version, so each change is a one-line diff."""
    lines = [
        _HEADER.format(stage=content.stage),
        f"stage: {content.stage}\n",
        f"model_name: {content.model_name}\n",
        f'model_version: "{content.model_version}"\n',
        f"variant: {content.variant}\n",
    ]
    if content.stage == "canary":
        lines.append(f"canary_weight: {content.canary_weight or 0}\n")
    return "".join(lines)


def write_stage_text(gitops_dir: Path, stage: Stage, text: str | None) -> Path:
    """Put ``text`` at the stage's model file durably, or remove the file when ``text`` is None.

    The text goes to a temp file of its own (a unique name beside the file), is fsync'd and
    renamed over the file, and the folder is fsync'd: readers polling it never see half a file,
    two writers never share a temp file, and what returns is on disk. This is also how a
    delivery command puts back the text it read when its commit fails.
    """
    path = stage_file_path(gitops_dir, stage)
    if text is None:
        path.unlink(missing_ok=True)
        if path.parent.is_dir():
            fsync_dir(path.parent)
        return path
    make_dirs(path.parent)
    replace_durably(path, text.encode("utf-8"))
    fsync_dir(path.parent)
    return path


def write_stage_file(gitops_dir: Path, content: StageFile) -> Path:
    """Write a stage's model file atomically and durably (:func:`write_stage_text`)."""
    return write_stage_text(gitops_dir, content.stage, render_stage_file(content))
