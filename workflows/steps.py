"""One function per step of the retrain pipeline, shared by Argo and the local runner.

Each Argo step runs ``cxr pipeline step <name>`` (see :mod:`workflows.pipeline_cli`),
which calls the function of the same name here; ``cxr pipeline run`` calls the
same functions in :data:`workflows.retrain.STEP_ORDER` on one machine. The
functions stay thin: the work itself belongs to ``data_pipeline`` (staging,
validation, dataset versions), ``training`` (Ray training, evaluation, ONNX
export, registration) and ``delivery`` (gates + promotion commit). What
lives here is the glue: resolving the dataset source and the base model,
turning each package's result into a small typed record, and the records the
cluster steps hand to each other through the object store (the RayJob that
trains cannot write Argo output files).

Other packages are imported inside the functions so that rendering the
workflows or running one light step never pays for importing torch.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, Field

from core.errors import CxrError
from core.stages import Stage
from workflows.config import WorkflowSettings
from workflows.errors import HandoffMissing, PipelineError, SourceNotFound, StepFailed

if TYPE_CHECKING:
    from data_pipeline.store import ObjectStore
    from training.config import TrainConfig
    from training.prelaunch import PrelaunchedFit
    from training.registry import VersionFacts

log = logging.getLogger(__name__)

MODEL_NAME = "cxr-detector"
DICOM_DIR_NAMES = ("dicom", "train")  # synth output / the VinDr-CXR download
ANNOTATION_NAMES = ("annotations.csv", "train.csv")
LATEST_SOURCE = "latest"
FEEDBACK_PREFIX = "feedback/"
FEEDBACK_MARKER = "feedback.json"  # the gateway writes it last: its presence = a complete item


# --------------------------------------------------------------------------- records


class StagedData(BaseModel):
    """Raw studies ready to build from: a DICOM folder and a VinDr CSV."""

    root: Path
    dicom_dir: Path
    annotations_csv: Path

    @classmethod
    def from_dir(cls, root: Path) -> StagedData:
        """Find ``dicom/`` (or VinDr's ``train/``) and ``annotations.csv`` (or ``train.csv``) in ``root``."""
        root = Path(root)
        if not root.is_dir():
            raise SourceNotFound(f"dataset source {root} is not a directory")
        dicom = next((root / n for n in DICOM_DIR_NAMES if (root / n).is_dir()), None)
        csv = next((root / n for n in ANNOTATION_NAMES if (root / n).is_file()), None)
        if dicom is None or csv is None:
            raise SourceNotFound(
                f"{root} must hold a DICOM folder ({' or '.join(DICOM_DIR_NAMES)}/) and a VinDr CSV "
                f"({' or '.join(ANNOTATION_NAMES)}); `cxr data synth --out {root}` writes that layout"
            )
        return cls(root=root, dicom_dir=dicom, annotations_csv=csv)


class IngestResult(BaseModel):
    source: str
    staged: StagedData
    n_images: int
    n_feedback_items: int


class ValidationResult(BaseModel):
    total_rows: int
    bad_rows: int
    bad_fraction: float
    n_images: int
    missing_images: list[str] = Field(default_factory=list, description="first few ids without a DICOM file")


class DatasetResult(BaseModel):
    version: str
    path: Path
    n_images: int
    feedback_ids: list[str] = Field(default_factory=list)


class TrainResult(BaseModel):
    run_name: str
    run_id: str
    model_version: str
    dataset_version: str
    base_model_version: str | None
    metrics: dict[str, float]
    onnx_path: Path | None = None


class EvaluationResult(BaseModel):
    map50: float
    map40: float
    metrics: dict[str, float]


class ExportResult(BaseModel):
    onnx_sha256: str
    parity_max_abs_diff: float


class RegisterResult(BaseModel):
    model_version: str
    tags: dict[str, str]


class PromoteResult(BaseModel):
    stage: str
    model_version: str
    promoted: bool
    reason: str
    commit: str | None = None


class FeedbackCheck(BaseModel):
    threshold: int
    new_items: int
    should_retrain: bool
    last_dataset_version: str | None


class ExitRecord(BaseModel):
    run_name: str
    status: str
    failures: Any
    recorded_at: str


# --------------------------------------------------------------------------- helpers


def default_store() -> ObjectStore:
    """The stack's bucket from ``CXR_S3_*`` (or ``<stack>/credentials.json``)."""
    from data_pipeline.store import ObjectStore

    return ObjectStore.from_env()


def _store_for_bucket(store: ObjectStore, bucket: str) -> ObjectStore:
    if bucket == store.bucket:
        return store
    from data_pipeline.config import get_settings as data_settings
    from data_pipeline.store import ObjectStore

    return ObjectStore.from_env(data_settings().model_copy(update={"s3_bucket": bucket}))


def _handoff_key(settings: WorkflowSettings, run_name: str, step: str) -> str:
    return f"{settings.pipeline_prefix.rstrip('/')}/{run_name}/{step}.json"


def save_handoff(
    store: ObjectStore, settings: WorkflowSettings, run_name: str, step: str, record: BaseModel
) -> str:
    """Store one step's record for the cluster steps after it; returns the key."""
    key = _handoff_key(settings, run_name, step)
    store.put_bytes(key, record.model_dump_json(indent=2).encode(), content_type="application/json")
    log.info("event=handoff_saved step=%s key=%s", step, key)
    return key


def load_train_handoff(store: ObjectStore, settings: WorkflowSettings, run_name: str) -> TrainResult:
    """The train step's record of workflow ``run_name`` (written by the RayJob)."""
    key = _handoff_key(settings, run_name, "train")
    if not store.exists(key):
        raise HandoffMissing(
            f"no train record at s3://{store.bucket}/{key}: the train step of {run_name!r} did not finish"
        )
    return TrainResult.model_validate_json(store.get_bytes(key))


def _feedback_ids(store: ObjectStore) -> list[str]:
    """Ids of complete feedback items (``feedback/<id>/feedback.json`` present)."""
    ids = set()
    for name in store.list_prefix(FEEDBACK_PREFIX):
        parts = name[len(FEEDBACK_PREFIX) :].split("/")
        if len(parts) == 2 and parts[1] == FEEDBACK_MARKER:
            ids.add(parts[0])
    return sorted(ids)


def _ids_of(feedback_objects: list[str]) -> set[str]:
    """Feedback ids from object keys ``feedback/<id>/...``."""
    return {
        k[len(FEEDBACK_PREFIX) :].split("/")[0] for k in feedback_objects if k.startswith(FEEDBACK_PREFIX)
    }


def _consumed_feedback(store: ObjectStore) -> tuple[str | None, set[str]]:
    """The latest dataset version and the feedback ids its manifest says it merged or skipped.

    A skipped item (no image of its own, junk rows: data_pipeline/feedback.py) was judged once;
    counted as new for ever, one such item would keep asking for a retrain.
    """
    from data_pipeline.errors import DatasetNotFound
    from data_pipeline.versioning import MANIFEST, latest_version, version_prefix

    try:
        version = latest_version(store)
    except DatasetNotFound:
        return None, set()
    manifest = json.loads(store.get_bytes(version_prefix(version) + MANIFEST))
    source = manifest.get("source", {})
    return version, _ids_of(source.get("feedback_objects", [])) | set(source.get("feedback_skipped", {}))


def latest_source(store: ObjectStore) -> StagedData:
    """The DICOM folder and CSV the latest dataset version was built from, when they are on this machine."""
    from data_pipeline.errors import DatasetNotFound
    from data_pipeline.versioning import MANIFEST, latest_version, version_prefix

    try:
        version = latest_version(store)
    except DatasetNotFound as exc:
        raise SourceNotFound(
            "no dataset version yet, so no 'latest' source: pass --source DIR (dicom/ + annotations.csv) "
            "or build one with `cxr data ingest`"
        ) from exc
    source = json.loads(store.get_bytes(version_prefix(version) + MANIFEST)).get("source", {})
    dicom, csv = Path(source.get("dicom_dir", "")), Path(source.get("annotations", ""))
    if not (source.get("dicom_dir") and dicom.is_dir() and csv.is_file()):
        raise SourceNotFound(
            f"dataset {version} was built from {dicom} and {csv}, not on this machine; pass --source"
        )
    return StagedData(root=dicom.parent, dicom_dir=dicom, annotations_csv=csv)


def parse_bool(value: str | bool) -> bool:
    """Argo passes parameters as text: accept true/false/1/0/yes/no."""
    if isinstance(value, bool):
        return value
    lowered = value.strip().lower()
    if lowered in {"true", "1", "yes"}:
        return True
    if lowered in {"false", "0", "no"}:
        return False
    raise PipelineError(f"expected true or false, got {value!r}")


# --------------------------------------------------------------------------- steps


def ingest(
    source: str,
    *,
    dest: Path | None,
    include_feedback: bool,
    store: ObjectStore,
) -> IngestResult:
    """Stage studies from ``source`` and count waiting feedback.

    ``source`` is a folder, ``s3://bucket/prefix``, or ``latest``: the folder
    the latest dataset version was built from (one machine: retrain on the same
    studies plus the feedback that arrived since).

    A local folder is used in place unless ``dest`` is given (the cluster step
    copies it so Argo can pass it on as an artifact). Feedback itself is merged
    by ``build_dataset`` from the store, where the gateway wrote it.
    """
    if source == LATEST_SOURCE:
        staged = latest_source(store)
    elif source.startswith("s3://"):
        bucket, _, prefix = source[len("s3://") :].partition("/")
        if dest is None:
            raise PipelineError("an s3:// source needs a destination folder (--dest)")
        src_store = _store_for_bucket(store, bucket)
        files = src_store.download_prefix(prefix, dest)
        if not files:
            raise SourceNotFound(
                f"nothing under {source}: upload studies there as dicom/ + annotations.csv "
                f"(e.g. `mc cp -r` or ObjectStore.upload_dir)"
            )
        staged = StagedData.from_dir(dest)
    else:
        staged = StagedData.from_dir(Path(source))
        if dest is not None and Path(dest).resolve() != staged.root.resolve():
            shutil.copytree(staged.root, dest, dirs_exist_ok=True)
            staged = StagedData.from_dir(dest)
    n_images = sum(1 for p in staged.dicom_dir.iterdir() if p.is_file())
    n_feedback = len(_feedback_ids(store)) if include_feedback else 0
    log.info("event=ingest source=%s images=%d feedback_items=%d", source, n_images, n_feedback)
    return IngestResult(source=source, staged=staged, n_images=n_images, n_feedback_items=n_feedback)


def validate(staged: StagedData) -> ValidationResult:
    """Schema-check the annotations and make sure every annotated image has its file.

    Fails (rather than warns) above ``CXR_MAX_BAD_ROW_FRACTION`` bad rows or on a
    missing image, because a dataset version built from either would silently
    train on less than the radiologists labelled.
    """
    from data_pipeline.annotations import load_annotations
    from data_pipeline.config import get_settings as data_settings
    from data_pipeline.errors import DataPipelineError

    try:
        table = load_annotations(staged.annotations_csv)
        table.enforce(data_settings().max_bad_row_fraction)
    except DataPipelineError as exc:
        raise StepFailed("validate", str(exc)) from exc
    stems = {p.stem for p in staged.dicom_dir.iterdir() if p.is_file()}
    image_ids = table.image_ids()
    missing = [i for i in image_ids if i not in stems]
    if missing:
        raise StepFailed(
            "validate",
            f"{len(missing)} annotated images have no file in {staged.dicom_dir} "
            f"(first: {', '.join(missing[:5])})",
        )
    result = ValidationResult(
        total_rows=table.total_rows,
        bad_rows=len(table.quarantine),
        bad_fraction=table.bad_fraction,
        n_images=len(image_ids),
    )
    log.info("event=validate rows=%d bad=%d images=%d", result.total_rows, result.bad_rows, result.n_images)
    return result


def build_dataset(
    staged: StagedData,
    *,
    out_dir: Path,
    include_feedback: bool,
    store: ObjectStore,
    settings: WorkflowSettings,
    golden_wait_s: float = 0.0,
) -> DatasetResult:
    """Build (or find: versions are content hashes) the dataset version and upload it to the store.

    The version's manifest lists the feedback items merged into it; the hourly
    trigger (:func:`check_feedback`) counts only feedback that arrived after.
    ``golden_wait_s`` > 0: a golden set is being built beside this run (the first ``make up``);
    the split waits that long for its pin instead of finding none.
    """
    from data_pipeline.config import get_settings as data_settings
    from data_pipeline.errors import DataPipelineError
    from data_pipeline.golden import held_out_patients, wait_for_pin
    from data_pipeline.ingest import build_dataset as build

    def golden_patients() -> frozenset[str]:
        wait_for_pin(data_settings().gitops_dir, golden_wait_s)
        return held_out_patients(data_settings(), store)

    try:
        built = build(
            staged.dicom_dir,
            staged.annotations_csv,
            out_dir,
            settings=data_settings(),
            store=store,
            feedback=include_feedback,
            # the golden set's patients; when it is being built beside this run, read at the split
            exclude_patients=golden_patients
            if golden_wait_s > 0
            else held_out_patients(data_settings(), store),
            # the train step fetches it next: on one machine (the local runner) from this copy
            cache_dir=data_settings().cache_dir(),
        )
    except DataPipelineError as exc:
        raise StepFailed("build-dataset", str(exc)) from exc
    feedback_ids = sorted(_ids_of(built.manifest.get("source", {}).get("feedback_objects", [])))
    n_images = sum(built.manifest.get("counts", {}).get("images", {}).values())
    log.info(
        "event=dataset_built version=%s images=%d feedback_items=%d",
        built.version,
        n_images,
        len(feedback_ids),
    )
    return DatasetResult(
        version=built.version, path=Path(built.path), n_images=n_images, feedback_ids=feedback_ids
    )


def resolve_base_model(base_model: str, gitops_dir: Path) -> str | None:
    """'production' -> the version in production's stage file (None when empty), 'none' -> None."""
    choice = base_model.strip().lower()
    if choice in {"", "none", "scratch"}:
        return None
    if choice == "production":
        from core.stage_file import read_stage_file

        version = read_stage_file(gitops_dir, "production").model_version
        return version or None
    if not choice.isdigit():
        raise PipelineError(
            f"base model must be 'production', 'none' or a version number, got {base_model!r}"
        )
    return choice


def train_config(
    config_path: Path, *, base_model: str, epochs: int, settings: WorkflowSettings
) -> TrainConfig:
    """The train step's recipe: the config file, the base model to fine-tune, the epochs override (>0)."""
    from training.config import load_config

    base_version = resolve_base_model(base_model, settings.gitops_dir)
    config = load_config(Path(config_path))
    updates: dict[str, Any] = {"base_model_version": base_version}
    if epochs > 0:
        updates["epochs"] = epochs
    return config.model_copy(update=updates)


def prelaunch_train(
    config_path: Path, *, base_model: str, epochs: int, workers: int, settings: WorkflowSettings
) -> PrelaunchedFit | None:
    """Start the train step's Ray workers now, beside the data steps (None where Ray is not local).

    The local runner's overlap (training/prelaunch.py says why). Whatever stops it (a recipe or
    base model that cannot be read, a bad setting) is logged and left for the train step to
    report, naming itself, as without the prelaunch.
    """
    from training.prelaunch import prelaunch

    try:
        config = train_config(config_path, base_model=base_model, epochs=epochs, settings=settings)
        return prelaunch(config, workers)
    except Exception as exc:  # only a head start: the train step reads the recipe again and names the error
        log.warning("event=prelaunch_skipped error=%s: %s", type(exc).__name__, exc)
        return None


def train(
    dataset_version: str,
    *,
    config_path: Path,
    base_model: str,
    epochs: int,
    workers: int,
    run_name: str,
    settings: WorkflowSettings,
    prelaunched: PrelaunchedFit | None = None,
) -> TrainResult:
    """Train under Ray Train on ``dataset_version`` (fine-tuning ``base_model``); log and register in MLflow.

    ``prelaunched``: the workers :func:`prelaunch_train` started at the beginning of a local run.

    ``training.run.train_and_register`` keeps evaluation, ONNX export + parity
    and registration in the same process as training because export and parity
    need the trained weights in memory; the later steps read and check each of
    those results on their own, so a failure names the step that broke.
    """
    from training.errors import TrainingError
    from training.run import train_and_register

    config = train_config(config_path, base_model=base_model, epochs=epochs, settings=settings)
    base_version = config.base_model_version
    log.info(
        "event=train_start run=%s dataset=%s base_model=%s epochs=%d workers=%d",
        run_name,
        dataset_version,
        base_version,
        config.epochs,
        workers,
    )
    try:
        outcome = train_and_register(config, dataset_version, workers, prelaunched=prelaunched)
    except TrainingError as exc:
        raise StepFailed("train", str(exc)) from exc
    metrics = {k: float(v) for k, v in dict(outcome.metrics).items() if isinstance(v, int | float)}
    return TrainResult(
        run_name=run_name,
        run_id=str(outcome.run_id),
        model_version=str(outcome.model_version),
        dataset_version=dataset_version,
        base_model_version=base_version,
        metrics=metrics,
        onnx_path=Path(outcome.onnx_path) if getattr(outcome, "onnx_path", None) else None,
    )


def _metric(metrics: dict[str, float], *names: str) -> float | None:
    for name in names:
        for key in (name, f"metrics/{name}", f"test/{name}"):
            if key in metrics:
                return metrics[key]
    return None


def evaluate(trained: TrainResult) -> EvaluationResult:
    """The run's held-out test metrics: mAP@0.5 and VinDr's mAP@0.4 must both be there and finite."""
    map50 = _metric(trained.metrics, "map50", "mAP50", "map_50")
    map40 = _metric(trained.metrics, "map40", "mAP40", "map_40")
    if map50 is None or map40 is None or map50 != map50 or map40 != map40:
        raise StepFailed(
            "evaluate",
            f"run {trained.run_id} has no finite map50/map40 in its metrics ({sorted(trained.metrics)})",
        )
    log.info("event=evaluate run=%s map50=%.4f map40=%.4f", trained.run_id, map50, map40)
    return EvaluationResult(map50=map50, map40=map40, metrics=trained.metrics)


def _version_facts(model_name: str, model_version: str, mlflow_uri: str) -> VersionFacts:
    from training.errors import TrainingError
    from training.registry import ModelRegistry

    try:
        return ModelRegistry(mlflow_uri, model_name).facts(model_version)
    except TrainingError as exc:
        raise StepFailed("register", str(exc)) from exc


def export(trained: TrainResult, *, mlflow_uri: str, model_name: str = MODEL_NAME) -> ExportResult:
    """The registered ONNX's checksum and its recorded PyTorch-vs-ORT parity (the export refuses > 1e-3)."""
    tags = _version_facts(model_name, trained.model_version, mlflow_uri).tags
    sha = tags.get("onnx_sha256", "")
    parity = tags.get("parity_max_abs_diff")
    if not sha or parity is None:
        raise StepFailed("export", f"{model_name} v{trained.model_version} lacks onnx_sha256/parity tags")
    if trained.onnx_path is not None and trained.onnx_path.exists():
        from core.hashing import file_sha256

        local = file_sha256(trained.onnx_path)
        if local != sha:
            raise StepFailed("export", f"{trained.onnx_path} has sha256 {local}, the registry says {sha}")
    log.info("event=export version=%s onnx_sha256=%s parity=%s", trained.model_version, sha[:12], parity)
    return ExportResult(onnx_sha256=sha, parity_max_abs_diff=float(parity))


def register(trained: TrainResult, *, mlflow_uri: str, model_name: str = MODEL_NAME) -> RegisterResult:
    """The registered version, checked to carry every lineage tag and this run's dataset version."""
    facts = _version_facts(model_name, trained.model_version, mlflow_uri)
    tags = facts.tags
    missing = facts.missing_tags
    if missing:
        raise StepFailed("register", f"{model_name} v{trained.model_version} lacks lineage tags {missing}")
    if tags["dataset_version"] != trained.dataset_version:
        raise StepFailed(
            "register",
            f"v{trained.model_version} was trained on {tags['dataset_version']}, "
            f"not {trained.dataset_version}",
        )
    log.info("event=register version=%s dataset=%s", trained.model_version, trained.dataset_version)
    return RegisterResult(model_version=trained.model_version, tags=tags)


def _clone(git_url: str, dest: Path) -> Path:
    """Shallow clone of the GitOps repo for the cluster's promote step (deploy key via GIT_SSH_COMMAND)."""
    if dest.exists():
        shutil.rmtree(dest)
    proc = subprocess.run(
        ["git", "clone", "--depth", "20", git_url, str(dest)], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise StepFailed("promote-to-staging", f"git clone {git_url} failed: {proc.stderr.strip()}")
    return dest


def promote(
    model_version: str,
    *,
    stage: Stage = "staging",
    gitops_dir: Path,
    git_url: str | None = None,
    push: bool = False,
    work_dir: Path | None = None,
) -> PromoteResult:
    """``cxr promote <version> --to <stage>``: gates, alias, stage file, one commit (pushed in the cluster).

    A failed gate is an outcome, not an error: the model stays registered and
    the summary says which gate refused it.
    """
    from delivery.context import DeliveryContext
    from delivery.errors import GateFailed
    from delivery.promote import PromotionRequest, promote_version

    if git_url:
        gitops_dir = _clone(git_url, (work_dir or Path("/work")) / "gitops")
    ctx = DeliveryContext.from_settings(gitops_dir=gitops_dir)
    # In the cluster ArgoCD applies the commit; only the one-machine stack has a local Triton to follow.
    request = PromotionRequest(version=model_version, to=stage, push=push, apply_local=git_url is None)
    try:
        outcome = promote_version(ctx, request, echo=lambda line: log.info("promote %s", line))
    except GateFailed as exc:
        log.warning("event=promote_refused version=%s stage=%s reason=%s", model_version, stage, exc)
        return PromoteResult(stage=stage, model_version=model_version, promoted=False, reason=str(exc))
    except CxrError as exc:  # the stage files', the registry's and git's failures alike
        raise StepFailed("promote-to-staging", str(exc)) from exc
    if outcome.commit is None:
        reason = f"{stage} already serves v{model_version}; nothing to commit"
    else:
        reason = f"all {stage} gates passed"
    log.info("event=promoted version=%s stage=%s commit=%s", model_version, stage, outcome.commit)
    return PromoteResult(
        stage=stage, model_version=model_version, promoted=True, reason=reason, commit=outcome.commit
    )


def check_feedback(*, threshold: int, store: ObjectStore, settings: WorkflowSettings) -> FeedbackCheck:
    """Count complete feedback items not yet in a dataset version; retrain at ``threshold`` or more."""
    last_version, consumed = _consumed_feedback(store)
    new_items = len(set(_feedback_ids(store)) - consumed)
    result = FeedbackCheck(
        threshold=threshold,
        new_items=new_items,
        should_retrain=new_items >= threshold,
        last_dataset_version=last_version,
    )
    log.info(
        "event=check_feedback new=%d threshold=%d retrain=%s", new_items, threshold, result.should_retrain
    )
    return result


def record_exit(
    *, run_name: str, status: str, failures: str, store: ObjectStore, settings: WorkflowSettings
) -> ExitRecord:
    """The onExit handler: keep how the run ended (and each failed node's message) next to its records."""
    try:
        parsed: Any = json.loads(failures) if failures.strip() else []
    except json.JSONDecodeError:
        parsed = failures  # Argo leaves the placeholder as text when nothing failed
    record = ExitRecord(run_name=run_name, status=status, failures=parsed, recorded_at=_now())
    save_handoff(store, settings, run_name, "exit", record)
    level = logging.INFO if status == "Succeeded" else logging.ERROR
    log.log(
        level, "event=workflow_exit run=%s status=%s failures=%s", run_name, status, json.dumps(parsed)[:500]
    )
    return record


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
