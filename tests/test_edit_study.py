"""The edit study command (custom.engines.edit_study) end to end on tiny models: tables, figures, bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import INFERENCE_TINY_CONFIG, build_tiny_models

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundle" / "configs"
ATTRS = ["view", "density", "area"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def study_models(prepared_dir, tmp_path_factory) -> Path:
    """Stage 1 + segmenter of the shared tiny models, and a default-style model and an inpainting model that read
    view, density and area (one epoch each, mask drop on, healthy images included)."""
    from monai.bundle import run

    base = build_tiny_models(Path(prepared_dir), tmp_path_factory.getbasetemp() / "gcdm_tiny_models", segmenter=True)
    folder = tmp_path_factory.mktemp("study_models")
    for name in ("autoencoder.pt", "autoencoder.pt.sha256", "segmenter.pt", "segmenter.pt.sha256",
                 "feature_normalisation.json"):
        shutil.copyfile(base / name, folder / name)
    common = dict(meta_file=str(CONFIGS / "metadata.json"), logging_file=False, prepared_dir=str(prepared_dir),
                  ckpt_dir=str(folder), latent_cache_dir=str(folder / "cache"), attribute_names=ATTRS, p_mask=0.2,
                  train_limit=3, val_limit=2, batch_size=3, max_epochs=1, warmup_steps=1, val_interval=1,
                  save_interval=1, sample_interval=0, num_sample_cases=2, sample_ddim_steps=2, cache_workers=0)
    run("training", config_file=[str(CONFIGS / "common.json"), str(CONFIGS / "train_diffusion.json"),
                                 str(INFERENCE_TINY_CONFIG)], dm_output_dir=str(folder / "dm"), **common)
    run("training", config_file=[str(CONFIGS / "common.json"), str(CONFIGS / "train_diffusion.json"),
                                 str(CONFIGS / "train_inpaint.json"), str(INFERENCE_TINY_CONFIG)],
        dm_output_dir=str(folder / "ip"), **common)
    assert (folder / "model.pt").is_file() and (folder / "model_inpaint.pt").is_file()
    return folder


def test_edit_study_end_to_end(study_models, prepared_dir, phantom_dir, tmp_path):
    from custom.engines.edit_study import format_tables, main, study_cases

    cases = study_cases(prepared_dir, phantom_dir, 2)
    assert len(cases) == 2 and all(int(c["entry"]["num_lesions"]) >= 1 for c in cases)
    out = tmp_path / "study"
    rc = main(["--prepared_dir", str(prepared_dir), "--phantom_dir", str(phantom_dir), "--ckpt_dir", str(study_models),
               "--output", str(out), "--max_cases", "2", "--ddim_steps", "2", "--samples_per_attribute", "1",
               "--classifier_epochs", "1", "--extra_config", str(INFERENCE_TINY_CONFIG), "--remove_resample", "2",
               "--blend", "feather", "--attribute_guidance", "4", "--shape_bank", str(prepared_dir)])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert res["note"].startswith("phantom data") and res["settings"]["n_cases"] == 2
    assert res["settings"]["attribute_names"] == ATTRS
    for mode in ("keep", "inpaint"):
        r = res["keep_vs_inpaint"][mode]
        assert r["n_lesions"] + r["n_failed_features"] == 2
        assert r["mass_iou"] is None or 0.0 <= r["mass_iou"] <= 1.0
        # seam excess is the edited jump minus the real image's jump over the same ring
        assert r["seam_excess"] == pytest.approx(r["seam_jump"] - r["real_jump"])
        assert r["real_jump"] > 0
    for mech in ("keep", "inpaint"):
        r = res["removal"][mech]
        assert r["n"] == 2 and r["mechanism"] == [mech]
        assert r["contrast"] > 0 and r["ratio"] == pytest.approx(np.mean([c["ratio"] for c in r["per_case"]]))
        assert 0 <= r["found_after"] <= 2
        assert r["resample"] == 2 and np.isfinite(r["seam_excess"])
        side = json.loads((out / "samples" / f"remove_{mech}" / "r0_seed0.json").read_text())
        assert side["parameters"]["keep_resample"] == 2  # the study's options reached the inference run
        assert side["parameters"]["keep_blend"] == "feather"
    assert res["settings"]["blend"] == "feather"
    side = json.loads((out / "samples" / "keep" / "c0_seed0.json").read_text())
    assert side["parameters"]["keep_blend"] == "feather"  # the insertions too
    refs = res["removal_reference"]
    assert set(refs) == {"ring_fill", "sibling"}
    for name, r in refs.items():
        assert r["n"] == 2 and r["contrast"] == pytest.approx(res["removal"]["keep"]["contrast"])  # same boxes
        assert r["ratio"] == pytest.approx(np.mean([c["ratio"] for c in r["per_case"]])) and r["error"] > 0
    assert "reference: ring-mean fill" in (out / "results.md").read_text()
    af = res["attribute_fidelity"]
    assert af["n_generated"] == 8  # 2 views x 4 densities x 1 seed
    reader = af["density_reader"]  # the dense-fraction reader: fitted, or skipped with its reason (tiny phantom)
    if "skipped" in reader:
        assert af["attributes"] == ["view", "density"] and "DensityReader.fit" in reader["skipped"]
    else:
        assert af["attributes"] == ["view", "density", "density_reader"] and reader["thresholds"] == sorted(reader["thresholds"])
        assert af["accuracy"]["generated"]["density_reader"]["n"] == 8
    assert set(af["accuracy"]["generated"]) == set(af["attributes"]) and af["accuracy"]["real"]["view"]["n"] > 0
    sides = sorted((out / "samples" / "attributes").glob("a_*_seed*.json"))
    assert len(sides) == 8
    asked = {tuple(sorted(json.loads(p.read_text())["parameters"]["attributes"].items())) for p in sides}
    assert len(asked) == 8  # every view x density combination was requested
    assert {json.loads(p.read_text())["parameters"]["attribute_guidance"] for p in sides} == {4.0}
    assert res["settings"]["attribute_guidance"] == 4.0 and res["settings"]["shape_bank"] == str(prepared_dir)
    assert all(json.loads(p.read_text())["parameters"]["shape_bank"]["candidates"] >= 1 for p in sides)
    for name in ("healthy", "inpaint", "remove", "all"):
        assert Path(res["figures"][name]).is_file()
    healthy = json.loads((out / "samples" / "healthy" / "healthy_mlo_high_density_seed0.json").read_text())
    assert healthy["parameters"]["attributes"] == {"view": "MLO", "density": "C"}
    # every other sample keeps the pixels outside its region (the edit modes' promise), e.g. the removal
    table = (out / "results.md").read_text()
    assert table == format_tables(res) and "FD-radiomics67" in table and "phantom data" in table


def test_edit_study_bad_input_is_one_line_and_writes_nothing(study_models, prepared_dir, phantom_dir, tmp_path, capsys):
    from custom.engines.edit_study import main

    out = tmp_path / "never"
    base = ["--prepared_dir", str(prepared_dir), "--phantom_dir", str(phantom_dir), "--output", str(out),
            "--extra_config", str(INFERENCE_TINY_CONFIG)]
    no_inpaint = tmp_path / "no_inpaint"
    no_inpaint.mkdir()
    for name in ("autoencoder.pt", "model.pt", "segmenter.pt", "feature_normalisation.json"):
        for suffix in ("", ".sha256"):
            if (study_models / (name + suffix)).is_file():
                shutil.copyfile(study_models / (name + suffix), no_inpaint / (name + suffix))
    cases = [
        (["--ckpt_dir", str(no_inpaint)], "model_inpaint.pt: not found"),
        (["--ckpt_dir", str(study_models), "--max_cases", "1"], "max_cases: the Fréchet distance needs at least 2"),
        (["--ckpt_dir", str(study_models), "--classifier", str(tmp_path / "none.pt")], "none.pt: attribute classifier not found"),
        (["--ckpt_dir", str(study_models), "--segmenter", str(tmp_path / "seg.pt")], "seg.pt: lesion segmenter not found"),
        (["--ckpt_dir", str(study_models), "--remove_resample", "0"], "remove_resample: must be an integer 1..100"),
        (["--ckpt_dir", str(study_models), "--blend", "soft"], "keep_blend: must be one of feather, poisson"),
    ]
    for extra, words in cases:
        assert main(base + extra) == 1
        err = capsys.readouterr().err.strip()
        assert err.startswith("ERROR: ") and words in err and "\n" not in err, err
    bad_phantom = tmp_path / "empty_phantom"
    bad_phantom.mkdir()
    args = base + ["--ckpt_dir", str(study_models)]
    args[args.index(str(phantom_dir))] = str(bad_phantom)
    assert main(args) == 1
    assert "finding_annotations.csv: not found" in capsys.readouterr().err
    assert not out.exists()


def test_density_with_a_breast_mask_is_paired_and_read(study_models, prepared_dir, tmp_path):
    """The density-with-mask check: one test mask generated healthy at A-D (same seed), each read by the reader;
    the summary follows from the per-case rows."""
    from custom.engines.edit_study import _density_with_mask
    from custom.metrics.attribute_classifier import DensityReader, dense_fraction

    reader = DensityReader([0.2, 0.35, 0.5])
    out = tmp_path / "dm"
    res = _density_with_mask(Path(prepared_dir), 1, out, [str(CONFIGS / "inference.json"), str(INFERENCE_TINY_CONFIG)],
                             study_models, 2, 0, reader, 32, with_view=True)
    entry = json.loads((Path(prepared_dir) / "datalist.json").read_text())["test"][0]
    assert res["n"] == 4 and res["n_masks"] == 1
    rows = res["per_case"]
    assert [r["requested"] for r in rows] == ["A", "B", "C", "D"] and {r["case_id"] for r in rows} == {entry["case_id"]}
    for r in rows:
        side = json.loads((out / f"d_{entry['case_id'][:12]}_{r['requested']}_seed0.json").read_text())
        assert side["parameters"]["attributes"]["density"] == r["requested"]
        assert side["parameters"]["attributes"]["view"] == entry["view"]  # the image's own view
        assert side["conditions"]["num_lesions"] == 0  # healthy inside the given breast
        with __import__("PIL.Image").Image.open(out / f"d_{entry['case_id'][:12]}_{r['requested']}_seed0.png") as im:
            img = np.asarray(im).astype(np.float64) / 65535.0
        fr = dense_fraction(img)
        assert r["fraction"] == pytest.approx(fr, nan_ok=True) and r["read"] == reader.read([fr])[0]
    assert res["accuracy"] == pytest.approx(np.mean([r["read"] == r["requested"] for r in rows]))
    assert res["mean_fraction"]["C"] == pytest.approx(rows[2]["fraction"], nan_ok=True)
    rho = res["spearman_requested_vs_fraction"]
    assert rho is None or -1.0 <= rho <= 1.0
