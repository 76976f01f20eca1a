"""`cxr train` command line: errors a person can act on, the per-epoch table."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from training.cli import app, epoch_table

pytestmark = pytest.mark.unit


def test_missing_config_exits_2_with_a_message_not_a_traceback(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["run", "--config", str(tmp_path / "nope.yaml")])
    assert result.exit_code == 2
    assert "does not exist" in result.output
    assert "Traceback" not in result.output


def test_missing_dataset_directory_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CXR_MLFLOW_URI", "http://127.0.0.1:9")  # never reached: the dataset check comes first
    config = tmp_path / "c.yaml"
    config.write_text("name: t\n")
    result = CliRunner().invoke(
        app, ["run", "--config", str(config), "--dataset", str(tmp_path / "no" / "data")]
    )
    assert result.exit_code == 2
    assert "does not exist" in result.output


def test_epoch_table_shows_one_row_per_epoch(tmp_path: Path) -> None:
    csv = tmp_path / "results.csv"
    csv.write_text(
        "epoch,time,train/box_loss,metrics/mAP50(B)\n1,2.5,1.9,0.01\n2,5.0,1.7,0.02\n3,7.5,1.5,0.05\n"
    )
    table = epoch_table(csv)
    assert table.row_count == 3
    assert [c.header for c in table.columns] == ["epoch", "box", "mAP50", "s"]


def test_a_config_that_is_no_text_or_a_folder_is_one_error_line(tmp_path: Path) -> None:
    binary = tmp_path / "model.pt"
    binary.write_bytes(b"\x80\xb7\xff\x00" * 64)  # e.g. weights passed where the recipe goes
    recipe = Path("training/configs/cpu-small.yaml")
    for args, expected in (
        (["run", "--config", str(binary)], "not valid YAML"),
        (["run", "--config", str(tmp_path)], "is not a file"),
        (["tune", "--config", str(recipe), "--space", str(binary)], "is invalid"),
    ):
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 2, (args, result.output)
        assert expected in result.output, (args, result.output)
        assert isinstance(result.exception, SystemExit), (args, result.exception)


def test_an_mlflow_uri_that_is_no_server_address_is_one_error_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # MLflow would read "mlflow-host" as a folder here
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    for uri in ("mlflow-host", "http://[::1"):
        monkeypatch.setenv("CXR_MLFLOW_URI", uri)
        result = CliRunner().invoke(app, ["evaluate", "--model-version", "3"])
        text = " ".join(result.output.split())
        assert result.exit_code == 2, (uri, result.output)
        assert f"MLflow tracking URI '{uri}' cannot be used" in text, text
        assert isinstance(result.exception, SystemExit), (uri, result.exception)


def test_an_unknown_split_is_refused_before_mlflow_is_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CXR_MLFLOW_URI", "http://127.0.0.1:9")
    result = CliRunner().invoke(app, ["evaluate", "--model-version", "3", "--split", "tset"])
    assert result.exit_code == 2
    assert "use train, val or test" in " ".join(result.output.split())
    assert "MLflow" not in result.output


def test_an_out_file_that_cannot_be_written_is_refused_before_the_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The file is written last: a folder there was an IsADirectoryError traceback after the whole
    search (tune) or evaluation, with the result nowhere."""
    monkeypatch.setenv("CXR_MLFLOW_URI", "http://127.0.0.1:9")  # never reached: --out is checked first
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    recipe = "training/configs/cpu-small.yaml"
    for command in (["tune", "--config", recipe], ["evaluate", "--model-version", "3"]):
        for out, expected in ((tmp_path, "is a folder"), (a_file / "r.json", "is a file")):
            result = CliRunner().invoke(app, [*command, "--out", str(out)])
            assert result.exit_code == 2, (command, out, result.output)
            text = " ".join(result.output.replace("│", " ").split())
            assert expected in text, (command, out, result.output)
            assert "MLflow" not in result.output
