"""Every kustomization renders; core objects validate against Kubernetes schemas; CRs have what they need."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[3]
CORE_GROUPS = {
    "v1",
    "apps/v1",
    "batch/v1",
    "autoscaling/v2",
    "policy/v1",
    "networking.k8s.io/v1",
    "rbac.authorization.k8s.io/v1",
    "storage.k8s.io/v1",
}
# Custom resources we ship, with the fields their controllers cannot work without.
CUSTOM_REQUIRED: dict[tuple[str, str], list[str]] = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): ["spec.selector.matchLabels", "spec.endpoints"],
    ("external-secrets.io/v1beta1", "ExternalSecret"): [
        "spec.secretStoreRef.name",
        "spec.secretStoreRef.kind",
        "spec.target.name",
        "spec.data",
    ],
    ("monitoring.coreos.com/v1", "PrometheusRule"): ["spec.groups"],
    ("external-secrets.io/v1beta1", "ClusterSecretStore"): ["spec.provider"],
    ("argoproj.io/v1alpha1", "Application"): [
        "spec.project",
        "spec.source.repoURL",
        "spec.source.targetRevision",
        "spec.destination.server",
        "spec.destination.namespace",
    ],
    ("argoproj.io/v1alpha1", "ApplicationSet"): [
        "spec.generators",
        "spec.template.spec.source.repoURL",
        "spec.template.spec.destination.namespace",
    ],
    ("argoproj.io/v1alpha1", "AppProject"): ["spec.sourceRepos", "spec.destinations"],
}
KUBERNETES_VERSIONS = ("1.30.0", "1.37.0")


def field(obj: dict[str, Any], dotted: str) -> Any:
    value: Any = obj
    for part in dotted.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def test_every_overlay_renders_with_its_stage_objects(rendered: dict[str, list[dict[str, Any]]]) -> None:
    for stage in ("staging", "canary", "production"):
        names = {(o["kind"], o["metadata"]["name"]) for o in rendered[f"k8s/overlays/{stage}"]}
        assert ("Deployment", f"triton-{stage}") in names
        assert ("ConfigMap", f"cxr-model-{stage}") in names
        assert ("Job", f"cxr-reconcile-{stage}") in names
    production = {(o["kind"], o["metadata"]["name"]) for o in rendered["k8s/overlays/production"]}
    for kind in ("Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget"):
        assert (kind, "cxr-gateway-production") in production
    assert ("CronJob", "cxr-canary-step-production") in production


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_core_objects_validate_strictly_against_kubernetes_schemas(
    all_objects: list[tuple[str, dict[str, Any]]], version: str
) -> None:
    errors = []
    checked = 0
    for path, obj in all_objects:
        if obj["apiVersion"] not in CORE_GROUPS:
            continue
        try:
            kubernetes_validate.validate(obj, version, strict=True)
            checked += 1
        except kubernetes_validate.ValidationError as exc:
            errors.append(
                f"{path} {obj['kind']}/{obj['metadata']['name']}: {exc.message} at {list(exc.path)}"
            )
    assert not errors, "\n".join(errors)
    assert checked >= 40


def test_every_object_is_core_or_a_known_custom_resource_with_required_fields(
    all_objects: list[tuple[str, dict[str, Any]]],
) -> None:
    problems = []
    for path, obj in all_objects:
        key = (obj["apiVersion"], obj["kind"])
        if obj["apiVersion"] in CORE_GROUPS:
            continue
        if key not in CUSTOM_REQUIRED:
            problems.append(f"{path}: unexpected custom resource {key}")
            continue
        # Argo CD's default project, locked, lists its repositories and destinations empty on purpose
        locked = obj["kind"] == "AppProject" and obj["metadata"]["name"] == "default"
        problems += [
            f"{path} {obj['kind']}/{obj['metadata']['name']}: missing {f}"
            for f in CUSTOM_REQUIRED[key]
            if field(obj, f) is None or not (field(obj, f) or locked)
        ]
    assert not problems, "\n".join(problems)


def test_production_stage_configmap_is_the_committed_model_file(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    for stage in ("staging", "canary", "production"):
        cm = next(o for o in rendered[f"k8s/overlays/{stage}"] if o["kind"] == "ConfigMap")
        assert cm["data"]["model.yaml"] == (REPO / f"k8s/overlays/{stage}/model.yaml").read_text()


def test_gateway_and_reconcile_hook_mount_all_three_stage_files_where_the_reader_looks(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    production = rendered["k8s/overlays/production"]
    for kind in ("Deployment", "Job"):
        obj = next(o for o in production if o["kind"] == kind and "triton" not in o["metadata"]["name"])
        pod = obj["spec"]["template"]["spec"]
        volume = next(v for v in pod["volumes"] if v["name"] == "stage-files")
        paths = {
            src["configMap"]["name"]: src["configMap"]["items"][0]["path"]
            for src in volume["projected"]["sources"]
        }
        assert paths == {f"cxr-model-{s}": f"{s}/model.yaml" for s in ("staging", "canary", "production")}
        container = pod["containers"][0]
        mount = next(m for m in container["volumeMounts"] if m["name"] == "stage-files")
        env = {e["name"]: e.get("value") for e in container.get("env", [])}
        assert mount["mountPath"] == f"{env['CXR_GITOPS_DIR']}/k8s/overlays"


def test_each_stage_triton_reads_its_own_s3_repository_and_selects_only_its_pods(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    for stage in ("staging", "canary", "production"):
        objs = rendered[f"k8s/overlays/{stage}"]
        deploy = next(
            o for o in objs if o["kind"] == "Deployment" and o["metadata"]["name"] == f"triton-{stage}"
        )
        env = {e["name"]: e.get("value") for e in deploy["spec"]["template"]["spec"]["containers"][0]["env"]}
        assert env["MODEL_REPOSITORY"].endswith(f"/cxr/triton/{stage}")
        assert env["MODEL_REPOSITORY"].startswith("s3://")
        service = next(
            o for o in objs if o["kind"] == "Service" and o["metadata"]["name"] == f"triton-{stage}"
        )
        assert service["spec"]["selector"]["cxr.io/stage"] == stage


def test_applicationset_syncs_every_stage_automatically_with_prune_and_self_heal(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    appset = next(o for o in rendered["k8s/argocd"] if o["kind"] == "ApplicationSet")
    paths = {e["path"] for e in appset["spec"]["generators"][0]["list"]["elements"]}
    assert paths == {
        "k8s/shared",
        "k8s/monitoring",
        "k8s/overlays/staging",
        "k8s/overlays/canary",
        "k8s/overlays/production",
        "k8s/workflows",  # the rendered retrain templates (workflows/render.py writes them there)
    }
    project = next(o for o in rendered["k8s/argocd"] if o["kind"] == "AppProject")
    allowed = {d["namespace"] for d in project["spec"]["destinations"]}
    assert {e["namespace"] for e in appset["spec"]["generators"][0]["list"]["elements"]} <= allowed
    for path in paths:
        assert (REPO / path / "kustomization.yaml").exists()
    assert appset["spec"]["template"]["spec"]["syncPolicy"]["automated"] == {"prune": True, "selfHeal": True}
    assert {"group": "", "kind": "Secret"} in project["spec"]["namespaceResourceBlacklist"]


def test_every_application_sits_in_a_project_of_ours_that_admits_exactly_it(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    """Argo CD's built-in ``default`` project admits any repository, any namespace and any kind
    (a ClusterRoleBinding to cluster-admin included): an Application in it, or one a commit adds to
    k8s/platform, walks around every limit of cxr-detect. So no Application uses it, ``default``
    itself admits nothing, the app of apps may create Applications but no cluster role, and each
    project names its repositories and namespaces (no wildcards) and holds the Applications in it."""
    argocd = rendered["k8s/argocd"]
    projects = {o["metadata"]["name"]: o["spec"] for o in argocd if o["kind"] == "AppProject"}
    default = projects.get("default")
    assert default is not None, "k8s/argocd leaves Argo CD's default project open"
    assert not default.get("sourceRepos") and not default.get("destinations")
    assert not default.get("clusterResourceWhitelist")
    assert {"group": "*", "kind": "*"} in default.get("namespaceResourceBlacklist", [])
    held: list[tuple[str, dict[str, Any], set[str]]] = [
        (o["metadata"]["name"], o["spec"], {o["spec"]["destination"]["namespace"]})
        for o in [*argocd, *rendered["k8s/platform"]]
        if o["kind"] == "Application"
    ]
    for appset in (o for o in argocd if o["kind"] == "ApplicationSet"):
        elements = appset["spec"]["generators"][0]["list"]["elements"]
        held.append(
            (
                appset["metadata"]["name"],
                appset["spec"]["template"]["spec"],
                {e["namespace"] for e in elements},
            )
        )
    assert len(held) > 8
    for name, spec, namespaces in held:
        assert spec["project"] != "default", f"{name} is in Argo CD's unrestricted default project"
        project = projects.get(spec["project"])
        assert project is not None, f"{name}: project {spec['project']} is not defined in k8s/argocd"
        assert spec["source"]["repoURL"] in project["sourceRepos"], name
        allowed = {(d["server"], d["namespace"]) for d in project["destinations"]}
        assert {(spec["destination"]["server"], ns) for ns in namespaces} <= allowed, name
    for name, project in projects.items():
        assert "*" not in project.get("sourceRepos", []), name
        assert all("*" not in d["namespace"] and "*" not in d["server"] for d in project["destinations"]), (
            name
        )
    app_of_apps = projects[next(spec["project"] for n, spec, _ in held if n == "cxr-platform")]
    kinds = {k["kind"] for k in app_of_apps.get("clusterResourceWhitelist", [])}
    assert kinds and not kinds & {"*", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition"}
    assert {"group": "argoproj.io", "kind": "Application"} in app_of_apps["namespaceResourceWhitelist"]


def test_platform_pins_every_helm_chart_to_an_exact_version(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    charts = {}
    for app in rendered["k8s/platform"]:
        if app["kind"] != "Application":
            continue  # the StorageClass and the secret store beside the charts
        source = app["spec"]["source"]
        chart = source.get("chart") or source["path"].rsplit("/", 1)[-1]  # a chart in a git repository
        version = str(source["targetRevision"])
        assert version[:1].isdigit() or version.startswith("v"), f"{chart}: {version}"
        assert not any(c in version for c in "*^~x<> "), f"{chart} is not pinned: {version}"
        assert app["spec"]["syncPolicy"]["automated"] == {"prune": True, "selfHeal": True}
        charts[chart] = version
    for chart in (
        "argo-workflows",
        "local-path-provisioner",
        "kuberay-operator",
        "gpu-operator",
        "kube-prometheus-stack",
        "operator",
        "external-secrets",
    ):
        assert chart in charts


def test_every_gateway_and_pipeline_pod_gets_the_one_install_secret(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    """Without it each pod would generate its own: pseudonyms per pod, dataset versions per run."""
    production = rendered["k8s/overlays/production"]
    secrets = {  # the namespace-wide objects, secrets among them, are synced once from k8s/shared
        o["spec"]["target"]["name"]: {d["secretKey"] for d in o["spec"]["data"]}
        for o in rendered["k8s/shared"]
        if o["kind"] == "ExternalSecret"
    }
    assert secrets.get("cxr-install-secret") == {"CXR_DEID_SECRET", "CXR_PATIENT_SALT"}
    gateway = next(o for o in production if o["kind"] == "Deployment" and "gateway" in o["metadata"]["name"])
    container = gateway["spec"]["template"]["spec"]["containers"][0]
    assert {"secretRef": {"name": "cxr-install-secret"}} in container["envFrom"]
    retrain = yaml.safe_load((REPO / "k8s/workflows/cxr-retrain.yaml").read_text())
    steps = [t for t in retrain["spec"]["templates"] if "container" in t]
    assert steps and all(
        any(e["name"] == "CXR_PATIENT_SALT" for e in t["container"].get("env", [])) for t in steps
    )
