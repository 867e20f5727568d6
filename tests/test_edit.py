"""Trained inpainting (train_inpaint.json, --mode inpaint), lesion removal (--mode remove), attributes at inference,
and the seam / radiomics-fidelity / attribute-accuracy measurements on hand-made inputs."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import INFERENCE_TINY_CONFIG, build_tiny_models
from custom.engines.inference import describe_error

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundle" / "configs"
INFERENCE = [str(CONFIGS / "inference.json"), str(INFERENCE_TINY_CONFIG)]
INPAINT = [str(CONFIGS / "inference.json"), str(CONFIGS / "inference_inpaint.json"), str(INFERENCE_TINY_CONFIG)]
ATTRS = ["view", "density", "area"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


# ------------------------------------------------------------------------------------------------ measurements
def test_seam_score_hand_made():
    from custom.metrics.fidelity import boundary_jump, seam_score

    region = np.zeros((10, 12), dtype=bool)
    region[3:7, 4:9] = True  # 4 rows x 5 columns: 2*4 horizontal + 2*5 vertical boundary pairs
    real = np.full((10, 12), 0.5)
    edited = real.copy()
    edited[region] = 0.7
    assert boundary_jump(real, region) == 0.0
    assert boundary_jump(edited, region) == pytest.approx(0.2)
    # a horizontal ramp I = x / 12: only the 8 left/right pairs jump, by 1/12 each
    ramp = np.tile(np.arange(12) / 12.0, (10, 1))
    assert boundary_jump(ramp, region) == pytest.approx(8 / 18 / 12)
    s = seam_score(edited, region, ramp)
    assert s["seam_excess"] == pytest.approx(0.2 - 8 / 18 / 12) and s["seam_ratio"] == pytest.approx(0.2 / (8 / 18 / 12))
    assert np.isnan(boundary_jump(real, np.zeros_like(region)))


def test_radiomics_fidelity_and_attribute_accuracy_hand_made():
    from custom.metrics.fidelity import attribute_accuracy, radiomics_fidelity

    req = np.array([[1, 1, 5], [2, 2, 5], [3, 3, 5], [4, 4, 5]], dtype=float)
    meas = np.array([[10, 1, 1], [30, 4, 2], [20, 3, 3], [40, 2, 4]], dtype=float)
    r = radiomics_fidelity(req, meas, ["a", "b", "c"])
    # a: ranks 1,3,2,4 -> 1 - 6*2/(4*15) = 0.8; b: ranks 1,4,3,2 -> 1 - 6*(0+4+0+4)/60 = 0.2; c: constant request
    assert r["per_feature"]["a"] == pytest.approx(0.8) and r["per_feature"]["b"] == pytest.approx(0.2)
    assert r["per_feature"]["c"] is None and r["n_undefined"] == 1 and r["mean"] == pytest.approx(0.5)
    assert radiomics_fidelity(req[:, :2], -req[:, :2])["mean"] == pytest.approx(-1.0)
    acc = attribute_accuracy([{"view": "CC", "density": "A"}, {"view": "MLO"}, {"view": "CC", "density": "D"}],
                             [{"view": "CC", "density": "B"}, {"view": "CC"}, {"view": "CC", "density": "D"}])
    assert acc == {"density": {"accuracy": 0.5, "n": 2}, "view": {"accuracy": pytest.approx(2 / 3), "n": 3}}


def test_removal_error_hand_made():
    from custom.metrics.fidelity import removal_error

    truth = np.full((8, 8), 0.3)
    original = truth.copy()
    lesion = np.zeros((8, 8), dtype=bool)
    lesion[2:5, 2:5] = True
    original[lesion] = 0.7
    removed = truth.copy()
    removed[lesion] = 0.35
    r = removal_error(removed, truth, original, lesion)
    assert r["error"] == pytest.approx(0.05) and r["contrast"] == pytest.approx(0.4) and r["ratio"] == pytest.approx(0.125)


def test_inpaint_inputs_and_training_regions():
    from custom.engines.inpaint import inpaint_concat, random_regions, region_to_latent

    class AvgEncoder(torch.nn.Module):  # a stand-in for the frozen encoder: 2x2 average pooling, 2 channels
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def encode(self, x):
            z = torch.nn.functional.avg_pool2d(x, 2)
            return torch.cat([z, 2 * z], 1)

    image = torch.rand(1, 1, 8, 8) + 0.5
    region = torch.zeros(1, 1, 8, 8)
    region[..., 1:3, 5:8] = 1
    out = inpaint_concat(AvgEncoder(), image, region)
    assert out.shape == (1, 3, 4, 4)
    expect_region = torch.zeros(4, 4)
    expect_region[0:2, 2:4] = 1  # every latent cell touching the pixel region
    assert torch.equal(out[0, 0], expect_region) and torch.equal(region_to_latent(region, (4, 4))[0, 0], expect_region)
    blanked = image * (1 - region)
    assert torch.allclose(out[0, 1], torch.nn.functional.avg_pool2d(blanked, 2)[0, 0])

    masks = torch.zeros(3, 2, 16, 16)
    masks[0, 0, 6:9, 6:9] = 1
    present = torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 0.0]])
    g = torch.Generator().manual_seed(0)
    assert (random_regions(masks, present, g, p_box=0.0, p_full=1.0) == 1).all()
    lesion = random_regions(masks, present, g, p_box=0.0, p_full=0.0, max_dilation=2)
    assert lesion[0, 0, 6:9, 6:9].all() and 9 < lesion[0].sum() <= 49  # dilated lesion
    assert lesion[1].sum() > 0 and lesion[1, 0].any(0).sum() * lesion[1, 0].any(1).sum() == lesion[1].sum()  # a box


# ------------------------------------------------------------------------------------------------ workflows
@pytest.fixture(scope="module")
def models(prepared_dir, tmp_path_factory) -> Path:
    """The shared tiny GCDM model plus a tiny inpainting model that reads view, density and area (one epoch)."""
    from monai.bundle import run

    folder = build_tiny_models(Path(prepared_dir), tmp_path_factory.getbasetemp() / "gcdm_tiny_models")
    root = tmp_path_factory.getbasetemp() / "gcdm_tiny_inpaint"
    if not (root / "READY").is_file():
        run("training", config_file=[str(CONFIGS / "common.json"), str(CONFIGS / "train_diffusion.json"),
                                     str(CONFIGS / "train_inpaint.json"), str(INFERENCE_TINY_CONFIG)],
            meta_file=str(CONFIGS / "metadata.json"), logging_file=False, prepared_dir=str(prepared_dir),
            ckpt_dir=str(folder), dm_output_dir=str(root / "dm"), latent_cache_dir=str(root / "cache"),
            attribute_names=ATTRS, train_limit=2, val_limit=2, batch_size=2, max_epochs=1, warmup_steps=1,
            val_interval=1, save_interval=1, sample_interval=0, num_sample_cases=2, sample_ddim_steps=2,
            cache_workers=0)
        root.mkdir(parents=True, exist_ok=True)
        (root / "READY").write_text("ok")
    assert (folder / "model_inpaint.pt").is_file() and (folder / "model.pt").is_file()
    return folder


@pytest.fixture(scope="module")
def case(prepared_dir, phantom_dir, tmp_path_factory) -> dict:
    """A test-split case with one lesion: its source DICOM, features, annotated box, a lesion-mask PNG of the box at
    source size, an empty mask, and the phantom's lesion-free truth."""
    prepared, phantom = Path(prepared_dir), Path(phantom_dir)
    entry = next(e for e in json.loads((prepared / "datalist.json").read_text())["test"] if e["num_lesions"] == 1)
    cid = entry["case_id"]
    folder = tmp_path_factory.mktemp("edit_case")
    rows = list(csv.DictReader(open(prepared / "features.csv", newline="")))
    with open(folder / "features.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows([r for r in rows if r["case_id"] == cid])
    row = next(r for r in csv.DictReader(open(phantom / "finding_annotations.csv")) if r["image_id"] == cid and r["xmin"])
    box = [float(row[k]) for k in ("xmin", "ymin", "xmax", "ymax")]
    h, w = int(row["height"]), int(row["width"])
    mask = np.zeros((h, w), dtype=np.uint8)
    mask[int(box[1]):int(box[3]), int(box[0]):int(box[2])] = 255
    Image.fromarray(mask).save(folder / "lesion.png")
    Image.fromarray(np.zeros((h, w), dtype=np.uint8)).save(folder / "empty.png")
    return {"case_id": cid, "dicom": str(entry["source_image"]), "features": str(folder / "features.csv"),
            "box": ",".join(f"{v:g}" for v in box), "lesion_png": str(folder / "lesion.png"),
            "empty_png": str(folder / "empty.png"),
            "truth": str(phantom / "lesion_free" / row["study_id"] / f"{cid}.dicom"), "folder": folder}


def _run(configs, models: Path, prepared_dir, **kw) -> None:
    from monai.bundle import run

    run("inference", config_file=configs, meta_file=str(CONFIGS / "metadata.json"), logging_file=False,
        ckpt_dir=str(models), normaliser_file=str(Path(prepared_dir) / "feature_normalisation.json"), ddim_steps=2,
        progress=False, map_to_source=False, formats=["png"], **kw)


def _error(fn) -> str:
    with pytest.raises(Exception) as info:
        fn()
    msg = describe_error(info.value)
    assert msg is not None, info.value
    return msg


def _png(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im)


def _expected_outside(side: dict, dicom: str) -> np.ndarray:
    from custom.data.export import to_uint16
    from custom.data.prepare import load_display_image
    from custom.transforms.geometry import MammoGeometry

    geometry = MammoGeometry.from_dict(side["conditions"]["geometry"])
    display, _ = load_display_image(dicom)
    return to_uint16(geometry.apply_image(display[None], "image")[0].numpy().clip(0, 1))


def _region(cases) -> np.ndarray:
    return np.asarray(cases.cases[0].region, dtype=bool)


def test_inpaint_mode_with_prompt_keeps_outside_pixels(models, prepared_dir, case, tmp_path):
    from custom.engines.edit import build_edit_cases

    out = tmp_path / "inpaint"
    _run(INPAINT, models, prepared_dir, image_file=case["dicom"], lesion_box=case["box"], feature_file=case["features"],
         case_id="ip", seed=3, output_dir=str(out), attribute_names=ATTRS,
         prompt="a mammogram in CC view with high density and medium area")
    side = json.loads((out / "ip_seed3.json").read_text())
    assert side["parameters"]["mode"] == "inpaint" and side["parameters"]["edit"]["mechanism"] == "inpaint"
    assert side["parameters"]["attributes"] == {"view": "CC", "density": "C", "area": "medium"}
    img = _png(out / "ip_seed3.png")
    cases = build_edit_cases(mode="inpaint", image_size=32, normaliser_file=str(Path(prepared_dir) / "feature_normalisation.json"),
                             max_lesions=2, image_file=case["dicom"], lesion_box=case["box"], feature_file=case["features"],
                             keep_dilation=2, attribute_names=ATTRS)
    region = _region(cases)
    expected = _expected_outside(side, case["dicom"])
    assert region.any() and not region.all()
    assert np.array_equal(img[~region], expected[~region])  # bit-identical outside the dilated region
    assert (img[region] != expected[region]).any()


@pytest.mark.parametrize("mechanism,resample,blend", [("keep", 1, None), ("inpaint", 1, None), ("keep", 3, None),
                                                      ("inpaint", 2, "feather"), ("keep", 1, "feather")])
def test_remove_mode_keeps_outside_pixels_and_drops_the_lesion(models, prepared_dir, case, tmp_path, mechanism, resample,
                                                                blend):
    from custom.data.prepare import load_display_image
    from custom.metrics.fidelity import removal_error
    from custom.transforms.geometry import MammoGeometry

    configs = INPAINT if mechanism == "inpaint" else INFERENCE
    extra = {"attribute_names": ATTRS} if mechanism == "inpaint" else {}
    out = tmp_path / mechanism
    _run(configs, models, prepared_dir, mode="remove", image_file=case["dicom"], lesion_mask_file=case["lesion_png"],
         case_id="rm", seed=1, output_dir=str(out), keep_resample=resample, keep_blend=blend, **extra)
    side = json.loads((out / "rm_seed1.json").read_text())
    assert side["parameters"]["mode"] == "remove" and side["parameters"]["edit"]["mechanism"] == mechanism
    assert side["parameters"]["keep_resample"] == resample  # RePaint resampling recorded (1 = plain DDIM)
    assert side["parameters"]["keep_blend"] == (blend or "poisson")  # recorded; Poisson blending by default
    assert side["conditions"]["num_lesions"] == 0  # generated with the no-lesion condition
    img = _png(out / "rm_seed1.png")
    expected = _expected_outside(side, case["dicom"])
    region = img != expected
    geometry = MammoGeometry.from_dict(side["conditions"]["geometry"])
    lesion = geometry.apply_image((_png(case["lesion_png"]) > 0).astype(np.float32)[None], "mask")[0].numpy() > 0
    # every changed pixel lies within keep_dilation (2 px at 32 px) of the lesion
    from scipy import ndimage

    assert region.any() and not (region & ~ndimage.binary_dilation(lesion, iterations=3)).any()
    truth, _ = load_display_image(case["truth"])
    truth_m = geometry.apply_image(truth[None], "image")[0].numpy().clip(0, 1)
    r = removal_error(img / 65535.0, truth_m, expected / 65535.0, lesion)
    assert np.isfinite(r["error"]) and r["contrast"] > 0  # measured (a 1-epoch tiny model: no quality claim)


def test_bad_edit_inputs_write_nothing(models, prepared_dir, case, tmp_path):
    out = tmp_path / "never"
    msg = _error(lambda: _run(INFERENCE, models, prepared_dir, mode="remove", image_file=case["dicom"],
                              lesion_mask_file=case["empty_png"], output_dir=str(out)))
    assert "empty.png" in msg and "needs a lesion" in msg
    msg = _error(lambda: _run(INFERENCE, models, prepared_dir, mode="inpaint", image_file=case["dicom"],
                              lesion_box=case["box"], feature_file=case["features"], output_dir=str(out)))
    assert msg.startswith("mode:") and "inpainting channels" in msg
    msg = _error(lambda: _run(INPAINT, models, prepared_dir, image_file=case["dicom"], lesion_box=case["box"],
                              feature_file=case["features"], attribute_names=ATTRS, output_dir=str(out),
                              prompt="a mammogram with sparkly density"))
    assert msg.startswith("prompt:") and "'sparkly'" in msg
    msg = _error(lambda: _run(INFERENCE, models, prepared_dir, image_file=case["dicom"], mode="keep", lesion_box=case["box"],
                              feature_file=case["features"], attributes="view=MLO", output_dir=str(out)))
    assert msg.startswith("attributes:") and "view" in msg
    # the attribute names come from the model's record (configs/common.json + model.pt): another list is refused
    msg = _error(lambda: _run(INPAINT, models, prepared_dir, image_file=case["dicom"], lesion_box=case["box"],
                              feature_file=case["features"], attribute_names=ATTRS[:1], output_dir=str(out)))
    assert "attribute_names" in msg and "trained with" in msg
    # RePaint resampling: a positive integer, and only where a source image is kept
    for bad in (0, "two", 2.5):
        msg = _error(lambda: _run(INFERENCE, models, prepared_dir, mode="remove", image_file=case["dicom"],
                                  lesion_mask_file=case["lesion_png"], keep_resample=bad, output_dir=str(out)))
        assert msg.startswith("keep_resample:") and "integer" in msg
    msg = _error(lambda: _run(INFERENCE, models, prepared_dir, mask_file=case["lesion_png"], keep_resample=2,
                              output_dir=str(out)))
    assert msg.startswith("keep_resample:") and "'generate'" in msg
    msg = _error(lambda: _run(INFERENCE, models, prepared_dir, mode="remove", image_file=case["dicom"],
                              lesion_mask_file=case["lesion_png"], keep_blend="laplace", output_dir=str(out)))
    assert msg.startswith("keep_blend:") and "feather, poisson" in msg
    for value in ("poisson", "feather"):  # nothing to blend into when generating
        msg = _error(lambda: _run(INFERENCE, models, prepared_dir, mask_file=case["lesion_png"], keep_blend=value,
                                  output_dir=str(out)))
        assert msg.startswith("keep_blend:") and "'generate'" in msg
    assert not out.exists()


def test_mask_free_generation_from_a_prompt(models, prepared_dir, tmp_path):
    out = tmp_path / "free"
    _run(INPAINT, models, prepared_dir, mode="generate", attribute_names=ATTRS, case_id="healthy", seed=0,
         prompt="a mammogram in CC view with very high density and small area", output_dir=str(out))
    side = json.loads((out / "healthy_seed0.json").read_text())
    assert side["parameters"]["attributes"] == {"view": "CC", "density": "D", "area": "small"}
    assert side["conditions"]["mask"]["mode"].startswith("none") and side["conditions"]["num_lesions"] == 0
    assert _png(out / "healthy_seed0.png").shape == (32, 32)
    msg = _error(lambda: _run(INFERENCE, models, prepared_dir, output_dir=str(tmp_path / "never")))
    assert msg.startswith("mask:") and "--prompt" in msg


def test_mask_dropped_wrapper_forces_the_mask_drop():
    from custom.engines.edit import MaskDropped

    seen = {}

    class Probe(torch.nn.Module):
        latent_channels = 4

        def forward(self, x, t, drop_features=None, drop_mask=None, **kw):
            seen.update(drop_features=drop_features, drop_mask=drop_mask)
            return x

    net = MaskDropped(Probe())
    flags = torch.tensor([False, True])
    net(torch.zeros(2, 4, 2, 2), torch.zeros(2), drop_features=flags, drop_mask=torch.tensor([False, False]))
    assert seen["drop_mask"].tolist() == [True, True] and seen["drop_features"].tolist() == [False, True]
    assert net.latent_channels == 4


def test_keep_mode_with_the_inpainting_model_keeps_outside_pixels(models, prepared_dir, case, tmp_path):
    out = tmp_path / "keep_ip"
    _run(INPAINT, models, prepared_dir, mode="keep", image_file=case["dicom"], lesion_box=case["box"],
         feature_file=case["features"], attribute_names=ATTRS, case_id="kp", seed=2, output_dir=str(out))
    side = json.loads((out / "kp_seed2.json").read_text())
    img, expected = _png(out / "kp_seed2.png"), _expected_outside(side, case["dicom"])
    assert side["parameters"]["mode"] == "keep" and (img != expected).any()
    from scipy import ndimage

    from custom.transforms.geometry import MammoGeometry

    box = np.zeros(_png(case["lesion_png"]).shape, dtype=np.float32)
    box[_png(case["lesion_png"]) > 0] = 1
    lesion = MammoGeometry.from_dict(side["conditions"]["geometry"]).apply_image(box[None], "mask")[0].numpy() > 0
    assert not ((img != expected) & ~ndimage.binary_dilation(lesion, iterations=3)).any()


# ------------------------------------------------------------------------------------------------ view vs mask (issue 11)
def test_breast_shape_view_hand_made_masks():
    from custom.data.attributes import VIEW_SHAPE_THRESHOLD, breast_shape_view, view_mask_note
    from custom.data.phantom import _breast_outline

    tri = np.zeros((100, 120), dtype=np.uint8)  # row i is i + 1 pixels wide: top 5 rows mean 3 over a widest 100
    for i in range(100):
        tri[i, : i + 1] = 1
    assert breast_shape_view(tri) == ("CC", pytest.approx(3 / 100))
    rect = np.zeros((100, 120), dtype=np.uint8)  # cut off square at the top (the axilla): ratio 1
    rect[:, :70] = 2
    assert breast_shape_view(rect) == ("MLO", pytest.approx(1.0))
    assert breast_shape_view(rect[::-1][:, ::-1])[0] == "MLO"  # the chest-wall side does not matter
    assert breast_shape_view(np.zeros((50, 50)))[0] is None    # nothing to judge
    # the phantom's own outlines, both views, several draws
    for seed in range(5):
        for view in ("CC", "MLO"):
            _, mask = _breast_outline(256, 200, view, np.random.default_rng(seed))
            got, ratio = breast_shape_view(mask)
            assert got == view and abs(ratio - VIEW_SHAPE_THRESHOLD) > 0.08, (seed, view, ratio)
    assert view_mask_note({"view": "MLO"}, tri).startswith("view=MLO was requested but the breast mask is CC-shaped")
    assert "MLO-shaped" in view_mask_note({"view": "CC", "density": "D"}, rect)
    assert view_mask_note({"view": "CC"}, tri) is None and view_mask_note({"density": "D"}, tri) is None
    assert view_mask_note({"view": "MLO"}, None) is None


def test_a_view_contradicting_the_mask_is_generated_and_noted(models, prepared_dir, case, tmp_path):
    entry = next(e for e in json.loads((Path(prepared_dir) / "datalist.json").read_text())["test"]
                 if e["case_id"] == case["case_id"])
    other = {"CC": "MLO", "MLO": "CC"}[entry["view"]]
    out = tmp_path / "contra"
    for view, name in ((other, "contra"), (entry["view"], "agree")):
        _run(INPAINT, models, prepared_dir, mode="inpaint", image_file=case["dicom"], lesion_box=case["box"],
             feature_file=case["features"], case_id=name, seed=0, output_dir=str(out), attribute_names=ATTRS,
             prompt=f"a mammogram in {view} view")
    contra = json.loads((out / "contra_seed0.json").read_text())["parameters"]
    assert contra["attributes"]["view"] == other  # generated as asked
    assert len(contra["notes"]) == 1 and contra["notes"][0].startswith(f"view={other} was requested but the breast "
                                                                       f"mask is {entry['view']}-shaped")
    assert "notes" not in json.loads((out / "agree_seed0.json").read_text())["parameters"]


def _bank(root: Path) -> Path:
    """A hand-made prepared folder: 3 training label maps (CC large, CC small, MLO large) and one test entry."""
    from PIL import Image

    (root / "labels").mkdir(parents=True)
    entries = []
    for i, (view, width) in enumerate((("CC", 52), ("CC", 20), ("MLO", 50))):
        lab = np.zeros((64, 64), np.uint8)
        lab[:, :width] = 1
        if i == 0:
            lab[30:34, 10:14] = 2  # a lesion: part of the breast outline
        Image.fromarray(lab).save(root / "labels" / f"c{i}.png")
        entries.append({"case_id": f"c{i}", "label": f"labels/c{i}.png", "view": view, "laterality": "L"})
    (root / "datalist.json").write_text(json.dumps({"training": entries, "test": [dict(entries[0], case_id="t")]}))
    return root


def test_shape_bank_matches_the_shape_attributes_and_the_seed(tmp_path):
    import hashlib

    from custom.engines.edit import shape_bank_mask
    from custom.errors import MammoInputError

    bank = _bank(tmp_path / "bank")
    breast, rec = shape_bank_mask(bank, {"view": "CC", "area": "large", "density": "D"}, seed=5)
    lab = np.asarray(__import__("PIL.Image").Image.open(bank / "labels" / "c0.png"))
    assert np.array_equal(breast, (lab > 0).astype(np.uint8))  # the only CC + large (52/64 > 0.6): lesion -> breast
    assert rec == {"datalist": "datalist.json", "matched_on": {"view": "CC", "area": "large"}, "candidates": 1,
                   "mask_sha256": hashlib.sha256((bank / "labels" / "c0.png").read_bytes()).hexdigest()}
    # (the record holds no case id: no source identifier goes into the sidecar)
    picks = {shape_bank_mask(bank, {"view": "CC"}, seed=s)[1]["mask_sha256"] for s in range(20)}
    assert len(picks) == 2  # both CC masks are candidates; the seed picks
    assert shape_bank_mask(bank, {"view": "CC"}, seed=3)[1] == shape_bank_mask(bank, {"view": "CC"}, seed=3)[1]
    with pytest.raises(MammoInputError, match="no training mask with view=MLO, area=small"):
        shape_bank_mask(bank, {"view": "MLO", "area": "small"}, seed=0)
    with pytest.raises(MammoInputError, match="not a prepared folder"):
        shape_bank_mask(tmp_path / "nothing", {}, seed=0)


def test_mask_free_generation_with_a_shape_bank(models, prepared_dir, tmp_path):
    out = tmp_path / "bank"
    _run(INPAINT, models, prepared_dir, mode="generate", attribute_names=ATTRS, case_id="banked", seed=2,
         attributes="view=CC,density=D", shape_bank=str(prepared_dir), output_dir=str(out))
    side = json.loads((out / "banked_seed2.json").read_text())
    rec = side["parameters"]["shape_bank"]
    assert rec["matched_on"] == {"view": "CC"} and rec["candidates"] >= 1 and len(rec["mask_sha256"]) == 64
    assert side["conditions"]["num_lesions"] == 0 and not side["conditions"]["mask"]["mode"].startswith("none")
    img = _png(out / "banked_seed2.png")
    assert img.shape == (32, 32)
    msg = _error(lambda: _run(INFERENCE, models, prepared_dir, mask_file=str(Path(prepared_dir) / "labels" / "x.png"),
                              shape_bank=str(prepared_dir), output_dir=str(tmp_path / "never")))
    assert msg.startswith("shape_bank:") and "attributes alone" in msg
    assert not (tmp_path / "never").exists()
