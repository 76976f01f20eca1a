"""Inference: the detect pipeline (decode, letterbox, backend, NMS, boxes back to the source) and routing.

Also the backends (Triton, in-process ONNX Runtime) and the Triton model-repository builder.
"""
