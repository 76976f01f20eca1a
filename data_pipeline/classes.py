"""The 14 VinDr-CXR findings plus the image-level "No finding" label.

Ids and names are a contract shared by the CSV files, the YOLO datasets, the
trained model's output order and the gateway's responses, so they live in one
place and nothing else spells them out.
"""

from __future__ import annotations

from typing import Final

CLASS_NAMES: Final[tuple[str, ...]] = (
    "Aortic enlargement",
    "Atelectasis",
    "Calcification",
    "Cardiomegaly",
    "Consolidation",
    "ILD",
    "Infiltration",
    "Lung Opacity",
    "Nodule/Mass",
    "Other lesion",
    "Pleural effusion",
    "Pleural thickening",
    "Pneumothorax",
    "Pulmonary fibrosis",
)
NUM_CLASSES: Final[int] = len(CLASS_NAMES)
NO_FINDING_ID: Final[int] = 14
NO_FINDING: Final[str] = "No finding"

#: Every label a VinDr CSV row may carry (0..14), id -> name.
ALL_LABELS: Final[dict[int, str]] = {**dict(enumerate(CLASS_NAMES)), NO_FINDING_ID: NO_FINDING}
#: Reverse lookup, name -> id, for parsing hand-written CSVs.
LABEL_IDS: Final[dict[str, int]] = {name: cid for cid, name in ALL_LABELS.items()}


def class_name(class_id: int) -> str:
    """Name of a label id (0..14); raises KeyError for anything else."""
    return ALL_LABELS[class_id]
