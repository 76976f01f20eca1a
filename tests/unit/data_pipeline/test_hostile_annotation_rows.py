"""An annotations CSV from outside: hostile cells are quarantined rows with a reason, never a crash,
never copied whole into the version, never a formula in a spreadsheet, never rich markup."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from data_pipeline.annotations import COLUMNS, load_annotations, parse_frame
from data_pipeline.cli import app
from data_pipeline.quality import QualityReport

pytestmark = pytest.mark.unit

MAX_CELL_CHARS = 200  # what a quarantined cell keeps
HEADER = "image_id,class_name,class_id,rad_id,x_min,y_min,x_max,y_max\n"
GOOD = "a,Cardiomegaly,3,R1,10,20,100,200\n"


def _csv(tmp_path: Path, body: str, header: str = HEADER) -> Path:
    path = tmp_path / "train.csv"
    path.write_text(header + body)
    return path


def _text(output: str) -> str:
    return " ".join(output.split())


@pytest.mark.parametrize(
    "class_id", ["inf", "-inf", "Infinity", "1e30", "9223372036854775808", "1e400", "9" * 400]
)
def test_a_huge_or_infinite_class_id_is_a_quarantined_row_not_a_crash(tmp_path: Path, class_id: str) -> None:
    table = load_annotations(_csv(tmp_path, GOOD + f"b,Cardiomegaly,{class_id},R1,10,20,100,200\n"))
    assert table.frame["image_id"].tolist() == ["a"]
    [row] = table.quarantine.to_dict("records")
    assert row["line"] == 3
    assert "class_id" in row["reason"] and ("not an integer" in row["reason"] or "0..14" in row["reason"])


@pytest.mark.parametrize("column", ["x_min", "y_min", "x_max", "y_max"])
@pytest.mark.parametrize("value", ["inf", "-inf", "1e999"])
def test_an_infinite_coordinate_is_a_quarantined_row(tmp_path: Path, column: str, value: str) -> None:
    cells = dict(zip(COLUMNS, ["b", "Cardiomegaly", "3", "R1", "10", "20", "100", "200"], strict=True))
    cells[column] = value
    table = load_annotations(_csv(tmp_path, GOOD + ",".join(cells.values()) + "\n"))
    assert table.frame["image_id"].tolist() == ["a"]
    assert f"{column} '{value}' is not a finite number" in table.quarantine["reason"].iloc[0]


def test_validate_reports_an_infinite_class_id_as_a_bad_row(tmp_path: Path) -> None:
    path = _csv(tmp_path, GOOD * 30 + "b,Cardiomegaly,inf,R1,10,20,100,200\nc,Nodule/Mass,1e30,R1,1,2,3,4\n")
    result = CliRunner().invoke(
        app, ["validate", "--annotations", str(path)], env={"CXR_STACK_DIR": str(tmp_path / "stack")}
    )
    assert result.exit_code == 1 and not isinstance(result.exception, (OverflowError, TypeError)), (
        result.output
    )
    assert "line 32" in _text(result.output) and "line 33" in _text(result.output)


def test_the_quarantine_keeps_only_the_vindr_columns_and_clips_long_cells(tmp_path: Path) -> None:
    huge = "Z" * 100_000
    path = _csv(
        tmp_path,
        "a,Cardiomegaly,3,R1,10,20,100,200,Doe^John\n"
        f"b,Bogus,3,R1,1,2,3,4,Doe^Jane\n{huge},{huge},{huge},{huge},{huge},1,2,3,Roe^Richard\n",
        header=HEADER.rstrip("\n") + ",patient_name\n",
    )
    table = load_annotations(path)
    assert list(table.quarantine.columns) == ["line", "reason", *COLUMNS]
    shipped = json.dumps(json.loads(table.quarantine.to_json(orient="records")))  # as quality_report.json
    assert "Doe^" not in shipped and "Roe^" not in shipped
    for row in table.quarantine.to_dict("records"):
        for col in COLUMNS:
            assert len(str(row[col])) <= MAX_CELL_CHARS + 40, col
        assert len(row["reason"]) < 1000
    assert len(shipped) < 5_000


def test_quarantined_rows_from_a_frame_with_extra_columns_leave_them_out() -> None:
    import pandas as pd

    raw = pd.DataFrame(
        [["b", "Bogus", "3", "R1", "1", "2", "3", "4", "Doe^John", "1970-01-01"]],
        columns=[*COLUMNS, "patient_name", "birth_date"],
    )
    table = parse_frame(raw)
    assert list(table.quarantine.columns) == ["line", "reason", *COLUMNS]


@pytest.mark.parametrize(
    "rad_id",
    [
        '"=HYPERLINK(""http://evil.example/x"",""click"")"',
        "=1+1",
        "+cmd",
        "-2+3",
        "@SUM(A1)",
        '"R1\tx"',
        "x" * 129,
    ],
)
def test_a_rad_id_a_spreadsheet_could_run_is_a_quarantined_row(tmp_path: Path, rad_id: str) -> None:
    table = load_annotations(_csv(tmp_path, GOOD + f"b,Cardiomegaly,3,{rad_id},10,20,100,200\n"))
    assert table.frame["image_id"].tolist() == ["a"]
    assert "rad_id must be" in table.quarantine["reason"].iloc[0]


def test_vindr_and_gateway_rad_ids_still_pass(tmp_path: Path) -> None:
    ids = [f"R{i}" for i in range(1, 18)] + [
        "radiologist-1",
        "radiologist1",
        "anonymous",
        "rad_7.b",
        "x" * 128,
        "jane.doe@clinic.org",  # a gateway key id: the gateway writes its key's id as rad_id
        "Dr Smith",
        "_svc",
    ]
    body = "".join(f"a,Cardiomegaly,3,{r},10,20,100,200\n" for r in ids) + "a,No finding,14,,,,,\n"
    table = load_annotations(_csv(tmp_path, body))
    assert table.quarantine.empty
    assert table.frame["rad_id"].tolist() == [*ids, "unknown"]


def test_validate_prints_bracketed_cells_instead_of_dying_on_markup(tmp_path: Path) -> None:
    path = _csv(tmp_path, GOOD + "[/x],Bogus,3,R1,1,2,3,4\nc,Cardiomegaly,[/y],R1,1,2,3,4\n")
    result = CliRunner().invoke(
        app, ["validate", "--annotations", str(path)], env={"CXR_STACK_DIR": str(tmp_path / "stack")}
    )
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    text = _text(result.output)
    assert "[/x]" in text and "'[/y]'" in text


def test_the_quality_report_prints_bracketed_ids_as_text() -> None:
    report = QualityReport(
        thresholds={},
        n_images=3,
        decode_failures={"[/x]": "CorruptImage"},
        unannotated_images=["[bold]y"],
        excluded=["[/x]"],
    )
    out = io.StringIO()
    report.render(Console(file=out, width=200))
    assert "[/x]" in out.getvalue() and "[bold]y" in out.getvalue()


@pytest.mark.parametrize(
    "image_id",
    ['"=HYPERLINK(""http://evil.example/x"",""click"")"', "=1+1", "+cmd", "-2+3", "@SUM(A1)", '"a\rb"'],
)
def test_an_image_id_a_spreadsheet_could_run_is_a_quarantined_row(tmp_path: Path, image_id: str) -> None:
    """The image id goes into annotations_readers.csv and annotations_fused.csv of the version as it
    is (a file of that stem in the DICOM folder is all it takes), which are opened in spreadsheets."""
    table = load_annotations(_csv(tmp_path, GOOD + f"{image_id},Cardiomegaly,3,R1,10,20,100,200\n"))
    assert table.frame["image_id"].tolist() == ["a"]
    assert "image_id must" in table.quarantine["reason"].iloc[0]


def test_vindr_and_feedback_image_ids_still_pass(tmp_path: Path) -> None:
    ids = ["000434271f63a053c4128a0ba6352c7f", "fb-3f2a9c", "case_01.v2", "1.2.840.113619.2.55", "a b"]
    table = load_annotations(_csv(tmp_path, "".join(f"{i},No finding,14,R1,,,,\n" for i in ids)))
    assert table.quarantine.empty
    assert table.frame["image_id"].tolist() == ids


def test_an_annotations_file_over_the_size_limit_is_refused_before_it_is_read(tmp_path: Path) -> None:
    """pandas holds every cell as a string (~10x the file): a wrong file given as the CSV (an
    archive, a log) was read whole, exhausting the machine before any row was checked. The file
    here is sparse: nothing is written or read."""
    from data_pipeline.annotations import MAX_CSV_BYTES
    from data_pipeline.errors import AnnotationError

    path = _csv(tmp_path, GOOD)
    with path.open("r+b") as f:
        f.truncate(MAX_CSV_BYTES + 1)
    with pytest.raises(AnnotationError, match=r"over the \d+-byte limit"):
        load_annotations(path)
