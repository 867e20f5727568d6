"""The ``prepare`` workflow end to end on a small phantom dataset (the VinDr-Mammo code path)."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from conftest import RADIOMICS_PARAMS, REPO
from custom.data.prepare import PrepareWorkflow, load_display_image
from custom.features.radiomics import FEATURE_NAMES
from custom.transforms import MammoGeometry, breast_mask


def _datalist(prepared):
    return json.loads((prepared / "datalist.json").read_text())


def test_outputs_are_model_ready(prepared_dir):
    datalist = _datalist(prepared_dir)
    assert set(datalist) == {"training", "validation", "test"}
    entries = [e for split in datalist.values() for e in split]
    assert entries and all(e["split"] == s for s, v in datalist.items() for e in v)
    for e in entries:
        img = np.asarray(Image.open(prepared_dir / e["image"]))
        lab = np.asarray(Image.open(prepared_dir / e["label"]))
        inst = np.asarray(Image.open(prepared_dir / e["lesions"]))
        assert img.dtype == np.uint16 and img.shape == (64, 64)
        assert lab.dtype == np.uint8 and set(np.unique(lab)) <= {0, 1, 2} and (lab == 1).any()
        assert inst.max() == e["num_lesions"] and np.array_equal(inst > 0, lab == 2)
        assert e["laterality"] in ("L", "R") and "PHANTOM" not in json.dumps(e)  # no patient identifiers
        # all breasts face the same side: more tissue in the left half
        assert (lab[:, :32] > 0).sum() > (lab[:, 32:] > 0).sum()
    assert (prepared_dir / "preview.png").stat().st_size > 1000


def test_split_is_by_study_and_keeps_the_dataset_test_split(prepared_dir, phantom_dir):
    datalist = _datalist(prepared_dir)
    studies = {s: {e["study_id"] for e in v} for s, v in datalist.items()}
    assert not (studies["training"] & studies["validation"]) and not (studies["training"] & studies["test"])
    assert not (studies["validation"] & studies["test"])
    with open(phantom_dir / "breast-level_annotations.csv") as f:
        dataset_split = {r["image_id"]: r["split"] for r in csv.DictReader(f)}
    for split, entries in datalist.items():
        for e in entries:
            assert (dataset_split[e["case_id"]] == "test") == (split == "test")


def test_feature_file_matches_lesions_and_normaliser_is_fitted_on_training_only(prepared_dir):
    datalist = _datalist(prepared_dir)
    with open(prepared_dir / "features.csv") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == ["case_id", "lesion_index", *FEATURE_NAMES]
        rows = list(reader)
    lesions = {(e["case_id"], i) for v in datalist.values() for e in v for i in range(e["num_lesions"])}
    assert {(r["case_id"], int(r["lesion_index"])) for r in rows} == lesions
    train_ids = {e["case_id"] for e in datalist["training"]}
    train = np.array([[float(r[n]) for n in FEATURE_NAMES] for r in rows if r["case_id"] in train_ids])
    norm = json.loads((prepared_dir / "feature_normalisation.json").read_text())
    text = json.dumps(norm)
    assert str(len(train)) in text  # n_fit is the number of training lesions
    from custom.features.normalisation import FeatureNormaliser

    fitted = FeatureNormaliser.load(prepared_dir / "feature_normalisation.json")
    np.testing.assert_allclose(fitted.min, train.min(axis=0))
    np.testing.assert_allclose(fitted.max, train.max(axis=0))


def test_recorded_geometry_maps_back_to_the_source(prepared_dir, phantom_dir):
    entry = next(e for v in _datalist(prepared_dir).values() for e in v if e["num_lesions"] and e["laterality"] == "R")
    geom = MammoGeometry.from_dict(entry["geometry"])
    source, _ = load_display_image(entry["source_image"])
    lab = np.asarray(Image.open(prepared_dir / entry["label"]))
    back = geom.invert_image((lab > 0).astype(np.float32)[None], "mask")[0].numpy() > 0
    truth = breast_mask(source)
    assert back.shape == source.shape
    assert (back & truth).sum() / (back | truth).sum() > 0.9
    # the CSV's lesion box mapped through the geometry lands on the prepared lesion
    with open(phantom_dir / "finding_annotations.csv") as f:
        boxes = [[float(r[k]) for k in ("xmin", "ymin", "xmax", "ymax")]
                 for r in csv.DictReader(f) if r["image_id"] == entry["case_id"]]
    mapped = geom.apply_boxes(boxes)
    got = np.array([f["box"] for f in entry["findings"]], dtype=float)
    np.testing.assert_allclose(mapped, got, atol=1.5)


def test_rerun_reuses_finished_cases_and_the_radiomics_cache(prepared_dir):
    before = {p: p.stat().st_mtime_ns for p in (prepared_dir / "images").iterdir()}
    summary = PrepareWorkflow(str(json.loads((prepared_dir / "summary.json").read_text())["dataset_dir"]),
                              str(prepared_dir), str(RADIOMICS_PARAMS), image_size=64, num_workers=1,
                              progress=False, preview_cases=0).run()
    assert summary["cases_reused"] == summary["cases_prepared"] > 0
    assert summary["radiomics"]["computed"] == 0 and summary["radiomics"]["cached"] == summary["radiomics"]["lesions"]
    assert {p: p.stat().st_mtime_ns for p in (prepared_dir / "images").iterdir()} == before


def test_bad_inputs_are_reported_skips_and_nothing_is_half_written(phantom_dir, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(phantom_dir, data)
    with open(data / "finding_annotations.csv") as f:
        rows = list(csv.DictReader(f))
    files = sorted((data / "images").rglob("*.dicom"))
    truncated, ct, no_pixels = files[0], files[1], files[2]
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])  # cut inside the pixel data
    ds = pydicom.dcmread(ct)
    ds.Modality, ds.SOPClassUID = "CT", "1.2.840.10008.5.1.4.1.1.2"
    ds.save_as(ct)
    ds = pydicom.dcmread(no_pixels)
    del ds.PixelData
    ds.save_as(no_pixels)
    # a lesion box placed in the air, outside the breast
    victim = next(r for r in rows if r["finding_categories"] == "['Mass']" and Path(r["image_id"]).name not in
                  {p.stem for p in (truncated, ct, no_pixels)})
    side = victim["laterality"]
    w = float(victim["width"])
    x0 = w - 30 if side == "L" else 5
    victim.update(xmin=x0, xmax=x0 + 20, ymin=5, ymax=25)
    with open(data / "finding_annotations.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    out = tmp_path / "out"
    summary = PrepareWorkflow(str(data), str(out), str(RADIOMICS_PARAMS), image_size=48, num_workers=2,
                              progress=False, preview_cases=0).run()
    reasons = {s["case_id"]: (s["source"], s["reason"]) for s in summary["skipped"]}
    assert "cannot decode pixel data" in reasons[truncated.stem][1] and str(truncated) == reasons[truncated.stem][0]
    assert "not a mammogram: Modality is 'CT'" in reasons[ct.stem][1]
    assert "no pixel data" in reasons[no_pixels.stem][1]
    assert "outside the breast" in reasons[victim["image_id"]][1]
    listed = {e["case_id"] for v in _datalist(out).values() for e in v}
    assert not listed & set(reasons)
    for bad in reasons:
        assert not (out / "images" / f"{bad}.png").exists() and not (out / "records" / f"{bad}.json").exists()
    assert not [p for p in out.rglob("*") if ".tmp" in p.name]
    assert summary["cases_prepared"] == len(listed) == summary["cases_found"] - 4


def test_bundle_cli_runs_prepare(phantom_dir, tmp_path):
    out = tmp_path / "cli"
    cmd = [sys.executable, "-m", "monai.bundle", "run", "prepare", "--config_file", "bundle/configs/prepare.json",
           "--dataset_dir", str(phantom_dir), "--output_dir", str(out), "--image_size", "32",
           "--normalisation_copy", "None", "--progress", "False", "--preview_cases", "0"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["settings"]["image_size"] == 32 and summary["cases_prepared"] > 0
    assert "training" in proc.stdout and "radiomics:" in proc.stdout
    assert not (REPO / "bundle" / "models" / "None").exists()
