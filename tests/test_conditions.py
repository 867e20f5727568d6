"""Conditions for inference: every mask form, feature file / reference lesion, and every rejected input."""

from __future__ import annotations

import csv
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from conftest import RADIOMICS_PARAMS
from custom.data.conditions import build_conditions
from custom.data.prepare import load_display_image
from custom.errors import MammoInputError
from custom.features import FEATURE_NAMES, FeatureNormaliser, extract_lesion_features, write_feature_csv, write_feature_json
from custom.transforms import breast_mask, compute_geometry, lesion_instances_from_boxes

S = 64
H, W = 200, 160
BOX_TOP = [40, 50, 70, 74]  # xmin, ymin, xmax, ymax: the upper lesion (lesion_index 0)
BOX_LOW = [20, 120, 44, 140]  # the lower lesion, further left (lesion_index 1 by first-pixel row-major order)


# ---------------------------------------------------------------------------------------------------- helpers
def breast_shape(h=H, w=W, right=False) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    b = ((yy - h / 2) / (0.45 * h)) ** 2 + (xx / (0.75 * w)) ** 2 < 1
    return b[:, ::-1].copy() if right else b


def save_png(path: Path, arr) -> Path:
    Image.fromarray(np.asarray(arr)).save(path)
    return path


def save_nifti(path: Path, arr) -> Path:
    nib.save(nib.Nifti1Image(np.asarray(arr).T.astype(np.uint8), np.eye(4)), str(path))  # axis 0 = columns
    return path


def raw_rows(case_id: str, n: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"case_id": case_id, "lesion_index": i, **dict(zip(FEATURE_NAMES, rng.uniform(1, 100, 67)))}
            for i in range(n)]


@pytest.fixture(scope="module")
def norm_file(tmp_path_factory) -> Path:
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("norm") / "feature_normalisation.json"
    FeatureNormaliser().fit(rng.uniform(0, 120, (20, 67))).save(path)
    return path


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """A source-size left breast with two elliptic lesions, in every mask form, and feature files."""
    d = tmp_path_factory.mktemp("case")
    breast = breast_shape()
    inst = lesion_instances_from_boxes((H, W), [BOX_TOP, BOX_LOW])
    for k, box in ((1, BOX_TOP), (2, BOX_LOW)):  # the drawn ellipse's bounding box is the box itself
        rows, cols = np.nonzero(inst == k)
        assert [cols.min(), rows.min(), cols.max() + 1, rows.max() + 1] == box
    label = breast.astype(np.uint8)
    label[inst > 0] = 2
    files = {
        "label": save_png(d / "label.png", label),
        "breast": save_png(d / "breast.png", breast.astype(np.uint8) * 255),
        "lesion": save_png(d / "lesion.png", (inst > 0).astype(np.uint8) * 255),
        "instances": save_png(d / "instances.png", inst.astype(np.uint8)),
        "breast_nii": save_nifti(d / "breast.nii.gz", breast),
        "instances_nii": save_nifti(d / "instances.nii.gz", np.where(inst == 1, 7, np.where(inst == 2, 9, 0))),
    }
    two_cases = raw_rows("case-a", 2, 1) + raw_rows("case-b", 2, 2)
    write_feature_csv(d / "two_cases.csv", two_cases)
    files["csv"] = d / "two_cases.csv"
    files["rows"] = {"case-a": two_cases[:2], "case-b": two_cases[2:]}
    return {"dir": d, "breast_array": breast, "inst": inst, **files}


def build(norm_file, **kw):
    return build_conditions(image_size=S, normaliser_file=norm_file, **kw)


def iou(a, b) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


# ---------------------------------------------------------------------------------------------------- mask forms
def test_every_mask_form_gives_the_same_conditions(case, norm_file):
    feats = dict(feature_file=case["csv"], feature_case_id="case-b")
    forms = {
        "label_map": build(norm_file, mask_file=case["label"], lesion_mask_file=case["instances"], **feats),
        "breast_and_lesion_masks": build(norm_file, breast_mask_file=case["breast"], lesion_mask_file=case["instances"], **feats),
        "breast_mask_and_box": build(norm_file, breast_mask_file=case["breast"], lesion_box=[BOX_TOP, BOX_LOW], **feats),
        "nifti_instance_map": build(norm_file, breast_mask_file=case["breast_nii"], lesion_mask_file=case["instances_nii"], **feats),
    }
    ref = forms["label_map"]
    assert ref.label.shape == (S, S) and ref.label.dtype == np.uint8 and set(np.unique(ref.label)) == {0, 1, 2}
    assert ref.lesion_masks.shape == (2, S, S) and ref.lesion_masks.dtype == np.float32
    assert ref.num_lesions == 2 and ref.lesion_present.tolist() == [1.0, 1.0]
    assert np.array_equal(ref.lesion_masks.sum(axis=0) > 0, ref.label == 2)
    assert ref.geometry is not None and ref.geometry.source_shape == (H, W) and not ref.geometry.flip
    for mode, c in forms.items():
        assert c.source["mask"]["mode"] == (mode if mode != "nifti_instance_map" else "breast_and_lesion_masks")
        assert np.array_equal(c.label, ref.label), mode
        assert np.array_equal(c.lesion_masks, ref.lesion_masks), mode
        assert np.array_equal(c.features, ref.features), mode
        assert c.geometry == ref.geometry, mode
    # slot 0 holds instance 1 (BOX_TOP, lesion_index 0), slot 1 instance 2
    top = [np.nonzero(m)[0].min() for m in ref.lesion_masks]
    assert top[0] < top[1]


def test_source_size_masks_map_through_the_geometry_and_back(tmp_path, norm_file):
    breast = breast_shape(right=True)
    box = [W - 70, 60, W - 40, 84]
    inst = lesion_instances_from_boxes((H, W), [box])
    save_png(tmp_path / "b.png", breast.astype(np.uint8))
    src = _write_mg(tmp_path / "src.dcm", H, W, laterality="R")
    rows = raw_rows("x", 1, 3)
    write_feature_csv(tmp_path / "f.csv", rows)
    c = build(norm_file, breast_mask_file=tmp_path / "b.png", lesion_box=box, feature_file=tmp_path / "f.csv",
              source_image=src)
    g = c.geometry
    assert g.flip and c.source["mask"]["laterality"] == "R" and c.source["mask"]["laterality_source"] == "source_image_tag"
    # model frame: the chest wall is on the left like the prepared training data
    assert (c.label[:, : S // 2] > 0).sum() > (c.label[:, S // 2 :] > 0).sum()
    back_breast = g.invert_image((c.label > 0).astype(np.float32)[None], "mask")[0].numpy() > 0
    back_lesion = g.invert_image(c.lesion_masks[:1], "mask")[0].numpy() > 0
    assert back_breast.shape == (H, W)
    assert iou(back_breast, breast | (inst > 0)) > 0.95
    assert iou(back_lesion, inst > 0) > 0.8
    # the box maps onto the model lesion's box
    got = np.array(c.lesions()[0]["box"], dtype=float)
    np.testing.assert_allclose(g.apply_boxes([box])[0], got, atol=1.5)
    # the laterality argument overrides the tag (and the disagreement with the content is recorded)
    c2 = build(norm_file, breast_mask_file=tmp_path / "b.png", lesion_box=box, feature_file=tmp_path / "f.csv",
               laterality="L")
    assert not c2.geometry.flip and c2.source["mask"]["laterality_source"] == "argument"
    assert c2.source["mask"]["laterality_conflict"] is True


def test_model_size_masks_are_used_as_is(tmp_path, norm_file):
    breast = breast_shape(S, S)
    inst = lesion_instances_from_boxes((S, S), [[10, 20, 20, 28]])
    label = breast.astype(np.uint8)
    label[inst > 0] = 2
    save_png(tmp_path / "label.png", label)
    save_nifti(tmp_path / "breast.nii", breast)
    save_nifti(tmp_path / "lesion.nii", inst > 0)
    c = build(norm_file, mask_file=tmp_path / "label.png", feature_file=_csv(tmp_path, 1), max_lesions=3)
    assert c.geometry is None and c.source["mask"]["frame"] == "model"
    assert np.array_equal(c.label, label) and c.lesion_masks.shape == (3, S, S)
    assert np.array_equal(c.lesion_masks[0] > 0, inst > 0) and not c.lesion_masks[1:].any()
    assert c.lesion_present.tolist() == [1.0, 0.0, 0.0] and not c.features[1:].any()
    c2 = build(norm_file, breast_mask_file=tmp_path / "breast.nii", lesion_mask_file=tmp_path / "lesion.nii",
               feature_file=_csv(tmp_path, 1), max_lesions=3)
    assert np.array_equal(c2.label, label)
    # a breast without lesion: zero features, no lesion slot used
    c3 = build(norm_file, breast_mask_file=tmp_path / "breast.nii")
    assert c3.num_lesions == 0 and not c3.features.any() and set(np.unique(c3.label)) == {0, 1}
    batch = c.to_batch()
    assert batch["label"].shape == (1, 1, S, S) and batch["features"].shape == (1, 3, 67)


def test_instance_ids_order_lesions_and_rows_pair_by_lesion_index(tmp_path, norm_file):
    breast = breast_shape(S, S)
    inst = np.zeros((S, S), dtype=np.uint8)
    inst[lesion_instances_from_boxes((S, S), [[8, 40, 16, 48]]) > 0] = 3  # lower lesion: smaller id -> index 0
    inst[lesion_instances_from_boxes((S, S), [[20, 12, 30, 20]]) > 0] = 8
    save_png(tmp_path / "b.png", breast.astype(np.uint8))
    save_png(tmp_path / "i.png", inst)
    rows = raw_rows("c", 2, 5)
    write_feature_csv(tmp_path / "f.csv", rows[::-1])  # file order must not matter, lesion_index does
    norm = FeatureNormaliser.load(norm_file)
    c = build(norm_file, breast_mask_file=tmp_path / "b.png", lesion_mask_file=tmp_path / "i.png",
              feature_file=tmp_path / "f.csv")
    assert c.source["mask"]["lesion_order"] == "instance_ids"
    assert np.array_equal(c.lesion_masks[0] > 0, inst == 3) and np.array_equal(c.lesion_masks[1] > 0, inst == 8)
    for i in range(2):
        np.testing.assert_array_equal(c.features[i], norm.transform(np.array([rows[i][n] for n in FEATURE_NAMES]))[0])
        assert c.raw_features[i]["lesion_index"] == i
    # the same mask as a binary mask: the lesions have no identity, so different rows cannot be paired with them
    save_png(tmp_path / "bin.png", (inst > 0).astype(np.uint8))
    with pytest.raises(MammoInputError, match="without identity") as err:
        build(norm_file, breast_mask_file=tmp_path / "b.png", lesion_mask_file=tmp_path / "bin.png",
              feature_file=tmp_path / "f.csv")
    assert err.value.source == str(tmp_path / "bin.png")
    # ... but one row repeated for every lesion (a preset) pairs the same in any order: lesions by first pixel
    write_feature_csv(tmp_path / "same.csv", [dict(rows[0], lesion_index=i) for i in range(2)])
    c2 = build(norm_file, breast_mask_file=tmp_path / "b.png", lesion_mask_file=tmp_path / "bin.png",
               feature_file=tmp_path / "same.csv")
    assert c2.source["mask"]["lesion_order"] == "components"
    assert np.array_equal(c2.lesion_masks[0] > 0, inst == 8) and np.array_equal(c2.lesion_masks[1] > 0, inst == 3)


# ---------------------------------------------------------------------------------------------------- features
def test_feature_file_selection_and_normalisation(case, norm_file, tmp_path):
    norm = FeatureNormaliser.load(norm_file)
    for cid in ("case-a", "case-b"):
        c = build(norm_file, mask_file=case["label"], lesion_mask_file=case["instances"], feature_file=case["csv"], feature_case_id=cid)
        expected_raw = np.array([[r[n] for n in FEATURE_NAMES] for r in case["rows"][cid]])
        got_raw = np.array([[r[n] for n in FEATURE_NAMES] for r in c.raw_features])
        np.testing.assert_array_equal(got_raw, expected_raw)
        y, report = norm.transform(expected_raw)
        np.testing.assert_array_equal(c.features, y)
        assert c.clipping == report.to_dict() and c.source["features"]["feature_case_id"] == cid
        assert c.features.dtype == np.float32 and (0 <= c.features).all() and (c.features <= 1).all()
    # JSON, one case, no feature_case_id needed; a value above the training max is clipped and reported
    rows = raw_rows("only", 2, 9)
    rows[1]["original_firstorder_Mean"] = 1e6
    write_feature_json(tmp_path / "one.json", "only", rows)
    c = build(norm_file, mask_file=case["label"], lesion_mask_file=case["instances"], feature_file=tmp_path / "one.json")
    assert c.features[1, FEATURE_NAMES.index("original_firstorder_Mean")] == 1.0
    assert c.clipping["clipped_above"].get("original_firstorder_Mean") == 1
    np.testing.assert_array_equal(c.features, norm.transform(rows)[0])


def test_reference_lesion_features_match_the_prepare_pipeline(tmp_path, norm_file, case):
    # a 16-bit PNG reference mammogram (right breast, so the flip is exercised) with one dense lesion
    rng = np.random.default_rng(4)
    h, w = 180, 150
    breast = breast_shape(h, w, right=True)
    lesion = lesion_instances_from_boxes((h, w), [[w - 70, 70, w - 40, 100]]) > 0
    img = np.where(breast, 0.35 + 0.05 * rng.standard_normal((h, w)), 0.02)
    img[lesion] += 0.25 + 0.05 * rng.standard_normal(int(lesion.sum()))
    save_png(tmp_path / "ref.png", np.round(np.clip(img, 0, 1) * 65535).astype(np.uint16))
    save_png(tmp_path / "ref_lesion.png", lesion.astype(np.uint8) * 255)
    bm = breast_shape(S, S)
    lab = bm.astype(np.uint8)
    lab[lesion_instances_from_boxes((S, S), [[10, 20, 22, 30]]) > 0] = 2
    save_png(tmp_path / "target.png", lab)
    c = build(norm_file, mask_file=tmp_path / "target.png", reference_image=tmp_path / "ref.png",
              reference_lesion_mask=tmp_path / "ref_lesion.png", params_file=RADIOMICS_PARAMS)
    assert c.source["features"]["mode"] == "reference_lesion" and len(c.raw_features) == 1
    got = np.array([c.raw_features[0][n] for n in FEATURE_NAMES])
    assert got.shape == (67,) and np.isfinite(got).all()
    # the documented steps, done here independently: display image, breast, flip/crop/resize, 16-bit quantisation
    image, _ = load_display_image(tmp_path / "ref.png")
    region = breast_mask(image) | lesion
    geom, _ = compute_geometry(region, None, S, 0.02)
    assert geom.flip
    stored = np.round(geom.apply_image(image[None])[0].numpy().clip(0.0, 1.0) * 65535.0).astype(np.uint16)
    prepared = stored.astype(np.float64) / 65535.0  # what prepare writes and the radiomics step reads back
    lesion_out = geom.apply_image(lesion.astype(np.float32)[None], "mask")[0].numpy() > 0
    expected = extract_lesion_features(prepared, lesion_out, RADIOMICS_PARAMS)
    np.testing.assert_array_equal(got, np.array([expected[n] for n in FEATURE_NAMES]))
    np.testing.assert_array_equal(c.features[0], FeatureNormaliser.load(norm_file).transform(got)[0])
    # a reference with one lesion cannot condition a mask with two
    with pytest.raises(MammoInputError) as err:
        build(norm_file, mask_file=case["label"], reference_image=tmp_path / "ref.png",
              reference_lesion_mask=tmp_path / "ref_lesion.png", params_file=RADIOMICS_PARAMS)
    assert "ref_lesion.png" in str(err.value) and "1 reference lesion(s) but 2 lesion(s)" in str(err.value)


# ---------------------------------------------------------------------------------------------------- bad inputs
def _csv(d: Path, n: int, name: str = "f.csv", case_id: str = "c") -> Path:
    write_feature_csv(d / name, raw_rows(case_id, n, 11))
    return d / name


def _write_mg(path: Path, h: int, w: int, laterality: str | None = "L") -> Path:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.2"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "MG"
    if laterality:
        ds.ImageLaterality = laterality
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = h, w
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = np.zeros((h, w), dtype="<u2").tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def _bad(norm_file, **kw) -> str:
    with pytest.raises(MammoInputError) as err:
        build(norm_file, **kw)
    return str(err.value)


def test_every_bad_input_is_named_and_explained(case, norm_file, tmp_path):
    d = tmp_path
    breast = breast_shape()
    lab_no_lesion = save_png(d / "no_lesion.png", breast.astype(np.uint8))
    f1, f2 = _csv(d, 1, "one.csv"), _csv(d, 2, "two.csv")

    # features given, but no lesion in the mask
    msg = _bad(norm_file, mask_file=lab_no_lesion, feature_file=f1)
    assert "one.csv" in msg and "no_lesion.png" in msg and "has no lesion" in msg
    # lesions in the mask, but no features
    msg = _bad(norm_file, mask_file=case["label"])
    assert "label.png" in msg and "2 lesion(s) but no lesion features" in msg
    # counts differ
    msg = _bad(norm_file, mask_file=case["label"], feature_file=f1)
    assert "one.csv" in msg and "1 feature row(s) but 2 lesion(s)" in msg and "label.png" in msg
    # unknown and missing feature names reach the user with the names listed
    with open(f2) as f:
        text = f.read()
    (d / "unknown.csv").write_text(text.replace("original_glcm_Idmn", "original_glcm_Bogus", 1))
    msg = _bad(norm_file, mask_file=case["label"], feature_file=d / "unknown.csv")
    assert "unknown.csv" in msg and "original_glcm_Idmn" in msg  # reported missing ...
    rows = list(csv.reader(text.splitlines()))
    keep = [i for i, h in enumerate(rows[0]) if h != "original_shape2D_Sphericity"]
    (d / "missing.csv").write_text("\n".join(",".join(r[i] for i in keep) for r in rows) + "\n")
    msg = _bad(norm_file, mask_file=case["label"], feature_file=d / "missing.csv")
    assert "missing.csv" in msg and "missing 1 feature(s): original_shape2D_Sphericity" in msg
    rows[0] = rows[0] + ["original_glcm_Bogus"]
    rows[1:] = [r + ["1.0"] for r in rows[1:]]
    (d / "extra.csv").write_text("\n".join(",".join(r) for r in rows) + "\n")
    msg = _bad(norm_file, mask_file=case["label"], feature_file=d / "extra.csv")
    assert "extra.csv" in msg and "unknown feature name(s): original_glcm_Bogus" in msg
    # several cases in the file: the user must choose, and a wrong choice lists what is there
    msg = _bad(norm_file, mask_file=case["label"], feature_file=case["csv"])
    assert "two_cases.csv" in msg and "feature_case_id" in msg and "'case-a'" in msg and "'case-b'" in msg
    msg = _bad(norm_file, mask_file=case["label"], feature_file=case["csv"], feature_case_id="nope")
    assert "two_cases.csv" in msg and "'nope'" in msg and "'case-a'" in msg
    # lesion_index gap
    gap = raw_rows("g", 2, 1)
    gap[1]["lesion_index"] = 3
    write_feature_csv(d / "gap.csv", gap)
    msg = _bad(norm_file, mask_file=case["label"], feature_file=d / "gap.csv")
    assert "gap.csv" in msg and "[0, 3]" in msg

    # wrong mask values
    bad = np.asarray(Image.open(case["label"])).copy()
    bad[0, 0], bad[0, 1] = 3, 7
    msg = _bad(norm_file, mask_file=save_png(d / "values.png", bad), feature_file=f2)
    assert "values.png" in msg and "unexpected value(s) 3, 7" in msg
    b012 = breast.astype(np.uint8)
    b012[case["inst"] > 0] = 2
    msg = _bad(norm_file, breast_mask_file=save_png(d / "b012.png", b012), feature_file=f2)
    assert "b012.png" in msg and "binary" in msg and "unexpected value(s) 2" in msg
    msg = _bad(norm_file, breast_mask_file=case["breast"],
               lesion_mask_file=_nii(d / "ids.nii.gz", np.where(case["inst"] > 0, 300, 0)), feature_file=f2)
    assert "ids.nii.gz" in msg and "instance ids 0..255" in msg and "300" in msg
    # breast and lesion masks of different sizes
    msg = _bad(norm_file, breast_mask_file=case["breast"],
               lesion_mask_file=save_png(d / "small_lesion.png", np.ones((100, 80), np.uint8)), feature_file=f2)
    assert "small_lesion.png" in msg and "100x80" in msg and f"{H}x{W}" in msg
    # the source image is not the one the mask belongs to
    msg = _bad(norm_file, mask_file=case["label"], feature_file=f2, source_image=_write_mg(d / "other.dcm", 100, 80))
    assert "label.png" in msg and "other.dcm" in msg and "100x80" in msg
    # empty breast
    msg = _bad(norm_file, breast_mask_file=save_png(d / "empty.png", np.zeros((H, W), np.uint8)))
    assert "empty.png" in msg and "empty breast" in msg
    only_lesion = np.where(case["inst"] > 0, 2, 0).astype(np.uint8)
    msg = _bad(norm_file, mask_file=save_png(d / "only_lesion.png", only_lesion), feature_file=f2)
    assert "only_lesion.png" in msg and "empty breast" in msg
    # a lesion outside the breast (in the air at the far right)
    msg = _bad(norm_file, breast_mask_file=case["breast"], lesion_box=[W - 20, 5, W - 5, 20], feature_file=f1)
    assert "lesion_box" in msg and "outside the breast" in msg
    air = np.asarray(Image.open(case["label"])).copy()
    air[5:15, W - 20 : W - 8] = 2
    msg = _bad(norm_file, mask_file=save_png(d / "air.png", air), feature_file=_csv(d, 3, "three.csv"), max_lesions=3)
    assert "air.png" in msg and "lesion 0 lies outside the breast" in msg
    # more lesions than slots
    msg = _bad(norm_file, breast_mask_file=case["breast"], lesion_box=[BOX_TOP, BOX_LOW, [40, 90, 60, 110]],
               feature_file=_csv(d, 3, "three.csv"))
    assert "lesion_box" in msg and "3 lesions" in msg and "2 lesion slot(s)" in msg
    # a lesion that vanishes at the model resolution
    big = breast_shape(800, 640)
    tiny = np.zeros((800, 640), np.uint8)
    tiny[400:402, 200:202] = 1
    msg = _bad(norm_file, breast_mask_file=save_png(d / "big.png", big.astype(np.uint8)),
               lesion_mask_file=save_png(d / "tiny.png", tiny), feature_file=f1)
    assert "tiny.png" in msg and "vanishes" in msg and f"{S}x{S}" in msg
    # inconsistent arguments
    msg = _bad(norm_file, mask_file=case["label"], breast_mask_file=case["breast"])
    assert "label.png" in msg and "breast_mask_file" in msg
    msg = _bad(norm_file, breast_mask_file=case["breast"], lesion_box=[10, 10, 5, 20], feature_file=f1)
    assert "lesion_box" in msg and "xmax > xmin" in msg
    msg = _bad(norm_file, mask_file=case["label"], feature_file=f2, laterality="up")
    assert "laterality" in msg and "'up'" in msg
    msg = _bad(norm_file, breast_mask_file=case["breast"], lesion_mask_file=save_png(d / "zero.png", np.zeros((H, W), np.uint8)))
    assert "zero.png" in msg and "empty lesion mask" in msg
    msg = _bad(norm_file, mask_file=d / "absent.png")
    assert "absent.png" in msg and "not found" in msg


def _nii(path: Path, arr) -> Path:
    nib.save(nib.Nifti1Image(np.asarray(arr).T.astype(np.int16), np.eye(4)), str(path))
    return path
