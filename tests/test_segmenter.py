"""The lesion segmenter: ``bundle/configs/train_segmenter.json`` through the real CLI, and custom.metrics.segmenter.

A 3-study phantom (4 training / 4 validation / 4 test images) is prepared once per module at 64 px; the CLI runs
use a tiny override (32 px, channels [4, 8], 1 epoch) written next to the run.
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
from monai.networks.nets import UNet

from custom.checkpoints import load_checkpoint
from custom.errors import MammoInputError
from custom.metrics import FeatureDistance, build_segmenter, load_segmenter, predict_lesion, segmenter_score_on_real
from custom.metrics.segmenter import lesion_probability, segmenter_score_on_prepared

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "bundle" / "configs" / "train_segmenter.json"
TINY = {"image_size": 32, "segmenter_channels": [4, 8], "max_epochs": 1, "val_interval": 1, "batch_size": 4,
        "progress": False}

torch.set_num_threads(1)  # on a shared 2-core machine one thread is much faster than two (no OpenMP waits)


def _run_cli(prepared: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    tiny = out / "tiny.json"
    tiny.write_text(json.dumps(TINY))
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    cmd = [sys.executable, "-m", "monai.bundle", "run", "training",
           "--config_file", f"['{CONFIG}','{tiny}']",
           "--prepared_dir", str(prepared), "--ckpt_dir", str(out / "models"), "--log_dir", str(out / "runs"), *extra]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def prepared_dir(tmp_path_factory) -> Path:
    from custom.data.phantom import generate_phantom_dataset
    from custom.data.prepare import PrepareWorkflow

    phantom = tmp_path_factory.mktemp("seg_phantom")
    generate_phantom_dataset(phantom, n_studies=3, seed=0, image_shape=(320, 256), progress=False)
    out = tmp_path_factory.mktemp("seg_prepared")
    PrepareWorkflow(
        dataset_dir=str(phantom), output_dir=str(out), params_file=str(REPO / "bundle" / "configs" / "radiomics_params.yaml"),
        image_size=64, num_workers=1, progress=False, preview_cases=0,
    ).run()
    datalist = json.loads((out / "datalist.json").read_text())
    assert datalist["training"] and datalist["validation"] and datalist["test"], {k: len(v) for k, v in datalist.items()}
    return out


@pytest.fixture(scope="module")
def trained(prepared_dir, tmp_path_factory) -> Path:
    """One epoch of the real CLI; returns the run folder (``models/segmenter.pt``, ``runs/`` TensorBoard logs)."""
    out = tmp_path_factory.mktemp("segmenter_run")
    proc = _run_cli(prepared_dir, out)
    assert "val_mean_dice: " in proc.stdout + proc.stderr  # the evaluator ran and logged its Dice
    return out


def test_cli_run_leaves_a_loadable_checkpoint(trained):
    ckpt_path = trained / "models" / "segmenter.pt"
    ckpt = load_checkpoint(ckpt_path)
    assert {"model", "meta", "optimizer", "trainer"} <= set(ckpt)
    assert ckpt["trainer"]["iteration"] == ckpt["trainer"]["epoch_length"] == 1  # 4 training images, batch 4
    assert ckpt["meta"]["image_size"] == 32 and ckpt["meta"]["network_args"]["channels"] == [4, 8]
    assert any(p.name.startswith("events.out.tfevents") for p in (trained / "runs").rglob("*"))

    # from the checkpoint's own meta, and into an explicitly built network
    net = load_segmenter(ckpt_path)
    assert isinstance(net, UNet) and not net.training and net.segmenter_image_size == 32
    explicit = UNet(spatial_dims=2, in_channels=1, out_channels=2, channels=(4, 8), strides=(2,), num_res_units=1)
    net2 = load_segmenter(ckpt_path, explicit)
    assert net2 is explicit
    for (k, a), (_, b) in zip(net.state_dict().items(), net2.state_dict().items()):
        assert torch.equal(a, b), k

    images = torch.rand(3, 1, 32, 32)
    mask = predict_lesion(net, images)
    assert mask.shape == (3, 32, 32) and mask.dtype == torch.bool
    # other sizes run at the training size and come back at the input size
    prob = lesion_probability(net, np.random.default_rng(0).random((2, 1, 64, 64), dtype=np.float32))
    assert prob.shape == (2, 64, 64) and float(prob.min()) >= 0.0 and float(prob.max()) <= 1.0
    assert predict_lesion(net, torch.rand(2, 64, 64)).shape == (2, 64, 64)


def test_resume_continues_from_the_checkpoint(prepared_dir, trained, tmp_path):
    import shutil

    out = tmp_path / "resume"
    shutil.copytree(trained / "models", out / "models")
    before = load_checkpoint(out / "models" / "segmenter.pt")
    # also an empty validation split (val_limit 0): training goes on without validation
    proc = _run_cli(prepared_dir, out, "--resume", "True", "--max_epochs", "2", "--val_limit", "0")
    assert f"Restored all variables from {out / 'models' / 'segmenter.pt'}" in proc.stdout + proc.stderr
    after = load_checkpoint(out / "models" / "segmenter.pt")
    assert after["trainer"]["max_epochs"] == 2 and after["trainer"]["iteration"] == 2 * before["trainer"]["iteration"]
    assert not torch.equal(after["model"]["model.0.conv.unit0.conv.weight"], before["model"]["model.0.conv.unit0.conv.weight"])


def test_load_segmenter_errors_name_the_file(trained, tmp_path):
    ckpt_path = trained / "models" / "segmenter.pt"
    wrong = UNet(spatial_dims=2, in_channels=1, out_channels=2, channels=(8, 16), strides=(2,), num_res_units=1)
    with pytest.raises(MammoInputError, match="does not match the configured network") as err:
        load_segmenter(ckpt_path, wrong)
    assert str(ckpt_path) in str(err.value)
    with pytest.raises(MammoInputError, match="not found"):
        load_segmenter(tmp_path / "missing.pt")
    bare = tmp_path / "bare.pt"
    torch.save({"weights": {}}, bare)
    with pytest.raises(MammoInputError, match="no checksum file bare.pt.sha256") as err:  # not written by the bundle
        load_segmenter(bare)
    assert err.value.source == str(bare)
    from custom.checkpoints import save_checkpoint

    save_checkpoint(bare, {"weights": {}})
    with pytest.raises(MammoInputError, match="no 'model' entry"):
        load_segmenter(bare)
    with pytest.raises(ValueError, match="2 classes"):
        build_segmenter({"spatial_dims": 2, "in_channels": 1, "out_channels": 3, "channels": [4, 8], "strides": [2]})


def test_segmenter_scores_on_real_images_and_fsd(trained, prepared_dir):
    net = load_segmenter(trained / "models" / "segmenter.pt")
    res = segmenter_score_on_prepared(net, prepared_dir, "test", image_size=32)
    assert res["split"] == "test" and res["n_images"] >= 1 and res["n_pixels"] == res["n_images"] * 32 * 32
    for key in ("breast_iou", "pixel_accuracy"):
        assert 0.0 <= res[key] <= 1.0
    assert res["mass_iou"] is None or 0.0 <= res["mass_iou"] <= 1.0
    json.dumps(res, allow_nan=False)
    # images without a true lesion: the breast is scored, the per-image lesion Dice is undefined (not 0 or 1)
    images = torch.rand(2, 1, 32, 32) * 0.05
    images[:, :, 4:28, 4:20] = 0.6
    labels = torch.zeros(2, 32, 32, dtype=torch.long)
    labels[:, 4:28, 4:20] = 1
    scores = segmenter_score_on_real(net, images, labels)
    assert scores["n_images"] == 2 and scores["mass_dice_n"] == 0 and scores["mass_dice_n_undefined"] == 2
    assert scores["background_iou"] == 1.0  # the breast is found by threshold; lesion calls never leave it
    boxed = segmenter_score_on_real(net, images, labels, box_margin=2)
    assert boxed["box_margin"] == 2 and boxed["mass_iou"] is None  # no true lesion, no box: nothing can be called
    fsd = FeatureDistance(segmenter=net)(images.repeat(2, 1, 1, 1), torch.rand(4, 1, 32, 32))
    assert fsd["fsd"] > 0 and fsd["fsd_feature_dim"] == 4 + 8
