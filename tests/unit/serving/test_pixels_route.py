"""``/v1/results/{id}/pixels``: the values and the source's own VOI, windowed by the review page.

Windowing what the route sends with the window it names must give what decode_bytes shows (the
preview and the model's input), for every kind of VOI the decoder knows.
"""

from __future__ import annotations

import numpy as np
import pytest
from fastapi.testclient import TestClient
from pydicom.dataset import Dataset

from data_pipeline.dicom_io import decode_bytes, window
from serving.gateway.routes.results import render_pixels
from tests.unit.data_pipeline.test_dicom_decoding import _bytes, _dicom, _raw
from tests.unit.serving.serving_support import make_png

pytestmark = pytest.mark.unit


def _windowed(body: bytes, headers: dict[str, str]) -> np.ndarray:
    """What review.js draws, in 0..1: value = code * slope + intercept, the window, MONOCHROME1 inverted."""
    rows, cols = int(headers["X-CXR-Rows"]), int(headers["X-CXR-Columns"])
    codes = np.frombuffer(body, "<u2").reshape(rows, cols)
    values = codes * float(headers["X-CXR-Value-Slope"]) + float(headers["X-CXR-Value-Intercept"])
    center, width = float(headers["X-CXR-Window-Center"]), float(headers["X-CXR-Window-Width"])
    out = window(values.astype(np.float32), center, width, headers["X-CXR-Window-Function"])
    return 1.0 - out if headers["X-CXR-Invert"] == "1" else out


def _lut(ds: Dataset) -> Dataset:
    item = Dataset()
    item.LUTDescriptor = [4096, 0, 16]
    item.LUTData = (np.sqrt(np.arange(4096) / 4095) * 65535).astype(np.uint16).tobytes()
    ds.VOILUTSequence = [item]
    return ds


def _rescaled(ds: Dataset) -> Dataset:
    ds.RescaleSlope, ds.RescaleIntercept = 2, -500
    ds.WindowCenter, ds.WindowWidth = 1500, 6000
    return ds


def _sigmoid(ds: Dataset) -> Dataset:
    ds.VOILUTFunction = "SIGMOID"
    return ds


CASES = {
    "window": lambda: _bytes(_dicom(_raw())),
    "monochrome1": lambda: _bytes(_dicom(_raw(), photometric="MONOCHROME1")),
    "rescale": lambda: _bytes(_rescaled(_dicom(_raw()))),
    "sigmoid": lambda: _bytes(_sigmoid(_dicom(_raw(), width=1000))),
    "no-window": lambda: _bytes(_dicom(_raw(), center=None, width=None)),
    "voi-lut": lambda: _bytes(_lut(_dicom(_raw()))),
    "png": lambda: make_png(96, 80, seed=3),
}


@pytest.mark.parametrize("case", list(CASES))
def test_windowing_the_sent_values_with_the_sent_window_shows_what_the_decoder_shows(case: str) -> None:
    source = CASES[case]()
    body, headers = render_pixels(source)
    np.testing.assert_allclose(_windowed(body, headers), decode_bytes(source, salt="s").pixels, atol=2e-4)


def test_the_window_sent_is_the_dicoms_own_and_the_values_are_modality_values() -> None:
    raw = _raw()
    body, headers = render_pixels(_bytes(_rescaled(_dicom(raw))))
    assert (headers["X-CXR-Window-Center"], headers["X-CXR-Window-Width"]) == ("1500.0", "6000.0")
    assert headers["X-CXR-Window-Function"] == "LINEAR" and headers["X-CXR-Invert"] == "0"
    codes = np.frombuffer(body, "<u2").reshape(raw.shape)
    values = codes * float(headers["X-CXR-Value-Slope"]) + float(headers["X-CXR-Value-Intercept"])
    np.testing.assert_allclose(values, raw * 2.0 - 500, atol=0.1)  # 16 bits over the range


def test_large_images_are_sent_at_most_1024_px_a_side() -> None:
    body, headers = render_pixels(_bytes(_dicom(_raw(shape=(2050, 1400)))))
    assert (int(headers["X-CXR-Rows"]), int(headers["X-CXR-Columns"])) == (1024, 699)
    assert len(body) == 1024 * 699 * 2


def _voi_function(raw: bytes) -> bytes:
    """A windowed DICOM whose VOILUTFunction holds ``raw``: bytes the client chose, not a defined term."""
    ds = _dicom(_raw(), width=1000)
    ds.add_new(0x00281056, "CS", raw.decode("latin-1"))
    return _bytes(ds)


@pytest.mark.parametrize("raw", [b"LIN\xb5", b"\xff", b"GAMMA"])
def test_a_voi_function_that_is_no_defined_term_is_named_linear_as_the_decoder_applies_it(raw: bytes) -> None:
    source = _voi_function(raw)
    body, headers = render_pixels(source)
    assert headers["X-CXR-Window-Function"] == "LINEAR"
    for value in headers.values():
        value.encode("latin-1")  # what an HTTP header can carry; raised for the upper-cased micro sign
    np.testing.assert_allclose(_windowed(body, headers), decode_bytes(source, salt="s").pixels, atol=2e-4)


def test_pixels_of_a_dicom_with_a_non_latin1_voi_function_are_served_not_a_500(
    onnx_client: TestClient, keys: dict[str, str]
) -> None:
    """'µ' (0xB5) upper-cases to a Greek capital that no HTTP header can carry: the route answered 500."""
    detected = onnx_client.post(
        "/v1/detect",
        content=_voi_function(b"LIN\xb5"),
        headers={"X-API-Key": keys["pacs"], "Content-Type": "application/dicom"},
    )
    assert detected.status_code == 200, detected.text
    r = onnx_client.get(
        f"/v1/results/{detected.json()['request_id']}/pixels", headers={"X-API-Key": keys["radiologist"]}
    )
    assert r.status_code == 200, r.text
    assert r.headers["X-CXR-Window-Function"] == "LINEAR"
