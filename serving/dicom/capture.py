"""Secondary Capture of one image with the detections burned into its pixels.

Some PACS viewers show neither SR ROIs nor presentation states; a picture with
the boxes drawn in is the one result every viewer can display. Because its
pixels are no longer the acquisition's, it is marked as what it is, everywhere a
reader or a routing rule looks: ImageType DERIVED\\SECONDARY, BurnedInAnnotation
YES, and a series and derivation description saying it is not for primary
diagnosis. It is downscaled to bound what travels back to the PACS.
"""

from __future__ import annotations

from typing import Any

import highdicom as hd
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset

from serving.dicom.sr import check_pairing, check_referencable, model_version, with_study_attributes
from serving.dicom.uids import derived_uid, source_parts

#: Series number of the captures: fixed so a PACS lists them in one place of every study.
CAPTURE_SERIES_NUMBER = 992
MAX_SIDE = 1024
DERIVATION = (
    "Secondary capture with CXR Detect model {version} detections burned in; "
    "derived from the original image for review only, NOT FOR PRIMARY DIAGNOSIS."
)


def build_burned_capture(
    source: Dataset, pixels_uint8: np.ndarray, response: dict[str, Any], *, manufacturer: str = "CXR Detect"
) -> Dataset:
    """An 8-bit MONOCHROME2 SC image of ``pixels_uint8`` (the displayed source image) with boxes and labels.

    Boxes are in the source's pixel coordinates; they are scaled to the pixel
    array (which may already be smaller than the source) and to the downscaled
    capture.
    """
    if pixels_uint8.ndim != 2 or pixels_uint8.dtype != np.uint8:
        raise ValueError("the capture needs a 2-D uint8 (displayed, MONOCHROME2) image")
    source = with_study_attributes(source)
    check_referencable(source)
    check_pairing(source, response)
    version = model_version(response)
    drawn = burn_in(pixels_uint8, response, source_size=(int(source.Columns), int(source.Rows)))
    placeholder_orientation = ("L", "F")  # highdicom requires one; replaced by the source's own below
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=source,
        pixel_array=drawn,
        photometric_interpretation=hd.PhotometricInterpretationValues.MONOCHROME2,
        bits_allocated=8,
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        series_instance_uid=derived_uid(*source_parts(source)[:2], version, "capture-series"),
        series_number=CAPTURE_SERIES_NUMBER,
        sop_instance_uid=derived_uid(*source_parts(source), version, "capture"),
        instance_number=int(source.get("InstanceNumber") or 1),
        manufacturer=manufacturer,
        patient_orientation=placeholder_orientation,
        series_description=f"NOT FOR PRIMARY DIAGNOSIS - CXR Detect boxes v{version}"[:64],
    )
    # from_ref_dataset copies only the patient's name, ID, birth date and sex: without the rest of
    # the Patient and Study modules (IssuerOfPatientID, other IDs, study description...), as the
    # SR and presentation states carry them, a PACS that tells patients apart by ID and issuer
    # could file the capture under another patient, or refuse it as not matching the study
    sc.copy_patient_and_study_information(source)
    # Downscaling keeps the orientation; an unknown one stays empty (Type 2) rather than guessed.
    sc.PatientOrientation = source.get("PatientOrientation", "")
    sc.ImageType = ["DERIVED", "SECONDARY"]
    sc.BurnedInAnnotation = "YES"
    sc.DerivationDescription = DERIVATION.format(version=version)[:1024]
    ref = Dataset()
    ref.ReferencedSOPClassUID = source.SOPClassUID
    ref.ReferencedSOPInstanceUID = source.SOPInstanceUID
    sc.SourceImageSequence = [ref]
    return sc


def burn_in(pixels: np.ndarray, response: dict[str, Any], *, source_size: tuple[int, int]) -> np.ndarray:
    """``pixels`` at most :data:`MAX_SIDE` on the long side, each box outlined and labelled.

    The outline is white with a black edge and the label white on black, so
    both stay visible over bright bone and dark lung alike.
    """
    height, width = pixels.shape
    scale = min(1.0, MAX_SIDE / max(height, width))
    out_w, out_h = max(1, round(width * scale)), max(1, round(height * scale))
    image = Image.fromarray(pixels, mode="L")
    if (out_w, out_h) != (width, height):
        image = image.resize((out_w, out_h), Image.Resampling.BILINEAR)
    sx = out_w / max(source_size[0], 1)
    sy = out_h / max(source_size[1], 1)
    draw = ImageDraw.Draw(image)
    line = max(1, round(max(out_w, out_h) / 400))
    font = ImageFont.load_default(size=max(10, round(max(out_w, out_h) / 60)))
    for det in response.get("detections", []):
        x0, y0, x1, y1 = (float(v) for v in det["box"])
        rect = (
            min(max(x0 * sx, 0), out_w - 1),
            min(max(y0 * sy, 0), out_h - 1),
            min(max(x1 * sx, 0), out_w - 1),
            min(max(y1 * sy, 0), out_h - 1),
        )
        draw.rectangle(rect, outline=0, width=line + 2)
        draw.rectangle(rect, outline=255, width=line)
        label = f"{det['class_name']} {float(det['confidence']):.2f}"
        left, top, right, bottom = draw.textbbox((0, 0), label, font=font)
        tx = rect[0]
        ty = rect[1] - (bottom - top) - 2 if rect[1] - (bottom - top) - 2 >= 0 else rect[3] + 2
        draw.rectangle((tx, ty, tx + right - left + 2, ty + bottom - top + 2), fill=0)
        draw.text((tx + 1 - left, ty + 1 - top), label, fill=255, font=font)
    return np.asarray(image, dtype=np.uint8).copy()
