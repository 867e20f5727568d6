"""The ``inference`` workflow (``bundle/configs/inference.json``): the bundle CLI and in-process ``monai.bundle.run``.

Tiny stage-1 / stage-2 checkpoints are trained once per session through the real training configs (32 px, one
epoch / one iteration, ``tests/configs/inf_tiny.json``) on the session's prepared phantom (``conftest.prepared_dir``)
and cached under pytest's base temporary folder, so ``test_evaluate.py`` reuses them.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import build_tiny_models
from custom.engines.inference import describe_error

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundle" / "configs"
INFERENCE = CONFIGS / "inference.json"
TINY = REPO / "tests" / "configs" / "inf_tiny.json"
CONFIG_LIST = [str(INFERENCE), str(TINY)]
STEPS = 3


# ------------------------------------------------------------------------------------------------ fixtures
pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def models(prepared_dir, tmp_path_factory) -> Path:
    return build_tiny_models(Path(prepared_dir), tmp_path_factory.getbasetemp() / "gcdm_tiny_models")


@pytest.fixture(scope="module")
def case(prepared_dir, phantom_dir, tmp_path_factory) -> dict:
    """A test-split case with exactly one lesion: its prepared label map (64 px, i.e. source geometry for the 32-px
    model), a feature file with its raw features, its source DICOM and its lesion box from the annotations."""
    prepared, phantom = Path(prepared_dir), Path(phantom_dir)
    datalist = json.loads((prepared / "datalist.json").read_text())
    entry = next(e for e in datalist["test"] if e["num_lesions"] == 1)
    cid = entry["case_id"]
    folder = tmp_path_factory.mktemp("inf_case")
    rows = list(csv.DictReader(open(prepared / "features.csv", newline="")))
    feature_file = folder / "features.csv"
    with open(feature_file, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows([r for r in rows if r["case_id"] == cid])
    box = next(r for r in csv.DictReader(open(phantom / "finding_annotations.csv")) if r["image_id"] == cid and r["xmin"])
    return {
        "case_id": cid,
        "label": prepared / entry["label"],
        "features": feature_file,
        "dicom": Path(entry["source_image"]),
        "box": f"{float(box['xmin']):g},{float(box['ymin']):g},{float(box['xmax']):g},{float(box['ymax']):g}",
        "folder": folder,
    }


def _overrides(models: Path, prepared_dir, **kw) -> dict:
    return {"ckpt_dir": str(models), "normaliser_file": str(Path(prepared_dir) / "feature_normalisation.json"),
            "ddim_steps": STEPS, "progress": False, **kw}


def _run(models: Path, prepared_dir, **kw) -> None:
    """One in-process ``monai.bundle run inference`` (the CLI's code path)."""
    from monai.bundle import run

    run("inference", config_file=CONFIG_LIST, meta_file=str(CONFIGS / "metadata.json"), logging_file=False,
        **_overrides(models, prepared_dir, **kw))


def _cli(models: Path, prepared_dir, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "monai.bundle", "run", "inference", "--config_file", str(CONFIG_LIST)]
    for k, v in _overrides(models, prepared_dir).items():
        cmd += [f"--{k}", str(v)]
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    return subprocess.run(cmd + list(args), cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def _png(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im)


def _error(fn) -> str:
    with pytest.raises(Exception) as info:
        fn()
    message = describe_error(info.value)
    assert message is not None, f"not reported as an input error: {info.value!r}"
    assert "\n" not in message
    return message


# ------------------------------------------------------------------------------------------------ CLI
def test_cli_writes_every_format_and_seeds_are_reproducible(models, prepared_dir, case, tmp_path):
    out = tmp_path / "out"
    proc = _cli(models, prepared_dir, "--mask_file", str(case["label"]), "--feature_file", str(case["features"]),
                "--num_samples", "2", "--seed", "0", "--output_dir", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for seed in (0, 1):
        for suffix in (".dcm", ".png", ".nii.gz", ".json"):
            assert (out / f"synthetic_seed{seed}{suffix}").is_file(), sorted(p.name for p in out.iterdir())
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary file left
    assert "2 sample(s) of 1 case(s) written" in proc.stdout and "wrote   synthetic seed 1" in proc.stdout

    summary = json.loads((out / "inference_summary.json").read_text())
    assert summary["n_written"] == 2 and summary["skipped"] == []
    side = json.loads((out / "synthetic_seed1.json").read_text())
    params = side["parameters"]
    assert (params["seed"], params["ddim_steps"], params["guidance_scale"], params["sigma"]) == (1, STEPS, 3.0, 1.5)
    assert params["weights"] == "EMA" and len(params["model_sha256"]) == 64 and params["mode"] == "generate"
    assert side["synthetic"] is True and side["conditions"]["num_lesions"] == 1

    seed0, seed1 = _png(out / "synthetic_seed0.png"), _png(out / "synthetic_seed1.png")
    assert seed0.dtype == np.uint16 and seed0.shape == (64, 64)  # mapped back onto the 64-px mask grid
    assert not np.array_equal(seed0, seed1)  # different seeds differ
    import nibabel as nib

    nii = np.asarray(nib.load(str(out / "synthetic_seed0.nii.gz")).dataobj).T
    np.testing.assert_allclose(nii, seed0 / 65535.0, atol=0.6 / 65535.0)

    # same seed, alone in another run (in-process): the same image — within float rounding, since the two rows of
    # the first run were sampled in one batched call (per-row generators keep the noise identical)
    again = tmp_path / "again"
    _run(models, prepared_dir, mask_file=str(case["label"]), feature_file=str(case["features"]), seed=1, output_dir=str(again))
    alone = _png(again / "synthetic_seed1.png").astype(np.int64)
    assert np.abs(alone - seed1.astype(np.int64)).max() <= 4  # 4 / 65535 of the range (measured: 1)
    assert not (again / "synthetic_seed0.png").exists()


def test_cli_mask_feature_disagreement_is_one_line_and_writes_nothing(models, prepared_dir, case, tmp_path):
    rows = list(csv.DictReader(open(case["features"], newline="")))
    extra = dict(rows[0], lesion_index="1")
    bad = tmp_path / "two_lesions.csv"
    with open(bad, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows + [extra])
    out = tmp_path / "out"
    proc = _cli(models, prepared_dir, "--mask_file", str(case["label"]), "--feature_file", str(bad), "--output_dir", str(out))
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    errors = [line for line in proc.stderr.splitlines() if line.startswith("ERROR:")]
    assert len(errors) == 1, proc.stderr[-2000:]
    assert str(bad) in errors[0] and "2 feature row(s) but 1 lesion(s)" in errors[0]
    assert proc.stderr.strip().splitlines()[-1] == errors[0]
    assert not out.exists()


# ------------------------------------------------------------------------------------------------ keep the rest
@pytest.fixture(scope="module")
def keep_run(models, prepared_dir, case, tmp_path_factory) -> dict:
    """Keep-the-rest on the source DICOM with the annotated lesion box (breast mask found automatically): once in
    the model frame (exactness check), once mapped back to the source grid."""
    root = tmp_path_factory.mktemp("keep")
    args = dict(image_file=str(case["dicom"]), mode="keep", lesion_box=case["box"], feature_file=str(case["features"]),
                case_id=case["case_id"], seed=5)
    _run(models, prepared_dir, output_dir=str(root / "model_frame"), map_to_source=False, **args)
    _run(models, prepared_dir, output_dir=str(root / "source_frame"), **args)
    return {"root": root, "args": args, "name": f"{case['case_id']}_seed5"}


def test_keep_the_rest_changes_only_the_dilated_lesion_region(keep_run, models, prepared_dir, case):
    from monai.bundle import ConfigParser

    from custom.data.export import to_uint16
    from custom.data.prepare import load_display_image
    from custom.engines.inference import build_inference_cases
    from custom.transforms.geometry import MammoGeometry

    out = _png(keep_run["root"] / "model_frame" / f"{keep_run['name']}.png")
    side = json.loads((keep_run["root"] / "model_frame" / f"{keep_run['name']}.json").read_text())
    assert out.shape == (32, 32) and side["parameters"]["mode"] == "keep"

    # the known image is the source through the conditions' geometry: the `prepare` preprocessing
    geometry = MammoGeometry.from_dict(side["conditions"]["geometry"])
    display, _ = load_display_image(case["dicom"])
    expected = to_uint16(geometry.apply_image(display[None], "image")[0].numpy().clip(0, 1))

    p = ConfigParser()
    p.read_config(CONFIG_LIST)
    p.update({"bundle_root": str(CONFIGS.parent), "ckpt_dir": str(models)})
    a = keep_run["args"]
    cases = build_inference_cases(
        image_size=32, normaliser_file=str(Path(prepared_dir) / "feature_normalisation.json"), max_lesions=2,
        mode="keep", image_file=a["image_file"], lesion_box=a["lesion_box"], feature_file=a["feature_file"],
        keep_dilation=int(p.get_parsed_content("keep_dilation_px")),
    )
    c = cases[0]
    region, lesion = c.region, c.conditions.label == 2
    assert np.array_equal(to_uint16(c.known_image), expected)
    assert lesion.any() and region[lesion].all() and region.sum() > lesion.sum()
    assert region.sum() < 0.5 * (c.conditions.label > 0).sum()
    assert side["parameters"]["keep_region_pixels"] == int(region.sum())
    assert np.array_equal(out[~region], expected[~region])  # outside: exactly the preprocessed source
    assert (out[region] != expected[region]).sum() > 0.5 * region.sum()  # inside: new content

    src = _png(keep_run["root"] / "source_frame" / f"{keep_run['name']}.png")
    assert src.shape == display.shape  # mapped back onto the source grid


def test_dicom_read_back_has_new_uids_no_source_patient_and_the_png_pixels(keep_run, case):
    import pydicom

    source = pydicom.dcmread(str(case["dicom"]), stop_before_pixels=True)
    folder = keep_run["root"] / "source_frame"
    ds = pydicom.dcmread(str(folder / f"{keep_run['name']}.dcm"))
    assert ds.Modality == "MG" and ds.ConversionType == "SYN" and ds.BitsStored == 16
    for uid in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
        assert getattr(ds, uid) != getattr(source, uid)
    assert str(ds.PatientName) == "SYNTHETIC" and ds.PatientID == "SYNTHETIC"
    assert str(ds.PatientName) != str(source.PatientName) and ds.PatientID != source.PatientID
    assert str(source.PatientID) not in (folder / f"{keep_run['name']}.json").read_text()
    assert ds.ImageLaterality == source.ImageLaterality
    assert np.array_equal(ds.pixel_array, _png(folder / f"{keep_run['name']}.png"))


# ------------------------------------------------------------------------------------------------ batch mode
def test_datalist_batch_mode_writes_every_case_and_reports_skips(models, prepared_dir, tmp_path):
    prepared = tmp_path / "prepared"
    shutil.copytree(prepared_dir, prepared, ignore=shutil.ignore_patterns("latent_cache", "cache", "preview.png"))
    tests = json.loads((prepared / "datalist.json").read_text())["test"][:3]
    broken = prepared / tests[1]["label"]
    broken.write_bytes(b"not a png")
    out = tmp_path / "out"
    _run(models, prepared_dir, datalist=str(prepared / "datalist.json"), split="test", max_cases=3, output_dir=str(out))
    summary = json.loads((out / "inference_summary.json").read_text())
    assert summary["n_cases"] == 2 and summary["n_written"] == 2
    assert [s["case"] for s in summary["skipped"]] == [tests[1]["case_id"]] and summary["skipped"][0]["reason"]
    for entry in (tests[0], tests[2]):
        side = json.loads((out / f"{entry['case_id']}_seed0.json").read_text())
        assert side["conditions"]["mask"]["mode"] == "prepared_datalist"
        assert side["conditions"]["num_lesions"] == min(entry["num_lesions"], 2)
        assert _png(out / f"{entry['case_id']}_seed0.png").shape == (32, 32)  # model frame


# ------------------------------------------------------------------------------------------------ MONAI Label keys
def test_monai_label_keys_generate_from_a_label_map(models, prepared_dir, tmp_path):
    from monai.bundle import ConfigParser

    from custom.checkpoints import load_checkpoint

    p = ConfigParser()
    p.read_config(CONFIG_LIST)
    p.update({"bundle_root": str(CONFIGS.parent), "ckpt_dir": str(models), "ddim_steps": STEPS})
    network = p.get_parsed_content("network_def")
    ckpt = load_checkpoint(models / "model.pt")
    network.load_state_dict(ckpt.get("model", ckpt))  # MONAI Label's loader: the same weights, strict
    label = np.zeros((32, 32), dtype=np.uint8)
    label[4:28, :18] = 1
    Image.fromarray(label).save(tmp_path / "breast.png")
    data = p.get_parsed_content("preprocessing")({"image": str(tmp_path / "breast.png")})
    assert tuple(data["image"].shape) == (1, 32, 32)
    inferer = p.get_parsed_content("inferer")
    pred = inferer(data["image"][None], network)  # how MONAI Label calls it: breast only, no lesion features
    out = p.get_parsed_content("postprocessing")({"pred": pred})["pred"]
    assert tuple(out.shape) == (1, 1, 32, 32) and float(out.min()) >= 0 and float(out.max()) <= 1
    lesion = torch.as_tensor(label).float()[None, None]
    lesion[..., 10:14, 6:10] = 2
    assert "lesion features are required" in _error(lambda: inferer(lesion, network))


# ------------------------------------------------------------------------------------------------ bad input
def test_a_model_key_that_differs_from_the_checkpoint_record_is_named(models, prepared_dir, case, tmp_path):
    out = tmp_path / "out"
    msg = _error(lambda: _run(models, prepared_dir, mask_file=str(case["label"]), feature_file=str(case["features"]),
                              cross_attention_dim=8, output_dir=str(out)))
    assert str(models / "model.pt") in msg and "trained with cross_attention_dim=16" in msg and "--ckpt_dir" in msg
    assert not out.exists()


def test_an_unknown_option_is_rejected_not_ignored(models, prepared_dir, case, tmp_path):
    msg = _error(lambda: _run(models, prepared_dir, mask_file=str(case["label"]), feature_file=str(case["features"]),
                              accumulation_steps=4, output_dir=str(tmp_path / "out")))
    assert "--accumulation_steps" in msg and "not an option of inference.json" in msg
    assert not (tmp_path / "out").exists()


def test_corrupt_checkpoint_is_named(models, prepared_dir, case, tmp_path):
    broken = tmp_path / "models"
    broken.mkdir()
    for name in ("autoencoder.pt", "autoencoder.pt.sha256", "diffusion_info.json", "model.pt.sha256"):
        shutil.copy(models / name, broken / name)
    (broken / "model.pt").write_bytes((models / "model.pt").read_bytes()[:3000])
    out = tmp_path / "out"
    msg = _error(lambda: _run(broken, prepared_dir, mask_file=str(case["label"]), feature_file=str(case["features"]),
                              output_dir=str(out)))
    assert str(broken / "model.pt") in msg and "stage-2 model checkpoint is damaged" in msg
    assert not out.exists()


def test_unwritable_output_dir_fails_before_any_work(models, prepared_dir, case, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    msg = _error(lambda: _run(models, prepared_dir, mask_file=str(case["label"]), feature_file=str(case["features"]),
                              output_dir=str(blocker / "out")))
    assert str(blocker / "out") in msg and "not a folder" in msg
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


def test_conflicting_inputs_are_refused(models, prepared_dir, case, tmp_path):
    msg = _error(lambda: _run(models, prepared_dir, mask_file=str(case["label"]), feature_file=str(case["features"]),
                              image_file=str(case["dicom"]), output_dir=str(tmp_path / "out")))
    assert "--mode keep" in msg
    msg = _error(lambda: _run(models, prepared_dir, mode="keep", mask_file=str(case["label"]),
                              feature_file=str(case["features"]), output_dir=str(tmp_path / "out")))
    assert "image_file" in msg
    assert not (tmp_path / "out").exists()


def test_inference_builds_the_trained_network_from_the_checkpoint_record(models):
    """Training records the model keys in model.pt; inference rebuilds the network from configs/common.json + that
    record (no training config, no scale file) and loads the weights strictly: the same parameters, bit for bit, and
    the same sampler."""
    from monai.bundle import ConfigParser

    from custom.checkpoints import load_checkpoint
    from custom.workflows.bundle import BundleModel

    train = ConfigParser()
    train.read_config([str(CONFIGS / "common.json"), str(CONFIGS / "train_diffusion.json"), str(TINY)])
    model = BundleModel(CONFIGS.parent, models / "model.pt", models / "autoencoder.pt")
    ckpt = load_checkpoint(models / "model.pt")
    record = json.loads(ckpt["model_config"])
    assert record["image_size"] == 32 and record["cross_attention_dim"] == 16 and record["num_train_timesteps"] == 100
    a = train.get_parsed_content("network_def")
    assert type(a) is type(model.network)
    assert {k: tuple(v.shape) for k, v in a.state_dict().items()} == {k: tuple(v.shape) for k, v in model.network.state_dict().items()}
    assert all(torch.equal(v, ckpt["model"][k]) for k, v in model.network.state_dict().items())
    s_train, s_inf = train.get_parsed_content("sampling_scheduler"), model.sampling_scheduler
    assert s_train.prediction_type == s_inf.prediction_type and torch.equal(s_train.alphas_cumprod, s_inf.alphas_cumprod)
    for key in ("image_size", "sigma", "max_lesions", "conditioning_mode"):
        assert model[key] == train.get_parsed_content(key), key


def test_keep_region_and_paste_weights():
    from custom.engines.inference import keep_region, paste_weights

    label = np.zeros((20, 20), dtype=np.uint8)
    label[2:18, 2:18] = 1
    label[9:11, 9:11] = 2
    region = keep_region(label, 3)
    assert region[9:11, 9:11].all() and region[6, 10] and not region[5, 10] and not region[0].any()
    w = paste_weights(region, 2.0).numpy()
    assert (w[~region] == 0).all() and w[10, 10] == 1.0 and 0 < w[region].min() < 1
    assert not keep_region(np.ones((5, 5), dtype=np.uint8), 2).any()


# ------------------------------------------------------------------------------------------------ sampler choice
def test_sampler_pndm_runs_and_is_recorded(models, prepared_dir, case, tmp_path):
    """``--sampler pndm``: the workflow samples with MONAI's PNDM (another image than the DDIM default for the same
    seed) and records the sampler (and no eta) with the output."""
    kw = dict(mask_file=str(case["label"]), feature_file=str(case["features"]), formats=["png"], seed=3)
    _run(models, prepared_dir, sampler="pndm", output_dir=str(tmp_path / "pndm"), **kw)
    _run(models, prepared_dir, output_dir=str(tmp_path / "ddim"), **kw)
    params = json.loads((tmp_path / "pndm" / "synthetic_seed3.json").read_text())["parameters"]
    assert params["sampler"] == "pndm" and params["ddim_eta"] is None and params["ddim_steps"] == STEPS
    ddim = json.loads((tmp_path / "ddim" / "synthetic_seed3.json").read_text())["parameters"]
    assert "sampler" not in ddim and ddim["ddim_eta"] == 1.0  # the DDIM default's record is unchanged
    assert not np.array_equal(_png(tmp_path / "pndm" / "synthetic_seed3.png"), _png(tmp_path / "ddim" / "synthetic_seed3.png"))


@pytest.mark.parametrize("option, extra", [("ddim_eta", {"ddim_eta": 0.0}), ("mode", {"mode": "keep"}),
                                           ("sampler", {"sampler": "euler"})])
def test_sampler_options_pndm_cannot_honour_are_rejected_first(models, prepared_dir, case, tmp_path, option, extra):
    out = tmp_path / "out"
    kw = {"sampler": "pndm", **extra}
    msg = _error(lambda: _run(models, prepared_dir, mask_file=str(case["label"]), feature_file=str(case["features"]),
                              output_dir=str(out), **kw))
    assert msg.startswith(f"{option}:") or f"--{option}" in msg, msg
    assert not out.exists()
