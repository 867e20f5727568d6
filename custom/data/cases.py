"""The dataset-independent description of one mammogram that the adapters produce and ``prepare`` consumes."""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["Finding", "MammoCase", "Skipped", "assign_split"]


@dataclass
class Finding:
    """One lesion annotation: a box ``[xmin, ymin, xmax, ymax]`` in source pixel coordinates (x = column),
    or ``None`` when the lesion comes from a mask file."""

    category: str = "Mass"
    birads: str | None = None
    box: list[float] | None = None


@dataclass
class MammoCase:
    """One image to prepare.

    Attributes:
        case_id: unique id (VinDr: the image_id); used for output file names.
        image_path: the source image (DICOM MG, or PNG for the folder adapter).
        study_id: grouping key for splitting — every image of a study (patient exam) lands in the same split.
        laterality: ``"L"``/``"R"`` from the dataset's annotations, ``None`` to use the DICOM tag / image content.
        view: ``"CC"``, ``"MLO"``, … or ``None``.
        split: the dataset's own split (``"training"``, ``"validation"``, ``"test"``) or ``None``.
        density, breast_birads: breast-level labels as the dataset writes them (e.g. ``"DENSITY C"``, ``"BI-RADS 2"``).
        findings: the lesions of the image (boxes), empty for an image without lesion.
        mask_path: a lesion mask file (PNG / NIfTI / DICOM SEG), used instead of boxes when given.
        annotated_shape: ``[height, width]`` of the image the boxes were drawn on (VinDr CSV), ``None`` if unknown;
            ``prepare`` compares it with the image it reads.
    """

    case_id: str
    image_path: str
    study_id: str
    laterality: str | None = None
    view: str | None = None
    split: str | None = None
    density: str | None = None
    breast_birads: str | None = None
    findings: list[Finding] = field(default_factory=list)
    mask_path: str | None = None
    annotated_shape: list[int] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Skipped:
    """A case (or CSV row) left out, with the file it concerns and the reason."""

    case_id: str
    source: str
    reason: str

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


def assign_split(study_id: str, dataset_split: str | None, validation_fraction: float, test_fraction: float,
                 seed: int = 0) -> str:
    """Deterministic split by study: the dataset's ``"test"`` (and ``"validation"``) is kept; its ``"training"``
    is divided into training/validation by a hash of the study id; with no split given, the hash divides the
    study into training/validation/test. Never splits by image."""
    u = int(hashlib.sha1(f"{seed}:{study_id}".encode()).hexdigest()[:12], 16) / float(16**12)
    split = (dataset_split or "").strip().lower()
    if split in ("test", "testing"):
        return "test"
    if split in ("validation", "val"):
        return "validation"
    if split in ("training", "train"):
        return "validation" if u < validation_fraction else "training"
    if u < test_fraction:
        return "test"
    return "validation" if u < test_fraction + validation_fraction else "training"
