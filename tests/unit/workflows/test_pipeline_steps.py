"""Step functions' own logic (source layout, base model, metrics, validation) and the runner's failures."""

from __future__ import annotations

import io
import json
import math
import re
from collections.abc import Callable
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from tests.unit.serving.serving_support import MemoryStore
from workflows import steps
from workflows.config import WorkflowSettings
from workflows.errors import PipelineError, SourceNotFound, StepFailed
from workflows.pipeline_cli import app
from workflows.retrain import STEP_ORDER

pytestmark = pytest.mark.unit

HEADER = "image_id,class_name,class_id,rad_id,x_min,y_min,x_max,y_max\n"


def _source(
    root: Path, dicom: str = "dicom", csv: str = "annotations.csv", ids: tuple[str, ...] = ("a", "b")
) -> Path:
    (root / dicom).mkdir(parents=True)
    for i in ids:
        (root / dicom / f"{i}.dicom").write_bytes(b"DICM")
    rows = "".join(f"{i},No finding,14,R1,,,,\n" for i in ids)
    (root / csv).write_text(HEADER + rows + "a,Nodule/Mass,8,R2,10,10,40,40\n")
    return root


def _trained(metrics: dict[str, float]) -> steps.TrainResult:
    return steps.TrainResult(
        run_name="r",
        run_id="id",
        model_version="2",
        dataset_version="d",
        base_model_version=None,
        metrics=metrics,
    )


def test_staged_data_accepts_the_synth_and_the_vindr_layouts(tmp_path: Path) -> None:
    synth = steps.StagedData.from_dir(_source(tmp_path / "s"))
    assert synth.dicom_dir.name == "dicom" and synth.annotations_csv.name == "annotations.csv"
    vindr = steps.StagedData.from_dir(_source(tmp_path / "v", dicom="train", csv="train.csv"))
    assert vindr.dicom_dir.name == "train" and vindr.annotations_csv.name == "train.csv"


def test_a_folder_without_images_or_csv_is_refused_with_the_layout_to_use(tmp_path: Path) -> None:
    (tmp_path / "dicom").mkdir()
    with pytest.raises(SourceNotFound, match="cxr data synth"):
        steps.StagedData.from_dir(tmp_path)
    with pytest.raises(SourceNotFound, match="not a directory"):
        steps.StagedData.from_dir(tmp_path / "missing")


def test_local_source_is_copied_only_when_a_destination_is_given(tmp_path: Path) -> None:
    source = _source(tmp_path / "src")
    in_place = steps.ingest(str(source), dest=None, include_feedback=False, store=None)  # type: ignore[arg-type]
    assert in_place.staged.root == source and in_place.n_images == 2
    copied = steps.ingest(str(source), dest=tmp_path / "out", include_feedback=False, store=None)  # type: ignore[arg-type]
    assert copied.staged.root == tmp_path / "out" and (tmp_path / "out" / "dicom" / "a.dicom").exists()


def test_validate_counts_rows_and_images(tmp_path: Path) -> None:
    result = steps.validate(steps.StagedData.from_dir(_source(tmp_path)))
    assert (result.total_rows, result.bad_rows, result.n_images) == (3, 0, 2)


def test_validate_fails_when_an_annotated_image_has_no_file(tmp_path: Path) -> None:
    root = _source(tmp_path)
    (root / "dicom" / "b.dicom").unlink()
    with pytest.raises(StepFailed, match=r"1 annotated images have no file .*first: b"):
        steps.validate(steps.StagedData.from_dir(root))


def test_validate_fails_above_the_bad_row_limit_naming_the_lines(tmp_path: Path) -> None:
    root = _source(tmp_path)
    with (root / "annotations.csv").open("a") as f:
        f.write("b,Nodule/Mass,8,R2,50,50,10,10\n")  # x_max < x_min
    with pytest.raises(StepFailed, match="line"):
        steps.validate(steps.StagedData.from_dir(root))


def test_base_model_production_means_the_version_in_productions_stage_file(tmp_path: Path) -> None:
    from core.stage_file import StageFile, write_stage_file

    write_stage_file(tmp_path, StageFile(stage="production", model_name="cxr-detector", model_version=""))
    assert steps.resolve_base_model("production", tmp_path) is None  # nothing in production: from scratch
    write_stage_file(tmp_path, StageFile(stage="production", model_name="cxr-detector", model_version="5"))
    assert steps.resolve_base_model("production", tmp_path) == "5"
    assert steps.resolve_base_model("none", tmp_path) is None
    assert steps.resolve_base_model("7", tmp_path) == "7"
    with pytest.raises(PipelineError, match="'production', 'none' or a version"):
        steps.resolve_base_model("latest", tmp_path)


def test_evaluate_reads_the_runs_test_metrics() -> None:
    result = steps.evaluate(_trained({"test/map50": 0.61, "test/map40": 0.66, "test/recall": 0.5}))
    assert (result.map50, result.map40) == (0.61, 0.66)


@pytest.mark.parametrize("metrics", [{"test/map50": 0.5}, {"test/map50": math.nan, "test/map40": 0.4}])
def test_evaluate_fails_without_finite_map50_and_map40(metrics: dict[str, float]) -> None:
    with pytest.raises(StepFailed, match="evaluate"):
        steps.evaluate(_trained(metrics))


@pytest.mark.parametrize(("text", "value"), [("true", True), ("False", False), ("1", True), (" no ", False)])
def test_argo_boolean_parameters_are_parsed(text: str, value: bool) -> None:
    assert steps.parse_bool(text) is value


def test_argo_boolean_parameters_reject_anything_else() -> None:
    with pytest.raises(PipelineError, match="expected true or false"):
        steps.parse_bool("maybe")


def test_run_stops_at_the_failing_step_and_says_which_and_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CXR_STACK_DIR", str(tmp_path / "stack"))
    monkeypatch.setenv(
        "CXR_PRELAUNCH_TRAINING", "false"
    )  # no Ray here: tests/unit/workflows/test_runner_prelaunch.py
    work = tmp_path / "work"
    result = CliRunner().invoke(
        app, ["run", "--source", str(tmp_path / "nowhere"), "--no-feedback", "--work-dir", str(work)]
    )
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    assert "failed step" in result.output and "nowhere" in result.output
    summary = json.loads((work / "summary.json").read_text())
    assert summary["failed_step"] == "ingest" and not summary["succeeded"]
    assert [s["status"] for s in summary["steps"]] == ["failed"] + ["pending"] * (len(STEP_ORDER) - 1)
    # no terminal here: the step's start and end are structured lines, the end with state and time
    lines = result.stdout.splitlines()
    total = len(STEP_ORDER)
    assert f"event=pipeline_step_start step=ingest index=1 total={total}" in lines
    done = next(line for line in lines if line.startswith("event=pipeline_step_done"))
    assert done.startswith(
        f"event=pipeline_step_done step=ingest index=1 total={total} state=failed seconds="
    )
    assert "nowhere" in done and not any("step=validate" in line for line in lines)


def test_run_reports_each_step_with_its_state_and_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, settings: WorkflowSettings
) -> None:
    from workflows import runner

    def fine(name: str) -> Callable[[], str]:
        def action() -> str:
            if name == "promote-to-staging":
                raise runner._Skipped("not asked (--no-promote)")
            return f"{name} done"

        return action

    monkeypatch.setattr(runner._StepActions, "by_name", lambda self: {n: fine(n) for n in STEP_ORDER})
    options = runner.RunOptions(
        source="latest",
        training_config=tmp_path / "c.yaml",
        base_model="none",
        epochs=0,
        workers=1,
        include_feedback=False,
        promote=False,
        run_name="r",
        work_dir=tmp_path / "work",
    )
    out = io.StringIO()
    summary = runner.run_pipeline(options, settings, store=object(), console=Console(file=out, width=120))
    assert summary.succeeded
    done = [line for line in out.getvalue().splitlines() if line.startswith("event=pipeline_step_done")]
    assert [re.search(r" step=(\S+)", line)[1] for line in done] == list(STEP_ORDER)  # type: ignore[index]
    states = [re.search(r" state=(\S+)", line)[1] for line in done]  # type: ignore[index]
    assert states == ["ok"] * (len(STEP_ORDER) - 1) + ["skipped"]
    assert all(re.search(r" seconds=\d+\.\d ", line) for line in done)
    assert 'detail="ingest done"' in done[0]

    # on a terminal: one line per step with its mark, number, name and time (no event= lines)
    screen = io.StringIO()
    runner.run_pipeline(
        options, settings, store=object(), console=Console(file=screen, force_terminal=True, width=120)
    )
    shown = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", screen.getvalue())
    assert "event=" not in shown
    assert re.search(r"✓ \[1/8\] ingest \(\d+\.\d s\) ingest done", shown), shown
    assert re.search(r"- \[8/8\] promote-to-staging \(\d+\.\d s\) not asked", shown), shown


def test_run_refuses_a_bad_recipe_base_model_or_epochs_before_any_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """They reached the train step only after ingest, validate and the dataset build."""
    monkeypatch.setenv("CXR_STACK_DIR", str(tmp_path / "stack"))
    monkeypatch.setenv("CXR_PRELAUNCH_TRAINING", "false")
    work = tmp_path / "work"
    base = ["run", "--source", str(_source(tmp_path / "src")), "--no-feedback", "--work-dir", str(work)]
    for extra, code, expected in (
        (["--config", str(tmp_path / "nope.yaml")], 1, "does not exist"),
        (["--base-model", "prod"], 1, "base model must be 'production'"),
        (["--epochs", "-1"], 2, "--epochs"),
    ):
        result = CliRunner().invoke(app, [*base, *extra])
        assert result.exit_code == code, (extra, result.output)
        assert expected in " ".join(result.output.replace("│", " ").split()), (extra, result.output)
        assert not work.exists(), extra  # no step ran


def test_an_expected_error_of_another_package_is_logged_without_a_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The store being down is a message (the summary shows it), not a page of urllib3 frames."""
    import logging

    from core.progress import reporting
    from data_pipeline.errors import StoreError
    from workflows.runner import PipelineSummary, StepRecord, _run_step

    def store_down() -> str:
        raise StoreError("S3 http://127.0.0.1:9 unreachable; is the stack running (`cxr stack up`)?")

    def bug() -> str:
        raise KeyError("x")

    summary = PipelineSummary(run_name="r", steps=[StepRecord(name=n) for n in STEP_ORDER])
    with reporting(Console(file=io.StringIO())) as progress, caplog.at_level(logging.ERROR):
        _run_step(1, summary.steps[0], store_down, summary, progress)
        _run_step(2, summary.steps[1], bug, summary, progress)
    records = [r for r in caplog.records if "step_error" in r.getMessage()]
    assert [r.exc_info is not None for r in records] == [False, True]  # a bug keeps its traceback
    assert "unreachable" in records[0].getMessage()
    assert summary.steps[0].status == "failed" and "is the stack running" in str(summary.steps[0].detail)


class _MemoryStore(MemoryStore):
    """The serving tests' in-memory store with what the real ``download_prefix`` calls besides."""

    bucket = "cxr"

    def __init__(self, objects: dict[str, bytes]) -> None:
        super().__init__()
        self.objects.update(objects)

    def list_objects(self, prefix: str) -> list[object]:
        from data_pipeline.store import ObjectInfo

        return [ObjectInfo(k, len(self.objects[k])) for k in self.list_prefix(prefix)]

    def get_file(self, key: str, dest: Path) -> Path:
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(self.objects[key])
        return dest

    def download_prefix(self, prefix: str, dest: Path) -> list[Path]:
        from data_pipeline.store import ObjectStore

        return ObjectStore.download_prefix(self, prefix, dest)  # type: ignore[arg-type]


def test_a_rerun_under_the_same_name_stages_the_s3_source_as_it_is_now(
    tmp_path: Path, settings: WorkflowSettings
) -> None:
    """`cxr pipeline run --run-name X` again after a crash: the staged studies are the source's current
    ones, never a file left from the first try (one the source replaced by a same-size one, or deleted),
    as each Argo pod stages into an empty folder."""
    from workflows.runner import PipelineSummary, RunOptions, _StepActions

    csv = (HEADER + "a,No finding,14,R1,,,,\nb,No finding,14,R1,,,,\n").encode()
    store = _MemoryStore(
        {
            "incoming/dicom/a.dicom": b"DICM-old",
            "incoming/dicom/b.dicom": b"DICM",
            "incoming/annotations.csv": csv,
        }
    )
    options = RunOptions(
        source="s3://cxr/incoming",
        training_config=Path("training/configs/cpu-small.yaml"),
        base_model="none",
        epochs=0,
        workers=1,
        include_feedback=False,
        promote=False,
        run_name="again",
        work_dir=tmp_path / "again",
    )
    _StepActions(options, settings, store, PipelineSummary(run_name="again")).ingest()  # the crashed try
    store.objects["incoming/dicom/a.dicom"] = b"DICM-new"  # re-exported: same size, other pixels
    del store.objects["incoming/dicom/b.dicom"]
    store.objects["incoming/annotations.csv"] = (HEADER + "a,No finding,14,R1,,,,\n").encode()
    actions = _StepActions(options, settings, store, PipelineSummary(run_name="again"))
    assert actions.ingest().startswith("1 images")
    staged = actions.state["staged"]
    assert (staged.dicom_dir / "a.dicom").read_bytes() == b"DICM-new"
    assert sorted(p.name for p in staged.dicom_dir.iterdir()) == ["a.dicom"]
