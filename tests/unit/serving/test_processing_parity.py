"""The gateway's pre/post-processing is ultralytics' own: same input tensor, same boxes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from serving.contract import contract_from_metadata, read_onnx_metadata
from serving.inference.postprocess import to_detections
from serving.inference.preprocess import prepare
from tests.unit.serving.serving_support import chest_like

pytestmark = pytest.mark.unit


def _gray(width: int, height: int, seed: int) -> np.ndarray:
    return (chest_like(width, height, seed) // 16).astype(np.uint8)


@pytest.mark.parametrize(("width", "height"), [(300, 200), (97, 211), (128, 128)])
def test_letterboxed_tensor_equals_ultralytics_letterbox(onnx_model: Path, width: int, height: int) -> None:
    from ultralytics.data.augment import LetterBox

    contract = contract_from_metadata(read_onnx_metadata(onnx_model))
    img = _gray(width, height, seed=width)
    ours = prepare(img, contract).tensor
    theirs = LetterBox(new_shape=contract.imgsz, auto=False)(image=np.stack([img] * 3, axis=-1))
    expected = theirs.transpose(2, 0, 1).astype(np.float32) / 255.0
    assert ours.shape == expected.shape
    np.testing.assert_array_equal(ours, expected)


def _on_image(boxes_xyxy: np.ndarray) -> np.ndarray:
    """Ultralytics' boxes that cover some of the image: it also returns a box lying in the letterbox's
    padding, clipped to a zero-area line on the border, which the gateway drops (no finding of the image)."""
    return np.asarray((boxes_xyxy[:, 2] > boxes_xyxy[:, 0]) & (boxes_xyxy[:, 3] > boxes_xyxy[:, 1]))


@pytest.mark.parametrize(("width", "height", "seed"), [(300, 200, 1), (150, 260, 2)])
def test_detections_match_ultralytics_predict_within_one_pixel(
    onnx_model: Path, width: int, height: int, seed: int
) -> None:
    from ultralytics import YOLO

    contract = contract_from_metadata(read_onnx_metadata(onnx_model))
    img = _gray(width, height, seed)
    conf, iou = 0.5, 0.7

    session = ort.InferenceSession(str(onnx_model), providers=["CPUExecutionProvider"])
    prepared = prepare(img, contract)
    output = session.run(["output0"], {"images": prepared.tensor[None].copy()})[0]
    ours = to_detections(
        output[0], prepared.params, contract.class_names, conf_threshold=conf, iou_threshold=iou, max_det=300
    )

    result = YOLO(str(onnx_model), task="detect").predict(
        np.stack([img] * 3, axis=-1), imgsz=contract.size, conf=conf, iou=iou, rect=False, verbose=False
    )[0]
    on_image = _on_image(result.boxes.xyxy.cpu().numpy())
    theirs_boxes = result.boxes.xyxy.cpu().numpy()[on_image]
    theirs_cls = result.boxes.cls.cpu().numpy().astype(int)[on_image]
    theirs_conf = result.boxes.conf.cpu().numpy()[on_image]

    assert len(ours) > 0, "the test model must produce detections for the comparison to mean anything"
    assert len(ours) == len(theirs_boxes)
    order = np.argsort(-theirs_conf, kind="stable")
    for det, j in zip(sorted(ours, key=lambda d: -d.confidence), order, strict=True):
        assert det.class_id == theirs_cls[j]
        assert det.confidence == pytest.approx(float(theirs_conf[j]), abs=1e-4)
        np.testing.assert_allclose(det.box, theirs_boxes[j], atol=1.0)
        assert 0 <= det.box[0] <= det.box[2] <= width and 0 <= det.box[1] <= det.box[3] <= height


def test_large_image_is_shrunk_like_the_dataset_and_boxes_come_back_in_original_pixels(
    onnx_model: Path,
) -> None:
    from ultralytics import YOLO

    from data_pipeline.geometry import resize_longest

    contract = contract_from_metadata(read_onnx_metadata(onnx_model))
    big = _gray(2400, 1800, seed=5)
    small = resize_longest(big, 1024)
    scale_x, scale_y = 2400 / small.shape[1], 1800 / small.shape[0]

    session = ort.InferenceSession(str(onnx_model), providers=["CPUExecutionProvider"])
    prepared = prepare(big, contract, max_side=1024)
    assert prepared.source_size == (2400, 1800)
    output = session.run(["output0"], {"images": prepared.tensor[None].copy()})[0]
    ours = to_detections(
        output[0],
        prepared.params,
        contract.class_names,
        conf_threshold=0.5,
        iou_threshold=0.7,
        max_det=300,
        source_size=prepared.source_size,
    )
    result = YOLO(str(onnx_model), task="detect").predict(
        np.stack([small] * 3, axis=-1), imgsz=contract.size, conf=0.5, iou=0.7, rect=False, verbose=False
    )[0]
    on_image = _on_image(result.boxes.xyxy.cpu().numpy())
    theirs = result.boxes.xyxy.cpu().numpy()[on_image] * np.array([scale_x, scale_y, scale_x, scale_y])
    order = np.argsort(-result.boxes.conf.cpu().numpy()[on_image], kind="stable")
    assert len(ours) == len(theirs) > 0
    for det, j in zip(sorted(ours, key=lambda d: -d.confidence), order, strict=True):
        np.testing.assert_allclose(det.box, theirs[j], atol=1.0 * max(scale_x, scale_y))
        assert det.box[2] <= 2400 and det.box[3] <= 1800


def test_an_upload_is_prepared_again_for_a_model_that_pads_with_another_value() -> None:
    """A shadow or canary version whose contract pads with another value must see its own padding."""
    import asyncio
    import dataclasses
    from types import SimpleNamespace

    from serving.contract import ModelContract
    from serving.inference.cpu_pool import CpuPool
    from serving.inference.pipeline import DecodedUpload, Pipeline

    img = _gray(300, 200, seed=5)
    grey, black = ModelContract(imgsz=(256, 256)), ModelContract(imgsz=(256, 256), pad_value=0)
    prepared = prepare(img, grey)
    image = SimpleNamespace(to_uint8=lambda: img)
    upload = DecodedUpload(b"", image, prepared, "k", {})  # type: ignore[arg-type]
    pipeline = Pipeline(SimpleNamespace(max_side=0), backend=None, metrics=None, cpu=CpuPool(1))  # type: ignore[arg-type]
    [same] = asyncio.run(pipeline.reprepare([upload], SimpleNamespace(contract=dataclasses.replace(grey))))  # type: ignore[arg-type]
    assert same is upload
    [again] = asyncio.run(pipeline.reprepare([upload], SimpleNamespace(contract=black)))  # type: ignore[arg-type]
    assert again.prepared.tensor[0, 0, 0] == 0.0 and prepared.tensor[0, 0, 0] == np.float32(114 / 255)
