"""The ``evaluate`` workflow (``bundle/configs/evaluate.json``): wiring, outputs, ablation rows and their honesty.

The metric formulas (IoU / pixel accuracy from a confusion matrix, FD-radiomics67, MS-SSIM, ...) are tested in
``test_metrics.py``; here the real tiny models (trained once per session by the real training configs, see
``build_tiny_models``; shared with ``test_inference.py`` through pytest's base temporary folder) generate for the
session's prepared phantom test split and the workflow's outputs are checked.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from custom.engines.evaluation import PHANTOM_CAVEAT
from conftest import build_tiny_models
from custom.engines.inference import describe_error

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundle" / "configs"
EVALUATE = CONFIGS / "evaluate.json"
TINY = REPO / "tests" / "configs" / "inf_tiny.json"
CONFIG_LIST = [str(EVALUATE), str(TINY)]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def models(prepared_dir, tmp_path_factory) -> Path:
    return build_tiny_models(Path(prepared_dir), tmp_path_factory.getbasetemp() / "gcdm_tiny_models", segmenter=True)


def _overrides(models: Path, prepared_dir, results: Path, **kw) -> dict:
    return {"ckpt_dir": str(models), "segmenter_path": str(models / "segmenter.pt"), "prepared_dir": str(prepared_dir),
            "results_dir": str(results), "ddim_steps": 3, "diversity_cases": 1, "diversity_samples": 2,
            "figure_cases": 2, "progress": False, **kw}


def _run(models: Path, prepared_dir, results: Path, **kw) -> None:
    from monai.bundle import run

    run("evaluate", config_file=CONFIG_LIST, meta_file=str(CONFIGS / "metadata.json"), logging_file=False,
        **_overrides(models, prepared_dir, results, **kw))


@pytest.fixture(scope="module")
def evaluation(models, prepared_dir, tmp_path_factory) -> dict:
    """``python -m monai.bundle run evaluate`` on the tiny setup (every test case of the session phantom)."""
    results = tmp_path_factory.mktemp("evaluation")
    cmd = [sys.executable, "-m", "monai.bundle", "run", "evaluate", "--config_file", str(CONFIG_LIST)]
    for k, v in _overrides(models, prepared_dir, results).items():
        cmd += [f"--{k}", str(v)]
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    n_test = len(json.loads((Path(prepared_dir) / "datalist.json").read_text())["test"])
    label = f"gated_sigma1.5_{models.name}"  # a model folder other than bundle/models is part of the row label
    return {"results": results, "run": results / label, "label": label, "proc": proc, "n_test": n_test}


def _in01(v) -> bool:
    return v is not None and 0.0 <= float(v) <= 1.0


# ------------------------------------------------------------------------------------------------ the CLI run
def test_cli_writes_metrics_with_the_expected_keys_and_ranges(evaluation):
    m = json.loads((evaluation["run"] / "metrics.json").read_text())
    n = evaluation["n_test"]
    assert {"metrics", "settings", "controllability", "segmenter_ceiling", "fd_radiomics67", "frd_published", "feature_distance", "diversity",
            "reconstruction", "caveat", "skipped", "seconds"} <= set(m)
    # a model without attributes: the attribute-fidelity check says why it is empty
    assert m["attribute_fidelity"] == {"skipped": "the model reads no attributes"}
    assert m["metrics"]["density_accuracy"] is None
    s = m["metrics"]
    for key in ("mass_iou", "breast_iou", "pixel_accuracy", "ceiling_breast_iou", "ceiling_pixel_accuracy", "ms_ssim"):
        assert _in01(s[key]), (key, s[key])
    for key in ("mass_dice_mean", "mass_dice_std", "ceiling_mass_iou"):
        assert s[key] is None or _in01(s[key]), (key, s[key])
    assert -1.0 <= s["recon_ssim"] <= 1.0 and s["recon_psnr"] > 0
    assert s["feature_distance_name"] == "fsd" and s["feature_distance"] >= 0  # no local Inception: never "fid"
    assert "fid" not in m["feature_distance"] and m["feature_distance"]["fsd_feature_network"] == "segmenter encoder"
    assert s["fd_radiomics67"] is None or s["fd_radiomics67"] >= 0
    assert s["frd"] is None and m["frd_published"]["frd"] is None  # the published FRD is off by default (project protocol)
    assert s["floor_feature_distance"] >= 0  # real-vs-real floor: two halves of the real test set
    # stage-1 reference: real vs the real images' own autoencoder round trip, the same distance function
    assert s["stage1_feature_distance"] >= 0 and s["stage1_feature_distance"] == m["feature_distance"]["stage1_reconstruction"]
    assert s["stage1_fd_radiomics67"] is None or s["stage1_fd_radiomics67"] >= 0
    # lesion pixels clipped at white (0.9.2): one region (the test lesions) for all three image sets
    sat = m["lesion_saturation"]
    assert {"generated", "real", "stage1_reconstruction"} == set(sat)
    assert len({v["n_pixels"] for v in sat.values()}) == 1 and sat["real"]["level"] == 0.995
    for key, name in (("generated", "lesion_saturation"), ("real", "real_lesion_saturation"),
                      ("stage1_reconstruction", "stage1_lesion_saturation")):
        assert s[name] == sat[key]["fraction"] and (s[name] is None or _in01(s[name]))
    top = m["fd_radiomics67"]["fd_radiomics67_top_features"]
    assert (top == []) == (s["fd_radiomics67"] is None) and all(t["distance"] >= 0 for t in top)
    cm = np.asarray(m["controllability"]["confusion_matrix"])
    assert cm.shape == (3, 3) and cm.sum() == n * 32 * 32  # ONE matrix pooled over every test image
    assert m["controllability"]["n_images"] == m["segmenter_ceiling"]["n_images"] == n
    st = m["settings"]
    assert st["ddim_steps"] == 3 and "DDIM steps" in st["ddim_steps_note"] and st["n_cases"] == n
    assert st["n_generated"] == n + 1  # + 1 extra sample for the one diversity condition
    assert st["sigma"] == st["sigma_trained"] == 1.5 and st["sigma_matches_training"] is True
    assert m["diversity"]["n_conditions"] == 1 and m["diversity"]["n_samples_per_condition"] == 2
    assert m["phantom"] is True and m["caveat"] == PHANTOM_CAVEAT
    assert len(list((evaluation["run"] / "generated").glob("*.png"))) == n + 1


def test_cli_writes_the_report_figure_and_prints_the_table(evaluation):
    report = (evaluation["run"] / "report.md").read_text()
    assert PHANTOM_CAVEAT in report
    assert "| Mass IoU (pooled) |" in report and "| Breast IoU (pooled) |" in report and "ceiling" in report
    assert "![mask, generated, real](figure_grid.png)" in report
    with Image.open(evaluation["run"] / "figure_grid.png") as im:
        assert im.size[0] > 200 and im.size[1] > 200
    out = evaluation["proc"].stdout
    assert "Mass IoU (pooled)" in out and "Pixel accuracy (pooled)" in out and PHANTOM_CAVEAT in out
    assert str(evaluation["run"] / "metrics.json") in out and str(evaluation["run"] / "report.md") in out
    rows = {r["label"]: r for r in json.loads((evaluation["results"] / "ablations.json").read_text())["rows"]}
    metrics = json.loads((evaluation["run"] / "metrics.json").read_text())["metrics"]
    assert rows[evaluation["label"]]["mass_iou"] == metrics["mass_iou"] and rows[evaluation["label"]]["sigma"] == 1.5
    assert not [p for p in evaluation["run"].rglob(".*")]  # atomic writes leave no temporary file


def test_sigma_rows_make_the_tradeoff_plot_and_a_mismatched_sigma_is_flagged(evaluation, models, prepared_dir, capsys):
    _run(models, prepared_dir, evaluation["results"], sigma=2.5, max_cases=2, label="sigma2.5_mismatch")
    run = evaluation["results"] / "sigma2.5_mismatch"
    m = json.loads((run / "metrics.json").read_text())
    assert m["settings"]["sigma"] == 2.5 and m["settings"]["sigma_trained"] == 1.5
    assert m["settings"]["sigma_matches_training"] is False
    assert "WARNING: sigma 2.5 differs from the model's training sigma 1.5" in capsys.readouterr().out
    rows = {r["label"]: r for r in json.loads((evaluation["results"] / "ablations.json").read_text())["rows"]}
    assert {evaluation["label"], "sigma2.5_mismatch"} <= set(rows)
    assert rows["sigma2.5_mismatch"]["sigma_matches_training"] is False and rows["sigma2.5_mismatch"]["n_cases"] == 2
    with Image.open(run / "sigma_tradeoff.png") as im:
        assert im.size[0] > 200
    report = (run / "report.md").read_text()
    assert "## Ablations" in report and "![Mass IoU and FD-radiomics67 vs sigma](sigma_tradeoff.png)" in report
    assert "| sigma2.5_mismatch | gated | 2.5 ⚠ | 1.5 |" in report and "one model trained per sigma" in report


def test_a_local_feature_network_gives_fid_instead_of_fsd(models, prepared_dir, tmp_path):
    torch.manual_seed(0)
    net = torch.jit.script(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                                               torch.nn.Flatten()))
    path = tmp_path / "feature_net.pt"
    net.save(str(path))
    _run(models, prepared_dir, tmp_path / "results", fid_network=str(path), fid_input_size=32, max_cases=2, label="fid")
    m = json.loads((tmp_path / "results" / "fid" / "metrics.json").read_text())
    assert m["metrics"]["feature_distance_name"] == "fid" and m["metrics"]["feature_distance"] >= 0
    assert m["feature_distance"]["fid_feature_network"] == str(path) and m["feature_distance"]["fid_feature_dim"] == 8
    assert "| FID (local feature network) |" in (tmp_path / "results" / "fid" / "report.md").read_text()


# ------------------------------------------------------------------------------------------------ refusals
def test_conditioning_mode_ablation_needs_a_model_trained_with_it(models, prepared_dir, tmp_path):
    with pytest.raises(Exception) as info:
        _run(models, prepared_dir, tmp_path / "results", conditioning_mode="concat")
    msg = describe_error(info.value)
    assert msg is not None and "model.pt" in msg and "conditioning_mode='gated'" in msg and "--ckpt_dir" in msg
    assert not (tmp_path / "results").exists()


def test_missing_segmenter_is_named_before_generating(models, prepared_dir, tmp_path):
    missing = tmp_path / "no_segmenter.pt"
    with pytest.raises(Exception) as info:
        _run(models, prepared_dir, tmp_path / "results", segmenter_path=str(missing))
    msg = describe_error(info.value)
    assert msg is not None and str(missing) in msg and "not found" in msg
    assert not (tmp_path / "results").exists()


# ------------------------------------------------------------------------------------------------ pieces
def test_evaluate_and_inference_take_the_same_model_definition():
    """Both rebuild the model with the same BundleModel (common.json + the checkpoint record); only evaluation may
    change sigma (an ablation) and it samples with fewer DDIM steps."""
    inference = json.loads((CONFIGS / "inference.json").read_text())
    evaluate = json.loads(EVALUATE.read_text())
    assert not [v for cfg in (inference, evaluate) for v in cfg.values() if isinstance(v, str) and v.startswith("%")]
    assert {k: v for k, v in inference["model"].items() if k != "may_differ"} == \
        {k: v for k, v in evaluate["model"].items() if k != "may_differ"}
    assert inference["model"]["may_differ"] == [] and evaluate["model"]["may_differ"] == ["sigma"]
    assert inference["network_def"] == evaluate["network_def"] == "$@model.network"
    assert inference["ddim_steps"] == 20 and evaluate["ddim_steps"] is None  # evaluate: the protocol's value
    assert evaluate["protocol"] == "project"  # the project's protocol stays the default


def test_lesion_rois_run_labels_and_phantom_detection(prepared_dir, tmp_path):
    from custom.engines.evaluation import is_phantom, lesion_rois, run_label

    inst = np.zeros((2, 20, 20), dtype=np.uint8)
    inst[0, 8:12, 4:8] = 1
    roi = lesion_rois(inst, margin=0.25, min_margin=2)
    rows, cols = np.nonzero(roi[0])
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (6, 13, 2, 9) and not roi[1].any()
    assert run_label("gated", 1.5, None, "bundle/models", "bundle/models") == "gated_sigma1.5"
    assert run_label("concat", 2.0, None, tmp_path / "m_sigma2", "bundle/models") == "concat_sigma2_m_sigma2"
    assert run_label("gated", 0, "mine", tmp_path, "bundle/models") == "mine"
    assert is_phantom(prepared_dir) is True
    assert is_phantom(prepared_dir, "false") is False
    (tmp_path / "summary.json").write_text(json.dumps({"dataset_dir": str(tmp_path / "real_data")}))
    assert is_phantom(tmp_path) is False


def test_protocol_gcdm_end_to_end_mass_images_only_with_the_reference_settings(models, prepared_dir, tmp_path):
    """``run evaluate --protocol gcdm``: only the test images with a mass, 50 DDIM steps, eta 1, guidance 3, one
    sample each; the headline IoUs / PA are the reference's pooled confusion matrix (breast threshold rule, lesion by
    the bundle's segmenter inside the boxes, named as such) with the real-image ceiling beside them."""
    from custom.metrics.protocol import gcdm_test_entries

    test = json.loads((Path(prepared_dir) / "datalist.json").read_text())["test"]
    n_mass = len(gcdm_test_entries(test))
    assert 0 < n_mass < len(test)  # the session phantom has healthy test images: the selection is exercised
    kw = _overrides(models, prepared_dir, tmp_path / "res", protocol="gcdm", label="gcdm")
    for k in ("ddim_steps", "diversity_cases", "diversity_samples"):
        kw.pop(k)
    from monai.bundle import run

    run("evaluate", config_file=CONFIG_LIST, meta_file=str(CONFIGS / "metadata.json"), logging_file=False, **kw)
    m = json.loads((tmp_path / "res" / "gcdm" / "metrics.json").read_text())
    st = m["settings"]
    assert (st["protocol"], st["ddim_steps"], st["ddim_eta"], st["guidance_scale"]) == ("gcdm", 50, 1.0, 3.0)
    assert st["protocol_deviations"] == {} and m["protocol"] == "gcdm"
    assert st["n_cases"] == n_mass and st["n_generated"] == n_mass  # mass images only, one sample per mask
    assert sum("no mass" in s["reason"] for s in m["skipped"]) == len(test) - n_mass
    g = m["gcdm_protocol"]
    assert "own lesion segmenter (not MedSAM)" in g["lesion_segmenter"] == m["lesion_segmenter"]
    for key in ("generated", "real_ceiling"):
        cm = np.asarray(g[key]["confusion_matrix"])
        assert cm.shape == (3, 3) and cm.sum() == n_mass * 32 * 32  # one matrix pooled over the mass test images
        tp = np.diag(cm)
        assert g[key]["mass_iou"] == pytest.approx(100 * tp[2] / (cm[2].sum() + cm[:, 2].sum() - tp[2]))
        assert g[key]["pixel_accuracy"] == pytest.approx(100 * tp.sum() / cm.sum())
    assert m["metrics"]["mass_iou"] == pytest.approx(g["generated"]["mass_iou"] / 100)
    assert m["metrics"]["ceiling_breast_iou"] == pytest.approx(g["real_ceiling"]["breast_iou"] / 100)
    report = (tmp_path / "res" / "gcdm" / "report.md").read_text()
    assert "Protocol: **gcdm**" in report and "not MedSAM" in report and "GCDM pooled confusion matrix" in report


def test_protocol_options_are_checked_before_generating(models, prepared_dir, tmp_path):
    with pytest.raises(Exception) as err:
        _run(models, prepared_dir, tmp_path / "r", protocol="paper")
    assert "--protocol" in describe_error(err.value)
    with pytest.raises(Exception) as err:
        _run(models, prepared_dir, tmp_path / "r", protocol="gcdm", sam_path=str(tmp_path / "no_sam"))
    assert "--sam_path" in describe_error(err.value) or "no_sam" in describe_error(err.value)
    assert not (tmp_path / "r").exists() or not list((tmp_path / "r").rglob("*.png"))


def test_gcdm_max_cases_counts_the_mass_cases_evaluated(prepared_dir, tmp_path):
    """``--protocol gcdm --max_cases k``: the first k images *with a mass* are evaluated, even when the split starts
    with images without one (a datalist whose test split lists every non-mass image first); the non-mass images
    before them are listed as skipped. The project protocol keeps "the first k images"."""
    from custom.engines.evaluation import evaluation_cases
    from custom.errors import MammoInputError

    src = Path(prepared_dir)
    for p in src.iterdir():
        if p.name != "datalist.json":
            (tmp_path / p.name).symlink_to(p)
    splits = json.loads((src / "datalist.json").read_text())
    every = [e for s in ("training", "validation", "test") for e in splits.get(s, [])]
    healthy = [e for e in every if int(e.get("num_lesions", 0)) == 0][:3]
    masses = [e for e in every if int(e.get("num_lesions", 0)) > 0][:3]
    assert len(healthy) == 3 and len(masses) == 3  # the session phantom has both
    (tmp_path / "datalist.json").write_text(json.dumps({**splits, "test": healthy + masses}))
    kw = dict(image_size=32, sigma=2.0, max_lesions=2, diversity_cases=0)
    got = evaluation_cases(tmp_path, "test", max_cases=2, mass_only=True, **kw)
    assert [c.name for c in got.cases] == [masses[0]["case_id"], masses[1]["case_id"]]  # 2 mass cases, not 0
    assert [s["case"] for s in got.skipped if "no mass" in s["reason"]] == [e["case_id"] for e in healthy]
    everything = evaluation_cases(tmp_path, "test", mass_only=True, **kw)
    assert [c.name for c in everything.cases] == [e["case_id"] for e in masses]
    project = evaluation_cases(tmp_path, "test", max_cases=2, mass_only=False, **kw)
    assert [c.name for c in project.cases] == [healthy[0]["case_id"], healthy[1]["case_id"]]
    (tmp_path / "datalist.json").write_text(json.dumps({**splits, "test": healthy}))
    with pytest.raises(MammoInputError, match="has no image with a mass"):
        evaluation_cases(tmp_path, "test", max_cases=2, mass_only=True, **kw)


def _density_image(fraction: float, size: int = 64) -> np.ndarray:
    """A breast (left 40 columns) of fat (0.5) with ``fraction`` of its pixels dense (0.9, scattered by a fixed
    permutation); air elsewhere."""
    img = np.zeros((size, size), np.float32)
    breast = np.full(size * 40, 0.5, np.float32)
    breast[: int(round(fraction * breast.size))] = 0.9
    img[:, :40] = breast[np.random.default_rng(0).permutation(breast.size)].reshape(size, 40)
    return img


def test_evaluation_attribute_fidelity_reads_density_back(tmp_path):
    """The report's density check on hand-made images: the reader is fitted on training images of known dense
    fractions (A 0.1, B 0.3, C 0.5, D 0.7 -> thresholds 0.2 / 0.4 / 0.6) and reads the generated and real images."""
    from types import SimpleNamespace

    from PIL import Image

    from custom.engines.evaluation import EvaluationReport
    from custom.metrics.attribute_classifier import dense_fraction

    prepared = tmp_path / "prepared"
    (prepared / "images").mkdir(parents=True)
    entries = []
    for i, (dens, fr) in enumerate([("A", 0.1), ("B", 0.3), ("C", 0.5), ("D", 0.7)] * 2):
        Image.fromarray((_density_image(fr) * 65535).astype(np.uint16)).save(prepared / "images" / f"t{i}.png")
        entries.append({"case_id": f"t{i}", "image": f"images/t{i}.png", "density": f"DENSITY {dens}", "num_lesions": 0})
    (prepared / "datalist.json").write_text(json.dumps({"training": entries, "test": []}))
    assert dense_fraction(_density_image(0.3)) == pytest.approx(0.3, abs=0.01)  # the construction reads as meant

    asked = ["A", "B", "C", "D"]
    cases = [SimpleNamespace(extra={"attributes": {"density": d}, "attribute_codes": np.array([k])}) for k, d in enumerate(asked)]
    report = EvaluationReport.__new__(EvaluationReport)
    report.cases, report.prepared_dir = SimpleNamespace(cases=cases), prepared
    gen = np.stack([_density_image(f) for f in (0.1, 0.5, 0.5, 0.7)])[:, None]  # read A, C, C, D
    real = np.stack([_density_image(f) for f in (0.1, 0.3, 0.5, 0.7)])[:, None]
    out = report._attribute_fidelity({"gen": gen, "real": real})
    assert out["thresholds"] == pytest.approx([0.2, 0.4, 0.6], abs=0.01) and out["fit_on"] == 8 and out["n"] == 4
    assert out["generated_accuracy"] == 0.75 and out["real_accuracy"] == 1.0
    assert out["spearman_requested_vs_generated_fraction"] == pytest.approx(0.9486833, abs=1e-6)  # ranks 1,2.5,2.5,4
    for c in cases:
        c.extra.pop("attribute_codes")
    assert report._attribute_fidelity({"gen": gen, "real": real}) == {"skipped": "the model reads no attributes"}
