"""Cluster serving fits together: what the Sync hook publishes, how the Tritons pick it up, who scales.

- the hook publishes the GPU variant and calls no Triton (each replica polls the repository);
- publishing is idempotent and never leaves a poll a half-written model;
- the manifests: Triton in poll mode and Ready without a model, the hook a Sync hook after the
  stage's ConfigMap, no replicas where an HPA scales, one canary mechanism (no AnalysisTemplate),
  GPU scheduling only for Triton.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from google.protobuf import text_format
from onnx import TensorProto, helper, numpy_helper
from tritonclient.grpc import model_config_pb2 as mc
from typer.testing import CliRunner

from core.hashing import file_sha256
from core.stage_file import StageFile, write_stage_file
from delivery import reconcile as rec
from delivery.context import DeliveryContext
from tests.unit.serving.serving_support import MemoryStore
from training.registry import VersionFacts

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[3]
STAGES = ("staging", "canary", "production")
MODEL = "cxr-detector"


# ---------------------------------------------------------------- the Sync hook's publish


def tiny_onnx(path: Path) -> Path:
    """A 1-node model carrying the gateway contract (all build_repository reads)."""
    graph = helper.make_graph(
        [helper.make_node("Mul", ["images", "k"], ["output0"])],
        "tiny",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, 64, 64])],
        [helper.make_tensor_value_info("output0", TensorProto.FLOAT, ["batch", 3, 64, 64])],
        initializer=[numpy_helper.from_array(np.ones(1, dtype=np.float32), "k")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    contract = {"input": "images", "output": "output0", "imgsz": [64, 64], "class_names": ["a", "b"]}
    helper.set_model_props(model, {"cxr_contract": json.dumps(contract)})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.SerializeToString())
    return path


class FakeStore(MemoryStore):
    """The slice of ObjectStore publishing uses; records every write and delete in order."""

    def __init__(self) -> None:
        super().__init__()
        self.log: list[tuple[str, str]] = []

    def put_bytes(self, key: str, data: bytes, content_type: str = "") -> None:
        super().put_bytes(key, data, content_type)
        self.log.append(("put", key))

    def upload_dir(self, directory: Path, prefix: str, *, skip: set[str] | None = None) -> int:
        prefix = prefix.rstrip("/") + "/"
        sent = 0
        for path in sorted(p for p in directory.rglob("*") if p.is_file()):
            rel = path.relative_to(directory).as_posix()
            if skip and rel in skip:
                continue
            data = path.read_bytes()
            if self.objects.get(prefix + rel) != data:  # unchanged: not re-sent
                self.put_bytes(prefix + rel, data)
                sent += 1
        return sent

    def delete_prefix(self, prefix: str) -> int:
        gone = self.list_prefix(prefix)
        self.log.extend(("delete", key) for key in gone)
        return super().delete_prefix(prefix)


class FakeRegistry:
    model_name = MODEL
    tracking_uri = "http://mlflow.invalid"

    def __init__(self, models: dict[str, Path]) -> None:
        self.models = models
        self.operating_points: dict[str, str] = {}  # version -> artifact JSON (none: trained before them)
        self.asked: list[str] = []
        self.variants: list[str] = []  # the serving variant of each ONNX download

    def facts(self, version: str) -> VersionFacts:
        """Each version's lineage tag records its fp32 file (the other variants carry no hash tag here)."""
        return VersionFacts(version, {"onnx_sha256": file_sha256(self.models[version])})

    def download_onnx(self, version: str, dest: Path, variant: str = "fp32") -> Path:
        self.variants.append(variant)
        dest.mkdir(parents=True, exist_ok=True)
        out = dest / "model.onnx"
        out.write_bytes(self.models[version].read_bytes())
        return out

    def download_operating_points(self, version: str, dest: Path, variant: str = "fp32") -> Path | None:
        self.asked.append(version)
        if version not in self.operating_points:
            return None
        dest.mkdir(parents=True, exist_ok=True)
        out = dest / "operating_points.json"
        out.write_text(self.operating_points[version])
        return out


@pytest.fixture
def cluster(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> tuple[DeliveryContext, FakeStore, FakeRegistry]:
    for stage in STAGES:
        write_stage_file(tmp_path / "gitops", StageFile(stage=stage))  # type: ignore[arg-type]

    class NoTriton:
        def __init__(self, *args: object, **kwargs: object) -> None:
            raise AssertionError("the cluster reconcile must not call a Triton (the replicas poll)")

    monkeypatch.setattr("serving.inference.triton_repo.TritonAdmin", NoTriton)
    ctx = DeliveryContext(
        gitops_dir=tmp_path / "gitops",
        mlflow_uri="http://mlflow.invalid",
        prometheus_url="http://prometheus.invalid",
        stack_dir=tmp_path / "stack",
    )
    models = {v: tiny_onnx(tmp_path / "models" / v / "model.onnx") for v in ("3", "5")}
    return ctx, FakeStore(), FakeRegistry(models)


def set_version(ctx: DeliveryContext, stage: str, version: str, variant: str = "fp32") -> None:
    weight = {"canary_weight": 10} if stage == "canary" else {}
    content = StageFile(stage=stage, model_version=version, variant=variant, **weight)  # type: ignore[arg-type]
    write_stage_file(ctx.gitops_dir, content)


def published_config(store: FakeStore, stage: str) -> mc.ModelConfig:
    text = store.objects[f"triton/{stage}/{MODEL}/config.pbtxt"].decode()
    return text_format.Parse(text, mc.ModelConfig())


def test_sync_hook_publishes_the_gpu_variant_version_first_and_loads_nothing(cluster: Any) -> None:
    ctx, store, registry = cluster
    set_version(ctx, "production", "5")
    result = rec.publish_stage(ctx, "production", registry=registry, store=store)
    assert (result.action, result.model_version) == ("published", "5")
    assert store.list_prefix("triton/production/") == [
        f"triton/production/{MODEL}/5/model.onnx",
        f"triton/production/{MODEL}/config.pbtxt",
    ]
    # a poll between the two writes sees the old config or the complete new model, never a
    # config naming a version directory that is not there yet
    assert [key for _, key in store.log] == store.list_prefix("triton/production/")
    config = published_config(store, "production")
    assert config.platform == "onnxruntime_onnx"
    assert config.instance_group[0].kind == mc.ModelInstanceGroup.KIND_GPU
    assert config.parameters["cxr_model_version"].string_value == "5"
    # fp32 is served as it was measured: no TensorRT FP16 unless the stage file names that variant
    assert config.parameters["cxr_variant"].string_value == "fp32"
    assert not config.optimization.execution_accelerators.gpu_execution_accelerator

    set_version(ctx, "production", "5", variant="fp16-trt")
    assert rec.publish_stage(ctx, "production", registry=registry, store=store).action == "published"
    config = published_config(store, "production")
    trt = config.optimization.execution_accelerators.gpu_execution_accelerator[0]
    assert (trt.name, trt.parameters["precision_mode"]) == ("tensorrt", "FP16")
    assert config.parameters["cxr_variant"].string_value == "fp16-trt"
    assert registry.variants == ["fp32", "fp16-trt"]  # each variant's own artifact


def test_sync_hook_is_idempotent_and_a_rollback_replaces_the_newer_version(cluster: Any) -> None:
    ctx, store, registry = cluster
    set_version(ctx, "canary", "5")
    rec.publish_stage(ctx, "canary", registry=registry, store=store)
    writes = len(store.log)
    again = rec.publish_stage(ctx, "canary", registry=registry, store=store)
    assert again.action == "unchanged" and len(store.log) == writes  # no timestamp moves, no reload

    set_version(ctx, "canary", "3")  # rollback: older number, must not sit beside 5
    assert rec.publish_stage(ctx, "canary", registry=registry, store=store).action == "published"
    assert store.list_prefix("triton/canary/") == [
        f"triton/canary/{MODEL}/3/model.onnx",
        f"triton/canary/{MODEL}/config.pbtxt",
    ]
    ops = store.log[writes:]
    assert ops.index(("put", f"triton/canary/{MODEL}/3/model.onnx")) < ops.index(
        ("delete", f"triton/canary/{MODEL}/5/model.onnx")
    )
    assert published_config(store, "canary").parameters["cxr_model_version"].string_value == "3"


def test_a_stage_that_names_no_version_is_emptied_so_its_tritons_unload(cluster: Any) -> None:
    ctx, store, registry = cluster
    set_version(ctx, "staging", "5")
    rec.publish_stage(ctx, "staging", registry=registry, store=store)
    set_version(ctx, "staging", "")
    assert rec.publish_stage(ctx, "staging", registry=registry, store=store).action == "unpublished"
    assert store.list_prefix("triton/staging/") == []
    assert rec.publish_stage(ctx, "staging", registry=registry, store=store).action == "unchanged"


def test_published_repository_carries_the_versions_operating_points(cluster: Any) -> None:
    from core.operating_points import CONFIG_PARAMETER, OperatingPoints

    ctx, store, registry = cluster
    ops = OperatingPoints(onnx_sha256=file_sha256(registry.models["5"]), fallback_threshold=0.3)
    registry.operating_points["5"] = ops.to_json()
    set_version(ctx, "production", "5")
    rec.publish_stage(ctx, "production", registry=registry, store=store)
    assert published_config(store, "production").parameters[CONFIG_PARAMETER].string_value == ops.to_json()
    set_version(ctx, "canary", "3")  # a version trained before operating points: published without
    rec.publish_stage(ctx, "canary", registry=registry, store=store)
    assert CONFIG_PARAMETER not in published_config(store, "canary").parameters
    rec.publish_stage(ctx, "canary", registry=registry, store=store)
    assert registry.asked == ["5", "3"]  # the answer, absent included, is cached per version


def test_promote_publish_writes_the_cluster_variant_too(cluster: Any) -> None:
    _, store, registry = cluster
    prefix = rec.publish_repository(registry.models["3"], "staging", "3", MODEL, store)
    assert published_config(store, "staging").instance_group[0].kind == mc.ModelInstanceGroup.KIND_GPU
    assert prefix == "triton/staging"


def test_reconcile_publish_command_only_publishes(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from delivery.cli import app

    calls: list[tuple[str, str]] = []

    def publish(ctx: object, stage: str, **_: object) -> rec.ReconcileResult:
        calls.append(("publish", stage))
        return rec.ReconcileResult(stage, "5", "published", 0.0)  # type: ignore[arg-type]

    def load(*args: object, **kwargs: object) -> rec.ReconcileResult:
        raise AssertionError("reconcile --publish must not load through a Triton")

    monkeypatch.setattr(rec, "publish_stage", publish)
    monkeypatch.setattr(rec, "reconcile_stage", load)
    monkeypatch.setenv("CXR_STACK_DIR", str(tmp_path / "stack"))
    out = CliRunner().invoke(
        app, ["reconcile", "--publish", "--stage", "production", "--gitops-dir", str(tmp_path)]
    )
    assert out.exit_code == 0, out.output
    assert calls == [("publish", "production")]
    assert "production: v5 published" in out.output


# ---------------------------------------------------------------- the manifests


def pod_spec(obj: dict[str, Any]) -> dict[str, Any]:
    if obj["kind"] == "CronJob":
        return obj["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    return obj["spec"]["template"]["spec"]


def find(objs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    return next(o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name)


def test_every_triton_polls_its_repository_and_is_ready_without_a_model(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    for stage in STAGES:
        pod = pod_spec(find(rendered[f"k8s/overlays/{stage}"], "Deployment", f"triton-{stage}"))
        args = pod["containers"][0]["args"]
        assert "--model-control-mode=poll" in args and "--repository-poll-secs=30" in args
        assert (
            "--strict-readiness=false" in args
        )  # Ready when the server is; the gateway's /readyz reports the model
        assert not any(a.startswith(("--load-model", "--model-control-mode=explicit")) for a in args)
        assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
        assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1


def test_reconcile_is_a_sync_hook_that_runs_after_the_stage_file_and_publishes(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    for stage in STAGES:
        objs = rendered[f"k8s/overlays/{stage}"]
        job = find(objs, "Job", f"cxr-reconcile-{stage}")
        notes = job["metadata"]["annotations"]
        assert notes["argocd.argoproj.io/hook"] == "Sync"  # PostSync would wait for a Healthy gateway
        assert notes["argocd.argoproj.io/hook-delete-policy"] == "BeforeHookCreation"
        stage_file = find(objs, "ConfigMap", f"cxr-model-{stage}")
        wave = int(stage_file["metadata"]["annotations"]["argocd.argoproj.io/sync-wave"])
        assert wave < int(notes.get("argocd.argoproj.io/sync-wave", "0"))
        command = pod_spec(job)["containers"][0]["command"]
        assert command[-4:] == ["reconcile", "--publish", "--stage", "$(CXR_STAGE)"]


def test_deployments_scaled_by_an_hpa_leave_replicas_to_it(
    all_objects: list[tuple[str, dict[str, Any]]],
) -> None:
    hpas = [o for _, o in all_objects if o["kind"] == "HorizontalPodAutoscaler"]
    assert hpas
    for hpa in hpas:
        target = hpa["spec"]["scaleTargetRef"]
        deployment = next(
            o
            for _, o in all_objects
            if o["kind"] == target["kind"]
            and o["metadata"]["name"] == target["name"]
            and o["metadata"].get("namespace") == hpa["metadata"].get("namespace")
        )
        assert "replicas" not in deployment["spec"], f"{target['name']}: the HPA owns replicas"


def test_one_canary_mechanism_the_gateway_weighting_no_analysis_template(
    all_objects: list[tuple[str, dict[str, Any]]],
) -> None:
    assert not [o["metadata"]["name"] for _, o in all_objects if o["kind"] in ("AnalysisTemplate", "Rollout")]
    assert not list((REPO / "k8s").rglob("analysis-template*.yaml"))
    names = {(o["kind"], o["metadata"]["name"]) for _, o in all_objects}
    assert ("CronJob", "cxr-canary-step-production") in names


def test_only_triton_tolerates_the_gpu_taint_and_cpu_pods_ask_modestly(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    production = rendered["k8s/overlays/production"]
    for kind, name in (
        ("Deployment", "cxr-gateway-production"),
        ("CronJob", "cxr-canary-step-production"),
        ("Job", "cxr-reconcile-production"),
    ):
        pod = pod_spec(find(production, kind, name))
        assert not any(t.get("key") == "nvidia.com/gpu" for t in pod.get("tolerations", [])), name
        assert "nvidia.com/gpu.present" not in pod.get("nodeSelector", {}), name
    gateway = pod_spec(find(production, "Deployment", "cxr-gateway-production"))["containers"][0]
    cpu = str(gateway["resources"]["requests"]["cpu"])
    assert (float(cpu[:-1]) / 1000 if cpu.endswith("m") else float(cpu)) <= 2


def test_two_processes_fetching_one_version_at_once_leave_a_whole_onnx_in_the_cache(tmp_path: Path) -> None:
    """The reconcile watcher and a promote fetch a new version together; MLflow writes downloads in place.

    With one shared download folder, one fetcher renamed the file the other was still writing:
    a truncated ONNX in the cache. Here the two downloads interleave chunk by chunk.
    """
    import hashlib
    import threading

    payload = bytes(range(256)) * 4096  # 1 MiB
    both_writing = threading.Barrier(2, timeout=10)

    class SlowRegistry:
        model_name = MODEL
        tracking_uri = "http://mlflow.invalid"

        def facts(self, version: str) -> VersionFacts:
            return VersionFacts(version, {"onnx_sha256": hashlib.sha256(payload).hexdigest()})

        def download_onnx(self, version: str, dest: Path, variant: str = "fp32") -> Path:
            dest.mkdir(parents=True, exist_ok=True)
            out = dest / "onnx" / "model.onnx"
            out.parent.mkdir(exist_ok=True)
            with out.open("wb") as fh:
                fh.write(payload[:1000])
                both_writing.wait()  # both fetchers are mid-download now
                fh.write(payload[1000:])
            both_writing.wait()  # and both finished before either renames
            return out

        def download_operating_points(self, version: str, dest: Path, variant: str = "fp32") -> None:
            return None

    errors: list[BaseException] = []
    targets: list[Path] = []

    def fetch() -> None:
        try:
            targets.append(rec.fetch_onnx(SlowRegistry(), "7", tmp_path / "cache"))  # type: ignore[arg-type]
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=fetch) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == []
    assert len(set(targets)) == 1 and targets[0].read_bytes() == payload
    assert [p.name for p in targets[0].parent.iterdir() if p.name.startswith("download")] == []
