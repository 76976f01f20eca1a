"""Triton Python-backend model: runs the same ONNX file in onnxruntime.

The ``tritonserver`` bundled with nvidia-pytriton ships only the Python backend,
so on one machine this file stands in for Triton's ONNX Runtime backend. It
keeps the same model name, tensors and dynamic batching, so the gateway cannot
tell it from the cluster's ``onnxruntime_onnx`` platform. Copied verbatim into
each model version directory by ``serving.inference.triton_repo.build_repository``.
"""

import json
import os

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        contract = json.loads(params.get("cxr_contract", "{}"))
        self.input_name = contract.get("input", "images")
        self.output_name = contract.get("output", "output0")
        path = os.path.join(args["model_repository"], args["model_version"], "model.onnx")
        options = ort.SessionOptions()
        threads = int(params.get("ort_threads", "0") or 0)
        if threads:
            options.intra_op_num_threads = threads
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(path, sess_options=options, providers=["CPUExecutionProvider"])

    def execute(self, requests):
        arrays = [pb_utils.get_input_tensor_by_name(r, self.input_name).as_numpy() for r in requests]
        sizes = [a.shape[0] for a in arrays]
        same_shape = len({a.shape[1:] for a in arrays}) == 1
        if same_shape:
            outputs = self.session.run([self.output_name], {self.input_name: np.concatenate(arrays)})[0]
            parts = np.split(outputs, np.cumsum(sizes)[:-1])
        else:
            parts = [self.session.run([self.output_name], {self.input_name: a})[0] for a in arrays]
        responses = []
        for part in parts:
            tensor = pb_utils.Tensor(self.output_name, np.ascontiguousarray(part, dtype=np.float32))
            responses.append(pb_utils.InferenceResponse(output_tensors=[tensor]))
        return responses

    def finalize(self):
        self.session = None
