"""Grayscale Softcopy Presentation State (GSPS) of one image's detections.

Every PACS viewer displays a GSPS over the image it references, while many
ignore SR ROIs: the GSPS is how a radiologist actually sees the boxes, on the
original pixels, switchable like any other annotation layer. One layer holds
per box a closed outline and a "<finding> <confidence>" label, grouped so a
viewer moves them together; an image without boxes still gets a GSPS that says
so, so the reader can tell "looked and found nothing" from "never analysed".

Only the header of the source is needed (Rows, Columns, SamplesPerPixel, UIDs,
window or VOI LUT): its VOI transformation is copied, so the image opens with the
same contrast as without the presentation state, and the same polarity: a viewer
applying a presentation state ignores the image's Photometric Interpretation
(PS3.4 N.2.1.4), so a MONOCHROME1 image gets Presentation LUT Shape INVERSE.
"""

from __future__ import annotations

import copy
from typing import Any

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from serving.dicom.sr import (
    check_pairing,
    check_referencable,
    closed_box,
    finding_tracking_uid,
    model_version,
    with_study_attributes,
)
from serving.dicom.uids import derived_uid, source_parts

#: Series number of the presentation states: fixed so a PACS lists them in one place of every study.
GSPS_SERIES_NUMBER = 991
LAYER = "CXR_DETECT"
NO_FINDING_TEXT = "No finding above threshold"
_PIXEL = hd.pr.AnnotationUnitsValues.PIXEL


def build_gsps(source: Dataset, response: dict[str, Any], *, manufacturer: str = "CXR Detect") -> Dataset:
    """The GSPS drawing ``response``'s boxes (source pixel coordinates) over the ``source`` image."""
    source = with_study_attributes(source)
    check_referencable(source)
    check_pairing(source, response)
    model = response["model"]
    version = model_version(response)
    layer = hd.pr.GraphicLayer(layer_name=LAYER, order=1, description=f"{model['name']} v{version}"[:64])
    groups, graphics, texts = _annotations(source, response)
    if not texts:
        texts.append(
            hd.pr.TextObject(
                text_value=NO_FINDING_TEXT,
                units=hd.pr.AnnotationUnitsValues.DISPLAY,
                bounding_box=(0.02, 0.02, 0.6, 0.07),
                text_justification=hd.pr.TextJustificationValues.LEFT,
            )
        )
    annotation = hd.pr.GraphicAnnotation(
        referenced_images=[source],
        graphic_layer=layer,
        graphic_objects=graphics or None,
        text_objects=texts,
    )
    return hd.pr.GrayscaleSoftcopyPresentationState(
        referenced_images=[source],
        series_instance_uid=derived_uid(*source_parts(source)[:2], version, "gsps-series"),
        series_number=GSPS_SERIES_NUMBER,
        sop_instance_uid=derived_uid(*source_parts(source), version, "gsps"),
        instance_number=int(source.get("InstanceNumber") or 1),
        manufacturer=manufacturer,
        manufacturer_model_name=str(model["name"])[:64],
        software_versions=version[:64],
        device_serial_number=version[:64],
        content_label="CXR_DETECT",
        content_description=f"CXR Detect {model['name']} v{version} boxes"[:64],
        graphic_annotations=[annotation],
        graphic_layers=[layer],
        graphic_groups=groups or None,
        voi_lut_transformations=_source_voi(source),
        presentation_lut_transformation=_presentation_lut(source),
        series_description=f"CXR Detect boxes v{version}"[:64],
    )


_VOI_FUNCTIONS = {v.value for v in hd.VOILUTFunctionValues}


def _presentation_lut(source: Dataset) -> hd.PresentationLUTTransformation:
    """INVERSE for a MONOCHROME1 source, else IDENTITY (highdicom's default whatever the source).

    The presentation state's pipeline replaces the image's Photometric Interpretation: with
    IDENTITY a MONOCHROME1 radiograph (most CR, many DX) showed inverted, bone dark, as soon as
    a viewer applied our boxes.
    """
    inverse = str(source.get("PhotometricInterpretation", "")).strip() == "MONOCHROME1"
    shape = hd.PresentationLUTShapeValues.INVERSE if inverse else hd.PresentationLUTShapeValues.IDENTITY
    return hd.PresentationLUTTransformation(presentation_lut_shape=shape)


def _source_voi(source: Dataset) -> list[hd.pr.SoftcopyVOILUTTransformation] | None:
    """The source's own VOI transformation, as the image shows without the presentation state.

    Not highdicom's copy of it, which broke three ways: it refuses an image carrying both a
    window and a VOI LUT Sequence (DICOM allows both; many CR and DX do), and its ValueError
    refused the whole study's result objects, SR included; it split a single window explanation
    ("NORMAL") into one value per character; and it rewrote a 12-bit VOI LUT's descriptor to 16
    bits, so a viewer read the LUT's output on a 16 times larger scale: the image nearly black
    (PS3.3 C.11.2.1.1 allows 8 to 16 bits in a presentation state).
    The window is kept when both are present (what most viewers apply by default). One transformation
    only: PS3.3 C.11.8 allows a presentation state one window pair, or a VOI LUT Sequence of one item,
    per image, where the image may offer several alternatives; the first is the viewers' default.
    None: the source has neither, and the presentation state none either.
    """
    if _has_value(source, "WindowCenter") and _has_value(source, "WindowWidth"):
        # a term DICOM does not define (a vendor's own) is applied as LINEAR, the default, as the
        # decoder does (data_pipeline/dicom_io.py): highdicom refused it, and with it the study's objects
        function = str(source.get("VOILUTFunction", "") or "").strip().upper()
        voi = hd.pr.SoftcopyVOILUTTransformation(
            window_center=_first(source, "WindowCenter"),
            window_width=_first(source, "WindowWidth"),
            voi_lut_function=function if function in _VOI_FUNCTIONS else None,
        )
        if _has_value(source, "WindowCenterWidthExplanation"):
            voi.WindowCenterWidthExplanation = _first(source, "WindowCenterWidthExplanation")
        return [voi]
    if _has_value(source, "VOILUTSequence"):
        placeholder = hd.VOILUT(first_mapped_value=0, lut_data=np.zeros(2, np.uint16))  # replaced below
        voi = hd.pr.SoftcopyVOILUTTransformation(voi_luts=[placeholder])
        voi.VOILUTSequence = [copy.deepcopy(source.VOILUTSequence[0])]
        return [voi]
    return None


def _first(source: Dataset, keyword: str) -> Any:
    """The first value of a (possibly multi-valued) attribute of ``source``."""
    value = source[keyword].value
    return value[0] if isinstance(value, MultiValue) else value


def _has_value(source: Dataset, keyword: str) -> bool:
    """Whether ``keyword`` is present with a value (an empty one is as good as absent, a 0 is not)."""
    if keyword not in source:
        return False
    element = source[keyword]
    return len(element.value) > 0 if element.VR == "SQ" else element.VM > 0


def _annotations(
    source: Dataset, response: dict[str, Any]
) -> tuple[list[hd.pr.GraphicGroup], list[hd.pr.GraphicObject], list[hd.pr.TextObject]]:
    """Per box: a group, its closed outline and its label, tracked by the same UID as the SR's ROI."""
    columns, rows = float(source.Columns), float(source.Rows)
    groups: list[hd.pr.GraphicGroup] = []
    graphics: list[hd.pr.GraphicObject] = []
    texts: list[hd.pr.TextObject] = []
    for i, det in enumerate(response.get("detections", []), start=1):
        # highdicom rejects points outside (0, 0)..(Columns, Rows); boxes from fusion can overshoot by a hair
        outline = closed_box(det["box"])
        outline[:, 0] = np.clip(outline[:, 0], 0.0, columns)
        outline[:, 1] = np.clip(outline[:, 1], 0.0, rows)
        label = f"{det['class_name']} {float(det['confidence']):.2f}"
        group = hd.pr.GraphicGroup(graphic_group_id=i, label=label[:64])
        tracking_id, tracking_uid = f"finding {i}", finding_tracking_uid(source, response, i)
        groups.append(group)
        graphics.append(
            hd.pr.GraphicObject(
                graphic_type=hd.pr.GraphicTypeValues.POLYLINE,
                graphic_data=outline,
                units=_PIXEL,
                graphic_group=group,
                tracking_id=tracking_id,
                tracking_uid=tracking_uid,
            )
        )
        texts.append(
            hd.pr.TextObject(
                text_value=label,
                units=_PIXEL,
                anchor_point=(float(outline[0, 0]), float(outline[0, 1])),
                anchor_point_visible=False,
                graphic_group=group,
                tracking_id=tracking_id,
                tracking_uid=tracking_uid,
            )
        )
    return groups, graphics, texts
