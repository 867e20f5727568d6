"""A fixed study split read from a file, e.g. GCDM's published VinDr-Mammo split (373 / 45 / 104 CC mass images).

Two layouts are read:

* a JSON file ``{"training": [...], "validation": [...], "test": [...]}`` (``train`` / ``val`` accepted);
* a folder holding GCDM's ``trainset.csv``, ``valset.csv`` and ``testset.csv`` (the reference repository's
  ``files/`` folder): their ``ID`` column is read, the feature columns are ignored.

An entry is either a study id (every image of the study that passes ``views`` / ``lesion_categories``) or one image
as GCDM names it, ``<study_id>_<L|R>_<VIEW>`` with an optional ``.nii.gz`` / ``.png`` / ``.dcm`` suffix (that
study's image of that laterality and view). Images that no entry names are left out of the prepared data.
"""

from __future__ import annotations

import csv
import json
import os
import re
from collections.abc import Iterable
from pathlib import Path

from custom.data.cases import MammoCase
from custom.errors import MammoInputError

__all__ = ["SPLITS", "read_split_file", "SplitSelection"]

SPLITS = ("training", "validation", "test")
_ALIASES = {"training": "training", "train": "training", "validation": "validation", "val": "validation", "test": "test"}
_GCDM_FILES = {"training": "trainset.csv", "validation": "valset.csv", "test": "testset.csv"}
_IMAGE_ID = re.compile(r"^(?P<study>[^_]+)_(?P<lat>[LR])_(?P<view>[A-Za-z]+)$")
_SUFFIXES = (".nii.gz", ".png", ".dcm", ".dicom", ".nii")


def _strip(entry: str) -> str:
    entry = entry.strip()
    for s in _SUFFIXES:
        if entry.lower().endswith(s):
            return entry[: -len(s)]
    return entry


def read_split_file(path: str | os.PathLike) -> dict[str, list[str]]:
    """``{"training": [...], "validation": [...], "test": [...]}`` entries of a split file or GCDM split folder.

    Raises:
        MammoInputError: missing file/folder, unreadable JSON, an unknown split name, or an entry in two splits.
    """
    path = Path(path)
    out: dict[str, list[str]] = {s: [] for s in SPLITS}
    if path.is_dir():
        for split, name in _GCDM_FILES.items():
            f = path / name
            if not f.is_file():
                raise MammoInputError(f, "split file folder: expected trainset.csv, valset.csv and testset.csv (GCDM's files/)")
            with open(f, newline="") as fh:
                reader = csv.DictReader(fh)
                if not reader.fieldnames or "ID" not in reader.fieldnames:
                    raise MammoInputError(f, "no ID column")
                out[split] = [_strip(r["ID"]) for r in reader if r.get("ID")]
    elif path.is_file():
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise MammoInputError(path, f"unreadable split file ({err})") from err
        if not isinstance(data, dict):
            raise MammoInputError(path, "split file must be a JSON object of lists")
        for key, entries in data.items():
            split = _ALIASES.get(str(key).lower())
            if split is None:
                raise MammoInputError(path, f"unknown split {key!r}; expected one of {sorted(_ALIASES)}")
            if not isinstance(entries, list) or not all(isinstance(e, str) for e in entries):
                raise MammoInputError(path, f"split {key!r} must be a list of study or image ids")
            out[split] += [_strip(e) for e in entries]
    else:
        raise MammoInputError(path, "split file not found (split_file)")
    seen: dict[str, str] = {}
    for split, entries in out.items():
        for e in entries:
            if e in seen and seen[e] != split:
                raise MammoInputError(path, f"{e!r} is in both the {seen[e]} and the {split} split")
            seen[e] = split
    return out


class SplitSelection:
    """Which split a case belongs to according to a split file (``None``: not listed, leave it out)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.entries = read_split_file(path)
        self._images: dict[tuple[str, str, str], str] = {}
        self._studies: dict[str, str] = {}
        for split, entries in self.entries.items():
            for e in entries:
                m = _IMAGE_ID.match(e)
                if m:
                    self._images[(m["study"], m["lat"].upper(), m["view"].upper())] = split
                else:
                    self._studies[e] = split

    def split_of(self, case: MammoCase) -> str | None:
        key = (case.study_id, (case.laterality or "").upper(), (case.view or "").upper())
        return self._images.get(key) or self._studies.get(case.study_id)

    def select(self, cases: Iterable[MammoCase]) -> tuple[list[MammoCase], int, dict[str, int]]:
        """``(cases with case.split set from the file, number left out, entries per split not found)``."""
        kept, left_out = [], 0
        found: set[tuple[str, ...]] = set()
        for case in cases:
            split = self.split_of(case)
            if split is None:
                left_out += 1
                continue
            case.split = split
            kept.append(case)
            found.add((case.study_id, (case.laterality or "").upper(), (case.view or "").upper()))
            found.add((case.study_id,))
        missing = {s: 0 for s in SPLITS}
        for key, split in self._images.items():
            missing[split] += key not in found
        for study, split in self._studies.items():
            missing[split] += (study,) not in found
        return kept, left_out, missing
