"""The model card: what a registered model is for, what it learned from, how good it is, where it fails.

Rendered from the same objects that produce the registry tags, so the card
and the tags cannot disagree.
"""

from __future__ import annotations

from dataclasses import dataclass

from core.operating_points import OperatingPoints
from training.config import TrainConfig
from training.dataset import DatasetRef
from training.evaluate import EvalReport
from training.export import ExportResult
from training.operating_points import card_section as operating_section
from training.subgroups import card_section as subgroup_section


@dataclass(frozen=True)
class DatasetReportLink:
    """Where the training dataset's report (data_pipeline/report.py) can be read: two copies of one page.

    ``mlflow``: the page in this run's artifacts (``runs:/<run_id>/dataset_report/index.html``, in
    whichever artifact store MLflow writes to). ``s3``: the page beside the version in the object store.
    """

    mlflow: str
    s3: str


def _dataset_report(link: DatasetReportLink | None) -> str:
    """The card's pointer to the dataset report, or why there is none."""
    if link is None:
        return "No dataset report: the version was built before ingest drew one (`cxr data report VERSION`)."
    return (
        "Dataset report (class counts per split, box sizes, reader agreement before fusion, sample "
        f"images with their fused boxes): `{link.mlflow}` in this run's artifacts, and `{link.s3}` "
        "beside the version in the object store."
    )


def _precision(config: TrainConfig) -> str:
    """The recipe's training precision when it is not plain fp32 (``scaling.cpu_bf16``)."""
    if config.scaling.cpu_bf16 and not config.scaling.use_gpu:
        return "; the network's forward in bfloat16 on CPUs that compute it natively (fp32 elsewhere)"
    return ""


def _auc(report: EvalReport) -> str:
    """The image-level AUC (highest confidence per image) or why there is none."""
    return f"{report.no_finding_auc:.4f}" if report.no_finding_auc is not None else "n/a (one kind of image)"


def _study_auc(report: EvalReport) -> str:
    """The study-level AUC of the worklist's triage score (core/triage.py: max over a study's images)."""
    if report.study_triage_auc is None:
        return "n/a (one kind of study)"
    return f"{report.study_triage_auc:.4f}"


def render_model_card(
    *,
    config: TrainConfig,
    dataset: DatasetRef,
    run_name: str,
    git_commit: str,
    epochs_completed: int,
    torch_report: EvalReport,
    onnx_report: EvalReport,
    export: ExportResult,
    operating_points: OperatingPoints | None = None,
    dataset_report: DatasetReportLink | None = None,
) -> str:
    """Markdown model card for MLflow (version description and ``model_card.md`` artifact)."""
    data_kind = (
        "SYNTHETIC phantoms (generated shapes, not patient images): the metrics say the pipeline works, "
        "NOT that the model detects real findings"
        if dataset.synthetic
        else "radiographs with radiologists' boxes (fused across readers by the data pipeline)"
    )
    rows = "\n".join(
        f"| {c.class_id} | {c.class_name} | {c.instances} | {c.ap50:.3f} | {c.ap40:.3f} | {c.ap50_95:.3f} "
        f"| {c.precision:.3f} | {c.recall:.3f} |"
        for c in onnx_report.per_class
    )
    latency = (
        f"{onnx_report.latency_ms_b1:.2f} ms/image at batch 1, {onnx_report.latency_ms_b8:.2f} at batch 8"
        if onnx_report.latency_ms_b1 is not None and onnx_report.latency_ms_b8 is not None
        else "not measured"
    )
    return f"""# cxr-detector — {run_name}

## Intended use
Decision support for radiologists reading frontal chest radiographs: it proposes boxes for 14
VinDr-CXR findings for a radiologist to accept or correct. It is **not a medical device**, is not
cleared for diagnosis, and must never report to a patient or replace a radiologist's read.

## Model
- Architecture: Ultralytics {config.model.upper()} detector, trained from {
        "registered version " + config.base_model_version if config.base_model_version else "scratch"
    }, input {config.imgsz}x{config.imgsz} letterboxed (pad 114), RGB / 255.
- Output: raw head `output0` [N, 18, A] (cx, cy, w, h in input pixels + 14 class scores);
  NMS runs in the gateway.
- ONNX opset {export.opset}, dynamic batch, sha256 `{export.sha256}`.
- Training: {epochs_completed} epochs, {config.scaling.num_workers} Ray data-parallel workers, global batch
  {config.global_batch}, optimizer {config.optim.optimizer} lr0={config.optim.lr0}, mosaic {
        config.augment.mosaic
    }
  (closed for the last {config.augment.close_mosaic} epochs), horizontal flip p={config.augment.fliplr},
  no vertical flip{_precision(config)}. Recipe sha256 `{config.sha256()}`, code `{git_commit}`.

## Training data
Dataset version `{dataset.version}`: {data_kind}. Split by patient into train / val / test.
{_dataset_report(dataset_report)}

## Evaluation (split `{onnx_report.split}`, {onnx_report.images} images, {onnx_report.instances} boxes)
| metric | PyTorch | ONNX Runtime |
| --- | --- | --- |
| mAP@0.5 | {torch_report.map50:.4f} | {onnx_report.map50:.4f} |
| mAP@0.4 (VinDr-CXR) | {torch_report.map40:.4f} | {onnx_report.map40:.4f} |
| mAP@0.5:0.95 | {torch_report.map50_95:.4f} | {onnx_report.map50_95:.4f} |
| precision @ conf {onnx_report.conf_threshold} | {torch_report.precision:.4f} | {onnx_report.precision:.4f} |
| recall @ conf {onnx_report.conf_threshold} | {torch_report.recall:.4f} | {onnx_report.recall:.4f} |
| image-level AUC, finding vs "No finding" | {_auc(torch_report)} | {_auc(onnx_report)} |
| study-level triage AUC (worklist score) | {_study_auc(torch_report)} | {_study_auc(onnx_report)} |

Dataset versions keep no study UID, so each image is its own study here and the study-level AUC
equals the image-level one; it differs once a split holds studies of several images.

Parity: max |PyTorch - ONNX| on raw outputs {export.parity_max_abs_diff:.2e} over {export.parity_images}
dataset images. ONNX Runtime CPU latency: {latency}.

### Per class (ONNX, IoU thresholds as named; P/R at conf {onnx_report.conf_threshold})
| id | finding | boxes | AP50 | AP40 | AP50-95 | P | R |
| --- | --- | --- | --- | --- | --- | --- | --- |
{rows}

Classes absent from the table had no boxes in the evaluation split and are not measured.

{operating_section(operating_points)}
{subgroup_section(onnx_report.subgroups)}## Limitations
- Trained on one dataset version; performance on other scanners, paediatric or lateral views is unknown.
- Rare findings have few training boxes; their AP is noisy and may be near zero.
- "No finding" is image-level: an image without boxes is not a negative diagnosis.
- Inputs are expected as frontal CXR after VOI LUT; other body parts give meaningless boxes.
"""
