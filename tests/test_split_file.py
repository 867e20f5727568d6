"""A fixed study split from a file (GCDM's published split) with the CC / Mass filters, on a generated VinDr-layout
folder (finding_annotations.csv + empty image files: only the selection is exercised, not the preprocessing)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from custom.data.prepare import PrepareWorkflow
from custom.data.split_file import read_split_file
from custom.errors import MammoInputError

COLUMNS = ["image_id", "study_id", "series_id", "laterality", "view_position", "height", "width", "breast_birads",
           "breast_density", "finding_categories", "finding_birads", "xmin", "ymin", "xmax", "ymax", "split"]


def _vindr(root: Path) -> None:
    """6 studies x (L, R) x (CC, MLO); a mass in the R breast of studies s0-s4, a calcification in s5's L CC."""
    rows = []
    for s in range(6):
        for lat in "LR":
            for view in ("CC", "MLO"):
                image = f"i{s}{lat}{view}"
                finding = "['Mass']" if (lat == "R" and s < 5) else ("['Suspicious Calcification']" if (s == 5 and lat == "L" and view == "CC") else "['No Finding']")
                box = ("10", "10", "40", "40") if finding != "['No Finding']" else ("", "", "", "")
                rows.append([image, f"s{s}", "x", lat, view, "100", "80", "BI-RADS 4", "DENSITY C", finding,
                             "BI-RADS 4", *box, "training" if s < 4 else "test"])
                (root / "images" / f"s{s}").mkdir(parents=True, exist_ok=True)
                (root / "images" / f"s{s}" / f"{image}.dicom").write_bytes(b"")
    with open(root / "finding_annotations.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(COLUMNS)
        w.writerows(rows)


def _workflow(root: Path, split_file: Path) -> PrepareWorkflow:
    return PrepareWorkflow(dataset_dir=str(root), output_dir=str(root / "out"), params_file="unused.yaml",
                           views=["CC"], lesion_categories=["Mass"], split_file=str(split_file), progress=False)


def test_gcdm_image_ids_with_cc_mass_filters(tmp_path):
    _vindr(tmp_path)
    split = {"training": ["s0_R_CC.nii.gz", "s1_R_CC.nii.gz"], "validation": ["s2_R_CC.png"], "test": ["s4"]}
    (tmp_path / "split.json").write_text(json.dumps(split))
    cases, _, counts = _workflow(tmp_path, tmp_path / "split.json").load_cases()
    got = {c.case_id: c.split for c in cases}
    # s4 is a bare study id: its CC images (L without, R with a mass) both pass the CC filter
    assert got == {"i0RCC": "training", "i1RCC": "training", "i2RCC": "validation", "i4LCC": "test", "i4RCC": "test"}
    # 12 CC images in the dataset (MLO excluded before); the calcification-only one is left out by the
    # other-findings policy (exclude by default) before the split file is applied
    assert counts["not_in_split_file"] == 11 - 5
    assert counts["split_file_entries_not_found"] == 0


def test_gcdm_split_folder_and_missing_entries(tmp_path):
    _vindr(tmp_path)
    folder = tmp_path / "files"
    folder.mkdir()
    for name, ids in (("trainset.csv", ["s0_R_CC.nii.gz", "s3_R_CC.nii.gz"]), ("valset.csv", ["s1_R_CC.nii.gz"]),
                      ("testset.csv", ["s2_R_CC.nii.gz", "s9_L_CC.nii.gz"])):
        (folder / name).write_text("ID,Shape_Elongation\n" + "".join(f"{i},0.5\n" for i in ids))
    cases, _, counts = _workflow(tmp_path, folder).load_cases()
    assert {c.case_id: c.split for c in cases} == {"i0RCC": "training", "i3RCC": "training", "i1RCC": "validation",
                                                   "i2RCC": "test"}
    assert counts["split_file_entries_not_found"] == 1  # s9 does not exist


def test_bad_split_files_are_named(tmp_path):
    (tmp_path / "dup.json").write_text(json.dumps({"train": ["s0"], "test": ["s0"]}))
    with pytest.raises(MammoInputError, match=r"dup.json: 's0' is in both the training and the test split"):
        read_split_file(tmp_path / "dup.json")
    (tmp_path / "odd.json").write_text(json.dumps({"holdout": ["s0"]}))
    with pytest.raises(MammoInputError, match="unknown split 'holdout'"):
        read_split_file(tmp_path / "odd.json")
    with pytest.raises(MammoInputError, match="split file not found"):
        PrepareWorkflow(dataset_dir=str(tmp_path), output_dir=str(tmp_path / "o"), params_file="x",
                        split_file=str(tmp_path / "nope.json"))
