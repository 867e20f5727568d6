"""Generic folder adapter: ``images/<name>.<ext>`` with optional ``masks/<name>.<ext>`` lesion masks.

- images: DICOM MG (``.dcm``, ``.dicom``) or grayscale PNG (8/16 bit, already display-ready);
- masks (optional per image): PNG / NIfTI / DICOM SEG lesion mask of the same size; nonzero = lesion,
  connected components (or the instance ids, if the mask holds 0..K) are separate lesions; no mask file = no lesion;
- ``cases.csv`` (optional): columns ``case_id`` plus any of ``study_id``, ``split``, ``laterality``, ``view``,
  ``density``, ``breast_birads``. Without it each image is its own study and the split is drawn by hash.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

from custom.data.cases import MammoCase, Skipped
from custom.data.mask_io import MASK_SUFFIXES
from custom.errors import MammoInputError

__all__ = ["IMAGE_SUFFIXES", "load_folder_cases"]

IMAGE_SUFFIXES = (".dcm", ".dicom", ".png")


def _stem(path: Path) -> str:
    name = path.name
    return name[: -len(".nii.gz")] if name.lower().endswith(".nii.gz") else path.stem


def load_folder_cases(dataset_dir: str | os.PathLike) -> tuple[list[MammoCase], list[Skipped], dict[str, int]]:
    """Cases of a generic ``images/`` + ``masks/`` folder. Returns ``(cases, skipped, counts)`` like
    :func:`custom.data.vindr.load_vindr_cases`."""
    root = Path(dataset_dir)
    image_dir = root / "images"
    if not image_dir.is_dir():
        raise MammoInputError(image_dir, "folder dataset needs an images/ sub-folder")
    masks: dict[str, Path] = {}
    skipped: list[Skipped] = []
    mask_dir = root / "masks"
    if mask_dir.is_dir():
        for p in sorted(mask_dir.iterdir()):
            if any(p.name.lower().endswith(s) for s in MASK_SUFFIXES):
                masks[_stem(p)] = p
    extra: dict[str, dict[str, str]] = {}
    cases_csv = root / "cases.csv"
    if cases_csv.is_file():
        with open(cases_csv, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            if "case_id" not in (reader.fieldnames or []):
                raise MammoInputError(cases_csv, "missing CSV column: case_id")
            extra = {row["case_id"]: row for row in reader}
    cases = []
    for p in sorted(image_dir.iterdir()):
        if p.name.startswith(".") or not p.is_file():
            continue
        if p.suffix.lower() not in IMAGE_SUFFIXES:
            skipped.append(Skipped(p.stem, str(p), f"unsupported image file type {p.suffix!r}"))
            continue
        row = extra.get(p.stem, {})
        cases.append(
            MammoCase(
                case_id=p.stem,
                image_path=str(p),
                study_id=row.get("study_id") or p.stem,
                laterality=(row.get("laterality") or "").upper() or None,
                view=(row.get("view") or "").upper() or None,
                split=row.get("split") or None,
                density=row.get("density") or None,
                breast_birads=row.get("breast_birads") or None,
                mask_path=str(masks.pop(p.stem)) if p.stem in masks else None,
            )
        )
    for stem, p in masks.items():
        skipped.append(Skipped(stem, str(p), "mask file without a matching image"))
    return cases, skipped, {"excluded_view": 0, "ignored_findings": 0}
