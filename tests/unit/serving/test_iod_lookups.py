"""highdicom's IOD lookups, memoized (``serving.dicom.iod_lookups``): the same answers, asked once."""

from __future__ import annotations

import subprocess
import sys

import pytest
from pydicom.uid import UID, ComprehensiveSRStorage, CTImageStorage, GrayscaleSoftcopyPresentationStateStorage

from serving.dicom.iod_lookups import memoize_highdicom_lookups
from serving.dicom.sr import source_header
from serving.dicom.study_objects import study_objects
from tests.unit.serving.serving_support import make_dicom
from tests.unit.serving.test_pacs_objects import STUDY, TRIAGE, detection, response

pytestmark = pytest.mark.unit

CR = "1.2.840.10008.5.1.4.1.1.1"
SOP_CLASSES = [CR, CTImageStorage, ComprehensiveSRStorage, GrayscaleSoftcopyPresentationStateStorage]
ATTRIBUTES = ["ContentDate", "ContentTime", "NumberOfFrames", "PixelData", "FrameOfReferenceUID"]


@pytest.fixture(scope="module")
def lookups() -> dict:
    return memoize_highdicom_lookups()


def test_every_highdicom_module_holding_a_lookup_holds_the_memoized_one(lookups: dict) -> None:
    for name, memo in lookups.items():
        holders = [
            module_name
            for module_name, module in sys.modules.items()
            if module_name.split(".")[0] == "highdicom" and hasattr(module, name)
        ]
        assert "highdicom._standard_utils" in holders
        assert all(getattr(sys.modules[m], name) is memo for m in holders), name
    assert memoize_highdicom_lookups() == lookups  # installing again keeps the same functions


@pytest.mark.parametrize("sop_class", SOP_CLASSES)
def test_the_memoized_answers_are_highdicoms(lookups: dict, sop_class: str) -> None:
    in_iod, has_pixels = lookups["is_attribute_in_iod"], lookups["does_iod_have_pixel_data"]
    for attribute in ATTRIBUTES:
        expected = in_iod.__wrapped_original__(attribute, sop_class)
        assert in_iod(attribute, sop_class) is expected
        assert in_iod(attribute, UID(sop_class)) is expected  # a UID asks the same question as its str
        assert in_iod(attribute=attribute, sop_class_uid=sop_class) is expected  # by keyword too
        excluded = ["SharedFunctionalGroupsSequence"]
        assert in_iod(attribute, sop_class, exclude_path_elements=excluded) is in_iod.__wrapped_original__(
            attribute, sop_class, exclude_path_elements=excluded
        )
    assert has_pixels(sop_class) is has_pixels.__wrapped_original__(sop_class)


def test_an_unknown_sop_class_still_raises_every_time(lookups: dict) -> None:
    for _ in range(2):
        with pytest.raises(KeyError, match="No IOD found"):
            lookups["is_attribute_in_iod"]("ContentDate", "1.2.3.4.5")


def test_building_a_study_again_asks_the_tables_nothing(lookups: dict) -> None:
    headers = [source_header(make_dicom(seed=s, study_uid=STUDY)) for s in (1, 2)]
    items = [(s, response([detection()])) for s in headers]
    study_objects(items, TRIAGE)
    before = {name: memo.cache_info() for name, memo in lookups.items()}
    study_objects(items, TRIAGE)
    for name, memo in lookups.items():
        after = memo.cache_info()
        assert after.misses == before[name].misses, name  # no table walk the second time
        assert after.hits > before[name].hits, name  # and the builders did ask


def test_importing_the_sr_builder_installs_them() -> None:
    """A fresh process that imports the builders (as the gateway does) gets the memoized lookups."""
    probe = (
        "import serving.dicom.study_objects, highdicom.base as b, highdicom.content as c;"
        "print(hasattr(b.is_attribute_in_iod, '__wrapped_original__'),"
        " hasattr(c.does_iod_have_pixel_data, '__wrapped_original__'))"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True
    )
    assert done.stdout.split() == ["True", "True"]
