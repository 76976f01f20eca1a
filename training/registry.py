"""The MLflow model registry: the one client training, delivery and the pipeline steps use.

Training only ever CREATES versions (:meth:`ModelRegistry.register`), each marked incomplete
(:data:`INCOMPLETE_TAG`) until the run that made it has finished, and withdrawn when that run fails
after registering (:meth:`ModelRegistry.withdraw`); every read of a version refuses one still
marked, so a run that failed or died after registering leaves no usable model. Aliases (``staging``,
``canary``, ``production``) are the delivery pipeline's decision (``cxr promote``), made after
gates and review; they mirror the overlay files so the MLflow UI shows what serves where, and the
files stay the truth (a ``git revert`` wins; the next promote, rollback or reconcile re-points the
alias). It lives in ``training`` because training writes the versions and sits below
``delivery`` in the import graph, so both import it from here.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from pydantic import BaseModel

from core.operating_points import OPERATING_POINTS_FILE
from core.variants import DEFAULT_VARIANT, Variant, artifact_dir, variant_tag
from training.config import TrainConfig, TrainSettings
from training.errors import RegistryError, RegistryUnreachable

log = logging.getLogger(__name__)

ONNX_ARTIFACT_DIR = "onnx"
ONNX_FILE = "model.onnx"
WEIGHTS_ARTIFACT = "weights/best.pt"
MODEL_DESCRIPTION = "Chest X-ray finding detector (YOLO11, 14 VinDr-CXR classes), ONNX for Triton."
#: on a version from its creation until the training run that registered it has finished
#: (:func:`complete_version`); a version that still carries it was left by a run that failed, or died,
#: after registering and before its withdrawal could delete it: every read of it is refused
INCOMPLETE_TAG = "registration"
INCOMPLETE = "incomplete"
#: MLflow's column for a model version's description (``model_versions.description``, VARCHAR(5000))
DESCRIPTION_LIMIT = 5000
TRUNCATION_NOTE = (
    "\n\n... (cut to MLflow's 5000-character description limit: the full card is the run's "
    "`model_card.md` artifact)\n"
)
#: between a card that is whole and the sections recorded after it (an HTML comment: MLflow's page
#: does not show it). A cut card's note separates them; without a mark, sections recorded while the
#: card still fitted were read back as card text and cut from its end by the next section.
SECTIONS_MARK = "\n\n<!-- sections recorded after registration -->"
#: the most a description keeps of the sections recorded after the card (:meth:`ModelRegistry.record_section`)
TAIL_LIMIT = DESCRIPTION_LIMIT * 3 // 4


def fit_description(card: str, keep_tail: str = "", *, cut: bool = False) -> str:
    """``card`` + ``keep_tail`` within MLflow's limit on a version's description.

    The full model card (operating points and subgroup tables included) runs past 5000 characters;
    SQLite (the one-machine stack) stores it anyway, but the cluster's PostgreSQL refuses the write,
    so a finished training would fail to register. The card is cut with a note pointing at the
    run's ``model_card.md`` artifact; ``keep_tail`` (the sections delivery records, read by a
    reviewer) is kept whole and the card before it is cut instead. Past :data:`TAIL_LIMIT` the
    tail loses its oldest (first) ``## `` sections whole, never a part of one. ``cut``: ``card``
    was cut already (it keeps its note even when it would now fit).
    """
    mark = SECTIONS_MARK if keep_tail else ""
    if not cut and len(card) + len(mark) + len(keep_tail) <= DESCRIPTION_LIMIT:
        return card + mark + keep_tail
    tail = keep_tail
    while len(tail) > TAIL_LIMIT and (next_section := tail.find("\n\n## ", 1)) > 0:
        tail = tail[next_section:]
    tail = tail[:TAIL_LIMIT]  # one section longer than the limit alone
    room = DESCRIPTION_LIMIT - len(tail) - len(TRUNCATION_NOTE)
    return card[:room].rstrip() + TRUNCATION_NOTE + tail


def _without_section(text: str, heading: str) -> str:
    """``text`` without the ``## `` section that starts at ``heading`` (unchanged when there is none)."""
    start = text.find(heading)
    if start < 0:
        return text
    end = text.find("\n## ", start + len(heading))
    return text[:start].rstrip() + ("\n\n" + text[end + 1 :] if end >= 0 else "")


class LineageTags(BaseModel):
    """Tags on every registered version; promotion gates and the gateway read them by these names."""

    dataset_version: str
    git_commit: str
    config_sha256: str
    onnx_sha256: str
    map50: float
    map40: float
    parity_max_abs_diff: float
    imgsz: int
    classes: int

    def as_tags(self) -> dict[str, str]:
        return {key: str(value) for key, value in self.model_dump().items()}


#: the tag names every registered version must carry (the fields of :class:`LineageTags`)
REQUIRED_TAGS: tuple[str, ...] = tuple(LineageTags.model_fields)


@dataclass(frozen=True)
class VersionFacts:
    """What the registry says about one model version (its lineage tags)."""

    version: str
    tags: dict[str, str] = field(default_factory=dict)

    def number(self, key: str) -> float | None:
        raw = self.tags.get(key)
        if raw is None or raw == "":
            return None
        try:
            return float(raw)
        except ValueError:
            return None

    @property
    def missing_tags(self) -> list[str]:
        """Lineage tags this version lacks."""
        return [t for t in REQUIRED_TAGS if t not in self.tags]


class ModelRegistry:
    """Registry calls against one tracking server (the URI is explicit: no global MLflow state)."""

    def __init__(self, tracking_uri: str, model_name: str) -> None:
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        self.tracking_uri = tracking_uri
        self.model_name = model_name
        try:
            self._client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
        except (MlflowException, ValueError) as exc:  # "mlflow:5000" reads as a folder, "http://[x" as no URL
            reason = str(exc).split(". ")[0]  # MLflow's file-store notice runs on for a paragraph
            raise RegistryError(
                f"MLflow tracking URI {tracking_uri!r} cannot be used ({reason}); "
                "set CXR_MLFLOW_URI (or --mlflow-uri) to the server's http:// address"
            ) from exc
        self._reachable = False

    @classmethod
    def from_settings(cls, settings: TrainSettings | None = None) -> ModelRegistry:
        s = settings or TrainSettings()
        return cls(s.mlflow_uri, s.registered_model)

    # ------------------------------------------------------------------ errors

    def _ensure_reachable(self, what: str) -> None:
        """Fail in seconds, not after MLflow's client has retried with backoff for minutes."""
        if self._reachable or not self.tracking_uri.startswith("http"):
            return
        try:
            httpx.get(f"{self.tracking_uri.rstrip('/')}/health", timeout=5.0).raise_for_status()
        except httpx.HTTPError as exc:
            raise self._unreachable(exc, what) from exc
        self._reachable = True

    def _unreachable(self, exc: Exception, what: str) -> RegistryError:
        return RegistryUnreachable(
            f"MLflow at {self.tracking_uri} failed while {what}: {exc}. "
            "Is the stack up (`cxr stack status`) and CXR_MLFLOW_URI right?"
        )

    # ------------------------------------------------------------------ versions

    def register(
        self,
        run_id: str,
        tags: LineageTags,
        model_card: str,
        run_tags: dict[str, str] | None = None,
        *,
        incomplete: bool = False,
    ) -> str:
        """Register the run's ONNX artifact as a new version; returns the version number.

        ``incomplete``: created with :data:`INCOMPLETE_TAG` (in the same call, so no version is ever
        without it), refused by every read until :meth:`complete` clears it.
        """
        from mlflow.exceptions import MlflowException

        name = self.model_name
        try:
            if not self._client.search_registered_models(filter_string=f"name='{name}'"):
                self._client.create_registered_model(name, description=MODEL_DESCRIPTION)
        except MlflowException as exc:
            if "RESOURCE_ALREADY_EXISTS" not in str(exc):  # a parallel run created it first: fine
                raise RegistryError(f"cannot create registered model {name}: {exc}") from exc
        marker = {INCOMPLETE_TAG: INCOMPLETE} if incomplete else {}
        try:
            run = self._client.get_run(run_id)
            version = self._client.create_model_version(
                name,
                source=f"{run.info.artifact_uri}/{ONNX_ARTIFACT_DIR}",
                run_id=run_id,
                tags={**tags.as_tags(), **(run_tags or {}), **marker},
                description=fit_description(model_card),
            )
        except MlflowException as exc:
            raise RegistryError(f"cannot register a version of {name} from run {run_id}: {exc}") from exc
        log.info(
            "event=model_registered name=%s version=%s run_id=%s incomplete=%s",
            name,
            version.version,
            run_id,
            incomplete,
        )
        return str(version.version)

    def complete(self, version: str) -> None:
        """Clear the version's :data:`INCOMPLETE_TAG`: its run has finished, the version may be used."""
        try:
            self._client.delete_model_version_tag(self.model_name, str(version), INCOMPLETE_TAG)
        except Exception as exc:  # MlflowException or a connection error
            raise self._unreachable(exc, f"marking version {version} complete") from exc
        log.info("event=model_version_complete name=%s version=%s", self.model_name, version)

    def withdraw(self, version: str, run_id: str) -> None:
        """Delete a version whose run failed after registering it; never raises (it runs on a failure).

        Where the delete fails too (MLflow down), the version keeps, or is given again,
        :data:`INCOMPLETE_TAG`, which every read refuses; the log line names it for deleting by hand.
        """
        name = self.model_name
        try:
            self._client.delete_model_version(name, str(version))
        except Exception as exc:
            try:  # the tag may have been cleared already (the failure came after :meth:`complete`)
                self._client.set_model_version_tag(name, str(version), INCOMPLETE_TAG, INCOMPLETE)
                marked = True
            except Exception:
                marked = False
            log.error(
                "event=model_version_withdraw_failed name=%s version=%s run_id=%s marked_incomplete=%s "
                "error=%s note=delete it in the MLflow UI",
                name,
                version,
                run_id,
                marked,
                str(exc).splitlines()[0] if str(exc) else type(exc).__name__,
            )
            return
        log.warning("event=model_version_withdrawn name=%s version=%s run_id=%s", name, version, run_id)

    def architecture(self, version: str) -> str | None:
        """The architecture a version was trained as (its run's ``model`` parameter); None if unrecorded."""
        mv = self._model_version(version)
        try:
            params = self._client.get_run(mv.run_id).data.params
        except Exception as exc:
            raise self._unreachable(exc, f"reading the run of version {version}") from exc
        return params.get("model") or None

    def _model_version(self, version: str) -> Any:
        from mlflow.exceptions import MlflowException

        # MLflow answers a version that is not a number ("v3", "3.0", "") with INVALID_PARAMETER_VALUE,
        # which below would read as "MLflow failed: is the stack up?", a RegistryUnreachable that
        # callers take as licence to fall back on a cached model; it is the caller's typo instead.
        if not re.fullmatch(r"[0-9]+", str(version).strip()):
            raise RegistryError(
                f"{self.model_name} version {str(version)!r} is not a version number: MLflow numbers "
                "versions 1, 2, 3 ... (pass e.g. `--model-version 3`, not `v3`)"
            )
        self._ensure_reachable(f"reading version {version}")
        try:
            mv = self._client.get_model_version(self.model_name, str(version).strip())
        except MlflowException as exc:
            if "RESOURCE_DOES_NOT_EXIST" in str(exc.error_code) or "not found" in str(exc).lower():
                raise RegistryError(
                    f"{self.model_name} version {version} is not registered in MLflow at "
                    f"{self.tracking_uri}; list versions in the MLflow UI or with `cxr train evaluate`"
                ) from exc
            raise self._unreachable(exc, f"reading version {version}") from exc
        except Exception as exc:  # connection errors surface as requests/urllib3 exceptions
            raise self._unreachable(exc, f"reading version {version}") from exc
        if (mv.tags or {}).get(INCOMPLETE_TAG) == INCOMPLETE:  # not RegistryUnreachable: no cache fallback
            raise RegistryError(
                f"{self.model_name} version {version} is incomplete: MLflow run {mv.run_id} registered it "
                "and then failed (or has not finished), so it is not a usable model; use another "
                "version, and delete this one in the MLflow UI"
            )
        return mv

    def facts(self, version: str) -> VersionFacts:
        """Lineage tags of a registered version; an unknown version is a clear error."""
        mv = self._model_version(version)
        return VersionFacts(version=str(mv.version), tags=dict(mv.tags or {}))

    def record_section(self, version: str, heading: str, body: str, tags: dict[str, str]) -> None:
        """Add (or replace) a section of the version's model card, its registry description, and tags.

        Delivery records its golden-set comparison here, so the card a reviewer opens in MLflow
        shows what the promotion was decided on. A section with the same heading is replaced, so
        a repeated promotion does not pile up copies.
        """
        from mlflow.exceptions import MlflowException

        mv = self._model_version(version)
        # a card cut to the limit: the sections recorded since follow its note, and are kept whole
        description = str(mv.description or "")
        card, note, recorded = description.partition(TRUNCATION_NOTE)
        if not note:  # a whole card: the sections recorded since follow the mark
            card, _, recorded = description.partition(SECTIONS_MARK)
        card, recorded = _without_section(card, heading), _without_section(recorded, heading)
        section = f"\n\n{heading}\n{body.strip()}\n"
        card = fit_description(card.rstrip(), recorded.rstrip() + section, cut=bool(note))
        try:
            self._client.update_model_version(self.model_name, str(version), description=card)
            for key, value in tags.items():
                self._client.set_model_version_tag(self.model_name, str(version), key, value[:5000])
        except MlflowException as exc:
            raise self._unreachable(exc, f"recording {heading!r} on version {version}") from exc

    # ------------------------------------------------------------------ aliases

    def set_alias(self, stage: str, version: str) -> None:
        """Point the stage's alias at ``version``, or remove it when the stage serves nothing."""
        from mlflow.exceptions import MlflowException

        self._ensure_reachable(f"setting alias {stage}")
        try:
            if version:
                self._client.set_registered_model_alias(self.model_name, stage, version)
            else:
                self._client.delete_registered_model_alias(self.model_name, stage)
        except MlflowException as exc:
            if not version and "RESOURCE_DOES_NOT_EXIST" in str(exc.error_code):
                return
            raise self._unreachable(exc, f"setting alias {stage}") from exc
        except Exception as exc:
            raise self._unreachable(exc, f"setting alias {stage}") from exc
        log.info("registry_alias model=%s alias=%s version=%s", self.model_name, stage, version or "none")

    def alias_version(self, stage: str) -> str:
        """Version the alias points at, "" if none."""
        from mlflow.exceptions import MlflowException

        try:
            return str(self._client.get_model_version_by_alias(self.model_name, stage).version)
        except MlflowException:
            return ""

    # ------------------------------------------------------------------ artifacts

    def _download(self, version: str, artifact: str, dest: Path) -> Path:
        import mlflow.artifacts

        mv = self._model_version(version)
        dest.mkdir(parents=True, exist_ok=True)
        try:
            local = mlflow.artifacts.download_artifacts(
                run_id=mv.run_id, artifact_path=artifact, dst_path=str(dest), tracking_uri=self.tracking_uri
            )
        except Exception as exc:  # MlflowException or an S3 error behind the proxy
            raise RegistryError(
                f"cannot download {artifact} of {self.model_name} v{version} "
                f"(MLflow at {self.tracking_uri}): {exc}"
            ) from exc
        return Path(local)

    def download_onnx(self, version: str, dest: Path, variant: Variant = DEFAULT_VARIANT) -> Path:
        """The ONNX file of a registered version's variant (``onnx/model.onnx`` for fp32) under ``dest``."""
        return self._download(version, f"{artifact_dir(variant)}/{ONNX_FILE}", dest)

    def download_weights(self, version: str, dest: Path) -> Path:
        """The PyTorch checkpoint of a registered version, the starting point for fine-tuning."""
        return self._download(version, WEIGHTS_ARTIFACT, dest)

    def download_operating_points(
        self, version: str, dest: Path, variant: Variant = DEFAULT_VARIANT
    ) -> Path | None:
        """The variant's ``operating_points.json`` under ``dest``; None for a version trained before them.

        Absence is an answer, not an error: serving then keeps its global threshold and raw scores.
        """
        mv = self._model_version(version)
        folder = artifact_dir(variant)
        try:
            listed = self._client.list_artifacts(mv.run_id, folder)
        except Exception as exc:  # MlflowException or an S3 error behind the proxy
            raise self._unreachable(exc, f"listing the artifacts of version {version}") from exc
        if not any(Path(a.path).name == OPERATING_POINTS_FILE for a in listed):
            return None
        return self._download(version, f"{folder}/{OPERATING_POINTS_FILE}", dest)

    def attach_variant(self, version: str, variant: Variant, folder: Path, tags: dict[str, str]) -> None:
        """Log ``folder``'s files as the variant's artifacts of the version's run, then its tags.

        The artifacts go first: a version whose tags name a variant always has its file. Variant
        files are immutable like the version: delivery caches them per (version, variant) and a
        stage that serves one must keep serving those bytes, so attaching a DIFFERENT file under
        a variant the version already carries is refused; the same file again is a no-op rewrite.
        """
        if variant == DEFAULT_VARIANT:
            raise RegistryError("fp32 is the version's own export; only other variants are attached")
        mv = self._model_version(version)
        key = variant_tag(variant, "sha256")
        held, new = (mv.tags or {}).get(key), tags.get(key)
        if held and new and held != new:
            raise RegistryError(
                f"{self.model_name} v{version} already carries a {variant} variant (sha256 {held[:12]}) and "
                f"this build is another file ({new[:12]}); a version's files are immutable: register a "
                "new version (`cxr train run`) to serve a different one"
            )
        try:
            for path in sorted(p for p in folder.iterdir() if p.is_file()):
                self._client.log_artifact(mv.run_id, str(path), artifact_path=artifact_dir(variant))
            for name, value in tags.items():
                self._client.set_model_version_tag(self.model_name, str(version), name, value)
        except Exception as exc:  # MlflowException or an S3 error behind the proxy
            raise self._unreachable(exc, f"attaching the {variant} variant to version {version}") from exc
        log.info("event=variant_attached name=%s version=%s variant=%s", self.model_name, version, variant)


# ---------------------------------------------------------------------- training's shorthands


def register_version(
    settings: TrainSettings,
    run_id: str,
    tags: LineageTags,
    model_card: str,
    run_tags: dict[str, str] | None = None,
) -> str:
    """Register a training run's ONNX as a new version of the settings' registered model.

    The version is incomplete (refused by every read) until :func:`complete_version`; a run that
    fails before then calls :func:`withdraw_version`.
    """
    return ModelRegistry.from_settings(settings).register(run_id, tags, model_card, run_tags, incomplete=True)


def complete_version(settings: TrainSettings, version: str) -> None:
    """The run that registered ``version`` has finished: the version may be used."""
    ModelRegistry.from_settings(settings).complete(version)


def withdraw_version(settings: TrainSettings, version: str, run_id: str) -> None:
    """The run that registered ``version`` failed: delete it (or leave it refused); never raises."""
    try:
        registry = ModelRegistry.from_settings(settings)
    except RegistryError as exc:  # cannot happen after a registration with the same settings; say so anyway
        log.error("event=model_version_withdraw_failed version=%s run_id=%s error=%s", version, run_id, exc)
        return
    registry.withdraw(version, run_id)


def download_onnx(version: str, dest: Path, settings: TrainSettings | None = None) -> Path:
    """The fp32 export of a registered version (the variants come through :class:`ModelRegistry`)."""
    return ModelRegistry.from_settings(settings).download_onnx(version, dest)


def follow_base_architecture(config: TrainConfig, settings: TrainSettings) -> TrainConfig:
    """``config`` for its run: fine-tuning trains the base version's architecture, not the recipe's.

    The one place both fine-tuning paths (``train_and_register`` and ``cxr train tune``) ask,
    before their MLflow runs open, so the runs' parameters and cards name what was trained
    (:meth:`TrainConfig.fine_tuning` says why). A switch is logged.
    """
    if not config.base_model_version:
        return config
    tuned = config.fine_tuning(ModelRegistry.from_settings(settings).architecture(config.base_model_version))
    if tuned.model != config.model:
        log.warning(
            "event=fine_tune_architecture base_version=%s architecture=%s recipe_model=%s "
            "note=fine-tuning continues the base model; --base-model none trains the recipe's from scratch",
            config.base_model_version,
            tuned.model,
            config.model,
        )
    return tuned


def download_weights(version: str, dest: Path, settings: TrainSettings | None = None) -> Path:
    return ModelRegistry.from_settings(settings).download_weights(version, dest)
