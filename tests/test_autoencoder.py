"""Stage 1: AutoencoderKL training with Ignite engines (custom.engines.autoencoder, custom.losses,
bundle/configs/train_autoencoder.json and its multi-GPU override).

A 3-study phantom is prepared once per module; the bundle runs use ``tests/configs/ae_tiny.json`` (32 px, tiny
channels) on top of the real config.
"""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from ignite.engine import Events
from monai.networks.nets import AutoencoderKL, PatchDiscriminator
from PIL import Image

from custom.engines.autoencoder import (
    AtomicCheckpointSaver,
    AutoencoderTrainer,
    ImagePrepareBatch,
    NonFiniteLossError,
    NonFiniteLossHandler,
    compute_latent_scale_factor,
)
from custom.checkpoints import load_checkpoint, load_stage1
from custom.errors import MammoInputError
from custom.losses import FeatureNet, LocalPerceptualLoss, kl_loss, load_feature_network, save_feature_network

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundle" / "configs"
COMMON = CONFIGS / "common.json"
BASE = CONFIGS / "train_autoencoder.json"
MULTI_GPU = CONFIGS / "multi_gpu_train_autoencoder.json"
TINY = REPO / "tests" / "configs" / "ae_tiny.json"
STATE = "autoencoder_state.pt"

# One thread per process: the tiny models here gain nothing from intra-op threads, and two OpenMP threads on a
# busy 2-core machine (or next to a second DDP process) are several times slower than one.
torch.set_num_threads(1)


def _env(threads: int = 1) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def _config_list(*files: Path) -> str:
    return "[" + ",".join(f"'{f}'" for f in files) + "]"


@pytest.fixture(scope="module")
def ae_prepared(tmp_path_factory) -> Path:
    """3-study phantom (12 images: 4 training / 4 validation / 4 test) prepared at 64 px."""
    from custom.data.phantom import generate_phantom_dataset
    from custom.data.prepare import PrepareWorkflow

    phantom = tmp_path_factory.mktemp("ae_phantom")
    generate_phantom_dataset(phantom, n_studies=3, seed=0, image_shape=(320, 256), progress=False)
    out = tmp_path_factory.mktemp("ae_prepared")
    PrepareWorkflow(
        dataset_dir=str(phantom), output_dir=str(out), params_file=str(CONFIGS / "radiomics_params.yaml"),
        image_size=64, num_workers=1, progress=False, preview_cases=0,
    ).run()
    datalist = json.loads((out / "datalist.json").read_text())
    assert datalist["training"] and datalist["validation"], {k: len(v) for k, v in datalist.items()}
    return out


def _tiny_parser(prepared: Path, **overrides):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(COMMON), str(BASE), str(TINY)])
    parser.update({"prepared_dir": str(prepared), "device": "$torch.device('cpu')", **overrides})
    parser.parse()
    return parser


def _bundle_run(prepared: Path, out: Path, **overrides) -> None:
    """One in-process ``monai.bundle run training`` (the same code path as the CLI)."""
    from monai.bundle import run

    run(
        "training", config_file=[str(COMMON), str(BASE), str(TINY)], meta_file=str(CONFIGS / "metadata.json"), logging_file=False,
        prepared_dir=str(prepared), ckpt_dir=str(out / "models"), log_dir=str(out / "logs"),
        device="$torch.device('cpu')", **overrides,
    )


def _tiny_autoencoder(channels=(8, 16), latent_channels=2) -> AutoencoderKL:
    return AutoencoderKL(
        spatial_dims=2, in_channels=1, out_channels=1, channels=channels, num_res_blocks=1,
        attention_levels=(False,) * len(channels), latent_channels=latent_channels, norm_num_groups=8,
        with_encoder_nonlocal_attn=False, with_decoder_nonlocal_attn=False,
    )


def _batches(images: torch.Tensor, batch_size: int) -> list[dict]:
    return [{"image": images[i:i + batch_size]} for i in range(0, len(images), batch_size)]


def _phantom_images(prepared: Path, size: int = 32, split: str = "training") -> torch.Tensor:
    from custom.data.training import load_prepared_datalist, prepared_transforms

    xform = prepared_transforms(size, 1.5, 2)
    return torch.stack([xform(item)["image"] for item in load_prepared_datalist(prepared, split)])


def _cause(exc: BaseException, kind: type) -> BaseException | None:
    """``exc`` or the first exception of type ``kind`` in its ``__cause__`` chain (the bundle runner wraps errors
    in ``RuntimeError("Failed to evaluate ...")``)."""
    while exc is not None and not isinstance(exc, kind):
        exc = exc.__cause__
    return exc


def _read_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


# ---------------------------------------------------------------------------------------------- config
def test_common_config_defines_the_keys_both_stages_use():
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(COMMON), str(BASE)])
    parser.update({"device": "$torch.device('cpu')"})
    parser.parse()
    got = {k: parser.get_parsed_content(k) for k in (
        "bundle_root", "prepared_dir", "ckpt_dir", "device", "image_size", "sigma", "max_lesions", "latent_channels",
        "stage1_checkpoint", "latent_size")}
    assert got["bundle_root"] == "." and got["prepared_dir"] == "data/prepared"  # "." outside a ConfigWorkflow
    assert got["ckpt_dir"] == "./models" and got["stage1_checkpoint"] == "./models/autoencoder.pt"
    assert got["sigma"] == 1.5 and got["max_lesions"] == 2
    ae = parser.get_parsed_content("autoencoder_def")
    assert isinstance(ae, AutoencoderKL) and ae.latent_channels == got["latent_channels"]
    with torch.no_grad():
        z_mu, _ = ae.encode(torch.zeros(1, 1, got["image_size"], got["image_size"]))
    assert tuple(z_mu.shape) == (1, got["latent_channels"], got["latent_size"], got["latent_size"])
    assert parser.get_parsed_content("perceptual_loss") is None  # off by default, no network needed


# ---------------------------------------------------------------------------------------------- the real CLI
def test_cli_training_writes_stage1_checkpoint_grid_and_curve(ae_prepared, tmp_path):
    ckpt, logs = tmp_path / "models", tmp_path / "logs"
    cmd = [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", _config_list(COMMON, BASE, TINY),
           "--prepared_dir", str(ae_prepared), "--ckpt_dir", str(ckpt), "--log_dir", str(logs),
           "--max_epochs", "2", "--mask_training_prob", "0.25"]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    # stage-1 deliverable, loadable by stage 2's loader, with a positive finite scale factor
    parser = _tiny_parser(ae_prepared)
    ae = parser.get_parsed_content("autoencoder_def")
    scale = load_stage1(ckpt / "autoencoder.pt", ae)
    assert 0 < scale < math.inf

    # ... equal to 1 / std of z_mu over the training set, computed here directly
    ae.eval()
    with torch.no_grad():
        z = torch.cat([ae.encode(img[None])[0] for img in _phantom_images(ae_prepared, 32)])
    assert scale == pytest.approx(1.0 / float(z.double().std()), rel=1e-4)

    # reconstruction grid: one row per validation image (3), input | reconstruction, upscaled to >= 128 px tiles
    grid = np.asarray(Image.open(logs / "reconstruction_latest.png"))
    assert (logs / "reconstructions" / "epoch_0002.png").is_file()
    tile = 128
    assert grid.shape == (3 * tile + 2 * 2, 2 * tile + 2)
    assert grid[:tile, :tile].std() > 0 and grid[:tile, tile + 2:].std() > 0

    # loss curve: one row per iteration (4 images / batch 4 -> 1 per epoch) and the validation L1 of each epoch
    rows = _read_csv(logs / "loss_curve.csv")
    assert [int(r["iteration"]) for r in rows] == [1, 2]
    assert all(float(r["train_loss"]) > 0 and float(r["val_loss"]) > 0 for r in rows)

    # training state for resuming: all objects + the trainer's own state
    state = load_checkpoint(ckpt / STATE)
    assert {"autoencoder", "optimizer", "lr_scheduler", "discriminator", "d_optimizer", "trainer"} <= set(state)
    assert state["trainer"]["iteration"] == 2
    assert list(logs.glob("events.out.tfevents.*"))
    summary = json.loads((logs / "stage1_summary.json").read_text())
    assert summary["latents"] == "z_mu" and summary["scale_factor"] == pytest.approx(scale)


# ---------------------------------------------------------------------------------------------- resume
def test_resume_continues_exactly_like_an_uninterrupted_run(ae_prepared, tmp_path):
    # 4 training images -> 2 iterations per epoch; the cosine schedule is pinned to 4 epochs so that stopping after
    # epoch 2 is an interruption of the 4-epoch plan (as a crash would be), not a different plan
    common = {"batch_size": 2, "mask_training_prob": 0.25, "lr_scheduler#T_max": 4}
    _bundle_run(ae_prepared, tmp_path / "full", max_epochs=4, **common)
    _bundle_run(ae_prepared, tmp_path / "part", max_epochs=2, **common)
    first = load_checkpoint(tmp_path / "part" / "models" / STATE)
    assert first["trainer"]["iteration"] == 4
    _bundle_run(ae_prepared, tmp_path / "part", max_epochs=4, resume=True, **common)

    full = load_checkpoint(tmp_path / "full" / "models" / STATE)
    resumed = load_checkpoint(tmp_path / "part" / "models" / STATE)
    assert resumed["trainer"]["iteration"] == full["trainer"]["iteration"] == 8
    assert resumed["lr_scheduler"] == full["lr_scheduler"]
    steps = {int(s["step"]) for s in resumed["optimizer"]["state"].values()}
    assert steps == {8}
    for k, v in full["autoencoder"].items():
        assert torch.equal(v, resumed["autoencoder"][k]), k
    for pid, s in full["optimizer"]["state"].items():
        for name in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(s[name], resumed["optimizer"]["state"][pid][name]), (pid, name)
    assert full["optimizer"]["param_groups"] == resumed["optimizer"]["param_groups"]
    # the stage-1 files agree too, and the loss curve of the resumed run holds all 8 iterations
    a = load_checkpoint(tmp_path / "full" / "models" / "autoencoder.pt")
    b = load_checkpoint(tmp_path / "part" / "models" / "autoencoder.pt")
    assert float(a["scale_factor"]) == float(b["scale_factor"])
    rows = _read_csv(tmp_path / "part" / "logs" / "loss_curve.csv")
    assert [int(r["iteration"]) for r in rows] == list(range(1, 9))
    assert [r["train_loss"] for r in rows] == [r["train_loss"] for r in _read_csv(tmp_path / "full" / "logs" / "loss_curve.csv")]


def test_resume_without_a_checkpoint_names_the_missing_file(ae_prepared, tmp_path):
    missing = tmp_path / "nowhere" / STATE
    with pytest.raises(Exception) as err:  # the bundle runner wraps it in "Failed to evaluate ..."
        _bundle_run(ae_prepared, tmp_path / "run", resume=True, resume_checkpoint=str(missing))
    cause = _cause(err.value, MammoInputError)
    assert isinstance(cause, MammoInputError), repr(err.value)
    assert str(missing) in str(cause) and "resume checkpoint not found" in str(cause)


def test_checkpoint_saver_writes_atomically(tmp_path):
    from ignite.engine import Engine

    net = torch.nn.Linear(2, 2)
    saver = AtomicCheckpointSaver(str(tmp_path), {"net": net}, save_final=True, final_filename="state.pt",
                                  save_interval=1, epoch_level=False, n_saved=1)
    assert saver._final_checkpoint.save_handler._atomic and saver._interval_checkpoint.save_handler._atomic
    engine = Engine(lambda e, b: None)
    saver.attach(engine)
    engine.run([0], max_epochs=1)
    before = load_checkpoint(tmp_path / "state.pt")
    assert before["trainer"]["iteration"] == 1 and torch.equal(before["net"]["weight"], net.weight)

    class Unpicklable:  # torch.save fails half-way through writing the file
        def state_dict(self):
            return {"f": lambda: None}

        def load_state_dict(self, state):
            pass

    bad = AtomicCheckpointSaver(str(tmp_path), {"net": net, "bad": Unpicklable()}, save_final=True,
                                final_filename="state.pt")
    engine2 = Engine(lambda e, b: None)
    bad.attach(engine2)
    with torch.no_grad():
        net.weight.add_(1.0)
    with pytest.raises(Exception):
        engine2.run([0], max_epochs=1)
    after = load_checkpoint(tmp_path / "state.pt")  # the previous file is intact
    assert torch.equal(after["net"]["weight"], before["net"]["weight"])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("tmp")]


# ---------------------------------------------------------------------------------------------- training
def test_loss_falls_when_overfitting_a_few_phantom_images(ae_prepared):
    torch.manual_seed(0)
    images = _phantom_images(ae_prepared, 32)[:4]
    ae = _tiny_autoencoder((16, 32))
    losses: list[float] = []
    trainer = AutoencoderTrainer(
        device="cpu", max_epochs=40, train_data_loader=_batches(images, 4), network=ae,
        optimizer=torch.optim.Adam(ae.parameters(), 2e-3), kl_weight=1e-6, train_handlers=[NonFiniteLossHandler()],
    )
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: losses.append(float(e.state.output["recon_loss"])))
    trainer.run()
    assert len(losses) == 40
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5]), losses


def test_gradient_accumulation_steps_every_n_iterations():
    torch.manual_seed(0)
    ae = _tiny_autoencoder()
    opt = torch.optim.Adam(ae.parameters(), 1e-3)
    trainer = AutoencoderTrainer(device="cpu", max_epochs=1, train_data_loader=_batches(torch.rand(10, 1, 16, 16), 2),
                                 network=ae, optimizer=opt, accumulation_steps=2)
    trainer.run()  # 5 iterations: steps after iterations 2 and 4, plus the end-of-epoch flush after 5
    assert {int(s["step"]) for s in opt.state_dict()["state"].values()} == {3}


def test_nan_loss_stops_training_naming_the_iteration():
    torch.manual_seed(0)
    images = torch.rand(8, 1, 16, 16)
    images[4, 0, 3, 3] = float("nan")  # in the third batch of 2
    ae = _tiny_autoencoder()
    trainer = AutoencoderTrainer(device="cpu", max_epochs=1, train_data_loader=_batches(images, 2), network=ae,
                                 optimizer=torch.optim.Adam(ae.parameters(), 1e-3),
                                 train_handlers=[NonFiniteLossHandler()])
    with pytest.raises(NonFiniteLossError, match=r"non-finite training loss at iteration 3 \(epoch 1\)"):
        trainer.run()
    assert trainer.state.iteration == 3
    assert all(torch.isfinite(p).all() for p in ae.parameters())  # stopped before the optimiser step


def test_adversarial_loss_starts_after_the_warmup_iteration():
    torch.manual_seed(0)
    ae = _tiny_autoencoder()
    disc = PatchDiscriminator(spatial_dims=2, channels=8, in_channels=1, out_channels=1, num_layers_d=2, norm="INSTANCE")
    warmup = 2
    trainer = AutoencoderTrainer(
        device="cpu", max_epochs=1, train_data_loader=_batches(torch.rand(8, 1, 16, 16), 2), network=ae,
        optimizer=torch.optim.Adam(ae.parameters(), 1e-3), discriminator=disc,
        d_optimizer=torch.optim.Adam(disc.parameters(), 1e-3), adversarial_weight=0.1, adversarial_warmup=warmup,
        train_handlers=[NonFiniteLossHandler()],
    )
    seen: list[tuple] = []
    snapshot = [p.detach().clone() for p in disc.parameters()]

    def record(engine):
        changed = any(not torch.equal(a, b) for a, b in zip(snapshot, disc.parameters()))
        out = engine.state.output
        seen.append((engine.state.iteration, "g_adv_loss" in out, "d_loss" in out, changed))
        for a, b in zip(snapshot, disc.parameters()):
            a.copy_(b.detach())

    trainer.add_event_handler(Events.ITERATION_COMPLETED, record)
    trainer.run()
    assert seen == [(1, False, False, False), (2, False, False, False), (3, True, True, True), (4, True, True, True)]
    assert [trainer.adversarial_active(i) for i in (2, 3)] == [False, True]


def test_adversarial_weight_needs_a_discriminator():
    ae = _tiny_autoencoder()
    with pytest.raises(ValueError, match="discriminator"):
        AutoencoderTrainer(device="cpu", max_epochs=1, train_data_loader=[], network=ae,
                           optimizer=torch.optim.Adam(ae.parameters()), adversarial_weight=0.1)


def test_mask_training_replaces_images_by_soft_mask_channels():
    torch.manual_seed(0)
    batch = {"image": torch.full((64, 1, 4, 4), 0.5), "soft_mask": torch.stack(
        [torch.full((64, 4, 4), v) for v in (0.1, 0.2, 0.3)], 1)}
    x, y = ImagePrepareBatch(mask_key="soft_mask", mask_prob=0.5)(batch)
    assert x is y
    values = {round(float(v), 3) for v in x[:, 0, 0, 0]}
    assert values == {0.5, 0.1, 0.2, 0.3}
    x0, _ = ImagePrepareBatch()(batch)
    assert torch.equal(x0, batch["image"])


def test_crop_training_takes_one_window_per_sample_reproducibly():
    h, w, c = 12, 10, 4
    grid = torch.arange(h * w, dtype=torch.float32).reshape(1, 1, h, w)
    batch = {"image": grid.repeat(6, 1, 1, 1) + 1000 * torch.arange(6.0).view(6, 1, 1, 1)}
    prep = ImagePrepareBatch(crop_size=c)
    torch.manual_seed(3)
    x, y = prep(batch)
    assert x is y and x.shape == (6, 1, c, c)
    for i in range(6):
        win = x[i, 0] - 1000 * i  # the sample's own image (offset by 1000 * i), a contiguous window of it
        y0, x0 = divmod(int(win[0, 0]), w)
        assert torch.equal(win, grid[0, 0, y0 : y0 + c, x0 : x0 + c])
    torch.manual_seed(3)
    assert torch.equal(prep(batch)[0], x)  # the torch RNG alone decides the windows (resumable)
    full, _ = ImagePrepareBatch(crop_size=16)(batch)  # a window as large as the image: the whole image
    assert torch.equal(full, batch["image"])
    with pytest.raises(ValueError, match="larger than the 12x10"):
        ImagePrepareBatch(crop_size=11)(batch)
    with pytest.raises(ValueError, match="crop_size"):
        ImagePrepareBatch(crop_size=0)


# ---------------------------------------------------------------------------------------------- scale factor
def test_scale_factor_is_one_over_the_std_of_the_latents():
    torch.manual_seed(0)
    ae = _tiny_autoencoder().eval()
    images = torch.rand(10, 1, 16, 16)
    loader = _batches(images, 3)
    with torch.no_grad():
        z_mu, z_sigma = ae.encode(images)
    assert compute_latent_scale_factor(ae, loader) == pytest.approx(1.0 / float(z_mu.double().std()), rel=1e-6)

    torch.manual_seed(1)
    sampled = compute_latent_scale_factor(ae, loader, latents="sample")
    torch.manual_seed(1)
    with torch.no_grad():
        z = torch.cat([ae.sampling(*ae.encode(b["image"])) for b in loader])
    assert sampled == pytest.approx(1.0 / float(z.double().std()), rel=1e-6)
    with pytest.raises(ValueError, match="latents"):
        compute_latent_scale_factor(ae, loader, latents="mean")
    with pytest.raises(ValueError, match="no latents"):
        compute_latent_scale_factor(ae, [])


def test_kl_loss_matches_the_closed_form():
    mu, sigma = torch.tensor([[0.5, -1.0]]), torch.tensor([[1.0, 0.5]])
    expected = 0.5 * ((0.25 + 1 - 0 - 1) + (1 + 0.25 - math.log(0.25) - 1))
    assert float(kl_loss(mu, sigma)) == pytest.approx(expected)
    assert float(kl_loss(torch.zeros(3, 2, 4, 4), torch.ones(3, 2, 4, 4))) == pytest.approx(0.0)


# ---------------------------------------------------------------------------------------------- perceptual loss
def test_perceptual_loss_loads_a_local_network(tmp_path):
    torch.manual_seed(0)
    path = save_feature_network(tmp_path / "features.pt", FeatureNet(in_channels=1, channels=(4, 8)))
    loss = LocalPerceptualLoss(path)
    assert all(not p.requires_grad for p in loss.parameters())
    x = torch.rand(2, 1, 16, 16, requires_grad=True)
    y = torch.rand(2, 1, 16, 16)
    assert float(loss(y, y)) == pytest.approx(0.0, abs=1e-6)
    value = loss(x, y)
    assert float(value.detach()) > 0
    value.backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    loss.train()
    assert not loss.network.training

    # a TorchScript feature network with 3 input channels: the grey image is repeated
    ts_path = tmp_path / "features_ts.pt"
    net3 = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU())
    torch.jit.save(torch.jit.trace(net3, torch.rand(1, 3, 16, 16)), str(ts_path))
    ts_loss = LocalPerceptualLoss(ts_path, in_channels=3)
    assert float(ts_loss(x.detach(), y)) > 0


def test_perceptual_loss_bad_paths_name_the_file(tmp_path, ae_prepared):
    missing = tmp_path / "no_such_network.pt"
    with pytest.raises(MammoInputError, match="feature network not found") as err:
        LocalPerceptualLoss(missing)
    assert str(missing) in str(err.value)
    junk = tmp_path / "junk.pt"
    junk.write_text("not a network")
    with pytest.raises(MammoInputError, match="not a perceptual feature network") as err:
        load_feature_network(junk)
    assert str(junk) in str(err.value)
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.ones(2)}, other)
    with pytest.raises(MammoInputError, match="not a perceptual feature network"):
        load_feature_network(other)
    with pytest.raises(MammoInputError, match="perceptual_network"):
        load_feature_network(None)
    # through the bundle config
    parser = _tiny_parser(ae_prepared, perceptual_weight=0.5, perceptual_network=str(missing))
    with pytest.raises(Exception) as err:
        parser.get_parsed_content("perceptual_loss")
    cause = _cause(err.value, MammoInputError)
    assert isinstance(cause, MammoInputError) and str(missing) in str(cause), repr(err.value)
    assert _tiny_parser(ae_prepared).get_parsed_content("perceptual_loss") is None


def test_perceptual_loss_through_the_trainer(tmp_path):
    torch.manual_seed(0)
    path = save_feature_network(tmp_path / "f.pt", FeatureNet(channels=(4,)))
    ae = _tiny_autoencoder()
    trainer = AutoencoderTrainer(device="cpu", max_epochs=1, train_data_loader=_batches(torch.rand(4, 1, 16, 16), 2),
                                 network=ae, optimizer=torch.optim.Adam(ae.parameters(), 1e-3),
                                 perceptual_loss=LocalPerceptualLoss(path), perceptual_weight=0.5)
    trainer.run()
    out = trainer.state.output
    expected = out["recon_loss"] + 1e-6 * out["kl_loss"] + 0.5 * out["perceptual_loss"]
    assert float(out["loss"]) == pytest.approx(float(expected), rel=1e-5)
    assert float(out["perceptual_loss"]) > 0


# ---------------------------------------------------------------------------------------------- DDP
def test_two_process_ddp_run_on_gloo(ae_prepared, tmp_path):
    ckpt, logs = tmp_path / "models", tmp_path / "logs"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "monai.bundle", "run", "training", "--config_file", _config_list(COMMON, BASE, MULTI_GPU, TINY),
           "--prepared_dir", str(ae_prepared), "--ckpt_dir", str(ckpt), "--log_dir", str(logs),
           "--batch_size", "2", "--max_epochs", "1", "--dist_backend", "gloo"]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # 4 training images split over 2 ranks, batch 2 -> 1 iteration per rank
    state = load_checkpoint(ckpt / STATE)
    assert state["trainer"]["iteration"] == 1
    assert not any(k.startswith("module.") for k in state["autoencoder"])  # the plain module was saved
    parser = _tiny_parser(ae_prepared)
    scale = load_stage1(ckpt / "autoencoder.pt", parser.get_parsed_content("autoencoder_def"))
    assert 0 < scale < math.inf
    assert (logs / "reconstruction_latest.png").is_file()
    assert [int(r["iteration"]) for r in _read_csv(logs / "loss_curve.csv")] == [1]
