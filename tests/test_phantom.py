"""Tests of the synthetic VinDr-Mammo phantom generator (custom.data.phantom).

The display checks use this file's own small grayscale pipeline (rescale -> first window or VOI LUT ->
MONOCHROME1 inversion), written from the DICOM standard, not the generator's code.
"""

from __future__ import annotations

import csv
import re
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pydicom
import pytest

from custom.data.phantom import (
    GENERATOR_VERSION,
    PHANTOM_SERIES_DESCRIPTION,
    VINDR_BREAST_COLUMNS,
    VINDR_FINDING_COLUMNS,
    generate_phantom_dataset,
    image_variant,
    phantom_image,
)

SHAPE = (256, 208)
N_STUDIES = 4
MARKER = "SYNTHETIC PHANTOM - not patient data"

EXPECTED_FINDING_COLUMNS = [
    "image_id", "study_id", "series_id", "laterality", "view_position", "height", "width", "breast_birads",
    "breast_density", "finding_categories", "finding_birads", "xmin", "ymin", "xmax", "ymax", "split",
]
EXPECTED_BREAST_COLUMNS = [
    "study_id", "series_id", "image_id", "laterality", "view_position", "height", "width", "breast_birads",
    "breast_density", "split",
]
MG_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.2"
MG_PROCESSING = "1.2.840.10008.5.1.4.1.1.1.2.1"
ALL_TRANSFER_SYNTAXES = {
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.5",  # RLE Lossless
    "1.2.840.10008.1.2.1.99",  # Deflated Explicit VR Little Endian
}


# ------------------------------------------------------------------------------------------------ helpers
def read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def dicom_path(root: Path, row: dict[str, str]) -> Path:
    return root / "images" / row["study_id"] / f"{row['image_id']}.dicom"


def display(ds: pydicom.Dataset) -> np.ndarray:
    """Stored values -> display in [0, 1] (1 = white), following PS3.3 C.11 for the first VOI transform."""
    x = ds.pixel_array.astype(np.float64)
    slope = float(ds.get("RescaleSlope", 1.0))
    intercept = float(ds.get("RescaleIntercept", 0.0))
    x = x * slope + intercept
    if "VOILUTSequence" in ds:
        item = ds.VOILUTSequence[0]
        n, first, bits = (int(v) for v in item.LUTDescriptor)
        n = n or 65536
        data = item.LUTData
        lut = np.frombuffer(data, dtype="<u2") if isinstance(data, bytes) else np.asarray(data)
        assert lut.size == n
        y = lut[np.clip(np.floor(x).astype(np.int64) - first, 0, n - 1)] / float(2**bits - 1)
    else:
        centers, widths = ds.WindowCenter, ds.WindowWidth
        c = float(centers[0] if isinstance(centers, pydicom.multival.MultiValue) else centers)
        w = float(widths[0] if isinstance(widths, pydicom.multival.MultiValue) else widths)
        if str(ds.get("VOILUTFunction", "LINEAR")).upper() == "SIGMOID":
            y = 1.0 / (1.0 + np.exp(-4.0 * (x - c) / w))
        else:
            y = np.clip((x - (c - 0.5)) / (w - 1.0) + 0.5, 0.0, 1.0)
    if ds.PhotometricInterpretation == "MONOCHROME1":
        y = 1.0 - y
    return y


def air_level(img: np.ndarray, laterality: str) -> float:
    """Median display value of the outer 6% of columns on the side away from the chest wall."""
    w = img.shape[1]
    band = img[:, w - max(2, int(0.06 * w)):] if laterality == "L" else img[:, : max(2, int(0.06 * w))]
    return float(np.median(band))


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    root = tmp_path_factory.mktemp("phantom")
    out = {}
    for name, seed in (("a", 0), ("a_again", 0), ("b", 1)):
        out[name] = root / name
        out[f"{name}_summary"] = generate_phantom_dataset(
            out[name], n_studies=N_STUDIES, seed=seed, image_shape=SHAPE, progress=False
        )
    return out


@pytest.fixture(scope="module")
def ds_a(datasets):
    """Every image of dataset "a": (breast row, dataset read back, display image)."""
    root = datasets["a"]
    _, rows = read_csv(root / "breast-level_annotations.csv")
    items = []
    for row in rows:
        ds = pydicom.dcmread(dicom_path(root, row))
        items.append((row, ds, display(ds)))
    return items


# ------------------------------------------------------------------------------------------------ layout
def test_public_constants():
    assert MARKER in PHANTOM_SERIES_DESCRIPTION
    assert VINDR_FINDING_COLUMNS == EXPECTED_FINDING_COLUMNS
    assert VINDR_BREAST_COLUMNS == EXPECTED_BREAST_COLUMNS


def test_csv_columns_and_layout(datasets):
    root = datasets["a"]
    f_cols, f_rows = read_csv(root / "finding_annotations.csv")
    b_cols, b_rows = read_csv(root / "breast-level_annotations.csv")
    assert f_cols == EXPECTED_FINDING_COLUMNS
    assert b_cols == EXPECTED_BREAST_COLUMNS
    assert len(b_rows) == 4 * N_STUDIES
    hex32 = re.compile(r"^[0-9a-f]{32}$")
    studies = defaultdict(list)
    for row in b_rows:
        assert hex32.match(row["study_id"]) and hex32.match(row["image_id"]) and hex32.match(row["series_id"])
        assert (int(row["height"]), int(row["width"])) == SHAPE
        assert row["split"] in ("training", "test")
        assert re.fullmatch(r"BI-RADS [1-5]", row["breast_birads"])
        assert re.fullmatch(r"DENSITY [ABCD]", row["breast_density"])
        assert dicom_path(root, row).is_file()
        studies[row["study_id"]].append(row)
    assert len(studies) == N_STUDIES
    for rows in studies.values():
        assert sorted((r["laterality"], r["view_position"]) for r in rows) == [
            ("L", "CC"), ("L", "MLO"), ("R", "CC"), ("R", "MLO")]
        assert len({r["split"] for r in rows}) == 1  # split by study
        assert len({r["breast_density"] for r in rows}) == 1
    assert len({r["image_id"] for r in b_rows}) == 4 * N_STUDIES
    # every file on disk is listed; no temporary files left behind
    on_disk = sorted(p.relative_to(root) for p in (root / "images").rglob("*") if p.is_file())
    assert on_disk == sorted(dicom_path(root, r).relative_to(root) for r in b_rows)
    assert not [p for p in root.rglob(".*")]
    # ~test_fraction of the studies (0.2 of 4 -> 1)
    assert sum(rows[0]["split"] == "test" for rows in studies.values()) == 1
    readme = (root / "PHANTOM_README.txt").read_text()
    assert MARKER in readme and "synthetic" in readme.lower() and "not patient data" in readme
    assert "seed: 0" in readme and GENERATOR_VERSION in readme


def test_finding_rows_consistent_with_breast_rows(datasets):
    root = datasets["a"]
    _, f_rows = read_csv(root / "finding_annotations.csv")
    _, b_rows = read_csv(root / "breast-level_annotations.csv")
    by_image = defaultdict(list)
    for row in f_rows:
        by_image[row["image_id"]].append(row)
    assert set(by_image) == {r["image_id"] for r in b_rows}  # every image has >= 1 finding row
    n_masses = Counter()
    for b in b_rows:
        rows = by_image[b["image_id"]]
        for r in rows:
            for key in EXPECTED_BREAST_COLUMNS:
                assert r[key] == b[key], key
        masses = [r for r in rows if r["finding_categories"] == "['Mass']"]
        n_masses[len(masses)] += 1
        if not masses:
            assert len(rows) == 1 and rows[0]["finding_categories"] == "['No Finding']"
            assert all(rows[0][k] == "" for k in ("finding_birads", "xmin", "ymin", "xmax", "ymax"))
            assert b["breast_birads"] in ("BI-RADS 1", "BI-RADS 2")
            continue
        assert len(rows) == len(masses) <= 2
        grades = [int(r["finding_birads"].split()[1]) for r in masses]
        assert all(2 <= g <= 5 for g in grades)
        assert b["breast_birads"] == f"BI-RADS {max(grades)}"
        boxes = [[float(r[k]) for k in ("xmin", "ymin", "xmax", "ymax")] for r in masses]
        h, w = SHAPE
        for x0, y0, x1, y1 in boxes:
            assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
            assert 0.02 * h <= max(x1 - x0, y1 - y0) <= 0.4 * h  # ~2-8% radius, oval/lobulated included
        if len(boxes) == 2:
            (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = boxes
            assert ax1 <= bx0 or bx1 <= ax0 or ay1 <= by0 or by1 <= ay0, "mass boxes overlap"
    assert n_masses[1] > 0 and n_masses[2] > 0 and n_masses[0] > 0
    summary = datasets["a_summary"]
    assert summary["n_images"] == len(b_rows)
    assert summary["n_masses"] == sum(k * v for k, v in n_masses.items())


def test_mass_count_distribution_and_split_fraction(tmp_path):
    summary = generate_phantom_dataset(tmp_path, n_studies=20, seed=5, image_shape=(96, 80), progress=False)
    _, f_rows = read_csv(tmp_path / "finding_annotations.csv")
    _, b_rows = read_csv(tmp_path / "breast-level_annotations.csv")
    per_image = Counter(r["image_id"] for r in f_rows if r["finding_categories"] == "['Mass']")
    counts = Counter(per_image.get(r["image_id"], 0) for r in b_rows)
    assert sum(counts.values()) == 80
    assert 0.1 <= counts[0] / 80 <= 0.45 and 0.3 <= counts[1] / 80 <= 0.7 and 0.08 <= counts[2] / 80 <= 0.45
    test_studies = {r["study_id"] for r in b_rows if r["split"] == "test"}
    assert len(test_studies) == 4  # 0.2 * 20
    assert summary["n_test_studies"] == 4 and summary["n_training_studies"] == 16


# ------------------------------------------------------------------------------------------------ determinism
def test_same_seed_identical_different_seed_different(datasets):
    a, a2, b = datasets["a"], datasets["a_again"], datasets["b"]
    for name in ("finding_annotations.csv", "breast-level_annotations.csv"):
        assert (a / name).read_bytes() == (a2 / name).read_bytes()
        assert (a / name).read_bytes() != (b / name).read_bytes()
    _, rows_a = read_csv(a / "breast-level_annotations.csv")
    _, rows_b = read_csv(b / "breast-level_annotations.csv")
    assert not {r["image_id"] for r in rows_a} & {r["image_id"] for r in rows_b}
    for ra, rb in zip(rows_a, rows_b):
        da, da2 = pydicom.dcmread(dicom_path(a, ra)), pydicom.dcmread(dicom_path(a2, ra))
        db = pydicom.dcmread(dicom_path(b, rb))
        assert np.array_equal(da.pixel_array, da2.pixel_array)
        assert da.SOPInstanceUID == da2.SOPInstanceUID and da.StudyInstanceUID == da2.StudyInstanceUID
        assert da.SOPInstanceUID != db.SOPInstanceUID
        assert not np.array_equal(da.pixel_array, db.pixel_array)
    assert datasets["a_summary"] == {**datasets["a_again_summary"], "output_dir": str(a)}


# ------------------------------------------------------------------------------------------------ DICOM
def test_every_dicom_reads_back_with_mg_tags(ds_a):
    study_uids = defaultdict(set)
    for row, ds, img in ds_a:
        assert ds.Modality == "MG"
        intent = ds.PresentationIntentType
        assert intent in ("FOR PRESENTATION", "FOR PROCESSING")
        expected_sop = MG_PROCESSING if intent == "FOR PROCESSING" else MG_PRESENTATION
        assert ds.SOPClassUID == expected_sop and ds.file_meta.MediaStorageSOPClassUID == expected_sop
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert ds.SamplesPerPixel == 1 and ds.BitsAllocated == 16 and ds.PixelRepresentation == 0
        assert ds.HighBit == ds.BitsStored - 1
        assert (ds.Rows, ds.Columns) == SHAPE
        assert ds.ViewPosition == row["view_position"]
        if "ImageLaterality" in ds:
            assert ds.ImageLaterality == row["laterality"]
        assert ds.BodyPartExamined == "BREAST"
        assert MARKER in ds.SeriesDescription
        assert "SYNTHETIC PHANTOM" in ds.DerivationDescription and "SYNTHETIC PHANTOM" in ds.ImageComments
        assert str(ds.PatientName).startswith("PHANTOM^") and ds.PatientID.startswith("PHANTOM-")
        assert len(ds.PixelSpacing) == 2 and float(ds.ImagerPixelSpacing[0]) > 0
        arr = ds.pixel_array
        assert arr.shape == SHAPE and arr.dtype == np.uint16
        assert int(arr.max()) <= 2 ** ds.BitsStored - 1
        assert img.min() >= 0.0 and img.max() <= 1.0
        study_uids[row["study_id"]].add(ds.StudyInstanceUID)
    assert all(len(uids) == 1 for uids in study_uids.values())
    assert len({ds.SOPInstanceUID for _, ds, _ in ds_a}) == len(ds_a)
    assert len({ds.SeriesInstanceUID for _, ds, _ in ds_a}) == len(ds_a)


def test_lossless_round_trip_matches_generator(datasets):
    """Each written file (compressed or not) decodes exactly to the stored array the generator produced."""
    root = datasets["a"]
    shapes = Counter()
    for s in range(N_STUDIES):
        for i in range(4):
            img = phantom_image(0, s, i, SHAPE)
            path = root / "images" / img.study_id / f"{img.image_id}.dicom"
            ds = pydicom.dcmread(path)
            assert ds.file_meta.TransferSyntaxUID == img.variant.transfer_syntax
            assert np.array_equal(ds.pixel_array, img.stored)
            for m in img.masses:
                shapes[m["shape"]] += 1
                lo, hi = {"round": (2, 3), "oval": (2, 3), "lobulated": (3, 4),
                          "irregular": (4, 5), "spiculated": (4, 5)}[m["shape"]]
                assert lo <= m["birads"] <= hi
    assert set(shapes) == {"round", "oval", "lobulated", "irregular", "spiculated"}


def test_every_variant_present_in_four_studies(ds_a):
    seen = defaultdict(set)
    for row, ds, img in ds_a:
        seen["ts"].add(str(ds.file_meta.TransferSyntaxUID))
        seen["photometric"].add(ds.PhotometricInterpretation)
        seen["bits"].add(int(ds.BitsStored))
        seen["sop"].add(str(ds.SOPClassUID))
        seen["laterality_tag"].add("ImageLaterality" in ds)
        seen["rescale"].add(("RescaleSlope" in ds) and (float(ds.RescaleSlope), float(ds.RescaleIntercept)))
        if "VOILUTSequence" in ds:
            seen["voi"].add("LUT_SEQUENCE")
            assert "WindowCenter" not in ds
            desc = [int(v) for v in ds.VOILUTSequence[0].LUTDescriptor]
            assert desc[2] == 16 and desc[0] > 1
        else:
            assert "WindowCenter" in ds and "WindowWidth" in ds
            if "VOILUTFunction" not in ds:
                seen["voi"].add("IMPLICIT_LINEAR")
            else:
                seen["voi"].add(ds.VOILUTFunction)
            if isinstance(ds.WindowCenter, pydicom.multival.MultiValue):
                assert len(ds.WindowCenter) == len(ds.WindowWidth) == 2
                seen["voi"].add("TWO_WINDOWS")
        if ds.PresentationIntentType == "FOR PROCESSING":
            assert "WindowCenter" in ds and "WindowWidth" in ds
        if "PixelPaddingValue" in ds:
            seen["padding"].add(ds.PhotometricInterpretation)
            arr = ds.pixel_array
            pad = int(ds.PixelPaddingValue)
            maxv = 2 ** ds.BitsStored - 1
            assert pad == (maxv if ds.PhotometricInterpretation == "MONOCHROME1" else 0)
            assert (arr == pad).mean() > 0.1  # the air background
            x0, x1 = (int(0.94 * SHAPE[1]), SHAPE[1]) if row["laterality"] == "L" else (0, int(0.06 * SHAPE[1]))
            assert np.median(arr[:, x0:x1]) == pad
        else:
            seen["padding"].add("none")
    assert seen["ts"] == ALL_TRANSFER_SYNTAXES
    assert seen["photometric"] == {"MONOCHROME1", "MONOCHROME2"}
    assert seen["bits"] == {12, 14, 16}
    assert seen["sop"] == {MG_PRESENTATION, MG_PROCESSING}
    assert seen["laterality_tag"] == {True, False}
    assert False in seen["rescale"] and {(2.0, -1024.0), (0.5, 100.0)} <= seen["rescale"]
    assert seen["voi"] == {"LINEAR", "SIGMOID", "IMPLICIT_LINEAR", "TWO_WINDOWS", "LUT_SEQUENCE"}
    assert seen["padding"] == {"MONOCHROME1", "MONOCHROME2", "none"}
    # the cycle is a function of the global image index only
    assert image_variant(5) == image_variant(5) and image_variant(0) != image_variant(1)


def test_for_processing_stores_an_exposure_signal(ds_a):
    """For-processing images store a raw signal that is high in air (no tissue), low under dense tissue."""
    n = 0
    for row, ds, img in ds_a:
        if ds.PresentationIntentType != "FOR PROCESSING" or "PixelPaddingValue" in ds:
            continue
        arr = ds.pixel_array.astype(np.float64)
        x0, x1 = (int(0.94 * SHAPE[1]), SHAPE[1]) if row["laterality"] == "L" else (0, int(0.06 * SHAPE[1]))
        air = np.median(arr[:, x0:x1])
        assert air > 0.8 * (2 ** ds.BitsStored - 1)
        assert np.median(arr[img > 0.3]) < 0.7 * air
        n += 1
    assert n >= 1


# ------------------------------------------------------------------------------------------------ display
def test_display_orientation_and_air(ds_a):
    for row, ds, img in ds_a:
        h, w = img.shape
        air = air_level(img, row["laterality"])
        assert air < 0.1, (row["image_id"], air)
        left, right = img[:, : w // 2].mean(), img[:, w // 2:].mean()
        if row["laterality"] == "L":
            assert left > right + 0.08, (left, right)
        else:
            assert right > left + 0.08, (left, right)
        # chest-wall edge column is tissue over the breast's middle rows
        chest = img[int(0.4 * h): int(0.6 * h), 0 if row["laterality"] == "L" else w - 1]
        assert chest.mean() > air + 0.2


def test_mlo_has_bright_top_chest_wall_corner(ds_a):
    corners = defaultdict(dict)
    for row, ds, img in ds_a:
        h, w = img.shape
        ch, cw = max(2, int(0.05 * h)), max(2, int(0.05 * w))
        patch = img[:ch, :cw] if row["laterality"] == "L" else img[:ch, w - cw:]
        corners[(row["study_id"], row["laterality"])][row["view_position"]] = float(patch.mean())
    for key, c in corners.items():
        assert c["MLO"] > 0.6, (key, c)
        assert c["CC"] < 0.2, (key, c)  # no pectoral muscle in CC: air in that corner


def test_boxes_inside_breast_and_masses_brighter(datasets, ds_a):
    root = datasets["a"]
    _, f_rows = read_csv(root / "finding_annotations.csv")
    images = {row["image_id"]: (row, img) for row, _, img in ds_a}
    n = 0
    for f in f_rows:
        if f["finding_categories"] != "['Mass']":
            continue
        row, img = images[f["image_id"]]
        h, w = img.shape
        x0, y0, x1, y1 = (float(f[k]) for k in ("xmin", "ymin", "xmax", "ymax"))
        assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
        air = air_level(img, row["laterality"])
        cy, cx = int((y0 + y1) / 2), int((x0 + x1) / 2)
        centre = img[cy - 1: cy + 2, cx - 1: cx + 2].mean()
        assert centre > air + 0.3
        # the whole box lies in the breast: its corners are tissue, not air
        for yy, xx in ((y0, x0), (y0, x1 - 1), (y1 - 1, x0), (y1 - 1, x1 - 1)):
            assert img[int(yy), int(xx)] > air + 0.05
        # the mass is denser than its surroundings: the centre beats a ring just outside the box
        pad = max(3, int(0.3 * max(x1 - x0, y1 - y0)))
        ring = np.zeros_like(img, dtype=bool)
        ring[max(0, int(y0) - pad): int(y1) + pad, max(0, int(x0) - pad): int(x1) + pad] = True
        ring[int(y0): int(y1), int(x0): int(x1)] = False
        assert centre >= img[ring].mean() + 0.02, (f["image_id"], centre, img[ring].mean())
        n += 1
    assert n >= 4


# ------------------------------------------------------------------------------------------------ CLI
def test_cli_writes_dataset(tmp_path):
    out = tmp_path / "cli"
    proc = subprocess.run(
        [sys.executable, "-m", "custom.data.phantom", "--output_dir", str(out), "--n_studies", "1", "--seed", "3",
         "--image_shape", "96", "80", "--no_progress"],
        capture_output=True, text=True, timeout=120, cwd=Path(__file__).resolve().parents[1],
    )
    assert proc.returncode == 0, proc.stderr
    assert '"n_images": 4' in proc.stdout
    cols, rows = read_csv(out / "breast-level_annotations.csv")
    assert cols == EXPECTED_BREAST_COLUMNS and len(rows) == 4
    assert all((int(r["height"]), int(r["width"])) == (96, 80) for r in rows)
    assert "seed: 3" in (out / "PHANTOM_README.txt").read_text()


def test_invalid_arguments(tmp_path):
    with pytest.raises(ValueError):
        generate_phantom_dataset(tmp_path / "x", n_studies=0, progress=False)
    with pytest.raises(ValueError):
        generate_phantom_dataset(tmp_path / "y", n_studies=2, test_fraction=1.5, progress=False)
    assert not (tmp_path / "y" / "finding_annotations.csv").exists()


def test_missing_encoder_falls_back_to_uncompressed_with_a_warning(tmp_path, monkeypatch):
    import custom.data.phantom as phantom

    real = phantom.get_encoder

    class _Missing:
        is_available = False
        missing_dependencies = ["pyjpegls - not installed (simulated)"]

    monkeypatch.setattr(phantom, "get_encoder", lambda uid: _Missing() if uid == "1.2.840.10008.1.2.4.80" else real(uid))
    with pytest.warns(RuntimeWarning, match="JPEG-LS"):
        summary = generate_phantom_dataset(tmp_path, n_studies=1, seed=0, image_shape=(96, 80), progress=False)
    assert "JPEG-LS Lossless Image Compression" not in summary["by_transfer_syntax"]
    img = phantom_image(0, 0, 3, (96, 80))  # image index 3 of study 0 is the JPEG-LS one
    assert img.variant.transfer_syntax == "1.2.840.10008.1.2.4.80"
    ds = pydicom.dcmread(tmp_path / "images" / img.study_id / f"{img.image_id}.dicom")
    assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
    assert np.array_equal(ds.pixel_array, img.stored)
