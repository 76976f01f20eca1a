"""The delivery CLI answers bad input with one actionable line and an exit code, never a traceback."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any, ClassVar

import pytest
import typer
from typer.testing import CliRunner

from core.stage_file import StageFile, write_stage_file
from delivery.cli import GATE_EXIT, app, canary_app, promote, rollback
from training.registry import VersionFacts

pytestmark = pytest.mark.unit

runner = CliRunner()


@pytest.fixture
def repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    subprocess.run(["git", "init", "-q", "-b", "main", str(tmp_path)], check=True)
    monkeypatch.setenv("CXR_STACK_DIR", str(tmp_path / ".stack"))
    return tmp_path


def test_force_without_reason_is_refused_before_anything_happens(repo: Path) -> None:
    result = runner.invoke(app, ["promote", "3", "--to", "canary", "--force", "--gitops-dir", str(repo)])
    assert result.exit_code == 1
    assert "--force needs --reason" in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_unknown_stage_lists_the_valid_ones(repo: Path) -> None:
    result = runner.invoke(app, ["promote", "3", "--to", "prod", "--gitops-dir", str(repo)])
    assert result.exit_code == 1
    assert "staging, canary, production" in result.output


def test_rollback_of_an_empty_stage_explains_there_is_nothing_to_roll_back(repo: Path) -> None:
    result = runner.invoke(
        app, ["rollback", "--stage", "production", "--gitops-dir", str(repo), "--no-apply"]
    )
    assert result.exit_code == 1
    assert "serves nothing" in result.output


def test_analyze_with_prometheus_down_says_where_it_looked(repo: Path) -> None:
    result = runner.invoke(
        app, ["canary", "analyze", "--prometheus-url", "http://127.0.0.1:9", "--gitops-dir", str(repo)]
    )
    assert result.exit_code == 1
    assert "Prometheus at http://127.0.0.1:9 is unreachable" in result.output


def test_contract_names_can_be_mounted_by_the_root_command() -> None:
    root = typer.Typer()
    root.command("promote")(promote)
    root.command("rollback")(rollback)
    root.add_typer(canary_app, name="canary")
    for args in (["promote", "--help"], ["rollback", "--help"], ["canary", "step", "--help"]):
        result = runner.invoke(root, args)
        assert result.exit_code == 0, result.output
    assert "--force" in runner.invoke(root, ["promote", "--help"]).output


class _Registry:
    """The registry calls a staging promotion makes, answered from memory (no MLflow)."""

    tags: ClassVar[dict[str, str]] = {}
    aliases: ClassVar[dict[str, str]] = {}

    def __init__(self, tracking_uri: str, model_name: str) -> None:
        self.model_name = model_name

    def facts(self, version: str) -> VersionFacts:
        return VersionFacts(version, dict(self.tags))

    def set_alias(self, alias: str, version: str) -> None:
        if version:
            self.aliases[alias] = version
        else:  # as MLflow: no version removes the alias
            self.aliases.pop(alias, None)


@pytest.fixture
def stage_repo(repo: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A GitOps checkout with empty stage files, and a registry that knows version 4."""
    for args in (["config", "user.name", "T"], ["config", "user.email", "t@example.org"]):
        subprocess.run(["git", *args], cwd=repo, check=True)
    for stage in ("staging", "canary", "production"):
        write_stage_file(repo, StageFile(stage=stage))  # type: ignore[arg-type]
    subprocess.run(["git", "add", "."], cwd=repo, check=True)
    subprocess.run(["git", "commit", "-q", "-m", "initial"], cwd=repo, check=True)
    monkeypatch.setattr("delivery.promote.ModelRegistry", _Registry)
    monkeypatch.setattr(_Registry, "aliases", {})
    return repo


def _gate_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("event=promote_gate")]


def test_promote_reports_each_gate_with_its_verdict_as_a_log_line(stage_repo: Path) -> None:
    _Registry.tags = {"parity_max_abs_diff": "1e-05", "map50": "0.5", "map40": "0.4"}
    result = runner.invoke(
        app, ["promote", "4", "--to", "staging", "--no-apply", "--gitops-dir", str(stage_repo)]
    )
    assert result.exit_code == 0, result.output
    gates = _gate_lines(result.stdout)
    assert gates[0].startswith('event=promote_gate stage=staging version=4 gate="onnx parity" verdict=pass ')
    assert 'gate="mAP@0.5 floor" verdict=pass observed="map50=0.5" expected=">= 0"' in gates[1]
    assert [g.split(" verdict=")[1].split()[0] for g in gates[:5]] == ["pass"] * 5
    assert 'gate="variant fp32" verdict=pass' in gates[4]
    assert gates[5] == "event=promote_gates stage=staging version=4 verdict=pass gates=5 failed=0 warnings=0"
    assert "- onnx parity: pass" in result.stdout  # the report a person reads is still printed
    assert _Registry.aliases == {"staging": "4"}


def test_promote_logs_the_failed_gate_before_refusing(stage_repo: Path) -> None:
    _Registry.tags = {"parity_max_abs_diff": "0.5", "map50": "0.5", "map40": "0.4"}
    result = runner.invoke(
        app, ["promote", "4", "--to", "staging", "--no-apply", "--gitops-dir", str(stage_repo)]
    )
    assert result.exit_code == GATE_EXIT
    gates = _gate_lines(result.stdout)
    failed = 'gate="onnx parity" verdict=fail observed="parity_max_abs_diff=0.5" expected="<= 0.001"'
    assert failed in gates[0]
    assert gates[-1].startswith("event=promote_gates stage=staging version=4 verdict=fail gates=5 failed=1")
    assert _Registry.aliases == {}


def _promote_variant(repo: Path, variant: str) -> Any:
    args = ["promote", "4", "--to", "staging", "--variant", variant, "--no-apply", "--gitops-dir", str(repo)]
    return runner.invoke(app, args)


def _head(repo: Path) -> str:
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True).stdout


_INT8 = {
    "parity_max_abs_diff": "1e-05",
    "map50": "0.5",
    "map40": "0.4",
    "variants": "fp32,int8",
    "variant_int8_map50_drop": "0.004",
    "variant_int8_map40_drop": "-0.002",
    "variant_int8_score_max_abs_diff": "0.03",
    "variant_int8_finding_agreement": "0.95",
}


def test_an_int8_variant_within_the_limits_is_promoted_and_named_in_the_stage_file(stage_repo: Path) -> None:
    from core.stage_file import read_stage_file

    _Registry.tags = dict(_INT8)
    result = _promote_variant(stage_repo, "int8")
    assert result.exit_code == 0, result.output
    assert (
        'gate="variant int8" verdict=pass observed="mAP@0.5 drop +0.0040, mAP@0.4 drop -0.0020'
        in result.stdout
    )
    staged = read_stage_file(stage_repo, "staging")
    assert (staged.model_version, staged.variant) == ("4", "int8")
    log = subprocess.run(["git", "log", "-1", "--format=%B"], cwd=stage_repo, capture_output=True, text=True)
    assert log.stdout.startswith("promote cxr-detector 4 (int8) to staging (was none)")
    assert "Cxr-Variant: int8" in log.stdout


@pytest.mark.parametrize(
    ("tags", "why"),
    [
        ({"variant_int8_map50_drop": "0.02"}, "mAP@0.5 drop +0.0200"),
        ({"variant_int8_map40_drop": "0.011"}, "mAP@0.4 drop +0.0110"),
        ({"variant_int8_score_max_abs_diff": "0.25"}, "class-score parity 0.2500"),
        ({"variant_int8_finding_agreement": "0.85"}, "finding agreement 0.850"),
        ({"variants": "fp32"}, "carries fp32 only; build int8 with `cxr train quantize`"),
        ({"variant_int8_map50_drop": ""}, "variant_int8_map50_drop missing"),
    ],
)
def test_a_variant_over_the_limit_or_never_measured_is_refused_with_its_figures(
    stage_repo: Path, tags: dict[str, str], why: str
) -> None:
    from core.stage_file import read_stage_file

    _Registry.tags = {**_INT8, **tags}
    if tags.get("variant_int8_map50_drop") == "":
        del _Registry.tags["variant_int8_map50_drop"]
    head = _head(stage_repo)
    result = _promote_variant(stage_repo, "int8")
    assert result.exit_code == GATE_EXIT
    [line] = [g for g in _gate_lines(result.stdout) if 'gate="variant int8"' in g]
    assert "verdict=fail" in line and why in line, line
    assert "- variant int8: FAIL" in result.stdout  # the report a person reads names it too
    assert read_stage_file(stage_repo, "staging").model_version == ""  # nothing changed
    after = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=stage_repo, capture_output=True, text=True
    ).stdout
    assert after == head


def test_an_unknown_variant_lists_the_valid_ones(stage_repo: Path) -> None:
    result = runner.invoke(
        app,
        [
            "promote",
            "4",
            "--to",
            "staging",
            "--variant",
            "fp8",
            "--no-apply",
            "--gitops-dir",
            str(stage_repo),
        ],
    )
    assert result.exit_code == 1
    assert "unknown serving variant 'fp8'; use one of fp32, int8, fp16-trt" in result.output


_PASSING = {"parity_max_abs_diff": "1e-05", "map50": "0.5", "map40": "0.4"}


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, check=True).stdout


def test_a_promotion_whose_commit_fails_moves_nothing_and_the_retry_promotes(stage_repo: Path) -> None:
    """A refused commit once left v4 in the file and the alias: the retry said 'nothing to commit'."""
    from core.stage_file import read_stage_file

    _Registry.tags = dict(_PASSING)
    hook = stage_repo / _git(stage_repo, "rev-parse", "--git-path", "hooks/pre-commit").strip()
    hook.parent.mkdir(parents=True, exist_ok=True)
    hook.write_text("#!/bin/sh\necho 'refused by the review policy' >&2\nexit 1\n")
    hook.chmod(0o755)
    head = _head(stage_repo)
    refused = _promote_variant(stage_repo, "fp32")
    assert refused.exit_code == 1 and "refused by the review policy" in " ".join(refused.output.split())
    assert read_stage_file(stage_repo, "staging").model_version == ""  # what HEAD and the gateway say
    assert _git(stage_repo, "status", "--porcelain", "--", "k8s") == ""  # nothing left staged either
    assert _Registry.aliases == {} and _head(stage_repo) == head  # the alias moved back
    hook.unlink()
    retried = _promote_variant(stage_repo, "fp32")
    assert retried.exit_code == 0, retried.output
    assert "committed" in retried.stdout and "nothing to commit" not in retried.stdout
    assert read_stage_file(stage_repo, "staging").model_version == "4" and _head(stage_repo) != head
    assert _Registry.aliases == {"staging": "4"}


def test_a_promotion_that_cannot_push_moves_nothing_and_the_retry_pushes(
    stage_repo: Path, tmp_path: Path
) -> None:
    """`--push` without the remote was found after the commit and the alias: the retry the error
    asked for ("add it or drop --push") then said "nothing to commit" and never pushed."""
    from core.stage_file import read_stage_file

    _Registry.tags = dict(_PASSING)
    head = _head(stage_repo)
    args = ["promote", "4", "--to", "staging", "--push", "--no-apply", "--gitops-dir", str(stage_repo)]
    refused = runner.invoke(app, args)
    assert refused.exit_code == 1 and "no git remote named 'origin'" in refused.output
    assert _head(stage_repo) == head and _Registry.aliases == {}
    assert read_stage_file(stage_repo, "staging").model_version == ""
    remote = tmp_path / "remote.git"
    subprocess.run(["git", "init", "-q", "--bare", str(remote)], check=True)
    _git(stage_repo, "remote", "add", "origin", str(remote))
    retried = runner.invoke(app, args)
    assert retried.exit_code == 0, retried.output
    assert "pushed to origin" in retried.stdout and _Registry.aliases == {"staging": "4"}
    assert _git(remote, "rev-parse", "main") == _head(stage_repo) != head


def test_a_version_of_unicode_digits_is_refused_before_anything_happens(stage_repo: Path) -> None:
    _Registry.tags = dict(_PASSING)
    head = _head(stage_repo)
    result = runner.invoke(
        app, ["promote", "\u00b2", "--to", "staging", "--no-apply", "--gitops-dir", str(stage_repo)]
    )
    assert result.exit_code == 1
    assert "version must be an MLflow version number" in result.output
    assert _head(stage_repo) == head and _Registry.aliases == {}


def test_a_malformed_canary_window_is_refused_before_prometheus_is_asked(repo: Path) -> None:
    # model_copy validates nothing: "5x" (or a PromQL fragment) reached the queries as it was typed
    result = runner.invoke(
        canary_app,
        ["analyze", "--window", "5x", "--gitops-dir", str(repo), "--prometheus-url", "http://127.0.0.1:9"],
    )
    text = " ".join(result.output.split())
    assert result.exit_code == 1, result.output
    assert "--window '5x' is not a PromQL range" in text and "unreachable" not in text
    assert isinstance(result.exception, SystemExit), result.exception


def test_a_negative_poll_interval_is_a_usage_error(repo: Path) -> None:
    result = runner.invoke(app, ["reconcile", "--watch", "--poll-s", "-1", "--gitops-dir", str(repo)])
    assert result.exit_code == 2, result.output
    assert "--poll-s" in result.output
    assert isinstance(result.exception, SystemExit), result.exception


def test_an_mlflow_uri_that_is_no_server_address_fails_the_promotion_with_one_line(
    repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(repo)
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    result = runner.invoke(
        app,
        [
            "promote",
            "3",
            "--to",
            "staging",
            "--no-apply",
            "--gitops-dir",
            str(repo),
            "--mlflow-uri",
            "mlflow",
        ],
    )
    assert result.exit_code == 1, result.output
    assert "MLflow tracking URI 'mlflow' cannot be used" in " ".join(result.output.split())
    assert isinstance(result.exception, SystemExit), result.exception


def test_cluster_check_refuses_an_unknown_check_name() -> None:
    from delivery.cluster_fit.cli import app as cluster_app

    result = runner.invoke(cluster_app, ["--only", "rbca"])  # one command: Typer drops its name
    assert result.exit_code == 2, result.output  # it ran nothing and reported "0 misfits", exit 0
    assert "unknown check(s) rbca" in " ".join(result.output.replace("│", " ").split())


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("http://[::1", "Invalid IPv6 URL"),  # httpx.InvalidURL is no HTTPError: it was a traceback
        ("ftp://127.0.0.1:9090", "must start with http:// or https://"),  # was "unreachable, stack up?"
    ],
)
def test_canary_analyze_names_a_prometheus_address_that_is_no_http_url(
    repo: Path, url: str, why: str
) -> None:
    result = runner.invoke(app, ["canary", "analyze", "--prometheus-url", url, "--gitops-dir", str(repo)])
    text = " ".join(result.output.split())
    assert result.exit_code == 1, result.output
    assert f"--prometheus-url / CXR_PROMETHEUS_URL {url!r} is not a server address" in text, text
    assert why in text
    assert isinstance(result.exception, SystemExit), result.exception
