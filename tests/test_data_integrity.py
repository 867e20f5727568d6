"""Silent data mix-ups: every condition belongs to its lesion, caches and normalisers follow their content, corrupt
checkpoints and ambiguous inputs are refused (one regression test per fault; each failed before its fix)."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import RADIOMICS_PARAMS
from custom.errors import MammoInputError

FIELDS = ["image_id", "study_id", "series_id", "laterality", "view_position", "height", "width", "breast_birads",
          "breast_density", "finding_categories", "finding_birads", "xmin", "ymin", "xmax", "ymax", "split"]


# ---------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def mini_vindr(tmp_path_factory) -> dict:
    """One phantom study (4 DICOM MG) in the VinDr layout with hand-written annotations:

    - ``two``: two masses, box 0 the *lower* one (so box order != first-pixel order);
    - ``calc``: only a calcification finding (a non-mass finding);
    - ``plain``: no finding;
    - ``fourth``: no finding.
    """
    from custom.data.phantom import generate_phantom_dataset
    from custom.data.prepare import load_display_image
    from custom.transforms.masks import breast_mask

    root = tmp_path_factory.mktemp("mini_vindr")
    generate_phantom_dataset(root, n_studies=1, seed=3, image_shape=(320, 256), progress=False)
    rows = list(csv.DictReader(open(root / "finding_annotations.csv", newline="")))
    images = list(dict.fromkeys(r["image_id"] for r in rows))
    base = {r["image_id"]: r for r in rows}
    names = dict(zip(("two", "calc", "plain", "fourth"), images))
    # two boxes inside the breast of image "two", the lower one first
    first = base[names["two"]]
    path = root / "images" / first["study_id"] / f"{names['two']}.dicom"
    img, info = load_display_image(path)
    breast = breast_mask(img)
    rr, cc = np.nonzero(breast)
    cy = int(np.median(rr))
    cols = np.nonzero(breast[cy])[0]
    x0 = int(cols.min() + 0.15 * (cols.max() - cols.min())) if (first["laterality"] or "L") == "L" else \
        int(cols.min() + 0.55 * (cols.max() - cols.min()))
    boxes = [[x0, cy + 20, x0 + 28, cy + 44], [x0 + 4, cy - 50, x0 + 24, cy - 36]]  # lower (big), upper (small)
    for b in boxes:
        assert breast[b[1]:b[3], b[0]:b[2]].mean() > 0.99
    out = []
    for key, image_id in names.items():
        r = dict(base[image_id], finding_categories="['No Finding']", finding_birads="", xmin="", ymin="", xmax="",
                 ymax="", split="training")
        if key == "two":
            for b in boxes:
                out.append(dict(r, finding_categories="['Mass']", finding_birads="BI-RADS 4",
                                **dict(zip(("xmin", "ymin", "xmax", "ymax"), map(str, b)))))
        elif key == "calc":
            out.append(dict(r, finding_categories="['Suspicious Calcification']", finding_birads="BI-RADS 4",
                            xmin="60", ymin="100", xmax="70", ymax="110"))
        else:
            out.append(r)
    with open(root / "finding_annotations.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
        w.writeheader()
        w.writerows(out)
    (root / "breast-level_annotations.csv").unlink(missing_ok=True)
    return {"root": root, "names": names, "boxes": boxes}


def _prepare(dataset: Path, out: Path, **kw) -> dict:
    from custom.data.prepare import PrepareWorkflow

    wf = PrepareWorkflow(dataset_dir=str(dataset), output_dir=str(out), params_file=str(RADIOMICS_PARAMS),
                         image_size=64, num_workers=1, progress=False, preview_cases=0, validation_fraction=0.0,
                         test_fraction=0.0, **kw)
    return wf.run()


@pytest.fixture(scope="module")
def mini_prepared(mini_vindr, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("mini_prepared")
    summary = _prepare(mini_vindr["root"], out)
    return {"dir": out, "summary": summary}


# ---------------------------------------------------------------------------------------------------- item 1
def test_features_stay_with_their_lesion_from_prepare_to_inference(mini_vindr, mini_prepared):
    """The README's label-map command: lesion k of the instance map gets the feature row with lesion_index k-1;
    the label map alone (lesions without identity) is refused instead of pairing them by first pixel."""
    from custom.data.conditions import build_conditions
    from custom.features.feature_file import read_feature_file

    prep = mini_prepared["dir"]
    cid = mini_vindr["names"]["two"]
    rows = sorted((r for r in read_feature_file(prep / "features.csv") if r["case_id"] == cid),
                  key=lambda r: r["lesion_index"])
    inst = np.asarray(Image.open(prep / "lesions" / f"{cid}.png"))
    assert len(rows) == 2 and set(np.unique(inst)) == {0, 1, 2}
    # prepare: lesion_index k-1 is instance k, which is box k-1 (the lower, larger box first)
    areas = [int((inst == k).sum()) for k in (1, 2)]
    assert [r["original_shape2D_PixelSurface"] for r in rows] == pytest.approx(areas)
    assert areas[0] > areas[1] and np.nonzero(inst == 1)[0].min() > np.nonzero(inst == 2)[0].min()

    kw = dict(image_size=64, normaliser_file=prep / "feature_normalisation.json", feature_file=prep / "features.csv",
              feature_case_id=cid)
    with pytest.raises(MammoInputError, match="without identity") as err:
        build_conditions(mask_file=prep / "labels" / f"{cid}.png", **kw)
    assert err.value.source == str(prep / "labels" / f"{cid}.png")
    c = build_conditions(mask_file=prep / "labels" / f"{cid}.png", lesion_mask_file=prep / "lesions" / f"{cid}.png", **kw)
    for slot in range(2):
        assert int(c.lesion_masks[slot].sum()) == pytest.approx(rows[slot]["original_shape2D_PixelSurface"])
        assert c.raw_features[slot]["lesion_index"] == slot
    # the training datalist pairs the same way: slot i mask = instance i+1, features = row lesion_index i
    from custom.data.training import load_prepared_datalist, prepared_transforms

    item = next(i for i in load_prepared_datalist(prep, "training") if i["case_id"] == cid)
    t = prepared_transforms(None, sigma=0.0)(item)
    for slot in range(2):
        assert int(t["lesion_masks"][slot].sum()) == areas[slot]
    np.testing.assert_array_equal(t["features"].numpy(), c.features)


# ---------------------------------------------------------------------------------------------------- item 2
def _tiny_encoder(tmp: Path):
    import torch
    from monai.networks.nets import AutoencoderKL

    from custom.checkpoints import save_stage1
    from custom.engines.diffusion import FrozenLatentEncoder

    def net():
        torch.manual_seed(0)
        return AutoencoderKL(spatial_dims=2, in_channels=1, out_channels=1, channels=(4, 4), latent_channels=2,
                             num_res_blocks=1, attention_levels=(False, False), norm_num_groups=2,
                             with_encoder_nonlocal_attn=False, with_decoder_nonlocal_attn=False)

    save_stage1(tmp / "ae.pt", net(), 1.0)
    return FrozenLatentEncoder(net(), tmp / "ae.pt")


def test_latent_cache_follows_the_prepared_content(tmp_path, mini_prepared):
    """Re-running prepare with the same autoencoder changes an image: its cached latents are encoded again."""
    from custom.data.training import load_prepared_datalist, prepared_transforms
    from custom.engines.diffusion import LatentCache

    prep = tmp_path / "prep"
    shutil.copytree(mini_prepared["dir"], prep)
    enc = _tiny_encoder(tmp_path)
    items = load_prepared_datalist(prep, "training")
    base = prepared_transforms(None, sigma=1.0)
    cache = LatentCache(tmp_path / "cache", enc, sigma=1.0, image_size=64)
    assert cache.warm(items, base) == len(items)
    first = {i["case_id"]: cache.get(base(dict(i)))["latent"] for i in items}
    again = LatentCache(tmp_path / "cache", enc, sigma=1.0, image_size=64)
    assert again.warm(items, base) == 0  # same content: nothing to encode
    # "prepare again": the first case's image now holds other pixels (same autoencoder, same settings)
    cid = items[0]["case_id"]
    img = np.asarray(Image.open(items[0]["image"])).astype(np.uint16)
    Image.fromarray((65535 - img).astype(np.uint16)).save(items[0]["image"])
    fresh = LatentCache(tmp_path / "cache", enc, sigma=1.0, image_size=64)
    assert fresh.warm(items, base) == 1
    latent = fresh.get(base(dict(items[0])))["latent"]
    expected = enc.encode(base(dict(items[0]))["image"][None])[0]
    np.testing.assert_allclose(latent.numpy(), expected.numpy(), rtol=1e-5, atol=1e-6)
    assert not np.allclose(latent.numpy(), first[cid].numpy())
    # the others are read from the cache unchanged
    for i in items[1:]:
        np.testing.assert_array_equal(fresh.get(base(dict(i)))["latent"].numpy(), first[i["case_id"]].numpy())


# ---------------------------------------------------------------------------------------------------- item 3
@pytest.fixture(scope="module")
def tiny_models(prepared_dir, tmp_path_factory) -> Path:
    from conftest import build_tiny_models

    return build_tiny_models(Path(prepared_dir), tmp_path_factory.getbasetemp() / "gcdm_tiny_models")


def test_the_model_keeps_its_normaliser_and_prepare_never_touches_it(tiny_models, prepared_dir, mini_vindr, tmp_path):
    from custom.engines.inference import check_model_info, model_normaliser

    info = json.loads((tiny_models / "diffusion_info.json").read_text())
    norm = tiny_models / "feature_normalisation.json"
    # training wrote the normaliser it used beside the model, checksummed in the model info
    assert norm.read_bytes() == (Path(prepared_dir) / "feature_normalisation.json").read_bytes()
    import hashlib

    assert info["feature_normalisation_sha256"] == hashlib.sha256(norm.read_bytes()).hexdigest()
    assert model_normaliser(tiny_models) == str(norm)
    expected = {k: info[k] for k in ("conditioning_mode", "max_lesions")}
    check_model_info(tiny_models / "diffusion_info.json", expected, normaliser_file=norm)
    # preparing another dataset into the model folder is refused before anything is written
    models = tmp_path / "models"
    shutil.copytree(tiny_models, models)
    before = {p.name: p.read_bytes() for p in models.iterdir() if p.is_file()}
    with pytest.raises(MammoInputError, match="trained model") as err:
        _prepare(mini_vindr["root"], tmp_path / "new_prepared", normalisation_copy=str(models / "feature_normalisation.json"))
    assert err.value.source == str(models / "feature_normalisation.json")
    assert not (tmp_path / "new_prepared").exists()
    assert {p.name: p.read_bytes() for p in models.iterdir() if p.is_file()} == before
    # another normaliser (a new prepare's) is refused at load, naming the file
    other = tmp_path / "other_normalisation.json"
    data = json.loads(norm.read_text())
    other.write_text(json.dumps({**data, "n_fitted": data.get("n_fitted", 0) + 1}))
    with pytest.raises(MammoInputError, match="not the feature normaliser") as err:
        check_model_info(tiny_models / "diffusion_info.json", expected, normaliser_file=other)
    assert err.value.source == str(other)


# ---------------------------------------------------------------------------------------------------- item 4
def test_non_mass_findings_are_excluded_by_default_and_counted(mini_vindr, mini_prepared, tmp_path):
    from custom.data.vindr import load_vindr_cases

    names = mini_vindr["names"]
    summary = mini_prepared["summary"]
    prepared_ids = {json.loads(p.read_text())["case_id"] for p in (mini_prepared["dir"] / "records").glob("*.json")}
    datalist = json.loads((mini_prepared["dir"] / "datalist.json").read_text())
    listed = {e["case_id"] for v in datalist.values() for e in v}
    assert names["calc"] not in listed and {names["plain"], names["fourth"], names["two"]} <= listed
    assert summary["other_findings"] == {"policy": "exclude", "excluded_images": 1, "kept_as_healthy_images": 0}
    assert summary["cases_found"] == 3 and names["calc"] not in prepared_ids
    # asked for: kept as an image without lesion, and counted
    cases, _, counts = load_vindr_cases(mini_vindr["root"], other_findings="healthy")
    calc = next(c for c in cases if c.case_id == names["calc"])
    assert calc.findings == [] and counts["kept_other_findings_as_healthy"] == 1 and counts["excluded_other_findings"] == 0
    with pytest.raises(MammoInputError, match="other_findings"):
        load_vindr_cases(mini_vindr["root"], other_findings="maybe")


# ---------------------------------------------------------------------------------------------------- item 5
def _corruptions(path: Path) -> dict:
    """Ways a checkpoint file gets damaged (each applied to a fresh copy)."""
    from custom.checkpoints import checksum_path

    def flip(p):
        b = bytearray(p.read_bytes())
        mid = len(b) // 2
        b[mid:mid + 64] = bytes(x ^ 0xFF for x in b[mid:mid + 64])
        p.write_bytes(bytes(b))

    def garbage_with_checksum(p):
        from custom.checkpoints import write_checksum

        p.write_bytes(b"PK\x03\x04 not really a zip archive" * 10)
        write_checksum(p)

    def folder(p):
        p.unlink()
        p.mkdir()

    return {
        "flipped_bytes": flip,
        "truncated": lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 3]),
        "empty": lambda p: p.write_bytes(b""),
        "a_folder": folder,
        "no_checksum_file": lambda p: checksum_path(p).unlink(),
        "malformed_checksum_file": lambda p: checksum_path(p).write_text("not a digest\n"),
        "garbage_with_valid_checksum": garbage_with_checksum,
    }


def test_a_damaged_checkpoint_is_refused_naming_the_file(tiny_models, tmp_path):
    import torch
    from ignite.engine import Engine

    from custom.engines.autoencoder import ResumeCheckpointLoader
    from custom.checkpoints import checksum_path, load_checkpoint, load_stage1, verify_checkpoint
    from custom.engines.diffusion import resume_checkpoint

    dm = tiny_models.parent / "dm" / "checkpoints"
    for f in [tiny_models / "model.pt", tiny_models / "autoencoder.pt", *dm.glob("checkpoint*.pt")]:
        assert checksum_path(f).is_file(), f
        verify_checkpoint(f)
    for name, damage in _corruptions(tiny_models / "model.pt").items():
        folder = tmp_path / name
        shutil.copytree(tiny_models, folder)
        shutil.copytree(dm, folder / "checkpoints")
        target = folder / "model.pt"
        damage(target)
        with pytest.raises(MammoInputError) as err:
            load_checkpoint(target, what="stage-2 model checkpoint")
        assert err.value.source == str(target), name
        # the resume path (the newest training-state file) and the stage-1 loader refuse the same damage
        states = sorted((folder / "checkpoints").glob("checkpoint*.pt"))
        for state in states:
            damage(state)
        with pytest.raises(MammoInputError) as err:
            # verified when the resume file is chosen; what passes the checksum but is no checkpoint fails in the
            # trainer's resume loader, with the same kind of error
            path = resume_checkpoint(folder / "checkpoints", True)
            ResumeCheckpointLoader(path, {"network": torch.nn.Linear(2, 2)}, engine_key=None)(Engine(lambda e, b: 0))
        assert err.value.source in {str(p) for p in states} | {str(folder / "checkpoints")}, name
        damage(folder / "autoencoder.pt")
        with pytest.raises(MammoInputError) as err:
            load_stage1(folder / "autoencoder.pt", _tiny_encoder_net())
        assert err.value.source == str(folder / "autoencoder.pt"), name


def _tiny_encoder_net():
    from monai.networks.nets import AutoencoderKL

    return AutoencoderKL(spatial_dims=2, in_channels=1, out_channels=1, channels=(4, 4), latent_channels=2,
                         num_res_blocks=1, attention_levels=(False, False), norm_num_groups=2,
                         with_encoder_nonlocal_attn=False, with_decoder_nonlocal_attn=False)


def test_inference_refuses_a_damaged_model_before_writing(tiny_models, prepared_dir, tmp_path, capsys):
    """The 64-flipped-bytes case of the issue, through the in-process inference entry: one error, nothing written."""
    from monai.bundle import run

    models = tmp_path / "models"
    shutil.copytree(tiny_models, models)
    _corruptions(models / "model.pt")["flipped_bytes"](models / "model.pt")
    prep = Path(prepared_dir)
    entry = next(e for e in json.loads((prep / "datalist.json").read_text())["test"])
    out = tmp_path / "out"
    repo = Path(__file__).resolve().parents[1]
    with pytest.raises(Exception) as err:
        run("inference", config_file=[str(repo / "bundle/configs/inference.json"), str(repo / "tests/configs/inf_tiny.json")],
            meta_file=str(repo / "bundle/configs/metadata.json"), logging_file=False, ckpt_dir=str(models),
            mask_file=str(prep / entry["label"]), lesion_mask_file=str(prep / entry["lesions"]),
            feature_file=str(prep / "features.csv"), feature_case_id=entry["case_id"], ddim_steps=2, progress=False,
            output_dir=str(out))
    from custom.engines.inference import describe_error

    msg = describe_error(err.value)
    assert msg is not None and str(models / "model.pt") in msg and "damaged" in msg
    assert not out.exists() or not any(out.iterdir())


def test_checkpoints_keep_n_saved_across_resumes_and_follow_the_umask(tmp_path):
    import os

    import torch
    from ignite.engine import Engine, Events

    from custom.engines.autoencoder import AtomicCheckpointSaver
    from custom.checkpoints import checksum_path, verify_checkpoint

    net = torch.nn.Linear(2, 2)

    def train(start: int, epochs: int) -> None:
        eng = Engine(lambda e, b: 0.0)
        AtomicCheckpointSaver(str(tmp_path), {"net": net}, engine_key=None, save_interval=1, n_saved=2,
                              epoch_level=True).attach(eng)

        @eng.on(Events.STARTED)
        def _resume(e):
            e.state.epoch, e.state.iteration = start, start

        eng.run([0], max_epochs=start + epochs)

    train(0, 3)
    train(3, 3)  # a resumed run
    train(6, 2)
    kept = sorted(p.name for p in tmp_path.glob("*.pt"))
    assert kept == ["net_epoch=7.pt", "net_epoch=8.pt"]
    assert sorted(p.name for p in tmp_path.glob("*.sha256")) == [k + ".sha256" for k in kept]
    umask = os.umask(0)
    os.umask(umask)
    for p in kept:
        verify_checkpoint(tmp_path / p)
        assert (tmp_path / p).stat().st_mode & 0o777 == 0o666 & ~umask
        assert checksum_path(tmp_path / p).stat().st_mode & 0o777 == 0o666 & ~umask


# ---------------------------------------------------------------------------------------------------- item 6
def test_keep_mode_declares_the_source_content_and_no_file_name_leaks(mini_vindr, mini_prepared, tmp_path):
    import pydicom

    from custom.data.conditions import build_conditions
    from custom.data.export import export_sample
    from custom.features.feature_file import read_feature_file, write_feature_csv
    from custom.transforms.masks import lesion_instances_from_boxes

    prep = mini_prepared["dir"]
    yy, xx = np.mgrid[:64, :64]
    breast = ((yy - 32) / 28.0) ** 2 + (xx / 40.0) ** 2 < 1
    secret = "Doe_Jane_1962-03-04"
    mask = tmp_path / f"{secret}_breast.png"
    Image.fromarray(breast.astype(np.uint8) * 255).save(mask)
    feats = tmp_path / f"{secret}_features.csv"
    row = read_feature_file(prep / "features.csv")[0]
    write_feature_csv(feats, [dict(row, case_id="c", lesion_index=0)])
    cond = build_conditions(image_size=64, normaliser_file=prep / "feature_normalisation.json", breast_mask_file=mask,
                            lesion_box=[10, 25, 20, 35], feature_file=feats)
    src = next(Path(mini_vindr["root"], "images").rglob("*.dicom"))
    ds = pydicom.dcmread(src)
    ds.BurnedInAnnotation = "YES"
    ds.save_as(tmp_path / "with_text.dcm")
    del ds.BurnedInAnnotation
    if "RecognizableVisualFeatures" in ds:
        del ds.RecognizableVisualFeatures
    ds.save_as(tmp_path / "unknown.dcm")
    img = np.full((64, 64), 0.5)
    keep = {"mode": "keep", "seed": 0, "keep_image": {"name": f"{secret}.dcm", "sha256": "ab" * 32}}
    for source, burned in (("with_text.dcm", "YES"), ("unknown.dcm", "YES")):
        paths = export_sample(tmp_path / f"out_{source}", "s", img, cond, keep, formats=("dcm",), source_dicom=tmp_path / source)
        out = pydicom.dcmread(paths["dcm"])
        assert out.BurnedInAnnotation == burned and out.RecognizableVisualFeatures == "YES"
        assert secret not in str(out.ImageComments) and secret not in paths["json"].read_text()
    # a fully generated image shows nothing of a source
    paths = export_sample(tmp_path / "gen", "s", img, cond, {"mode": "generate", "seed": 0}, formats=("dcm",))
    out = pydicom.dcmread(paths["dcm"])
    assert out.BurnedInAnnotation == "NO" and out.RecognizableVisualFeatures == "NO"
    # base names only when asked
    paths = export_sample(tmp_path / "named", "s", img, cond, keep, formats=("dcm", "png", "nii"), file_names=True)
    assert f"{secret}_breast.png" in paths["json"].read_text()
    # every output gets the mode the umask gives (like the summary), not mkstemp's 0600
    import os

    umask = os.umask(0)
    os.umask(umask)
    for p in paths.values():
        assert p.stat().st_mode & 0o777 == 0o666 & ~umask, p.name


# ---------------------------------------------------------------------------------------------------- item 7
def test_presentation_lut_shape_inverse_is_applied():
    from custom.transforms.intensity import apply_dicom_grayscale

    x = np.arange(0, 4096, 64, dtype=np.uint16).reshape(8, 8)
    base = {"PhotometricInterpretation": "MONOCHROME2", "BitsStored": 12, "PixelRepresentation": 0,
            "WindowCenter": [2048.0], "WindowWidth": [4096.0]}
    identity, _ = apply_dicom_grayscale(x, {**base, "PresentationLUTShape": "IDENTITY"})
    inverse, info = apply_dicom_grayscale(x, {**base, "PresentationLUTShape": "INVERSE"})
    np.testing.assert_allclose(inverse, 1.0 - identity, atol=1e-7)
    assert info["inverted"] and info["presentation_lut_shape"] == "INVERSE"
    # MONOCHROME1 with INVERSE (how the MG IOD writes it) is inverted once, not twice
    mono1, _ = apply_dicom_grayscale(x, {**base, "PhotometricInterpretation": "MONOCHROME1", "PresentationLUTShape": "INVERSE"})
    np.testing.assert_allclose(mono1, 1.0 - identity, atol=1e-7)


def test_prepare_honours_window_index_from_the_command_line():
    from monai.bundle import ConfigParser

    repo = Path(__file__).resolve().parents[1]
    parser = ConfigParser()
    parser.read_config(str(repo / "bundle/configs/prepare.json"))
    parser["window_index"] = 1
    parser["output_dir"] = "/tmp/never_written"
    workflow = parser.get_parsed_content("workflow")
    assert workflow.settings.window_index == 1


def test_boxes_follow_the_annotated_image_size(tmp_path):
    from test_fuzz import H as FH, W as FW, mg_dataset

    from custom.data.cases import Finding, MammoCase
    from custom.data.prepare import PreprocessSettings, preprocess_case

    ds = mg_dataset(np.random.default_rng(1))
    ds.save_as(tmp_path / "img.dcm", enforce_file_format=True)
    settings = PreprocessSettings(image_size=32)
    box = [6, 18, 14, 26]
    plain = preprocess_case(MammoCase("a", str(tmp_path / "img.dcm"), "s", findings=[Finding(box=box)]),
                            str(tmp_path / "a"), settings)
    # annotated on a 2x larger copy of the image: the boxes are scaled onto the image read
    big = MammoCase("b", str(tmp_path / "img.dcm"), "s", findings=[Finding(box=[2 * v for v in box])],
                    annotated_shape=[2 * FH, 2 * FW])
    scaled = preprocess_case(big, str(tmp_path / "b"), settings)
    assert scaled["findings"][0]["box"] == plain["findings"][0]["box"]
    # another aspect ratio: the boxes cannot be placed
    odd = MammoCase("c", str(tmp_path / "img.dcm"), "s", findings=[Finding(box=box)], annotated_shape=[FH, 2 * FW])
    with pytest.raises(MammoInputError, match="aspect ratio") as err:
        preprocess_case(odd, str(tmp_path / "c"), settings)
    assert err.value.source == str(tmp_path / "img.dcm") and not (tmp_path / "c").exists()


def test_a_dicom_seg_of_several_images_gives_each_image_its_own_frames(tmp_path):
    import highdicom as hd
    from pydicom.sr.codedict import codes
    from pydicom.uid import generate_uid
    from test_fuzz import mg_dataset

    from custom.data.mask_io import load_mask_file

    sources, masks = [], []
    for k in range(2):
        ds = mg_dataset(np.random.default_rng(k))
        sources.append(ds)
        m = np.zeros((ds.Rows, ds.Columns), bool)
        m[10 + 10 * k:16 + 10 * k, 5:12] = True
        masks.append(m)
    study, series = generate_uid(), generate_uid()
    for i, ds in enumerate(sources):
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.PatientID, ds.PatientName, ds.StudyDate, ds.StudyTime = "P", "P^P", "20200101", "000000"
        ds.PatientBirthDate, ds.PatientSex, ds.AccessionNumber, ds.ReferringPhysicianName = "", "F", "", ""
        ds.StudyID, ds.SeriesNumber, ds.InstanceNumber = "1", 1, i + 1
        ds.PixelSpacing = [0.1, 0.1]
        ds.ImageOrientationPatient, ds.ImagePositionPatient = [1, 0, 0, 0, 1, 0], [0, 0, float(i)]
        ds.SliceThickness = 1.0
        ds.FrameOfReferenceUID = "1.2.826.0.1.3680043.8.498.1"
    desc = hd.seg.SegmentDescription(
        segment_number=1, segment_label="lesion", segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Mass, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL)
    seg = hd.seg.Segmentation(
        source_images=sources, pixel_array=np.stack(masks), segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[desc], series_instance_uid=generate_uid(), series_number=2, sop_instance_uid=generate_uid(),
        instance_number=1, manufacturer="test", manufacturer_model_name="test", software_versions="0",
        device_serial_number="0", omit_empty_frames=False)
    seg.save_as(tmp_path / "seg.dcm")
    for ds, m in zip(sources, masks):
        np.testing.assert_array_equal(load_mask_file(tmp_path / "seg.dcm", referenced_sop_instance_uid=ds.SOPInstanceUID), m)
    with pytest.raises(MammoInputError, match="covers 2 source images"):
        load_mask_file(tmp_path / "seg.dcm")
    with pytest.raises(MammoInputError, match="no frame of this SEG references"):
        load_mask_file(tmp_path / "seg.dcm", referenced_sop_instance_uid="1.2.999")


# ---------------------------------------------------------------------------------------------------- item 8
def test_blank_images_and_negative_keep_dilation_are_refused(tmp_path):
    from test_fuzz import mg_dataset

    from custom.data.prepare import load_display_image
    from custom.engines.inference import build_inference_cases

    ds = mg_dataset(np.random.default_rng(2))
    ds.PixelData = np.full((ds.Rows, ds.Columns), 1234, np.uint16).tobytes()
    ds.save_as(tmp_path / "constant.dcm", enforce_file_format=True)
    Image.fromarray(np.zeros((40, 30), np.uint16)).save(tmp_path / "blank.png")
    for name in ("constant.dcm", "blank.png"):
        with pytest.raises(MammoInputError, match="no dynamic range") as err:
            load_display_image(tmp_path / name)
        assert err.value.source == str(tmp_path / name)
    with pytest.raises(MammoInputError, match="keep_dilation") as err:
        build_inference_cases(image_size=32, normaliser_file=tmp_path / "n.json", max_lesions=2, mode="keep",
                              image_file=str(tmp_path / "blank.png"), keep_dilation=-1)
    assert err.value.source == "keep_dilation"
