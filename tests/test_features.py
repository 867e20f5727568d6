"""Tests for custom.features: PyRadiomics extraction, feature files, normalisation."""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from custom.errors import MammoInputError
from custom.features import (
    FEATURE_CLASSES,
    FEATURE_NAMES,
    INTENSITY_SCALE,
    NO_LESION_VECTOR,
    FeatureNormaliser,
    LesionJob,
    extract_features,
    extract_lesion_features,
    normalised_condition,
    read_feature_file,
    read_image_png,
    rows_to_matrix,
    write_feature_csv,
    write_feature_json,
)

PARAMS = Path(__file__).parents[1] / "bundle/configs/radiomics_params.yaml"

# Written out by hand from the PyRadiomics 3.0.1 documentation (non-deprecated features), not from the code; the
# order within a class is PyRadiomics' emission order (checked against a real extractor below): alphabetical by
# method name, hence MeanAbsoluteDeviation before Mean.
EXPECTED_NAMES = [
    "original_shape2D_Elongation", "original_shape2D_MajorAxisLength", "original_shape2D_MaximumDiameter",
    "original_shape2D_MeshSurface", "original_shape2D_MinorAxisLength", "original_shape2D_Perimeter",
    "original_shape2D_PerimeterSurfaceRatio", "original_shape2D_PixelSurface", "original_shape2D_Sphericity",
    "original_firstorder_10Percentile", "original_firstorder_90Percentile", "original_firstorder_Energy",
    "original_firstorder_Entropy", "original_firstorder_InterquartileRange", "original_firstorder_Kurtosis",
    "original_firstorder_Maximum", "original_firstorder_MeanAbsoluteDeviation", "original_firstorder_Mean",
    "original_firstorder_Median", "original_firstorder_Minimum", "original_firstorder_Range",
    "original_firstorder_RobustMeanAbsoluteDeviation", "original_firstorder_RootMeanSquared",
    "original_firstorder_Skewness", "original_firstorder_TotalEnergy", "original_firstorder_Uniformity",
    "original_firstorder_Variance",
    "original_glcm_Autocorrelation", "original_glcm_ClusterProminence", "original_glcm_ClusterShade",
    "original_glcm_ClusterTendency", "original_glcm_Contrast", "original_glcm_Correlation",
    "original_glcm_DifferenceAverage", "original_glcm_DifferenceEntropy", "original_glcm_DifferenceVariance",
    "original_glcm_Id", "original_glcm_Idm", "original_glcm_Idmn", "original_glcm_Idn", "original_glcm_Imc1",
    "original_glcm_Imc2", "original_glcm_InverseVariance", "original_glcm_JointAverage",
    "original_glcm_JointEnergy", "original_glcm_JointEntropy", "original_glcm_MCC",
    "original_glcm_MaximumProbability", "original_glcm_SumAverage", "original_glcm_SumEntropy",
    "original_glcm_SumSquares",
    "original_glszm_GrayLevelNonUniformity", "original_glszm_GrayLevelNonUniformityNormalized",
    "original_glszm_GrayLevelVariance", "original_glszm_HighGrayLevelZoneEmphasis",
    "original_glszm_LargeAreaEmphasis", "original_glszm_LargeAreaHighGrayLevelEmphasis",
    "original_glszm_LargeAreaLowGrayLevelEmphasis", "original_glszm_LowGrayLevelZoneEmphasis",
    "original_glszm_SizeZoneNonUniformity", "original_glszm_SizeZoneNonUniformityNormalized",
    "original_glszm_SmallAreaEmphasis", "original_glszm_SmallAreaHighGrayLevelEmphasis",
    "original_glszm_SmallAreaLowGrayLevelEmphasis", "original_glszm_ZoneEntropy",
    "original_glszm_ZonePercentage", "original_glszm_ZoneVariance",
]


# ----------------------------------------------------------------------------------------------- helpers
def _texture(shape=(64, 64), seed=0) -> np.ndarray:
    """A [0, 1] image quantised to 16 bits exactly as the prepare workflow writes it."""
    rng = np.random.default_rng(seed)
    smooth = np.cumsum(rng.normal(size=shape), axis=1)
    smooth = (smooth - smooth.min()) / (smooth.max() - smooth.min())
    x = 0.7 * smooth + 0.3 * rng.random(shape)
    return np.round(x * 65535).astype(np.uint16) / 65535.0


def _write_png16(path: Path, image01: np.ndarray) -> Path:
    Image.fromarray(np.round(image01 * 65535).astype(np.uint16)).save(path)
    return path


def _write_png8(path: Path, labels: np.ndarray) -> Path:
    Image.fromarray(labels.astype(np.uint8)).save(path)
    return path


def _ellipse(shape, cy, cx, ry, rx) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0


def _make_case(root: Path, case_id: str, seed: int, lesions: list[np.ndarray], shape=(96, 96)) -> LesionJob:
    inst = np.zeros(shape, np.uint8)
    for k, m in enumerate(lesions, start=1):
        inst[m] = k
    img = _write_png16(root / f"{case_id}.png", _texture(shape, seed))
    ins = _write_png8(root / f"{case_id}_inst.png", inst)
    return LesionJob(case_id, img, ins)


def _dataset(root: Path) -> list[LesionJob]:
    s = (96, 96)
    rect = np.zeros(s, bool)
    rect[60:75, 10:30] = True
    return [
        _make_case(root, "case_b", 1, [_ellipse(s, 30, 40, 12, 8), rect]),
        _make_case(root, "case_a", 2, [_ellipse(s, 50, 50, 20, 15)]),
        _make_case(root, "case_c", 3, []),  # no lesion -> no row
        _make_case(root, "case_d", 4, [_ellipse(s, 20, 20, 6, 6), _ellipse(s, 70, 70, 10, 18), rect]),
    ]


def _feature_rows(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        vals = rng.normal(size=len(FEATURE_NAMES)) * 10.0 ** rng.integers(-8, 8, size=len(FEATURE_NAMES))
        rows.append({"case_id": f"c{i // 2}", "lesion_index": i % 2, **dict(zip(FEATURE_NAMES, vals.tolist()))})
    rows[0][FEATURE_NAMES[0]] = 1.0 / 3.0
    rows[0][FEATURE_NAMES[1]] = 5e-324
    rows[0][FEATURE_NAMES[2]] = -0.0
    return rows


# ----------------------------------------------------------------------------------------------- names, params
def test_feature_names_canonical():
    assert list(FEATURE_NAMES) == EXPECTED_NAMES
    assert len(set(FEATURE_NAMES)) == 67
    counts = {c: sum(n.startswith(f"original_{c}_") for n in FEATURE_NAMES) for c in FEATURE_CLASSES}
    assert counts == {"shape2D": 9, "firstorder": 18, "glcm": 24, "glszm": 16}
    assert INTENSITY_SCALE == 255.0


def test_params_file_validates_and_pyradiomics_emits_canonical_order():
    import SimpleITK as sitk
    from radiomics import featureextractor

    ex = featureextractor.RadiomicsFeatureExtractor(str(PARAMS))  # validates against PyRadiomics' schema
    st = ex.settings
    assert (st["force2D"], st["force2Ddimension"], st["label"], st["binWidth"]) == (True, 0, 1, 5)
    assert (st["minimumROIDimensions"], st["minimumROISize"], st["correctMask"]) == (1, 4, False)
    assert st["resampledPixelSpacing"] is None and st["normalize"] is False
    assert ex.enabledImagetypes == {"Original": {}}
    assert set(ex.enabledFeatures) == {"shape2D", "firstorder", "glcm", "glszm"}

    img = _texture((40, 40), 5)
    mask = _ellipse((40, 40), 20, 20, 9, 6)
    raw = ex.execute(sitk.GetImageFromArray(img[None] * 255.0), sitk.GetImageFromArray(mask[None].astype(np.uint8)))
    assert [k for k in raw if not k.startswith("diagnostics")] == EXPECTED_NAMES


def test_invalid_params_file_is_rejected(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(PARAMS.read_text().replace("binWidth: 5", "binWidth: -5"))
    mask = np.zeros((20, 20), bool)
    mask[5:10, 5:10] = True
    with pytest.raises(MammoInputError, match="bad.yaml: not a valid PyRadiomics parameter file"):
        extract_lesion_features(np.full((20, 20), 0.5), mask, bad)


# ----------------------------------------------------------------------------------------------- single lesion
def test_rectangular_lesion_matches_definitions():
    img = _texture((64, 64), 1)
    mask = np.zeros((64, 64), bool)
    mask[10:20, 30:44] = True  # h = 10, w = 14
    f = extract_lesion_features(img, mask, PARAMS)
    assert list(f) == EXPECTED_NAMES
    assert all(isinstance(v, float) and math.isfinite(v) for v in f.values())

    v = img[mask] * 255.0
    h, w = 10, 14
    assert f["original_shape2D_PixelSurface"] == h * w
    # marching-squares contour through the pixel centres' half-way points: corners are cut by half-pixel diagonals
    assert f["original_shape2D_MeshSurface"] == pytest.approx(h * w - 0.5, rel=1e-12)
    assert f["original_shape2D_Perimeter"] == pytest.approx(2 * (h + w) - 4 + 2 * math.sqrt(2), rel=1e-12)
    assert f["original_firstorder_Mean"] == pytest.approx(v.mean(), rel=1e-12)
    assert f["original_firstorder_Minimum"] == pytest.approx(v.min(), rel=1e-12)
    assert f["original_firstorder_Maximum"] == pytest.approx(v.max(), rel=1e-12)
    assert f["original_firstorder_Range"] == pytest.approx(v.max() - v.min(), rel=1e-12)
    assert f["original_firstorder_Median"] == pytest.approx(np.median(v), rel=1e-12)
    assert f["original_firstorder_Variance"] == pytest.approx(v.var(), rel=1e-10)
    # Energy = sum((X + c)^2), voxelArrayShift c = 0; TotalEnergy = pixel area (1) * Energy
    assert f["original_firstorder_Energy"] == pytest.approx(np.sum(v**2), rel=1e-12)
    assert f["original_firstorder_TotalEnergy"] == pytest.approx(np.sum(v**2), rel=1e-12)
    assert f["original_firstorder_RootMeanSquared"] == pytest.approx(np.sqrt(np.mean(v**2)), rel=1e-12)


def test_constant_lesion_texture_values():
    mask = np.zeros((40, 40), bool)
    mask[5:15, 8:22] = True  # 140 pixels, one grey level
    f = extract_lesion_features(np.full((40, 40), 0.4), mask, PARAMS)
    n = 140
    assert f["original_glszm_ZonePercentage"] == pytest.approx(1 / n)  # a single zone of n pixels
    assert f["original_glszm_LargeAreaEmphasis"] == pytest.approx(n**2)
    assert f["original_glszm_SmallAreaEmphasis"] == pytest.approx(1 / n**2)
    assert f["original_glcm_JointEnergy"] == pytest.approx(1.0)
    assert f["original_glcm_Contrast"] == pytest.approx(0.0, abs=1e-12)
    assert f["original_firstorder_Uniformity"] == pytest.approx(1.0)
    assert f["original_firstorder_Mean"] == pytest.approx(0.4 * 255.0)


def test_matches_pyradiomics_on_the_full_image_and_shape_is_intensity_invariant():
    import SimpleITK as sitk
    from radiomics import featureextractor

    img = _texture((80, 80), 7)
    mask = _ellipse((80, 80), 40, 35, 15, 9)
    ours = extract_lesion_features(img, mask, PARAMS)
    ex = featureextractor.RadiomicsFeatureExtractor(str(PARAMS))
    ref = ex.execute(sitk.GetImageFromArray(img[None] * 255.0), sitk.GetImageFromArray(mask[None].astype(np.uint8)))
    np.testing.assert_allclose([ours[n] for n in EXPECTED_NAMES], [float(ref[n]) for n in EXPECTED_NAMES],
                               rtol=1e-12, atol=0)

    # a lesion touching every border of the image (no background around it) still works
    whole = np.ones((12, 9), bool)
    full = extract_lesion_features(img[:12, :9], whole, PARAMS)
    assert full["original_shape2D_PixelSurface"] == 108
    assert full["original_firstorder_Mean"] == pytest.approx(img[:12, :9].mean() * 255.0, rel=1e-12)

    other = extract_lesion_features(1.0 - 0.5 * img, mask, PARAMS)
    shape = [n for n in EXPECTED_NAMES if "_shape2D_" in n]
    assert [ours[n] for n in shape] == [other[n] for n in shape]
    assert ours["original_firstorder_Mean"] != pytest.approx(other["original_firstorder_Mean"])


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("empty", "lesion mask is empty"),
        ("shape", "does not match image shape"),
        ("one_pixel", "PyRadiomics rejected the lesion"),
        ("nan", "non-finite"),
        ("range", r"must lie in \[0, 1\]"),
        ("one_pixel_wide", "unexpected feature set"),
    ],
)
def test_extract_lesion_features_rejects_bad_input(case, message):
    img = _texture((32, 32), 3)
    mask = np.zeros((32, 32), bool)
    mask[10:16, 10:16] = True
    if case == "empty":
        mask[:] = False
    elif case == "shape":
        mask = mask[:, :30]
    elif case == "one_pixel":
        mask[:] = False
        mask[5, 5] = True
    elif case == "nan":
        img = img.copy()
        img[12, 12] = np.nan
    elif case == "range":
        img = img * 2.0 + 0.5
    elif case == "one_pixel_wide":  # a vertical line: PyRadiomics 3.0.1 silently skips shape2D
        mask[:] = False
        mask[5:15, 7] = True
    with pytest.raises(MammoInputError, match=f"lesion_src: .*{message}"):
        extract_lesion_features(img, mask, PARAMS, source="lesion_src")


def test_read_image_png_keeps_rows_first(tmp_path):
    img = np.zeros((20, 30))
    img[2, 25] = 1.0
    back = read_image_png(_write_png16(tmp_path / "i.png", img))
    assert back.shape == (20, 30) and back[2, 25] == 1.0 and back.dtype == np.float64
    with pytest.raises(MammoInputError, match="16-bit"):
        read_image_png(_write_png8(tmp_path / "l.png", np.zeros((4, 4))))


# ----------------------------------------------------------------------------------------------- batch
def test_batch_rows_parallel_equals_serial_and_single(tmp_path):
    jobs = _dataset(tmp_path)
    serial = extract_features(jobs, PARAMS, num_workers=1, progress=False)
    parallel = extract_features(jobs, PARAMS, num_workers=2, progress=False)
    assert serial.failures == [] and parallel.failures == []
    assert [(r["case_id"], r["lesion_index"]) for r in serial.rows] == [
        ("case_a", 0), ("case_b", 0), ("case_b", 1), ("case_d", 0), ("case_d", 1), ("case_d", 2)
    ]
    assert parallel.rows == serial.rows
    assert serial.n_computed == parallel.n_computed == 6 and serial.n_cached == 0
    assert all(list(r)[2:] == EXPECTED_NAMES for r in serial.rows)

    # each row equals the single-lesion function on the decoded files
    job = next(j for j in jobs if j.case_id == "case_d")
    image = np.asarray(Image.open(job.image_path)).astype(np.float64) / 65535.0
    inst = np.asarray(Image.open(job.instances_path))
    expected = extract_lesion_features(image, inst == 3, PARAMS)
    row = next(r for r in serial.rows if (r["case_id"], r["lesion_index"]) == ("case_d", 2))
    assert {k: row[k] for k in EXPECTED_NAMES} == expected
    # the same rectangle in two cases has the same shape features
    row_b = next(r for r in serial.rows if (r["case_id"], r["lesion_index"]) == ("case_b", 1))
    assert row_b["original_shape2D_PixelSurface"] == 15 * 20 == row["original_shape2D_PixelSurface"]


def test_cache_reuses_results(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    jobs = _dataset(data)
    cache = tmp_path / "cache"
    first = extract_features(jobs, PARAMS, cache_dir=cache, num_workers=1, progress=False)
    assert (first.n_computed, first.n_cached) == (6, 0)
    entries = sorted(cache.rglob("*.json"))
    assert len(entries) == 6
    assert not [p for p in cache.rglob("*") if ".tmp" in p.name]  # atomic writes leave no temporaries

    second = extract_features(jobs, PARAMS, cache_dir=cache, num_workers=1, progress=False)
    assert (second.n_computed, second.n_cached) == (0, 6)
    assert second.rows == first.rows

    # a new image for one case -> only its lesion is recomputed; a corrupted entry is recomputed too
    _write_png16(Path(jobs[1].image_path), _texture((96, 96), 99))  # case_a, 1 lesion
    entries[0].write_text("{ not json")
    third = extract_features(jobs, PARAMS, cache_dir=cache, num_workers=1, progress=False)
    assert (third.n_computed, third.n_cached) == (2, 4)
    changed = [r for r, o in zip(third.rows, first.rows) if r != o]
    assert [(r["case_id"], r["lesion_index"]) for r in changed] == [("case_a", 0)]

    # another params file (same settings, different bytes) -> new keys
    params2 = tmp_path / "params2.yaml"
    params2.write_text(PARAMS.read_text() + "\n# edited\n")
    fourth = extract_features(jobs, params2, cache_dir=cache, num_workers=1, progress=False)
    assert (fourth.n_computed, fourth.n_cached) == (6, 0)
    assert fourth.rows == third.rows


def test_failures_are_recorded_and_others_still_extracted(tmp_path):
    s = (64, 64)
    good = _make_case(tmp_path, "good", 1, [_ellipse(s, 20, 20, 8, 8)], shape=s)
    tiny = np.zeros(s, bool)
    tiny[50, 50] = True
    mixed = _make_case(tmp_path, "mixed", 2, [_ellipse(s, 20, 30, 9, 7), tiny], shape=s)
    no_image = _make_case(tmp_path, "no_image", 3, [_ellipse(s, 30, 30, 5, 5)], shape=s)
    Path(no_image.image_path).unlink()
    no_inst = LesionJob("no_inst", good.image_path, tmp_path / "missing_inst.png")
    wrong = _make_case(tmp_path, "wrong_shape", 4, [_ellipse((32, 32), 10, 10, 4, 4)], shape=(32, 32))
    wrong = LesionJob("wrong_shape", good.image_path, wrong.instances_path)

    res = extract_features([good, mixed, no_image, no_inst, wrong], PARAMS, num_workers=2, progress=False)
    assert [(r["case_id"], r["lesion_index"]) for r in res.rows] == [("good", 0), ("mixed", 0)]
    fails = {(f["case_id"], f["lesion_index"]): f for f in res.failures}
    assert set(fails) == {("mixed", 1), ("no_image", 0), ("no_inst", None), ("wrong_shape", 0)}
    assert "mixed_inst.png" in fails[("mixed", 1)]["source"]
    assert "single voxel" in fails[("mixed", 1)]["reason"]
    assert fails[("no_image", 0)]["source"] == str(no_image.image_path)
    assert fails[("no_image", 0)]["reason"] == "image file not found"
    assert fails[("no_inst", None)]["reason"] == "lesion instance map not found"
    assert "does not match image shape" in fails[("wrong_shape", 0)]["reason"]
    assert res.n_computed == 2


@pytest.mark.parametrize("workers", [1, 2])
def test_unexpected_exception_in_one_lesion_is_recorded(tmp_path, monkeypatch, workers):
    import custom.features.radiomics as rad

    real = rad.extract_lesion_features

    def flaky(image, mask, params_file, *, source=None):
        if "instance 2" in str(source):
            raise RuntimeError("boom")
        return real(image, mask, params_file, source=source)

    monkeypatch.setattr(rad, "extract_lesion_features", flaky)  # inherited by forked workers
    s = (48, 48)
    job = _make_case(tmp_path, "flaky", 1, [_ellipse(s, 12, 12, 6, 6), _ellipse(s, 34, 34, 6, 6),
                                             _ellipse(s, 12, 34, 5, 7)], shape=s)
    res = extract_features([job], PARAMS, num_workers=workers, progress=False, mp_context="fork")
    assert [r["lesion_index"] for r in res.rows] == [0, 2]
    assert res.failures == [{"case_id": "flaky", "lesion_index": 1, "source": str(job.image_path),
                             "reason": "RuntimeError: boom"}]


def test_progress_bar_counts_lesions(tmp_path, capsys):
    jobs = _dataset(tmp_path)
    res = extract_features(jobs, PARAMS, num_workers=1, progress=True)
    assert len(res.rows) == 6
    err = capsys.readouterr().err
    assert "radiomics" in err and "6/6" in err


def test_duplicate_case_ids_are_rejected(tmp_path):
    job = _make_case(tmp_path, "x", 1, [_ellipse((32, 32), 10, 10, 4, 4)], shape=(32, 32))
    with pytest.raises(MammoInputError, match="x: duplicate case_id"):
        extract_features([job, job], PARAMS, num_workers=1, progress=False)


# ----------------------------------------------------------------------------------------------- feature files
def test_csv_and_json_round_trip_exactly(tmp_path):
    rows = _feature_rows(5)
    p = write_feature_csv(tmp_path / "f.csv", rows)
    back = read_feature_file(p)
    assert back == rows
    assert math.copysign(1.0, back[0][FEATURE_NAMES[2]]) == -1.0  # -0.0 survives
    with open(p, newline="") as fh:
        header = next(csv.reader(fh))
    assert header == ["case_id", "lesion_index", *EXPECTED_NAMES]

    case_rows = [r for r in rows if r["case_id"] == "c1"]
    lesions = [{"lesion_index": r["lesion_index"], "features": {n: r[n] for n in FEATURE_NAMES}} for r in case_rows]
    pj = write_feature_json(tmp_path / "c1.json", "c1", lesions)
    obj = json.loads(pj.read_text())
    assert obj["case_id"] == "c1" and [les["lesion_index"] for les in obj["lesions"]] == [0, 1]
    assert read_feature_file(pj) == case_rows
    # flat rows are accepted too
    assert read_feature_file(write_feature_json(tmp_path / "c1b.json", "c1", case_rows)) == case_rows

    m = rows_to_matrix(back)
    assert m.shape == (5, 67) and m.dtype == np.float64
    assert m[3, 10] == rows[3][EXPECTED_NAMES[10]]


def _csv_text(rows):
    lines = [",".join(["case_id", "lesion_index", *FEATURE_NAMES])]
    for r in rows:
        lines.append(",".join([r["case_id"], str(r["lesion_index"]), *(repr(r[n]) for n in FEATURE_NAMES)]))
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize(
    ("name", "mutate", "message"),
    [
        ("missing.csv", lambda t: t.replace(",original_glcm_Idmn", "", 1), "missing 1 feature.*original_glcm_Idmn"),
        ("renamed.csv", lambda t: t.replace("original_glcm_Idmn", "original_glcm_Foo", 1),
         "missing 1 feature.*original_glcm_Idmn"),
        ("extra.csv", lambda t: "\n".join(
            line + (",original_glcm_Foo" if i == 0 else ",1.0") for i, line in enumerate(t.splitlines())) + "\n",
         "unknown feature name.*original_glcm_Foo"),
        ("noid.csv", lambda t: t.replace("lesion_index,", "idx,", 1), "missing column 'lesion_index'"),
        ("nan.csv", "nan", "case 'c0' lesion 1.*original_shape2D_MajorAxisLength is nan"),
        ("inf.csv", "inf", "case 'c0' lesion 1.*original_shape2D_MajorAxisLength is inf"),
        ("dup.csv", "dup", "duplicate entry for case 'c0' lesion 0"),
        ("fields.csv", lambda t: t.rstrip("\n") + ",7\n", "garbled CSV: line 4 has 70 fields"),
        ("binary.csv", "binary", "garbled feature file"),
        ("empty.csv", lambda t: "", "empty feature file"),
        ("garbled.json", lambda t: '{"case_id": "c0", "lesions": [', "garbled JSON"),
        ("nolesions.json", lambda t: '{"case_id": "c0"}', "missing 'lesions'"),
        ("features.txt", lambda t: t, "unsupported feature file type"),
    ],
)
def test_bad_feature_files_raise(tmp_path, name, mutate, message):
    rows = _feature_rows(3)
    text = _csv_text(rows)
    path = tmp_path / name
    if mutate == "nan" or mutate == "inf":
        parts = text.split("\n")
        cells = parts[2].split(",")
        cells[3] = mutate
        parts[2] = ",".join(cells)
        path.write_text("\n".join(parts))
    elif mutate == "dup":
        path.write_text(text + text.split("\n")[1] + "\n")
    elif mutate == "binary":
        path.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe\x00\x00garbage")
    else:
        path.write_text(mutate(text))
    with pytest.raises(MammoInputError) as err:
        read_feature_file(path)
    assert str(err.value).startswith(f"{path}: ")
    assert err.value.source == str(path)
    assert re.search(message, err.value.reason), err.value.reason


def test_non_numeric_value_names_case_lesion_and_feature(tmp_path):
    rows = _feature_rows(2)
    lines = _csv_text(rows).split("\n")
    cells = lines[1].split(",")
    cells[2 + 5] = "abc"
    lines[1] = ",".join(cells)
    path = tmp_path / "bad.csv"
    path.write_text("\n".join(lines))
    with pytest.raises(MammoInputError, match=rf"bad.csv: line 2 \(case 'c0' lesion 0\): feature {FEATURE_NAMES[5]} "
                                             r"is not a number \('abc'\)"):
        read_feature_file(path)


def test_bad_json_features(tmp_path):
    rows = _feature_rows(1)
    feats = {n: rows[0][n] for n in FEATURE_NAMES}
    del feats["original_glszm_ZoneVariance"]
    feats["original_glszm_Bogus"] = 1.0
    p = tmp_path / "c.json"
    p.write_text(json.dumps({"case_id": "c0", "lesions": [{"lesion_index": 0, "features": feats}]}))
    with pytest.raises(MammoInputError, match=r"c.json: .*missing 1 feature\(s\): original_glszm_ZoneVariance"):
        read_feature_file(p)
    feats["original_glszm_ZoneVariance"] = float("nan")
    del feats["original_glszm_Bogus"]
    p.write_text(json.dumps({"case_id": "c0", "lesions": [{"lesion_index": 0, "features": feats}]}))
    with pytest.raises(MammoInputError, match="case 'c0' lesion 0.*original_glszm_ZoneVariance is nan"):
        read_feature_file(p)


# ----------------------------------------------------------------------------------------------- normaliser
def _hand_matrix() -> np.ndarray:
    m = np.tile(np.arange(5, dtype=np.float64)[:, None], (1, 67))  # 0..4 in every column
    m[:, 0] = [1, 2, 3, 4, 10]
    m[:, 1] = [-5, -5, -5, -5, -5]  # constant feature
    m[:, 2] = [0.5, 0.25, 1.0, 0.75, 0.0]
    return m


def test_normaliser_fit_statistics():
    norm = FeatureNormaliser().fit(_hand_matrix())
    assert norm.n_fit == 5
    assert (norm.min[0], norm.max[0], norm.median[0], norm.q25[0], norm.q75[0]) == (1, 10, 3, 2, 4)
    assert norm.mean[0] == 4.0 and norm.std[0] == pytest.approx(math.sqrt(10.0))  # ((9+4+1+0+36)/5) = 10
    assert (norm.min[1], norm.max[1], norm.std[1]) == (-5, -5, 0)
    assert (norm.min[2], norm.max[2], norm.median[2], norm.q25[2], norm.q75[2]) == (0, 1, 0.5, 0.25, 0.75)
    assert all(a.dtype == np.float64 and a.shape == (67,) for a in (norm.min, norm.max, norm.mean, norm.std))
    # rows are accepted as well
    rows = [{"case_id": "c", "lesion_index": i, **dict(zip(FEATURE_NAMES, r))} for i, r in enumerate(_hand_matrix())]
    assert np.array_equal(FeatureNormaliser().fit(rows).median, norm.median)


def test_normaliser_transform_and_clipping():
    m = _hand_matrix()
    norm = FeatureNormaliser().fit(m)
    y, report = norm.transform(m)
    assert y.dtype == np.float32 and y.shape == (5, 67)
    assert y.min() >= 0.0 and y.max() <= 1.0
    assert not report.clipped and report.n_clipped == 0
    assert y[:, 0] == pytest.approx([0, 1 / 9, 2 / 9, 3 / 9, 1])
    assert np.all(y[:, 1] == 0.0)  # constant feature -> 0
    assert y[:, 5] == pytest.approx([0, 0.25, 0.5, 0.75, 1.0])

    x = m[0].copy()
    x[0] = 20.0  # above max
    x[2] = -1.0  # below min
    x[1] = -4.0  # constant feature, above
    v, rep = norm.transform(x)
    assert v.shape == (67,) and v.dtype == np.float32
    assert (v[0], v[2], v[1]) == (1.0, 0.0, 0.0)
    assert rep.clipped_above == {FEATURE_NAMES[0]: 1, FEATURE_NAMES[1]: 1}
    assert rep.clipped_below == {FEATURE_NAMES[2]: 1}
    assert rep.n_clipped == 3 and FEATURE_NAMES[0] in rep.summary()

    with pytest.raises(MammoInputError, match="shape"):
        norm.transform(np.zeros(66))
    bad = m[0].copy()
    bad[4] = np.nan
    with pytest.raises(MammoInputError, match=FEATURE_NAMES[4]):
        norm.transform(bad)


def test_normaliser_save_load_and_tamper(tmp_path):
    norm = FeatureNormaliser().fit(_hand_matrix() * 1.37 + 0.1)
    path = norm.save(tmp_path / "norm.json")
    obj = json.loads(path.read_text())
    assert obj["feature_names"] == EXPECTED_NAMES and "no_lesion_vector" in obj and "pyradiomics_version" in obj
    loaded = FeatureNormaliser.load(path)
    for s in ("min", "max", "median", "q25", "q75", "mean", "std"):
        assert np.array_equal(getattr(loaded, s), getattr(norm, s)), s
    assert loaded.n_fit == 5
    probe = np.linspace(-1, 8, 67)
    assert np.array_equal(loaded.transform(probe)[0], norm.transform(probe)[0])

    def tampered(fn, name):
        o = json.loads(path.read_text())
        fn(o)
        p = tmp_path / name
        p.write_text(json.dumps(o))
        return p

    cases = [
        (tampered(lambda o: o["statistics"]["max"].__setitem__(3, 99.0), "value.json"), "checksum mismatch"),
        (tampered(lambda o: o["feature_names"].__setitem__(0, "original_shape2D_Foo"), "name.json"),
         "unknown \\['original_shape2D_Foo'\\]"),
        (tampered(lambda o: o["statistics"]["min"].pop(), "short.json"), "statistics.min must be a list of 67"),
        (tampered(lambda o: o["statistics"]["min"].__setitem__(0, 1e9), "order.json"), "statistics.min > "),
        (tampered(lambda o: o["statistics"]["std"].__setitem__(0, "x"), "type.json"), "not a finite number"),
    ]
    trunc = tmp_path / "trunc.json"
    trunc.write_text(path.read_text()[:200])
    cases.append((trunc, "garbled normaliser file"))
    for p, msg in cases:
        with pytest.raises(MammoInputError, match=f"{p.name}: .*{msg}"):
            FeatureNormaliser.load(p)


def test_no_lesion_vector_and_condition():
    assert NO_LESION_VECTOR.shape == (67,) and NO_LESION_VECTOR.dtype == np.float32
    assert not NO_LESION_VECTOR.any()
    norm = FeatureNormaliser().fit(_hand_matrix())
    assert np.array_equal(normalised_condition([], norm), np.zeros((1, 67), np.float32))
    rows = [{"case_id": "c", "lesion_index": i, **dict(zip(FEATURE_NAMES, r))} for i, r in enumerate(_hand_matrix())]
    cond = normalised_condition(rows[::-1][:2], norm)  # lesions 4 and 3, returned sorted by lesion_index
    assert cond.shape == (2, 67) and cond[1, 0] == 1.0 and cond[0, 0] == pytest.approx(3 / 9)


def test_end_to_end_extract_write_read_normalise(tmp_path):
    jobs = _dataset(tmp_path)
    res = extract_features(jobs, PARAMS, num_workers=1, progress=False)
    p = write_feature_csv(tmp_path / "features.csv", res.rows)
    rows = read_feature_file(p)
    assert rows == res.rows
    norm = FeatureNormaliser().fit(rows)
    y, rep = norm.transform(rows_to_matrix(rows))
    assert y.shape == (6, 67) and 0.0 <= y.min() and y.max() <= 1.0 and not rep.clipped
