"""DICOM / PNG / JPEG decoding: pixels per transfer syntax, display pipeline, typed errors."""

from __future__ import annotations

import io
import os
from typing import Any

import numpy as np
import pydicom
import pydicom.data
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
    generate_uid,
)

from data_pipeline import dicom_guard
from data_pipeline.dicom_io import decode_bytes, decode_file, hash_patient_id, read_size, window
from data_pipeline.errors import CorruptImage, ImageDecodeError, UnsupportedImage

pytestmark = pytest.mark.unit

#: Only files shipped in the wheel; get_testdata_file() of a missing name would try to download it.
CORPUS = {os.path.basename(f): f for f in pydicom.data.get_testdata_files() if os.path.isfile(f)}


def _raw(bits: int = 12, shape: tuple[int, int] = (96, 80), seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    smooth = np.add.outer(np.linspace(0, 1, shape[0]), np.linspace(0, 1, shape[1])) / 2
    values = smooth * (2**bits - 1) * 0.9 + rng.normal(0, 20, shape)
    return np.clip(values, 0, 2**bits - 1).astype(np.uint16)


def _dicom(
    raw: np.ndarray,
    *,
    bits: int = 12,
    photometric: str = "MONOCHROME2",
    center: float | None = 2000,
    width: float | None = 3000,
    patient_id: str = "PAT-123",
) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientID = patient_id
    ds.Modality = "DX"
    ds.Rows, ds.Columns = raw.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 16
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 0
    ds.PixelSpacing = [0.15, 0.16]
    if center is not None and width is not None:
        ds.WindowCenter = center
        ds.WindowWidth = width
    ds.PixelData = raw.tobytes()
    return ds


def _bytes(ds: Dataset, **kwargs: object) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True, **kwargs)  # type: ignore[arg-type]
    return buffer.getvalue()


def _expected(raw: np.ndarray, center: float = 2000, width: float = 3000) -> np.ndarray:
    """The DICOM LINEAR window formula written out independently of the code under test."""
    x = raw.astype(np.float64)
    y = ((x - (center - 0.5)) / (width - 1) + 0.5).clip(0, 1)
    return y


@pytest.mark.parametrize(
    "syntax",
    [ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian],
    ids=lambda u: u.name,
)
def test_uncompressed_syntaxes_decode_to_the_windowed_original_pixels(syntax: pydicom.uid.UID) -> None:
    raw = _raw()
    ds = _dicom(raw)
    ds.file_meta.TransferSyntaxUID = syntax
    decoded = decode_bytes(_bytes(ds, implicit_vr=syntax == ImplicitVRLittleEndian), salt="s")
    np.testing.assert_allclose(decoded.pixels, _expected(raw), atol=1e-5)
    assert decoded.pixels.dtype == np.float32
    assert (decoded.rows, decoded.cols) == raw.shape
    assert decoded.source_format == "dicom"


@pytest.mark.parametrize("syntax", [RLELossless, JPEGLSLossless, JPEG2000Lossless], ids=lambda u: u.name)
def test_lossless_compressed_syntaxes_give_exactly_the_original_pixels(syntax: pydicom.uid.UID) -> None:
    raw = _raw()
    ds = _dicom(raw)
    ds.compress(syntax, encoding_plugin="pylibjpeg" if syntax == RLELossless else "")
    decoded = decode_bytes(_bytes(ds), salt="s")
    np.testing.assert_allclose(decoded.pixels, _expected(raw), atol=1e-5)


def test_jpeg_ls_near_lossless_stays_within_its_error_bound() -> None:
    raw = _raw()
    ds = _dicom(raw)
    ds.compress(JPEGLSNearLossless, jls_error=3)
    decoded = decode_bytes(_bytes(ds), salt="s")
    # a stored-value error of 3 moves the windowed value by at most 3 / (width - 1)
    assert np.abs(decoded.pixels - _expected(raw)).max() <= 3 / 2999 + 1e-5


def test_jpeg2000_lossy_stays_close_to_the_original() -> None:
    raw = _raw()
    ds = _dicom(raw)
    ds.compress(JPEG2000, j2k_psnr=[70])
    decoded = decode_bytes(_bytes(ds), salt="s")
    assert np.abs(decoded.pixels - _expected(raw)).mean() < 0.01


@pytest.mark.parametrize(
    ("compressed", "reference", "tolerance"),
    [
        ("SC_rgb_jpeg_gdcm.dcm", "SC_rgb_rle.dcm", 0.0),  # JPEG lossless, process 14
        ("SC_rgb_dcmtk_+eb+cr.dcm", "SC_rgb_rle.dcm", 1 / 255 + 1e-6),  # JPEG baseline
        ("MR_small_jpeg_ls_lossless.dcm", "MR_small.dcm", 0.0),
        ("MR_small_jp2klossless.dcm", "MR_small.dcm", 0.0),
        ("MR_small_RLE.dcm", "MR_small.dcm", 0.0),
        ("MR_small_bigendian.dcm", "MR_small.dcm", 0.0),  # explicit VR big endian
        ("MR_small_implicit.dcm", "MR_small.dcm", 0.0),
    ],
)
def test_real_world_encodings_match_their_uncompressed_twin(
    compressed: str, reference: str, tolerance: float
) -> None:
    got = decode_file(CORPUS[compressed], salt="s").pixels
    want = decode_file(CORPUS[reference], salt="s").pixels
    assert got.shape == want.shape
    assert np.abs(got - want).mean() <= tolerance + 1e-6


def test_jpeg_extended_12_bit_decodes_the_same_scan_as_its_jpeg2000_twin() -> None:
    # the two files carry different windows, so compare structure, not grey levels
    got = decode_file(CORPUS["JPGExtended.dcm"], salt="s").pixels.ravel()
    want = decode_file(CORPUS["JPEG2000.dcm"], salt="s").pixels.ravel()
    assert np.corrcoef(got, want)[0, 1] > 0.9  # 0.95 measured: clipping by different windows


def test_monochrome1_is_inverted_so_bone_is_bright() -> None:
    raw = _raw(bits=12)
    top = 2**12 - 1
    mono2 = decode_bytes(_bytes(_dicom(raw, center=2000, width=3000)), salt="s")
    inverted = (top - raw.astype(np.int32)).astype(np.uint16)
    mono1 = decode_bytes(
        _bytes(_dicom(inverted, photometric="MONOCHROME1", center=top - 2000 + 1, width=3000)), salt="s"
    )
    # same anatomy stored the other way round must display the same
    np.testing.assert_allclose(mono1.pixels, mono2.pixels, atol=1e-3)
    assert mono1.photometric == "MONOCHROME1"


def test_voi_window_maps_center_to_mid_grey_and_clips_outside() -> None:
    values = np.array([0.0, 949.5, 1000.0, 1050.5, 3000.0], dtype=np.float32)
    out = window(values.copy(), center=1000, width=101)
    np.testing.assert_allclose(out, [0.0, 0.0, 0.505, 1.0, 1.0], atol=1e-3)


def test_rescale_slope_and_intercept_apply_before_the_window() -> None:
    raw = _raw()
    ds = _dicom(raw, center=1000 * 2 - 500, width=3000 * 2)
    ds.RescaleSlope = 2
    ds.RescaleIntercept = -500
    decoded = decode_bytes(_bytes(ds), salt="s")
    expected = _expected(raw.astype(np.float64) * 2 - 500, center=1500, width=6000)
    np.testing.assert_allclose(decoded.pixels, expected, atol=1e-5)


def test_voi_lut_sequence_is_used_instead_of_a_window() -> None:
    raw = _raw()
    ds = _dicom(raw)  # the window must lose against the LUT (PS3.3 C.11.2: LUT is preferred here)
    item = Dataset()
    item.LUTDescriptor = [4096, 0, 16]
    lut = (np.sqrt(np.arange(4096) / 4095) * 65535).astype(np.uint16)  # a non-linear (gamma) VOI
    item.LUTData = lut.tobytes()  # OW: raw little-endian 16-bit words
    ds.VOILUTSequence = [item]
    decoded = decode_bytes(_bytes(ds), salt="s")
    np.testing.assert_allclose(decoded.pixels, lut[raw] / 65535.0, atol=1e-6)


def test_first_of_several_windows_is_the_default() -> None:
    raw = _raw()
    ds = _dicom(raw)
    ds.WindowCenter = [2000, 500]
    ds.WindowWidth = [3000, 200]
    decoded = decode_bytes(_bytes(ds), salt="s")
    np.testing.assert_allclose(decoded.pixels, _expected(raw), atol=1e-5)


def test_signed_pixels_with_rescale_decode_like_ct_values() -> None:
    values = np.linspace(-1000, 1000, 96 * 80).reshape(96, 80).astype(np.int16)
    ds = _dicom(values.view(np.uint16), bits=16, center=0, width=2001)
    ds.PixelRepresentation = 1
    decoded = decode_bytes(_bytes(ds), salt="s")
    expected = ((values.astype(np.float64) - (0 - 0.5)) / 2000 + 0.5).clip(0, 1)
    np.testing.assert_allclose(decoded.pixels, expected, atol=1e-5)


def test_sigmoid_voi_function_follows_the_standard() -> None:
    raw = _raw()
    ds = _dicom(raw, center=2000, width=1000)
    ds.VOILUTFunction = "SIGMOID"
    decoded = decode_bytes(_bytes(ds), salt="s")
    expected = 1 / (1 + np.exp(-4 * (raw.astype(np.float64) - 2000) / 1000))
    np.testing.assert_allclose(decoded.pixels, expected, atol=1e-5)


def test_without_a_window_the_full_range_is_shown() -> None:
    raw = _raw()
    decoded = decode_bytes(_bytes(_dicom(raw, center=None, width=None)), salt="s")
    assert decoded.pixels.min() == pytest.approx(0.0)
    assert decoded.pixels.max() == pytest.approx(1.0)


def test_metadata_is_returned_and_patient_id_only_as_salted_hash() -> None:
    ds = _dicom(_raw(), patient_id="PAT-123")
    decoded = decode_bytes(_bytes(ds), salt="site-a")
    assert decoded.study_uid == ds.StudyInstanceUID
    assert decoded.sop_uid == ds.SOPInstanceUID
    assert decoded.pixel_spacing == (0.15, 0.16)
    assert decoded.patient_hash == hash_patient_id("PAT-123", "site-a")
    assert decoded.patient_hash != hash_patient_id("PAT-123", "site-b")
    assert "PAT-123" not in (decoded.patient_hash or "")
    assert "PixelData" not in decoded.dataset  # type: ignore[operator]


def test_a_source_and_its_deidentified_feedback_image_share_one_patient_key() -> None:
    """The split groups by patient key: the gateway's pseudonym must lead to the source's group."""
    from serving.dicom.deid import deidentify_dicom

    source = _bytes(_dicom(_raw(), patient_id="PAT-123"))
    feedback, _ = deidentify_dicom(source, "site-a")  # the gateway of the same install
    identified, pseudonymised = decode_bytes(source, salt="site-a"), decode_bytes(feedback, salt="site-a")
    assert pseudonymised.dataset is not None and pseudonymised.dataset.PatientID != "PAT-123"
    assert pseudonymised.patient_hash == identified.patient_hash == hash_patient_id("PAT-123", "site-a")
    other, _ = deidentify_dicom(_bytes(_dicom(_raw(), patient_id="PAT-124")), "site-a")
    assert decode_bytes(other, salt="site-a").patient_hash != identified.patient_hash


def test_a_patient_id_is_taken_as_a_key_only_from_the_gateways_deidentification() -> None:
    key_like = hash_patient_id("PAT-123", "site-a") or ""
    elsewhere = _dicom(_raw(), patient_id=key_like)  # 16 hex, but no gateway label: an ID to hash
    elsewhere.PatientIdentityRemoved = "YES"
    elsewhere.DeidentificationMethod = "Another tool's profile"
    assert decode_bytes(_bytes(elsewhere), salt="site-a").patient_hash == hash_patient_id(key_like, "site-a")
    labelled = _dicom(_raw(), patient_id="MRN 0042")  # the label, but no key: hashed as it is
    labelled.DeidentificationMethod = "PS3.15 Annex E Basic Application Level Confidentiality Profile"
    assert decode_bytes(_bytes(labelled), salt="site-a").patient_hash == hash_patient_id("MRN 0042", "site-a")


def test_truncated_dicom_is_a_corrupt_image() -> None:
    data = _bytes(_dicom(_raw()))
    with pytest.raises(CorruptImage):
        decode_bytes(data[: len(data) // 2], salt="s")


def test_dicom_without_pixel_data_is_a_corrupt_image_with_advice() -> None:
    ds = _dicom(_raw())
    del ds.PixelData
    with pytest.raises(CorruptImage, match="no pixel data"):
        decode_bytes(_bytes(ds), salt="s")


@pytest.mark.parametrize(
    "data", [b"\x00" * 10, os.urandom(4096), b"hello, I am not an image" * 20, b"DICM" * 50]
)
def test_garbage_bytes_raise_a_typed_error(data: bytes) -> None:
    with pytest.raises(ImageDecodeError):
        decode_bytes(data, salt="s")


def test_headerless_garbage_is_refused_before_pydicom_parses_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """8 MiB of zeros is no DICOM stream: refused from its first bytes, not after a million elements."""
    parsed: list[int] = []
    real_read = dicom_guard.read_partial

    def counting_read(*args: Any, **kwargs: Any) -> Any:
        parsed.append(1)
        return real_read(*args, **kwargs)

    monkeypatch.setattr(dicom_guard, "read_partial", counting_read)
    for data in (b"\0" * (8 << 20), b"\xff" * 4096, b"GIF89a" + b"\0" * 200):
        with pytest.raises(UnsupportedImage, match="not a DICOM, PNG or JPEG"):
            decode_bytes(data)
    assert parsed == [], "pydicom was asked to parse bytes that cannot start a DICOM stream"


def test_zero_fill_after_dicm_or_after_the_file_meta_is_refused_from_the_header() -> None:
    """pydicom would read every 8 zero bytes as a (0000,0000) element (3.7 s per 8 MiB): refused up front."""
    with pytest.raises(CorruptImage, match="no File Meta Information"):
        decode_bytes(b"\0" * 128 + b"DICM" + b"\0" * (8 << 20))
    real = _bytes(_dicom(_raw(shape=(8, 8))))
    meta_end = 144 + int.from_bytes(real[140:144], "little")
    with pytest.raises(CorruptImage, match="command-group"):
        decode_bytes(real[:meta_end] + b"\0" * (8 << 20))
    assert decode_bytes(real, salt="s").rows == 8


def test_zero_fill_inside_the_dataset_stops_the_reader() -> None:
    """Zeros between real elements end the dataset there: the pixel data behind them is not trusted."""
    ds = _dicom(_raw(shape=(8, 8)))
    real = _bytes(ds)
    pixel_tag = b"\xe0\x7f\x10\x00"  # (7FE0,0010) Pixel Data, little endian
    at = real.index(pixel_tag)
    with pytest.raises(CorruptImage, match="no pixel data"):
        decode_bytes(real[:at] + b"\0" * 4096 + real[at:])


def test_dicom_without_preamble_still_decodes() -> None:
    """File meta without the 128-byte preamble and "DICM" starts with group 0002: still accepted."""
    raw = _raw(shape=(8, 8))
    data = _bytes(_dicom(raw))[132:]
    assert data[:2] == b"\x02\x00"
    decoded = decode_bytes(data, salt="s")
    assert (decoded.rows, decoded.cols) == (8, 8)
    np.testing.assert_array_equal(decoded.pixels, decode_bytes(_bytes(_dicom(raw)), salt="s").pixels)


def test_empty_upload_is_a_corrupt_image() -> None:
    with pytest.raises(CorruptImage, match="empty"):
        decode_bytes(b"", salt="s")


def test_absurd_dimensions_are_refused_before_decoding() -> None:
    ds = _dicom(_raw())
    ds.Rows, ds.Columns = 10000, 9000
    with pytest.raises(UnsupportedImage, match="CXR_DICOM_MAX_PIXELS"):
        decode_bytes(_bytes(ds), salt="s")


def test_multi_frame_series_is_refused() -> None:
    with pytest.raises(UnsupportedImage, match="multi-frame"):
        decode_file(CORPUS["SC_rgb_rle_2frame.dcm"], salt="s")


def test_color_secondary_capture_becomes_grey_and_is_flagged() -> None:
    decoded = decode_file(CORPUS["SC_rgb_rle.dcm"], salt="s")
    assert decoded.converted_from_color
    assert decoded.pixels.ndim == 2


def test_every_file_of_pydicoms_corpus_decodes_or_raises_a_typed_error() -> None:
    decoded = 0
    for name, path in sorted(CORPUS.items()):
        try:
            image = decode_file(path, salt="s")
        except ImageDecodeError:
            continue
        except Exception as exc:  # pragma: no cover - the failure this test exists to catch
            pytest.fail(f"{name}: raw {type(exc).__name__}: {exc}")
        assert image.pixels.dtype == np.float32, name
        assert np.isfinite(image.pixels).all(), name
        assert float(image.pixels.min()) >= 0.0 and float(image.pixels.max()) <= 1.0, name
        decoded += 1
    assert decoded > 50


@pytest.mark.parametrize("mode", ["L", "I;16", "RGB"])
def test_png_through_the_same_interface(mode: str) -> None:
    rng = np.random.default_rng(1)
    if mode == "I;16":
        arr = (rng.random((40, 50)) * 60000).astype(np.uint16)
        image = Image.fromarray(arr)
    elif mode == "RGB":
        arr = (rng.random((40, 50, 3)) * 255).astype(np.uint8)
        image = Image.fromarray(arr, "RGB")
    else:
        arr = (rng.random((40, 50)) * 255).astype(np.uint8)
        image = Image.fromarray(arr)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    decoded = decode_bytes(buffer.getvalue(), salt="s")
    assert decoded.source_format == "png"
    assert (decoded.rows, decoded.cols) == (40, 50)
    assert decoded.converted_from_color == (mode == "RGB")
    if mode == "L":
        np.testing.assert_allclose(decoded.pixels, arr / 255.0, atol=1e-6)
        np.testing.assert_array_equal(decoded.to_uint8(), arr)


def test_jpeg_through_the_same_interface() -> None:
    arr = np.tile(np.linspace(0, 255, 64, dtype=np.uint8), (48, 1))
    buffer = io.BytesIO()
    Image.fromarray(arr).save(buffer, format="JPEG", quality=95)
    decoded = decode_bytes(buffer.getvalue(), salt="s")
    assert decoded.source_format == "jpeg"
    assert np.abs(decoded.to_uint8().astype(int) - arr).mean() < 2


def test_broken_png_is_a_corrupt_image() -> None:
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((20, 20), np.uint8)).save(buffer, format="PNG")
    with pytest.raises(CorruptImage):
        decode_bytes(buffer.getvalue()[:40], salt="s")


def test_read_size_uses_headers_only(tmp_path: pytest.TempPathFactory) -> None:
    path = tmp_path / "x.dicom"  # type: ignore[operator]
    path.write_bytes(_bytes(_dicom(_raw(shape=(30, 70)))))
    assert read_size(path) == (70, 30)


@pytest.mark.parametrize(
    ("slope", "intercept"),
    [("nan", "0"), ("inf", "0"), ("1e300", "0"), ("1e36", "0"), ("0", "0"), ("1", "nan")],
    ids=["slope-nan", "slope-inf", "slope-1e300", "slope-past-float32", "slope-zero", "intercept-nan"],
)
@pytest.mark.filterwarnings("ignore:Invalid value for VR DS")
def test_a_rescale_that_maps_the_pixels_to_no_image_is_refused(slope: str, intercept: str) -> None:
    """It decoded to an all-NaN (or flat) image, which the detector answered with no findings."""
    ds = _dicom(_raw())
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    with pytest.raises(CorruptImage, match="Rescale Slope"):
        decode_bytes(_bytes(ds), salt="s")


def _palette(lut_words: list[int]) -> bytes:
    ds = _dicom(np.full((8, 8), 5, np.uint16), bits=8, photometric="PALETTE COLOR", center=None, width=None)
    for colour in ("Red", "Green", "Blue"):
        setattr(ds, f"{colour}PaletteColorLookupTableDescriptor", [256, 0, 16])
        setattr(ds, f"Segmented{colour}PaletteColorLookupTableData", np.array(lut_words, "<u2").tobytes())
    return _bytes(ds)


def test_segmented_palettes_are_bounded_before_pydicom_expands_them() -> None:
    """pydicom expands each 6-byte linear segment into 65,535 list entries: 22 KB took 1.3 GB and 5.6 s."""
    ramp = [0, 1, 0, 1, 255, 65535]  # one discrete entry, then a 255-entry linear ramp: 256 entries
    decoded = decode_bytes(_palette(ramp), salt="s")
    assert decoded.converted_from_color and decoded.pixels.shape == (8, 8)
    with pytest.raises(CorruptImage, match="65536 entries"):
        decode_bytes(_palette([0, 1, 0, 1, 65535, 65535, 1, 65535, 0]), salt="s")
    with pytest.raises(UnsupportedImage, match="indirect"):
        decode_bytes(_palette([0, 1, 0, 2, 1, 0, 0]), salt="s")
