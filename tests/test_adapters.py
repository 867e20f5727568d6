"""Mask files (PNG, NIfTI, DICOM SEG) and the VinDr-Mammo / folder adapters on small hand-made datasets."""

from __future__ import annotations

import csv
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from custom.data.folder import load_folder_cases
from custom.data.mask_io import load_mask_file
from custom.data.vindr import load_vindr_cases, parse_categories
from custom.errors import MammoInputError

FINDING_COLUMNS = ["image_id", "study_id", "series_id", "laterality", "view_position", "height", "width", "breast_birads",
                   "breast_density", "finding_categories", "finding_birads", "xmin", "ymin", "xmax", "ymax", "split"]


def _mask():
    m = np.zeros((30, 20), np.uint8)
    m[5:10, 3:8] = 1
    m[20:25, 12:18] = 1
    return m


def test_png_and_nifti_masks_read_rows_first(tmp_path):
    m = _mask()
    Image.fromarray(m * 255).save(tmp_path / "m.png")
    np.testing.assert_array_equal(load_mask_file(tmp_path / "m.png") > 0, m > 0)
    # NIfTI in ITK/Slicer index order: first axis = columns
    nib.save(nib.Nifti1Image(m.T[..., None].astype(np.uint8), np.eye(4)), tmp_path / "m.nii.gz")
    np.testing.assert_array_equal(load_mask_file(tmp_path / "m.nii.gz"), m)


def test_dicom_seg_mask(tmp_path):
    import highdicom as hd
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid
    from pydicom.sr.codedict import codes

    m = _mask()
    src = Dataset()
    src.file_meta = FileMetaDataset()
    src.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    src.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1.2"
    src.SOPInstanceUID, src.StudyInstanceUID, src.SeriesInstanceUID = generate_uid(), generate_uid(), generate_uid()
    src.Modality, src.PatientID, src.PatientName, src.StudyDate, src.StudyTime = "MG", "P", "P^P", "20200101", "000000"
    src.PatientBirthDate, src.PatientSex, src.AccessionNumber, src.ReferringPhysicianName = "", "F", "", ""
    src.StudyID, src.SeriesNumber, src.InstanceNumber = "1", 1, 1
    src.Rows, src.Columns = m.shape
    src.SamplesPerPixel, src.PhotometricInterpretation = 1, "MONOCHROME2"
    src.BitsAllocated, src.BitsStored, src.HighBit, src.PixelRepresentation = 16, 12, 11, 0
    src.PixelSpacing = [0.1, 0.1]
    src.PixelData = np.zeros(m.shape, np.uint16).tobytes()
    desc = hd.seg.SegmentDescription(
        segment_number=1, segment_label="lesion", segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Mass, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
    )
    seg = hd.seg.Segmentation(
        source_images=[src], pixel_array=m.astype(bool), segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[desc], series_instance_uid=generate_uid(), series_number=2,
        sop_instance_uid=generate_uid(), instance_number=1, manufacturer="test", manufacturer_model_name="test",
        software_versions="0", device_serial_number="0",
    )
    seg.save_as(tmp_path / "seg.dcm")
    np.testing.assert_array_equal(load_mask_file(tmp_path / "seg.dcm"), m)
    # a DICOM file that is not a SEG is refused
    src.save_as(tmp_path / "image.dcm", enforce_file_format=True)
    with pytest.raises(MammoInputError, match="Segmentation"):
        load_mask_file(tmp_path / "image.dcm")


def test_bad_mask_files(tmp_path):
    Image.fromarray(_mask()).save(tmp_path / "m.png")
    with pytest.raises(MammoInputError, match=r"mask size \(30, 20\) does not match the image size \(40, 20\)") as err:
        load_mask_file(tmp_path / "m.png", expected_shape=(40, 20))
    assert "m.png" in str(err.value)
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "rgb.png")
    with pytest.raises(MammoInputError, match="single-channel 2D"):
        load_mask_file(tmp_path / "rgb.png")
    (tmp_path / "junk.png").write_bytes(b"not a png")
    with pytest.raises(MammoInputError, match="unreadable mask file"):
        load_mask_file(tmp_path / "junk.png")
    with pytest.raises(MammoInputError, match="not found"):
        load_mask_file(tmp_path / "missing.png")


def _write_vindr(root: Path, rows: list[dict], columns=FINDING_COLUMNS):
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "finding_annotations.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow(r)
    for r in rows:
        if r.get("_file", True):
            p = root / "images" / r["study_id"] / f"{r['image_id']}.dicom"
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(b"")


def _row(image_id, study_id, cats="['No Finding']", box=("", "", "", ""), split="training", view="CC", **kw):
    r = dict(image_id=image_id, study_id=study_id, series_id="s", laterality="L", view_position=view, height=100,
             width=80, breast_birads="BI-RADS 1", breast_density="DENSITY B", finding_categories=cats,
             finding_birads="", xmin=box[0], ymin=box[1], xmax=box[2], ymax=box[3], split=split)
    r.update(kw)
    return r


def test_parse_categories():
    assert parse_categories("['Mass', 'Suspicious Calcification']") == ["Mass", "Suspicious Calcification"]
    assert parse_categories("Mass") == ["Mass"] and parse_categories("") == []


def test_vindr_adapter_on_a_small_csv(tmp_path):
    rows = [
        _row("img_nofind", "st1"),
        _row("img_mass", "st1", "['Mass']", (10, 20, 30, 40), finding_birads="BI-RADS 4", view="MLO"),
        _row("img_mass", "st1", "['Mass', 'Architectural Distortion']", (50, 50, 60, 70), view="MLO"),
        _row("img_calc", "st2", "['Suspicious Calcification']", (1, 1, 5, 5), split="test"),
        _row("img_missing", "st2", _file=False),
        _row("img_badbox", "st3", "['Mass']", (30, 20, 10, 40)),
    ]
    _write_vindr(tmp_path, rows)
    cases, skipped, counts = load_vindr_cases(tmp_path)
    assert {c.case_id for c in cases} == {"img_nofind", "img_mass"}  # calcification only: not a lesion-free image
    assert counts["excluded_other_findings"] == 1
    cases, skipped, counts = load_vindr_cases(tmp_path, other_findings="healthy")
    by_id = {c.case_id: c for c in cases}
    assert set(by_id) == {"img_nofind", "img_mass", "img_calc"} and counts["kept_other_findings_as_healthy"] == 1
    assert by_id["img_nofind"].findings == [] and by_id["img_calc"].findings == []  # calcification is not a lesion
    assert [f.box for f in by_id["img_mass"].findings] == [[10, 20, 30, 40], [50, 50, 60, 70]]
    assert by_id["img_mass"].findings[0].birads == "BI-RADS 4" and by_id["img_mass"].view == "MLO"
    assert by_id["img_calc"].split == "test" and by_id["img_mass"].image_path.endswith("images/st1/img_mass.dicom")
    reasons = {s.case_id: s.reason for s in skipped}
    assert reasons["img_missing"] == "image file missing" and "unusable box" in reasons["img_badbox"]
    assert counts["ignored_findings"] == 1
    cc_only, _, counts = load_vindr_cases(tmp_path, views=["CC"], other_findings="healthy")
    assert {c.case_id for c in cc_only} == {"img_nofind", "img_calc"} and counts["excluded_view"] == 1


def test_vindr_missing_columns_is_a_clear_error(tmp_path):
    _write_vindr(tmp_path, [_row("a", "s")], columns=[c for c in FINDING_COLUMNS if c not in ("xmin", "split")])
    with pytest.raises(MammoInputError, match="missing CSV columns: xmin, split") as err:
        load_vindr_cases(tmp_path)
    assert "finding_annotations.csv" in str(err.value)
    with pytest.raises(MammoInputError, match="not found"):
        load_vindr_cases(tmp_path / "nowhere")


def test_folder_adapter(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    for name in ("a", "b"):
        (tmp_path / "images" / f"{name}.dcm").write_bytes(b"")
    (tmp_path / "images" / "notes.txt").write_text("x")
    Image.fromarray(_mask()).save(tmp_path / "masks" / "a.png")
    Image.fromarray(_mask()).save(tmp_path / "masks" / "orphan.png")
    cases, skipped, _ = load_folder_cases(tmp_path)
    by_id = {c.case_id: c for c in cases}
    assert by_id["a"].mask_path.endswith("a.png") and by_id["b"].mask_path is None
    assert {s.case_id: s.reason for s in skipped} == {
        "notes": "unsupported image file type '.txt'", "orphan": "mask file without a matching image"}
