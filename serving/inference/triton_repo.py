"""Triton model repositories and the repository API.

Two variants of one model, identical to the gateway (name, tensors, batching with
``timeout_action: REJECT`` so overload is refused instead of queued forever, queue
policy, contract parameters):

- ``onnxruntime`` (:data:`CLUSTER`): ``platform: "onnxruntime_onnx"`` on the GPU
  (``KIND_GPU``), with the TensorRT execution accelerator in FP16 when the stage serves the
  ``fp16-trt`` precision variant (``core/variants.py``; fp32 and int8 run on CUDA as they are);
  what ``delivery.reconcile.publish_repository`` puts in each stage's ``s3://`` repository;
- ``python`` (:data:`ONE_MACHINE`): ``backend: "python"`` on the CPU with
  :mod:`serving.inference.triton_python.model` running the very same ONNX file in
  onnxruntime (the only backend the tritonserver in the nvidia-pytriton wheel carries).

The one-machine stack loads and unloads with explicit model control (:class:`TritonAdmin`);
the cluster's Tritons poll their repository and load whatever the reconcile hook publishes.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from core.errors import CxrError
from core.operating_points import CONFIG_PARAMETER
from core.variants import DEFAULT_VARIANT, VARIANT_METADATA_KEY, cpu_precision
from core.variants import Variant as Precision
from serving.contract import ModelContract, contract_from_metadata, metadata_of
from serving.inference.operating_points import beside as operating_points_beside

if TYPE_CHECKING:
    import onnx

log = logging.getLogger(__name__)

Variant = Literal["python", "onnxruntime"]
ONE_MACHINE: Variant = "python"
CLUSTER: Variant = "onnxruntime"
_PYTHON_MODEL = Path(__file__).parent / "triton_python" / "model.py"


@dataclass(frozen=True)
class RepositoryOptions:
    """Batching and queueing knobs shared by both variants, and where the model runs."""

    max_batch_size: int = 8
    max_queue_delay_us: int = 2000
    max_queue_size: int = 64
    queue_timeout_us: int = 10_000_000
    instance_count: int = 1
    gpu: bool = False
    tensorrt_fp16: bool = False
    ort_threads: int = 0
    tensorrt_workspace_bytes: int = 1 << 30  # TensorRT's scratch memory while building/running engines
    tensorrt_cache_dir: str = "/tmp"  # a writable emptyDir in the cluster's Triton pod

    @classmethod
    def for_variant(
        cls, variant: Variant, max_batch_size: int = 8, precision: Precision = DEFAULT_VARIANT
    ) -> RepositoryOptions:
        """A variant's defaults: the one-machine one on the CPU, the cluster one on the GPU.

        TensorRT FP16 only for the ``fp16-trt`` precision: it changes the numbers the model
        computes, so it is served only where a stage file names it and its gate passed.
        """
        if variant == CLUSTER:
            return cls(max_batch_size=max_batch_size, gpu=True, tensorrt_fp16=precision == "fp16-trt")
        return cls(max_batch_size=max_batch_size)


class ModelGraphMismatch(CxrError):
    """The ONNX graph is not what the config written for it would tell Triton it is."""


def _dims(value_info: object) -> list[int | str]:
    """A graph input's or output's dims: a fixed size as an int, a named or unknown one as a str."""
    shape = value_info.type.tensor_type.shape  # type: ignore[attr-defined]
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in shape.dim]


def check_graph(
    model: onnx.ModelProto, onnx_path: Path, contract: ModelContract, max_batch_size: int
) -> None:
    """Refuse a graph whose tensors are not the ones :func:`render_config` declares for it.

    The config is written from the contract (tensor names, FP32, a batch axis up to
    ``max_batch_size``), not from the graph: a graph with other tensor names, another type or a
    fixed batch still loaded in the Python backend and then failed inferences; a fixed batch of 1
    only once the dynamic batcher merged two requests, i.e. under load. (Rows per anchor are the
    exporter's check, ``training/export.py``.)
    """
    import onnx

    graph = model.graph
    initializers = {init.name for init in graph.initializer}
    tensors = {
        "input": {i.name: i for i in graph.input if i.name not in initializers},
        "output": {o.name: o for o in graph.output},
    }
    problems = []
    for kind, name in (("input", contract.input_name), ("output", contract.output_name)):
        tensor = tensors[kind].get(name)
        if tensor is None:
            problems.append(f"no {kind} '{name}' (the graph's: {sorted(tensors[kind])})")
            continue
        elem = tensor.type.tensor_type.elem_type
        if elem != onnx.TensorProto.FLOAT:
            problems.append(f"{kind} '{name}' is {onnx.TensorProto.DataType.Name(elem)}, not FLOAT")
        dims = _dims(tensor)
        if max_batch_size > 0 and dims and isinstance(dims[0], int) and dims[0] > 0:
            problems.append(
                f"{kind} '{name}' has a fixed batch of {dims[0]} (dims {dims}): export it dynamic"
            )
    if problems:
        raise ModelGraphMismatch(
            f"{onnx_path} does not match its model contract: {'; '.join(problems)}; "
            "serve the model.onnx `cxr train` exported (training/export.py checks these)"
        )


def _pbtxt_string(value: str) -> str:
    return json.dumps(value, ensure_ascii=True)


def render_config(
    contract: ModelContract,
    *,
    variant: Variant,
    model_name: str,
    model_version: str,
    options: RepositoryOptions,
    extra_parameters: dict[str, str] | None = None,
) -> str:
    """config.pbtxt text (protobuf text format) for one variant."""
    outputs = 4 + len(contract.class_names)
    head = 'backend: "python"' if variant == "python" else 'platform: "onnxruntime_onnx"'
    kind = "KIND_GPU" if options.gpu else "KIND_CPU"
    params = {
        "cxr_contract": contract.to_json(),
        "cxr_model_version": model_version,
        **(extra_parameters or {}),
    }
    if options.ort_threads:
        params["ort_threads"] = str(options.ort_threads)
    lines = [
        f"name: {_pbtxt_string(model_name)}",
        head,
        f"max_batch_size: {options.max_batch_size}",
        "input [",
        f"  {{ name: {_pbtxt_string(contract.input_name)} data_type: TYPE_FP32 dims: [ 3, -1, -1 ] }}",
        "]",
        "output [",
        f"  {{ name: {_pbtxt_string(contract.output_name)} data_type: TYPE_FP32 dims: [ {outputs}, -1 ] }}",
        "]",
        "dynamic_batching {",
        f"  preferred_batch_size: [ {options.max_batch_size} ]",
        f"  max_queue_delay_microseconds: {options.max_queue_delay_us}",
        "  default_queue_policy {",
        "    timeout_action: REJECT",
        f"    default_timeout_microseconds: {options.queue_timeout_us}",
        "    allow_timeout_override: true",
        f"    max_queue_size: {options.max_queue_size}",
        "  }",
        "}",
        f"instance_group [ {{ kind: {kind} count: {options.instance_count} }} ]",
        "version_policy: { latest: { num_versions: 1 } }",
    ]
    if variant == "onnxruntime" and options.gpu and options.tensorrt_fp16:
        # ONNX Runtime backend: TensorRT takes the subgraphs it can build an FP16 engine for;
        # with KIND_GPU the CUDA execution provider is always registered behind it, so any node
        # TensorRT rejects runs on CUDA (no CPU fallback needed, no extra config). Engines are
        # cached in tensorrt_cache_dir so a container restart does not rebuild them.
        lines += [
            "optimization { execution_accelerators {",
            '  gpu_execution_accelerator : [ { name : "tensorrt"',
        ]
        accelerator = {
            "precision_mode": "FP16",
            "max_workspace_size_bytes": str(options.tensorrt_workspace_bytes),
            "trt_engine_cache_enable": "1",
            "trt_engine_cache_path": options.tensorrt_cache_dir,
        }
        lines += [
            f"    parameters {{ key: {_pbtxt_string(k)} value: {_pbtxt_string(v)} }}"
            for k, v in accelerator.items()
        ]
        lines += ["  } ]", "} }"]
        # TensorRT builds an engine per input-shape range on first use (minutes, not milliseconds):
        # warm up with the smallest and the largest batch at the contract's size while the version
        # loads, so the range is [1, max] before the first request and the old version keeps
        # serving meanwhile.
        height, width = contract.imgsz
        warmups = sorted({1, options.max_batch_size})
        sample = f"data_type: TYPE_FP32 dims: [ 3, {height}, {width} ] zero_data: true"
        entries = [
            f'  {{ name: "tensorrt-batch-{b}" batch_size: {b} count: 1 '
            f"inputs {{ key: {_pbtxt_string(contract.input_name)} value: {{ {sample} }} }} }}"
            for b in warmups
        ]
        lines += ["model_warmup [", ",\n".join(entries), "]"]
    for key, value in params.items():
        lines.append(
            f"parameters {{ key: {_pbtxt_string(key)} value: {{ string_value: {_pbtxt_string(value)} }} }}"
        )
    return "\n".join(lines) + "\n"


def build_repository(
    onnx_path: Path,
    repo_dir: Path,
    *,
    variant: Variant = "python",
    model_name: str = "cxr-detector",
    version: int = 1,
    max_batch_size: int = 8,
    model_version: str | None = None,
    options: RepositoryOptions | None = None,
    dataset_version: str | None = None,
    precision: Precision = DEFAULT_VARIANT,
) -> Path:
    """Write ``<repo_dir>/<model_name>/{config.pbtxt,<version>/model.onnx[,model.py]}``; return the model dir.

    ``version`` is Triton's numeric directory; ``model_version`` is the registry
    version reported to clients (defaults to ``version``). ``dataset_version`` (the
    model's training data) lets the gateway's drift monitor find its reference statistics.
    ``operating_points.json`` beside the ONNX (measured on that file) goes into the config's
    ``cxr_operating_points`` parameter, where the gateway finds the per-class thresholds.
    Without ``options`` the variant's defaults apply (:meth:`RepositoryOptions.for_variant`).
    ``precision``: the serving variant ``onnx_path`` is (fp32, int8, fp16-trt), named in the
    config's ``cxr_variant`` parameter, which the gateway reports with each answer.
    A graph whose tensors differ from the contract's is refused (:func:`check_graph`).
    """
    if not onnx_path.is_file():
        raise FileNotFoundError(f"ONNX model {onnx_path} does not exist")
    opts = options or RepositoryOptions.for_variant(variant, max_batch_size, precision)  # explicit win
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)  # read once: contract and graph
    contract = contract_from_metadata(metadata_of(model))
    check_graph(model, onnx_path, contract, opts.max_batch_size)  # before anything of the old model goes
    model_dir = repo_dir / model_name
    if model_dir.exists():
        shutil.rmtree(model_dir)
    version_dir = model_dir / str(version)
    version_dir.mkdir(parents=True)
    shutil.copyfile(onnx_path, version_dir / "model.onnx")
    if variant == "python":
        shutil.copyfile(_PYTHON_MODEL, version_dir / "model.py")
    answered = cpu_precision(precision) if not opts.gpu else precision
    if answered != precision:
        log.warning(
            "triton_repo_precision requested=%s served=%s: no TensorRT on the CPU", precision, answered
        )
    extra: dict[str, str] = {VARIANT_METADATA_KEY: answered}
    if dataset_version:
        extra["cxr_dataset_version"] = dataset_version
    ops = operating_points_beside(onnx_path)
    if ops is not None:  # the gateway reads them with the contract, per loaded version
        extra[CONFIG_PARAMETER] = ops.to_json()
    (model_dir / "config.pbtxt").write_text(
        render_config(
            contract,
            variant=variant,
            model_name=model_name,
            model_version=model_version or str(version),
            options=opts,
            extra_parameters=extra,
        )
    )
    log.info(
        "triton_repo_built model=%s variant=%s precision=%s dir=%s operating_points=%s",
        model_name,
        variant,
        precision,
        model_dir,
        "yes" if ops is not None else "none",
    )
    return model_dir


class TritonAdmin:
    """Repository API of one Triton (HTTP host:port): load, unload, readiness (one-machine stack)."""

    def __init__(self, url: str, *, timeout_s: float = 60.0) -> None:
        from tritonclient.http import InferenceServerClient

        self.url = url
        self._client = InferenceServerClient(url, connection_timeout=timeout_s, network_timeout=timeout_s)

    def load(self, model_name: str = "cxr-detector") -> None:
        self._client.load_model(model_name)
        log.info("triton_load url=%s model=%s", self.url, model_name)

    def unload(self, model_name: str = "cxr-detector") -> None:
        self._client.unload_model(model_name)
        log.info("triton_unload url=%s model=%s", self.url, model_name)

    def require_live(self) -> None:
        """Raise unless the server answers that it is live (a connection error raises as it is)."""
        if not self._client.is_server_live():
            raise RuntimeError(f"Triton at {self.url} answers but is not live")

    def is_ready(self, model_name: str = "cxr-detector", version: str = "") -> bool:
        """Whether the model (with ``version``: that numeric version directory) serves requests."""
        try:
            return bool(self._client.is_model_ready(model_name, version))
        except Exception:
            return False

    def wait_ready(
        self, model_name: str = "cxr-detector", timeout_s: float = 60.0, version: str = ""
    ) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.is_ready(model_name, version):
                return True
            time.sleep(0.1)
        return False

    def close(self) -> None:
        self._client.close()
