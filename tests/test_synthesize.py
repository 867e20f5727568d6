"""The ``synthesize`` workflow (``custom.engines.synthesize``, ``bundle/configs/synthesize.json``).

Condition sampling, sharding and merging are tested without a model on the session's prepared phantom; the
end-to-end tests use the tiny models of ``conftest.build_tiny_models`` (32 px, 2 DDIM steps).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import build_tiny_models
from custom.engines.synthesize import (
    CohortWriter,
    ConditionLibrary,
    SynthesisDataset,
    SynthesisRun,
    SynthesisSpec,
    image_id,
    merge_cohort,
    render_recipe,
    sample_recipe,
    scale_shape_features,
    shard_indices,
)
from custom.errors import MammoInputError
from custom.features.normalisation import FeatureNormaliser

REPO = Path(__file__).resolve().parents[1]
CONFIGS = [str(REPO / "bundle" / "configs" / "synthesize.json"), str(REPO / "tests" / "configs" / "inf_tiny.json")]
SIZE = 32


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def library(prepared_dir) -> ConditionLibrary:
    return ConditionLibrary.from_prepared(prepared_dir, SIZE)


@pytest.fixture(scope="module")
def normaliser(prepared_dir):
    return FeatureNormaliser.load(Path(prepared_dir) / "feature_normalisation.json")


@pytest.fixture(scope="module")
def models(prepared_dir, tmp_path_factory) -> Path:
    return build_tiny_models(Path(prepared_dir), tmp_path_factory.getbasetemp() / "gcdm_tiny_models")


def _run(models: Path, prepared_dir, output_dir: Path, **kw) -> None:
    from monai.bundle import run

    args = dict(config_file=CONFIGS, meta_file=str(REPO / "bundle" / "configs" / "metadata.json"), logging_file=False,
                ckpt_dir=str(models), prepared_dir=str(prepared_dir), output_dir=str(output_dir), ddim_steps=2,
                progress=False, num_images=4, batch_size=2, seed=3, lesion_count_probs=[0.25, 0.5, 0.25])
    args.update(kw)
    run("synthesize", **args)


def _pixels(folder: Path) -> dict[str, np.ndarray]:
    return {p.stem: np.asarray(Image.open(p)) for p in sorted((folder / "images").glob("*.png"))}


# ------------------------------------------------------------------------------------------------ no model
@pytest.mark.parametrize("world", [1, 2, 3])
def test_shards_cover_every_index_once(world):
    for n in (0, 1, 2, 5, 7, 12):
        got = [i for r in range(world) for i in shard_indices(n, r, world)]
        assert sorted(got) == list(range(n)), (n, world)
        sizes = [len(shard_indices(n, r, world)) for r in range(world)]
        assert max(sizes) - min(sizes) <= 1
    with pytest.raises(ValueError):
        shard_indices(4, 2, 2)


def test_scale_shape_features_by_hand():
    feats = {"original_shape2D_PixelSurface": 100.0, "original_shape2D_Perimeter": 40.0,
             "original_shape2D_PerimeterSurfaceRatio": 0.4, "original_shape2D_Sphericity": 0.9,
             "original_firstorder_Mean": 0.3}
    out = scale_shape_features(feats, 2.0)
    assert out == {"original_shape2D_PixelSurface": 400.0, "original_shape2D_Perimeter": 80.0,
                   "original_shape2D_PerimeterSurfaceRatio": 0.2, "original_shape2D_Sphericity": 0.9,
                   "original_firstorder_Mean": 0.3}


def test_conditions_inside_breast_and_follow_the_mix(library, normaliser):
    probs, malignant = [0.2, 0.5, 0.3], 0.7
    spec = SynthesisSpec(seed=1, lesion_count_probs=probs, malignant_fraction=malignant)
    n = 300
    recipes = [sample_recipe(library, spec, i, "t") for i in range(n)]
    counts = Counter(len(r["lesions"]) + r["dropped_lesions"] for r in recipes)
    for k, p in enumerate(probs):  # the drawn counts follow the configuration (4 binomial standard deviations)
        assert abs(counts[k] / n - p) <= 4 * np.sqrt(p * (1 - p) / n), (k, counts)
    with_lesion = [r for r in recipes if r["lesions"]]
    share = sum(r["malignancy"] == "malignant" for r in with_lesion) / len(with_lesion)
    assert abs(share - malignant) <= 4 * np.sqrt(malignant * (1 - malignant) / len(with_lesion))
    assert sum(r["dropped_lesions"] for r in recipes) <= 0.02 * sum(counts[k] * k for k in counts)
    mirrored = sum(r["breast"]["mirror"] for r in recipes) / n
    assert abs(mirrored - 0.5) <= 4 * np.sqrt(0.25 / n)
    for r in recipes[:80]:
        cond, inst, rows = render_recipe(r, library, normaliser, 2)
        lesion = inst > 0
        # every lesion pixel lies inside the (mirrored / warped) breast, and the label map agrees
        from custom.engines.synthesize import _breast

        breast = _breast(library, r["breast"]["case_id"], r["breast"]["mirror"], r["breast"]["warp"])
        assert not (lesion & ~breast).any()
        assert ((cond.label == 2) == lesion).all() and ((cond.label >= 1) == (breast | lesion)).all()
        assert int(cond.lesion_present.sum()) == len(r["lesions"]) == int(inst.max())
        for k, les in enumerate(r["lesions"]):
            assert library.lesions[les["shape"]].malignancy == r["malignancy"]
            assert spec.scale_range[0] <= les["scale"] <= spec.scale_range[1]
            assert rows[k]["original_shape2D_MaximumDiameter"] == pytest.approx(
                library.lesions[les["shape"]].features["original_shape2D_MaximumDiameter"] * les["scale"])
        assert np.all((cond.features >= 0) & (cond.features <= 1))


def test_preset_features_and_unmeetable_mix(library, normaliser):
    spec = SynthesisSpec(seed=2, lesion_count_probs=[0, 1], malignant_fraction=0.0, feature_source="preset")
    library.check_spec(spec)
    presets = {p.name: p for p in library.presets}
    for i in range(10):
        r = sample_recipe(library, spec, i, "p")
        les = r["lesions"][0]
        name = les["features"].split(":", 1)[1]
        assert presets[name].malignancy == "benign" and les["shape"] in presets[name].members
        _, _, rows = render_recipe(r, library, normaliser, 2)
        want = scale_shape_features(presets[name].features, les["scale"])
        assert all(rows[0][k] == pytest.approx(v) for k, v in want.items())
    # a class the library does not have cannot be asked for
    only_benign = ConditionLibrary(**{**library.__dict__, "lesions": {k: v for k, v in library.lesions.items()
                                                                      if v.malignancy == "benign"}})
    with pytest.raises(MammoInputError, match="malignant_fraction"):
        only_benign.check_spec(SynthesisSpec(malignant_fraction=0.5))


def test_recipe_is_independent_of_sharding_and_regenerates(library, normaliser):
    spec = SynthesisSpec(seed=5)
    a = sample_recipe(library, spec, 7, "x")
    b = sample_recipe(library, spec, 7, "x")
    assert a == b and a["case_id"] == image_id("x", 7)
    assert sample_recipe(library, SynthesisSpec(seed=6), 7, "x") != a
    c1, i1, _ = render_recipe(a, library, normaliser, 2)
    c2, i2, _ = render_recipe(json.loads(json.dumps(a)), library, normaliser, 2)  # through its JSON record
    assert np.array_equal(c1.label, c2.label) and np.array_equal(i1, i2) and np.array_equal(c1.features, c2.features)


def test_merge_over_1_2_3_ranks(library, normaliser, prepared_dir, tmp_path):
    spec = SynthesisSpec(seed=0)
    n = 7
    for world in (1, 2, 3):
        out = tmp_path / f"w{world}"
        for rank in range(world):  # each rank writes its own shard
            writer = CohortWriter(out, run_tag="m")
            recipes = [sample_recipe(library, spec, i, "m") for i in shard_indices(n, rank, world)]
            for case in SynthesisDataset(recipes, library, normaliser, 2):
                writer.write(case, np.full((SIZE, SIZE), 0.25, dtype=np.float32))
        summary = merge_cohort(out, n, "m", Path(prepared_dir) / "feature_normalisation.json")
        datalist = json.loads((out / "datalist.json").read_text())
        ids = [e["case_id"] for e in datalist["training"]]
        assert ids == [image_id("m", i) for i in range(n)]  # every image once, in index order
        assert summary["images"] == n and all(e["synthetic"] for e in datalist["training"])
        assert datalist["validation"] == [] and datalist["test"] == []
        for e in datalist["training"]:  # boxes, BI-RADS and raw features of every lesion ride along
            assert len(e["findings"]) == len(e["lesion_features"]) == e["num_lesions"]
            assert all(f["birads"] and len(f["box"]) == 4 for f in e["findings"])
            assert all(len(r) == 68 for r in e["lesion_features"])  # lesion_index + 67 features
    # a missing image stops the merge (nothing written over the datalist)
    (tmp_path / "w2" / "records" / f"{image_id('m', 3)}.json").unlink()
    before = (tmp_path / "w2" / "datalist.json").read_text()
    with pytest.raises(MammoInputError, match="images 3 are not finished"):
        merge_cohort(tmp_path / "w2", n, "m", Path(prepared_dir) / "feature_normalisation.json")
    assert (tmp_path / "w2" / "datalist.json").read_text() == before


def _bare_run(out: Path, prepared_dir, model: Path, **kw) -> SynthesisRun:
    args = dict(output_dir=out, prepared_dir=prepared_dir, num_images=4, spec={"seed": 0}, image_size=SIZE,
                max_lesions=2, normaliser_file=Path(prepared_dir) / "feature_normalisation.json", model_path=model)
    args.update(kw)
    return SynthesisRun(**args)


def test_bad_inputs_before_any_work(prepared_dir, tmp_path):
    model = tmp_path / "model.pt"
    model.write_bytes(b"weights")
    out = tmp_path / "out"
    for n in (0, -3, "many"):
        with pytest.raises(MammoInputError, match="num_images"):
            _bare_run(out, prepared_dir, model, num_images=n).prepare()
    assert not out.exists()
    with pytest.raises(MammoInputError, match="cannot be met"):
        _bare_run(out, prepared_dir, model, mix_with=str(prepared_dir), mix_ratio=0.9).prepare()
    assert not out.exists()
    foreign = tmp_path / "foreign"
    (foreign / "images").mkdir(parents=True)
    (foreign / "images" / "a.png").write_bytes(b"x")
    with pytest.raises(MammoInputError, match="not empty and holds no synthesis run"):
        _bare_run(foreign, prepared_dir, model).prepare()
    assert sorted(p.name for p in foreign.rglob("*")) == ["a.png", "images"]
    # a run's folder resumes with the same model, and refuses another model or configuration
    run = _bare_run(out, prepared_dir, model).prepare()
    assert len(run.pending) == 4 and (out / "synthesis.json").is_file()
    manifest = (out / "synthesis.json").read_text()
    other = tmp_path / "other.pt"
    other.write_bytes(b"other weights")
    with pytest.raises(MammoInputError, match="different model"):
        _bare_run(out, prepared_dir, other).prepare()
    with pytest.raises(MammoInputError, match="different configuration"):
        _bare_run(out, prepared_dir, model, spec={"seed": 1}).prepare()
    assert (out / "synthesis.json").read_text() == manifest


# ------------------------------------------------------------------------------------------------ with the tiny model
def test_end_to_end_layout_regeneration_and_mix(models, prepared_dir, tmp_path):
    from monai.bundle import ConfigParser

    from custom.data.training import load_prepared_datalist, prepared_transforms

    out = tmp_path / "cohort"
    _run(models, prepared_dir, out, mix_with=str(prepared_dir), formats=["png", "dcm"])
    datalist = json.loads((out / "datalist.json").read_text())
    assert len(datalist["training"]) == 4
    import pydicom

    ds = pydicom.dcmread(out / datalist["training"][0]["dicom"])
    assert ds.Modality == "MG" and ds.BitsStored == 16 and "SYNTHETIC" in str(ds.SeriesDescription).upper()
    # prepare's layout: training code reads it unchanged
    items = load_prepared_datalist(out, "training", max_lesions=2)
    d = prepared_transforms(SIZE, 1.5, 2)(dict(items[0]))
    assert tuple(d["image"].shape) == (1, SIZE, SIZE) and float(d["image"].max()) <= 1.0
    img = np.asarray(Image.open(out / datalist["training"][0]["image"]))
    assert img.dtype == np.uint16
    summary = json.loads((out / "synthesis_summary.json").read_text())
    assert summary["throughput"]["images_per_s_total"] > 0 and summary["images"] == 4
    # the mixed folder: all real training images + the 4 synthetic ones, the real test split, ratio recorded
    real = json.loads((Path(prepared_dir) / "datalist.json").read_text())
    mixed = json.loads((out / "mixed" / "datalist.json").read_text())
    assert len(mixed["training"]) == len(real["training"]) + 4
    assert [e["case_id"] for e in mixed["test"]] == [e["case_id"] for e in real["test"]]
    mix = json.loads((out / "mixed" / "mix.json").read_text())
    assert mix["ratio"] == pytest.approx(4 / (4 + len(real["training"])))
    assert len(load_prepared_datalist(out / "mixed", "training", max_lesions=2)) == len(mixed["training"])

    # regenerate images from their records alone: recipe -> conditions -> the recorded seed -> the same pixels
    # (the first sampling batch, rows 0 and 1, regenerated as one batch as the run sampled them)
    recs = [json.loads((out / "records" / f"{e['case_id']}.json").read_text()) for e in datalist["training"][:2]]
    parser = ConfigParser()
    parser.read_config(CONFIGS)
    # a bare ConfigParser has no running workflow to find the bundle from: name it (model-zoo default ".")
    parser.update({"bundle_root": str(REPO / "bundle"), "ckpt_dir": str(models), "prepared_dir": str(prepared_dir),
                   "ddim_steps": 2, "progress": False})
    network = parser.get_parsed_content("network")
    network.load_state_dict(torch.load(models / "model.pt", weights_only=True)["model"])
    inferer = parser.get_parsed_content("inferer")
    library = ConditionLibrary.from_prepared(prepared_dir, SIZE)
    norm = FeatureNormaliser.load(out / "feature_normalisation.json")
    conds = [render_recipe(r["recipe"], library, norm, 2)[0] for r in recs]
    for cond, rec in zip(conds, recs):
        assert np.array_equal(cond.label, np.asarray(Image.open(out / rec["label"])))
    b = [c.to_batch() for c in conds]
    cat = {k: torch.cat([x[k] for x in b]) for k in b[0]}
    again = inferer(cat["label"], network, features=cat["features"], lesion_masks=cat["lesion_masks"],
                    lesion_present=cat["lesion_present"], seeds=[r["seed"] for r in recs])
    from custom.data.export import to_uint16

    for j, rec in enumerate(recs):
        assert np.array_equal(to_uint16(again[j, 0].numpy()), np.asarray(Image.open(out / rec["image"])))


def test_killed_run_resumes_with_every_image_once(models, prepared_dir, tmp_path, monkeypatch):
    out = tmp_path / "killed"
    real_write = CohortWriter.write
    calls = {"n": 0}

    def dying_write(self, case, image):
        if calls["n"] == 3:
            raise KeyboardInterrupt("killed")
        calls["n"] += 1
        return real_write(self, case, image)

    monkeypatch.setattr(CohortWriter, "write", dying_write)
    with pytest.raises(BaseException, match="killed"):
        _run(models, prepared_dir, out, num_images=6, batch_size=2)
    monkeypatch.setattr(CohortWriter, "write", real_write)
    done = sorted(p.name for p in (out / "records").glob("*.json"))
    assert len(done) == 3 and not (out / "datalist.json").exists()
    first = {p: (out / "records" / p).stat().st_mtime_ns for p in done}
    (out / "images" / ".half_written.png.abc.tmp.png").write_bytes(b"partial")  # what a SIGKILL leaves behind
    _run(models, prepared_dir, out, num_images=6, batch_size=2)
    datalist = json.loads((out / "datalist.json").read_text())
    ids = [e["case_id"] for e in datalist["training"]]
    assert len(ids) == 6 == len(set(ids)) == len(list((out / "records").glob("*.json")))
    assert len(list((out / "images").iterdir())) == 6  # the temporary file is gone
    assert {p: (out / "records" / p).stat().st_mtime_ns for p in done} == first  # finished images not redone
    shard = json.loads((out / "shards" / "rank0.json").read_text())
    assert shard["already_done"] == 3 and shard["written"] == 3


def test_two_gloo_processes_match_one_process(models, prepared_dir, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    common = ["--ckpt_dir", str(models), "--prepared_dir", str(prepared_dir), "--ddim_steps", "2", "--progress",
              "false", "--num_images", "5", "--batch_size", "1", "--seed", "3"]
    _run(models, prepared_dir, one, num_images=5, batch_size=1)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
           "monai.bundle", "run", "synthesize", "--config_file", json.dumps(CONFIGS).replace('"', "'"),
           "--output_dir", str(two), "--lesion_count_probs", "[0.25,0.5,0.25]", *common]
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "on 2 rank(s)" in res.stdout
    shards = sorted(p.name for p in (two / "shards").glob("*.json"))
    assert shards == ["rank0.json", "rank1.json"]
    assert [json.loads((two / "shards" / s).read_text())["written"] for s in shards] == [3, 2]
    a, b = _pixels(one), _pixels(two)
    assert sorted(a) == sorted(b) and len(a) == 5
    assert all(np.array_equal(a[k], b[k]) for k in a)
    da = json.loads((one / "datalist.json").read_text())["training"]
    db = json.loads((two / "datalist.json").read_text())["training"]
    assert [e["case_id"] for e in da] == [e["case_id"] for e in db]


def test_cli_error_line(prepared_dir, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = tmp_path / "never"
    res = subprocess.run([sys.executable, "-m", "monai.bundle", "run", "synthesize", "--config_file", CONFIGS[0],
                          "--prepared_dir", str(prepared_dir), "--output_dir", str(out), "--num_images", "0"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 1
    errors = [line for line in res.stderr.splitlines() if line.startswith("ERROR:")]
    assert errors == ["ERROR: num_images: must be at least 1, got 0"], res.stderr[-2000:]
    assert not out.exists()


def test_recipe_attributes_by_hand():
    """An image keeps its source breast's view / density, gets the area bin of its own label map (MAM-E: < 0.4
    small, 0.4-0.6 medium, > 0.6 large) and its own lesions' most suspicious category / BI-RADS (none without)."""
    from custom.engines.synthesize import recipe_attributes, source_breast_attributes

    source = source_breast_attributes({"case_id": "src", "view": "MLO", "laterality": "L", "density": "DENSITY D",
                                       "breast_birads": "BI-RADS 5", "findings": [{"birads": "BI-RADS 5"}],
                                       "manufacturer": "SIEMENS"})
    assert source == {"view": "MLO", "laterality": "L", "density": "D", "manufacturer": "siemens"}
    label = np.zeros((10, 10), np.uint8)
    label[:, :5] = 1  # 50 breast pixels of 100 -> medium
    label[0, 5] = 2  # + 1 lesion pixel: 0.51
    recipe = {"case_id": "syn", "malignancy": "malignant",
              "lesions": [{"birads": "BI-RADS 3", "category": "Mass"}, {"birads": None, "category": "Mass"}]}
    names = ["view", "density", "area", "lesion_category", "lesion_birads", "breast_birads"]
    assert recipe_attributes(recipe, source, label, names) == {
        "view": "MLO", "density": "D", "area": "medium", "lesion_category": "mass", "lesion_birads": "4"}
    label[:, 5:7] = 1  # 70 pixels -> large; no lesions -> none
    assert recipe_attributes({"case_id": "syn", "malignancy": None, "lesions": []}, source, label, names) == {
        "view": "MLO", "density": "D", "area": "large", "lesion_category": "none", "lesion_birads": "none"}


def test_a_model_with_attributes_is_asked_for_its_source_breasts_attributes(models, prepared_dir, tmp_path_factory,
                                                                             monkeypatch):
    """A stage-2 model trained with clinical attributes generates a cohort (it stopped on a missing input before):
    each image is asked for its source breast's view and density (read here from the prepared entry by hand) and
    the area bin of its own rendered breast; its record says so."""
    from monai.bundle import run

    from custom.networks.attributes import AttributeTokens

    root = tmp_path_factory.mktemp("attr_model")
    folder = root / "models"
    folder.mkdir()
    for name in ("autoencoder.pt", "autoencoder.pt.sha256"):
        shutil.copy(models / name, folder / name)
    cfg = REPO / "bundle" / "configs"
    names = ["view", "density", "area"]
    run("training", config_file=[str(cfg / "common.json"), str(cfg / "train_diffusion.json"), CONFIGS[1]],
        meta_file=str(cfg / "metadata.json"), logging_file=False, prepared_dir=str(prepared_dir), ckpt_dir=str(folder),
        dm_output_dir=str(root / "dm"), latent_cache_dir=str(root / "cache"), attribute_names=names,
        train_limit=2, val_limit=2, batch_size=2, max_epochs=1, warmup_steps=1, val_interval=1, save_interval=1,
        sample_interval=0, num_sample_cases=2, sample_ddim_steps=2, cache_workers=0)
    seen: list[list] = []
    real = AttributeTokens.forward

    def spy(self, codes, *args, **kwargs):
        seen.extend(torch.as_tensor(codes).tolist())
        return real(self, codes, *args, **kwargs)

    monkeypatch.setattr(AttributeTokens, "forward", spy)
    out = tmp_path_factory.mktemp("attr_cohort") / "cohort"
    _run(folder, prepared_dir, out, num_images=3, batch_size=3)
    entries = {e["case_id"]: e for e in json.loads((Path(prepared_dir) / "datalist.json").read_text())["training"]}
    records = [json.loads(p.read_text()) for p in sorted((out / "records").glob("*.json"))]
    assert len(records) == 3
    for rec in records:
        src = entries[rec["recipe"]["breast"]["case_id"]]
        ratio = (np.asarray(Image.open(out / rec["label"])) > 0).mean()
        area = "small" if ratio < 0.4 else "medium" if ratio <= 0.6 else "large"  # MAM-E's rule, by hand
        want = {"view": src["view"], "density": src["density"].split()[-1], "area": area}
        assert rec["attributes_requested"] == want and rec["density"] == want["density"]
        codes = [{"CC": 0, "MLO": 1}[want["view"]], "ABCD".index(want["density"]), ["small", "medium", "large"].index(area)]
        assert codes in seen, (rec["case_id"], codes)
