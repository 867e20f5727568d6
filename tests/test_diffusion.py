"""Stage 2 (gated conditional latent diffusion): network wiring, latent cache, Ignite training through the bundle
config, resume, sampling, bad input and a 2-process DDP run.

Everything runs on the session's small prepared phantom (``conftest.prepared_dir``) at 32x32 with a random stage-1
autoencoder built from ``bundle/configs/train_autoencoder.json`` and the tiny overrides of
``tests/configs/dm_tiny.json``.
"""

from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from ignite.engine import Events  # noqa: E402
from monai.bundle import ConfigParser  # noqa: E402

from custom.checkpoints import load_checkpoint, load_state_dict_checked, save_stage1  # noqa: E402
from custom.errors import MammoInputError  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundle" / "configs"
COMMON_CONFIG = CONFIGS / "common.json"
DM_CONFIG = CONFIGS / "train_diffusion.json"
MULTI_CONFIG = CONFIGS / "multi_gpu_train_diffusion.json"
TINY = REPO / "tests" / "configs" / "dm_tiny.json"
FILES = [str(COMMON_CONFIG), str(DM_CONFIG), str(TINY)]


def _cause_chain(err: BaseException) -> list[BaseException]:
    out, seen = [], set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        out.append(err)
        err = err.__cause__ or err.__context__
    return out


def _find(err: BaseException, kind: type) -> BaseException:
    for e in _cause_chain(err):
        if isinstance(e, kind):
            return e
    raise AssertionError(f"no {kind.__name__} in the exception chain: {[type(e).__name__ for e in _cause_chain(err)]}")


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def env(prepared_dir, tmp_path_factory):
    """Prepared data, a random stage-1 checkpoint of the configured autoencoder, a shared latent-cache folder."""
    root = tmp_path_factory.mktemp("dm")
    p = ConfigParser()
    p.read_config(FILES)
    torch.manual_seed(0)
    autoencoder = p.get_parsed_content("autoencoder_def")
    stage1 = root / "autoencoder.pt"
    save_stage1(stage1, autoencoder, scale_factor=0.8)
    return {"prepared": Path(prepared_dir), "stage1": stage1, "cache": root / "latent_cache", "root": root}


def make_parser(env, out: Path, files=FILES, **overrides) -> ConfigParser:
    p = ConfigParser()
    p.read_config([str(f) for f in files])
    p.update(
        {
            "prepared_dir": str(env["prepared"]),
            "stage1_checkpoint": str(env["stage1"]),
            "latent_cache_dir": str(env["cache"]),
            "ckpt_dir": str(out / "models"),
            "dm_output_dir": str(out / "runs"),
            "device": "$torch.device('cpu')",
            **overrides,
        }
    )
    return p


def perturb(net: torch.nn.Module, std: float = 0.05, seed: int = 0) -> torch.nn.Module:
    """MONAI zero-initialises the UNet's output conv; random weights make outputs depend on the inputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for q in net.parameters():
            q.add_(torch.randn(q.shape, generator=g) * std)
    return net


def conditions(b: int, latent_hw: int = 8, mask_latent_channels: int = 12, size: int = 32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    masks = (torch.rand(b, 2, size, size, generator=g) > 0.7).float()
    return {
        "mask_latent": torch.randn(b, mask_latent_channels, latent_hw, latent_hw, generator=g),
        "features": torch.rand(b, 2, 67, generator=g),
        "lesion_masks": masks,
        "lesion_present": torch.tensor([[1.0, 0.0]] * b),
    }


# ------------------------------------------------------------------------------------------------ network wiring
def test_unet_input_channels_follow_mask_channels(env, tmp_path):
    p = make_parser(env, tmp_path)
    net, enc = p.get_parsed_content("network_def"), p.get_parsed_content("latent_encoder")
    lc = int(p.get_parsed_content("latent_channels"))
    assert net.mask_latent_channels == 3 * lc == enc.mask_latent_channels
    assert net.unet.in_channels == lc + 3 * lc
    assert net.unet.conv_in.conv.weight.shape[1] == 4 * lc
    assert net.unet.out_channels == lc

    p1 = make_parser(env, tmp_path, mask_channels=[2])
    net1 = p1.get_parsed_content("network_def")
    assert net1.unet.in_channels == lc + lc and p1.get_parsed_content("latent_encoder").mask_latent_channels == lc

    # each soft-mask channel is encoded on its own by the 1-channel encoder: E(G(M)_c), concatenated in order
    soft = torch.rand(2, 3, 32, 32)
    z = enc.encode_mask(soft)
    assert z.shape == (2, 3 * lc, 8, 8)
    for c in range(3):
        torch.testing.assert_close(z[:, c * lc : (c + 1) * lc], enc.encode(soft[:, c : c + 1]), atol=1e-5, rtol=1e-5)


def test_mask_dropout_zeroes_mask_latent_and_geometry(env, tmp_path):
    p = make_parser(env, tmp_path)
    net = perturb(p.get_parsed_content("network_def")).eval()
    c = conditions(3)
    x, t = torch.randn(3, 4, 8, 8), torch.tensor([5, 50, 90])
    drop = torch.tensor([True, False, True])
    keep = torch.zeros(3, dtype=torch.bool)
    with torch.no_grad():
        dropped = net(x, t, **c, drop_mask=drop, drop_features=keep)
        zeroed = net(x, t, **{**c, "mask_latent": torch.zeros_like(c["mask_latent"]), "lesion_masks": torch.rand_like(c["lesion_masks"])}, drop_mask=drop, drop_features=keep)
        plain = net(x, t, **c, drop_mask=keep, drop_features=keep)
    # dropped samples ignore both the mask latent and the lesion mask geometry; the kept one is untouched
    torch.testing.assert_close(dropped[drop], zeroed[drop])
    torch.testing.assert_close(dropped[1], plain[1])
    assert not torch.allclose(dropped[0], plain[0], atol=1e-4)


def test_empty_slots_get_no_lesion_condition(env, tmp_path):
    net = perturb(make_parser(env, tmp_path).get_parsed_content("network_def")).eval()
    c = conditions(2)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 20])
    garbage = {**c, "features": c["features"].clone(), "lesion_masks": c["lesion_masks"].clone()}
    garbage["features"][:, 1] = 7.0  # slot 1 is empty (lesion_present 0): its content must not matter
    garbage["lesion_masks"][:, 1] = 1.0
    with torch.no_grad():
        torch.testing.assert_close(net(x, t, **c), net(x, t, **garbage))
        assert net.context(c["features"], c["lesion_masks"], c["lesion_present"]).shape == (2, 2, 16)


@pytest.mark.parametrize("mode", ["gated", "concat", "radiomics", "geometry", "off"])
def test_conditioning_modes_train_a_step(env, tmp_path, mode):
    net = make_parser(env, tmp_path, conditioning_mode=mode).get_parsed_content("network_def")
    assert net.conditioner.mode == mode and (net.conditioner.mask_encoder is None) == (mode in ("radiomics", "off"))
    c = conditions(2)
    out = net(torch.randn(2, 4, 8, 8), torch.tensor([1, 70]), **c, drop_features=torch.tensor([True, False]), drop_mask=torch.tensor([False, True]))
    out.square().mean().backward()
    assert out.shape == (2, 4, 8, 8)
    assert all(q.grad is not None for q in net.unet.parameters() if q.requires_grad)


def test_extra_concat_channels_and_token_sources():
    from torch import nn

    from custom.networks import LesionConditioner
    from custom.networks.gcdm import GCDMNetwork

    clinical = nn.Sequential(nn.Linear(3, 2 * 16), nn.Unflatten(1, (2, 16)))  # e.g. view / density / laterality
    net = GCDMNetwork(
        latent_channels=4, mask_latent_channels=12, extra_concat_channels=5,
        conditioner=LesionConditioner(mode="gated", token_dim=16, encoder_kwargs=dict(image_size=16, patch_size=8, hidden_size=16, num_hidden_layers=1, num_attention_heads=2)),
        unet_kwargs=dict(channels=[8, 16, 16], attention_levels=[False, False, True], num_res_blocks=1, num_head_channels=8, norm_num_groups=8),
        token_sources={"clinical": clinical},
    )
    assert net.unet.in_channels == 4 + 12 + 5
    c = conditions(2)
    ctx = net.context(c["features"], c["lesion_masks"], c["lesion_present"], clinical=torch.rand(2, 3))
    assert ctx.shape == (2, 2 + 2, 16)
    both = torch.tensor([True, False])
    ctx = net.context(c["features"], c["lesion_masks"], c["lesion_present"], both, both, clinical=torch.rand(2, 3))
    assert torch.count_nonzero(ctx[0, 2:]) == 0 and torch.count_nonzero(ctx[1, 2:]) > 0  # unconditional: no clinical
    out = net(torch.randn(2, 4, 8, 8), torch.tensor([3, 4]), **c, extra_concat=torch.randn(2, 5, 8, 8), clinical=torch.rand(2, 3))
    assert out.shape == (2, 4, 8, 8)
    with pytest.raises(ValueError, match="extra_concat must have 5 channels"):
        net(torch.randn(2, 4, 8, 8), torch.tensor([3, 4]), **c, clinical=torch.rand(2, 3))


# ------------------------------------------------------------------------------------------------ CLI + training
def test_cli_one_iteration_writes_model_and_grid(env, tmp_path):
    cmd = [
        sys.executable, "-m", "monai.bundle", "run", "training",
        "--config_file", str(FILES),
        "--prepared_dir", str(env["prepared"]), "--stage1_checkpoint", str(env["stage1"]),
        "--latent_cache_dir", str(env["cache"]), "--ckpt_dir", str(tmp_path / "models"),
        "--dm_output_dir", str(tmp_path / "runs"), "--train_limit", "2", "--batch_size", "2",
    ]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    model = load_checkpoint(tmp_path / "models" / "model.pt")
    assert {"model", "network", "scale_factor"} <= set(model)
    assert float(model["scale_factor"]) == pytest.approx(0.8)
    net = make_parser(env, tmp_path).get_parsed_content("network_def")
    load_state_dict_checked(net, model["model"], "model.pt", "EMA weights")
    info = json.loads((tmp_path / "models" / "diffusion_info.json").read_text())
    assert info["iteration"] == 1 and info["conditioning_mode"] == "gated"
    grid = tmp_path / "runs" / "samples" / "samples_latest.png"
    from PIL import Image

    with Image.open(grid) as im:  # 2 cases x (soft mask | sample | real), 32 px tiles, 2 px gaps, zoom 4
        assert im.size == ((3 * 32 + 4 * 2) * 4, (2 * 32 + 3 * 2) * 4)
    rows = list(csv.DictReader(open(tmp_path / "runs" / "losses.csv")))
    assert rows[-1]["iteration"] == "1" and float(rows[-1]["train_loss"]) > 0 and float(rows[-1]["val_loss"]) > 0
    assert (tmp_path / "runs" / "checkpoints" / "checkpoint_final.pt").is_file()


def _state(p: ConfigParser) -> dict:
    trainer = p.get_parsed_content("train#trainer")
    opt = p.get_parsed_content("optimizer")
    return {
        "iteration": trainer.state.iteration,
        "epoch": trainer.state.epoch,
        "network": {k: v.clone() for k, v in p.get_parsed_content("network").state_dict().items()},
        "ema": {k: v.clone() for k, v in p.get_parsed_content("ema").ema_model.state_dict().items()},
        "optimizer": {k: {n: (t.clone() if torch.is_tensor(t) else t) for n, t in s.items()} for k, s in opt.state_dict()["state"].items()},
        "lr_scheduler": p.get_parsed_content("lr_scheduler").state_dict()["last_epoch"],
    }


def _assert_same(a: dict, b: dict) -> None:
    assert (a["iteration"], a["epoch"], a["lr_scheduler"]) == (b["iteration"], b["epoch"], b["lr_scheduler"])
    for key in ("network", "ema"):
        assert a[key].keys() == b[key].keys()
        for k in a[key]:
            assert torch.equal(a[key][k], b[key][k]), f"{key}.{k} differs"
    assert a["optimizer"].keys() == b["optimizer"].keys() and len(a["optimizer"]) > 0
    for k in a["optimizer"]:
        for n in a["optimizer"][k]:
            assert torch.equal(torch.as_tensor(a["optimizer"][k][n]), torch.as_tensor(b["optimizer"][k][n])), f"optimizer {k}.{n}"


def test_resume_restores_iteration_optimiser_and_ema(env, tmp_path):
    common = dict(train_limit=4, val_limit=2, max_epochs=2, save_interval=1, sample_interval=0)
    p1 = make_parser(env, tmp_path, **common)
    p1.get_parsed_content("training")
    before = _state(p1)
    assert before["iteration"] == 4
    ema_model, network = p1.get_parsed_content("ema").ema_model, p1.get_parsed_content("network")
    assert any(not torch.equal(a, b) for a, b in zip(ema_model.parameters(), network.parameters()))  # EMA != online

    p2 = make_parser(env, tmp_path, **{**common, "max_epochs": 3, "resume": True})
    trainer = p2.get_parsed_content("train#trainer")
    p2.get_parsed_content("attach_checkpoints")  # the CheckpointLoader runs at STARTED ...
    restored = {}
    trainer.add_event_handler(Events.STARTED, lambda _: restored.update(_state(p2)))  # ... before this snapshot
    trainer.run()
    _assert_same(before, restored)
    assert trainer.state.iteration == 6 and trainer.state.epoch == 3
    rows = list(csv.DictReader(open(tmp_path / "runs" / "losses.csv")))
    assert [r["iteration"] for r in rows] == ["2", "4", "6"]  # the resumed run appends


def _fixed_noise_mse(p: ConfigParser, per_case: int = 16) -> float:
    """Noise MSE of the network on the training cases at ``per_case`` evenly spaced timesteps with fixed noise,
    through the validation inferer (the prediction converted to the implied noise)."""
    net, inferer, ds = p.get_parsed_content("network"), p.get_parsed_content("validate#inferer"), p.get_parsed_content("train#dataset")
    items = [ds[i] for i in range(len(ds))]
    keys = ["latent", "mask_latent", "features", "lesion_masks", "lesion_present"]
    b = {k: torch.stack([it[k] for it in items for _ in range(per_case)]) for k in keys}
    t = torch.linspace(0, int(p.get_parsed_content("num_train_timesteps")) - 1, per_case).long().repeat(len(items))
    noise = torch.randn(b["latent"].shape, generator=torch.Generator().manual_seed(0))
    was = net.training
    net.eval()
    with torch.no_grad():
        eps = inferer(b.pop("latent"), net, noise, t, **b)
    net.train(was)
    return float((eps - noise).square().mean())


def test_training_loss_falls_when_overfitting(env, tmp_path):
    p = make_parser(
        env, tmp_path, train_limit=2, max_epochs=60, lr=0.01, warmup_steps=5, val_interval=60,
        p_features=0.0, p_mask=0.0, p_both=0.0, sample_interval=0,
    )
    initial = _fixed_noise_mse(p)
    p.get_parsed_content("training")
    final = _fixed_noise_mse(p)
    rows = list(csv.DictReader(open(tmp_path / "runs" / "losses.csv")))
    train = [float(r["train_loss"]) for r in rows]
    assert len(train) == 60 and float(rows[-1]["val_loss"]) > 0
    assert final < 0.65 * initial, (initial, final)  # measured ~0.65 -> ~0.30
    assert sum(train[-10:]) < 0.75 * sum(train[:10]), train  # measured ~0.70 -> ~0.39


# ------------------------------------------------------------------------------------------------ latent cache
def test_latent_cache_matches_encoder_and_is_reused(env, tmp_path):
    from custom.data.training import prepared_transforms

    cache_dir = tmp_path / "cache"
    p = make_parser(env, tmp_path, latent_cache_dir=str(cache_dir), train_limit=3)
    enc, store = p.get_parsed_content("latent_encoder"), p.get_parsed_content("latent_store")
    data, ds = p.get_parsed_content("train#datalist"), p.get_parsed_content("train#dataset")
    assert store.encoded == len(data) == 3 and store.folder.parent == cache_dir
    xf = prepared_transforms(image_size=32, sigma=float(p.get_parsed_content("sigma")), max_lesions=2)
    for i, d in enumerate(data):
        item = xf(dict(d))
        torch.testing.assert_close(ds[i]["latent"], enc.encode(item["image"][None])[0], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(ds[i]["mask_latent"], enc.encode_mask(item["soft_mask"][None])[0], atol=1e-6, rtol=1e-6)
        assert "image" not in ds[i]  # training items hold latents only
    mtimes = {f: f.stat().st_mtime_ns for f in store.folder.glob("*.pt")}
    assert len(mtimes) == 3

    # a second run (new objects, same settings) reads every case and encodes none
    p2 = make_parser(env, tmp_path, latent_cache_dir=str(cache_dir), train_limit=3)
    p2.get_parsed_content("train#dataset")
    store2 = p2.get_parsed_content("latent_store")
    assert (store2.encoded, store2.loaded) == (0, 3) and store2.folder == store.folder
    assert {f: f.stat().st_mtime_ns for f in store.folder.glob("*.pt")} == mtimes
    # another sigma is another key
    p3 = make_parser(env, tmp_path, latent_cache_dir=str(cache_dir), sigma=2.5)
    assert p3.get_parsed_content("latent_store").folder != store.folder

    # latent_cache false: the prepare batch encodes on the fly and gets the same latents
    p4 = make_parser(env, tmp_path, latent_cache=False, train_limit=3)
    assert p4.get_parsed_content("latent_store") is None
    batch = next(iter(torch.utils.data.DataLoader(p4.get_parsed_content("train#dataset"), batch_size=3)))
    assert "latent" not in batch and "image" in batch
    z0, _, _, kw = p4.get_parsed_content("train#prepare_batch")(batch, torch.device("cpu"))
    torch.testing.assert_close(z0, torch.stack([ds[i]["latent"] for i in range(3)]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(kw["mask_latent"], torch.stack([ds[i]["mask_latent"] for i in range(3)]), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("latent_cache", [True, False])
def test_encoder_runs_during_iterations_only_without_cache(env, tmp_path, latent_cache):
    p = make_parser(env, tmp_path, latent_cache=latent_cache, sample_interval=0, val_interval=5)
    enc, trainer = p.get_parsed_content("latent_encoder"), p.get_parsed_content("train#trainer")
    calls, inside = [0], [False]
    original = enc.autoencoder.encode

    def counting(x):
        calls[0] += inside[0]
        return original(x)

    enc.autoencoder.encode = counting
    trainer.add_event_handler(Events.ITERATION_STARTED, lambda _: inside.__setitem__(0, True))
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda _: inside.__setitem__(0, False))
    p.get_parsed_content("training")
    assert trainer.state.iteration == 1
    assert (calls[0] == 0) if latent_cache else (calls[0] == 2)  # image + soft mask encoded in the iteration


# ------------------------------------------------------------------------------------------------ CFG + sampling
def test_prepare_batch_cfg_dropout_frequencies_and_fixed_validation_noise():
    from custom.engines.diffusion import GCDMPrepareBatch

    n = 4000
    batch = {
        "latent": torch.zeros(n, 4, 2, 2), "mask_latent": torch.zeros(n, 12, 2, 2),
        "features": torch.zeros(n, 2, 67), "lesion_masks": torch.zeros(n, 2, 4, 4), "lesion_present": torch.zeros(n, 2),
        "case_id": [f"c{i}" for i in range(n)],
    }
    torch.manual_seed(0)
    z0, target, args, kw = GCDMPrepareBatch(1000, 0.05, 0.05, 0.05)(batch, torch.device("cpu"))
    f, m = kw["drop_features"], kw["drop_mask"]
    freq = {"features only": (f & ~m).float().mean(), "mask only": (m & ~f).float().mean(), "both": (f & m).float().mean()}
    for name, v in freq.items():
        assert 0.035 < float(v) < 0.065, (name, float(v))
    assert torch.equal(target, kw["noise"]) and kw["timesteps"].min() >= 0 and kw["timesteps"].max() < 1000
    assert float(kw["timesteps"].float().std()) > 200  # uniform over [0, 1000)

    # validation: fixed noise and timestep per case (independent of batch composition), no dropout
    val = GCDMPrepareBatch(1000, seed=3)
    small = {k: v[:4] for k, v in batch.items()}
    _, t1, _, k1 = val(small, "cpu")
    rev = {k: (v[::-1] if isinstance(v, list) else v.flip(0)) for k, v in small.items()}
    _, t2, _, k2 = val(rev, "cpu")
    assert torch.equal(t1, t2.flip(0)) and torch.equal(k1["timesteps"], k2["timesteps"].flip(0))
    assert not torch.equal(t1[0], t1[1])
    assert not k1["drop_features"].any() and not k1["drop_mask"].any()


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_prediction_targets_and_validation_noise(prediction_type):
    from monai.networks.schedulers import DDPMScheduler

    from custom.engines.diffusion import GCDMPrepareBatch, GCDMTrainInferer

    sched = DDPMScheduler(1000, schedule="scaled_linear_beta", beta_start=0.0015, beta_end=0.0195, prediction_type=prediction_type)
    b = 5
    batch = {"latent": torch.randn(b, 4, 3, 3), "mask_latent": torch.zeros(b, 12, 3, 3), "features": torch.zeros(b, 2, 67),
             "lesion_masks": torch.zeros(b, 2, 4, 4), "lesion_present": torch.zeros(b, 2), "case_id": list("abcde")}
    z0, target, _, kw = GCDMPrepareBatch(1000, prediction_type=prediction_type, scheduler=sched)(batch, "cpu")
    a = sched.alphas_cumprod[kw["timesteps"]].view(-1, 1, 1, 1)
    expected = {"epsilon": kw["noise"], "sample": z0, "v_prediction": a.sqrt() * kw["noise"] - (1 - a).sqrt() * z0}
    torch.testing.assert_close(target, expected[prediction_type])

    class Oracle(torch.nn.Module):  # predicts the exact target from z_t (knows z0 and the noise)
        def forward(self, z_t, t, **cond):
            return target

    val = GCDMTrainInferer(sched, prediction_type=prediction_type, return_noise=True)
    noise_hat = val(z0, Oracle(), kw["noise"], kw["timesteps"], mask_latent=kw["mask_latent"])
    torch.testing.assert_close(noise_hat, kw["noise"], atol=2e-4, rtol=1e-3)  # the validation metric is noise MSE
    assert torch.equal(GCDMTrainInferer(sched, prediction_type=prediction_type)(z0, Oracle(), kw["noise"], kw["timesteps"]), target)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_min_snr_weights_and_weighted_loss(prediction_type):
    from monai.networks.schedulers import DDPMScheduler

    from custom.engines.diffusion import GCDMPrepareBatch
    from custom.losses import WeightedMSELoss

    sched = DDPMScheduler(1000, schedule="scaled_linear_beta", beta_start=0.0015, beta_end=0.0195, prediction_type=prediction_type)
    pb = GCDMPrepareBatch(1000, prediction_type=prediction_type, scheduler=sched, snr_gamma=5.0)
    t = torch.tensor([0, 100, 400, 999])
    w = pb.loss_weight(t)
    for k, ti in enumerate(t.tolist()):  # Hang et al.: the z0-error weight min(SNR, 5), expressed per target
        a = float(sched.alphas_cumprod[ti])
        snr = a / (1 - a)
        want = {"epsilon": min(snr, 5.0) / snr, "v_prediction": min(snr, 5.0) / (snr + 1), "sample": min(snr, 5.0)}
        assert w[k].item() == pytest.approx(want[prediction_type], rel=1e-5)
    b = 4
    batch = {"latent": torch.randn(b, 4, 3, 3), "mask_latent": torch.zeros(b, 12, 3, 3), "features": torch.zeros(b, 2, 67),
             "lesion_masks": torch.zeros(b, 2, 4, 4), "lesion_present": torch.zeros(b, 2), "case_id": list("abcd")}
    _, (target, weight), _, kw = pb(batch, "cpu")
    torch.testing.assert_close(weight, pb.loss_weight(kw["timesteps"]))
    plain = GCDMPrepareBatch(1000, prediction_type=prediction_type, scheduler=sched)
    torch.manual_seed(0)
    _, plain_target, _, _ = plain(batch, "cpu")
    torch.manual_seed(0)
    _, (weighted_target, _), _, _ = pb(batch, "cpu")
    assert torch.equal(plain_target, weighted_target)  # the weighting changes the loss, never the target

    pred = torch.randn(b, 4, 3, 3)
    per_sample = [((pred[i] - target[i]) ** 2).mean().item() for i in range(b)]
    expected = sum(weight[i].item() * per_sample[i] for i in range(b)) / b
    assert WeightedMSELoss()(pred, (target, weight)).item() == pytest.approx(expected, rel=1e-6)
    assert torch.equal(WeightedMSELoss()(pred, target), torch.nn.MSELoss()(pred, target))  # plain target: plain MSE
    for bad in (-1, True):  # True is an int in Python, not a gamma
        with pytest.raises(ValueError, match="snr_gamma"):
            GCDMPrepareBatch(1000, prediction_type=prediction_type, scheduler=sched, snr_gamma=bad)
    with pytest.raises(ValueError, match="weight must be"):
        WeightedMSELoss()(pred, (target, weight[:2]))


def test_lesion_weighted_loss_hand_computed():
    """lesion_loss_weight w: per latent cell 1 + (w - 1) * (share of the cell covered by the union of the present
    lesions), times the Min-SNR weight when both are on; the loss is mean(weight * squared error)."""
    from monai.networks.schedulers import DDPMScheduler

    from custom.engines.diffusion import GCDMPrepareBatch
    from custom.losses import WeightedMSELoss

    sched = DDPMScheduler(1000, schedule="scaled_linear_beta", beta_start=0.0015, beta_end=0.0195)
    masks = torch.zeros(2, 2, 4, 4)
    masks[0, 0, 0:2, 0:2] = 1   # latent cell (0, 0) fully
    masks[0, 1, 0:1, 0:2] = 1   # inside the first lesion: the union is unchanged
    masks[1, 0, 2:4, 2:3] = 1   # half of cell (1, 1)
    masks[1, 1, 0:2, 0:2] = 1   # an empty slot (not present): ignored
    present = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    pb = GCDMPrepareBatch(1000, scheduler=sched, lesion_loss_weight=10.0)
    got = pb.lesion_weight_map(masks, present, (2, 2))
    want = torch.ones(2, 1, 2, 2)
    want[0, 0, 0, 0] = 10.0
    want[1, 0, 1, 1] = 1 + 9 * 0.5
    assert torch.equal(got, want)
    batch = {"latent": torch.randn(2, 4, 2, 2), "mask_latent": torch.zeros(2, 12, 2, 2), "features": torch.zeros(2, 2, 67),
             "lesion_masks": masks, "lesion_present": present, "case_id": ["a", "b"]}
    _, (target, weight), _, kw = pb(batch, "cpu")
    assert torch.equal(weight, want)
    both = GCDMPrepareBatch(1000, scheduler=sched, lesion_loss_weight=10.0, snr_gamma=5.0)
    _, (_, w2), _, kw2 = both(batch, "cpu")
    assert torch.allclose(w2, want * both.loss_weight(kw2["timesteps"]).view(-1, 1, 1, 1))
    pred = torch.randn_like(target)
    expected = sum(float(weight[b, 0, i, j]) * float((pred[b, c, i, j] - target[b, c, i, j]) ** 2)
                   for b in range(2) for c in range(4) for i in range(2) for j in range(2)) / pred.numel()
    assert WeightedMSELoss()(pred, (target, weight)).item() == pytest.approx(expected, rel=1e-6)
    for bad in (0.5, float("nan"), "ten", True):  # True is an int in Python, not a weight
        with pytest.raises(ValueError, match="lesion_loss_weight"):
            GCDMPrepareBatch(1000, scheduler=sched, lesion_loss_weight=bad)


def test_snr_gamma_option_reaches_the_trainer(env, tmp_path):
    """``snr_gamma`` set in the training config: the trainer's loss is the weighted one, on the weighted target."""
    from custom.losses import WeightedMSELoss

    p = make_parser(env, tmp_path, snr_gamma=5.0, train_limit=2, val_limit=1, max_epochs=1, sample_interval=0)
    trainer = p.get_parsed_content("train#trainer")
    assert isinstance(trainer.loss_function, WeightedMSELoss) and trainer.prepare_batch.snr_gamma == 5.0
    seen, forward = [], trainer.loss_function.forward
    trainer.loss_function.forward = lambda pred, target: (seen.append(target), forward(pred, target))[1]
    trainer.run()
    target, weight = seen[0]
    assert weight.shape == (target.shape[0],) and bool((weight > 0).all() and (weight <= 1).all())
    off = make_parser(env, tmp_path / "off", train_limit=2, val_limit=1, max_epochs=1, sample_interval=0)
    assert type(off.get_parsed_content("loss")) is torch.nn.MSELoss  # default (snr_gamma null): the stock loss


@pytest.fixture(scope="module")
def sampler_parts(env, tmp_path_factory):
    p = make_parser(env, tmp_path_factory.mktemp("sampling"))
    net = perturb(p.get_parsed_content("network_def")).eval()
    return net, p.get_parsed_content("sampling_scheduler"), p.get_parsed_content("latent_encoder")


def test_sampling_seed_reproducible_and_decoded(sampler_parts):
    from custom.engines.sampling import ddim_sample

    net, sched, enc = sampler_parts
    c = conditions(2)
    a = ddim_sample(net, sched, **c, num_inference_steps=4, seed=1, decoder=enc, progress=False)
    b = ddim_sample(net, sched, **c, num_inference_steps=4, seed=1, decoder=enc, progress=False)
    other = ddim_sample(net, sched, **c, num_inference_steps=4, seed=2, decoder=enc, progress=False)
    assert torch.equal(a.latents, b.latents) and torch.equal(a.images, b.images)
    assert not torch.allclose(a.latents, other.latents)
    assert a.images.shape == (2, 1, 32, 32) and float(a.images.min()) >= 0 and float(a.images.max()) <= 1


def test_guidance_formula_and_scale_one_is_conditional(sampler_parts):
    from custom.engines.sampling import ddim_sample, guided_noise

    net, sched, _ = sampler_parts
    c = conditions(2)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([900, 10])
    yes, no = torch.ones(2, dtype=torch.bool), torch.zeros(2, dtype=torch.bool)
    with torch.no_grad():
        eps_c = net(x, t, **c, drop_features=no, drop_mask=no)
        eps_u = net(x, t, **c, drop_features=yes, drop_mask=yes)
        assert not torch.allclose(eps_c, eps_u, atol=1e-4)  # the conditions matter
        torch.testing.assert_close(guided_noise(net, x, t, c, 3.0), eps_u + 3.0 * (eps_c - eps_u), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(guided_noise(net, x, t, c, 1.0), eps_c)

    # s = 1: the whole sampler equals a plain conditional DDIM loop
    out = ddim_sample(net, sched, **c, num_inference_steps=4, guidance_scale=1.0, seed=5, progress=False)
    z = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(5))
    sched.set_timesteps(4)
    with torch.no_grad():
        for step in sched.timesteps:
            eps = net(z, torch.full((2,), int(step)), **c)
            z, _ = sched.step(eps, int(step), z)
    torch.testing.assert_close(out.latents, z)
    guided = ddim_sample(net, sched, **c, num_inference_steps=4, guidance_scale=3.0, seed=5, progress=False)
    assert not torch.allclose(guided.latents, z, atol=1e-4)


def test_repaint_keeps_the_known_region(sampler_parts):
    from custom.engines.sampling import ddim_sample

    net, sched, _ = sampler_parts
    c = conditions(2)
    known = torch.randn(2, 4, 8, 8)
    region = torch.zeros(2, 1, 8, 8)
    region[..., 2:6, 2:6] = 1.0
    out = ddim_sample(net, sched, **c, num_inference_steps=4, seed=0, known_latent=known, region=region, progress=False)
    outside = region.expand_as(known) == 0
    assert torch.equal(out.latents[outside], known[outside])
    assert not torch.allclose(out.latents[~outside], known[~outside], atol=1e-3)


# ------------------------------------------------------------------------------------------------ bad input
def test_missing_stage1_checkpoint_is_named(env, tmp_path):
    missing = tmp_path / "no_such_autoencoder.pt"
    p = make_parser(env, tmp_path, stage1_checkpoint=str(missing))
    with pytest.raises(Exception) as info:
        p.get_parsed_content("latent_encoder")
    err = _find(info.value, MammoInputError)
    assert str(missing) in str(err) and "not found" in str(err) and "stage 1" in str(err)


def test_stage1_checkpoint_of_another_configuration(env, tmp_path):
    q = ConfigParser()
    q.read_config(FILES)
    lc = int(q.get_parsed_content("latent_channels"))
    q.update({"latent_channels": 2 * lc})
    other = q.get_parsed_content("autoencoder_def")
    save_stage1(tmp_path / "other.pt", other, 1.0)
    p = make_parser(env, tmp_path, stage1_checkpoint=str(tmp_path / "other.pt"))
    with pytest.raises(Exception) as info:
        p.get_parsed_content("latent_encoder")
    err = str(_find(info.value, MammoInputError))
    assert "other.pt" in err and "does not match the configured network" in err and "shape mismatch" in err


def test_nan_loss_stops_before_the_update(env, tmp_path):
    p = make_parser(env, tmp_path, loss="$lambda pred, target: torch.nn.functional.mse_loss(pred, target) * float('nan')")
    net = p.get_parsed_content("network")
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(Exception) as info:
        p.get_parsed_content("training")
    err = str(_find(info.value, FloatingPointError))
    assert "non-finite training loss at iteration 1" in err and "loss=nan" in err
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # nothing applied
    assert not (tmp_path / "models" / "model.pt").exists()


# ------------------------------------------------------------------------------------------------ DDP
def test_two_process_ddp_gloo(env, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
        "--master_port", str(port), "-m", "monai.bundle", "run", "training",
        "--config_file", str(FILES + [str(MULTI_CONFIG)]),
        "--prepared_dir", str(env["prepared"]), "--stage1_checkpoint", str(env["stage1"]),
        "--latent_cache_dir", str(tmp_path / "cache"), "--ckpt_dir", str(tmp_path / "models"),
        "--dm_output_dir", str(tmp_path / "runs"), "--train_limit", "4", "--batch_size", "2", "--dist_backend", "gloo",
    ]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    info = json.loads((tmp_path / "models" / "diffusion_info.json").read_text())
    assert info["iteration"] == 1  # 4 cases split over 2 ranks by the DistributedSampler: 1 batch of 2 each
    rows = list(csv.DictReader(open(tmp_path / "runs" / "losses.csv")))
    assert len(rows) == 1  # only rank 0 writes
    assert len(list((tmp_path / "cache").glob("*/*.pt"))) >= 4
    load_checkpoint(tmp_path / "models" / "model.pt")


def test_resumed_run_against_an_uninterrupted_one(env, tmp_path):
    """A run stopped after epoch 2 and resumed to epoch 3 against the same run done in one go. Stage 2's resume is
    not bit-identical (stage 1's is, see test_autoencoder): the iteration, optimiser, EMA and schedule are restored
    exactly (test above), but not every random generator the run draws from after the restart. Measured here (tiny
    config, 2 iterations after the restart): max |difference| of network/EMA weights 1.0e-3 to 1.1e-3; the bound
    documented in docs/README.md and held here is 1e-2."""
    common = dict(train_limit=4, val_limit=2, save_interval=1, sample_interval=0)
    whole = make_parser(env, tmp_path / "whole", **common, max_epochs=3)
    whole.get_parsed_content("training")
    a = _state(whole)
    first = make_parser(env, tmp_path / "split", **common, max_epochs=2)
    first.get_parsed_content("training")
    second = make_parser(env, tmp_path / "split", **common, max_epochs=3, resume=True)
    second.get_parsed_content("training")
    b = _state(second)
    assert (a["iteration"], a["epoch"]) == (b["iteration"], b["epoch"]) == (6, 3)
    worst = max(float((a[key][k].float() - b[key][k].float()).abs().max()) for key in ("network", "ema") for k in a[key])
    print(f"resume vs uninterrupted: max |difference| over network and EMA weights = {worst:.3e}")
    assert 0.0 <= worst <= 1e-2, f"resumed run differs from the uninterrupted one by up to {worst:.3e}"


def test_lesion_loss_weight_option_reaches_the_trainer(env, tmp_path):
    from custom.losses import WeightedMSELoss

    p = make_parser(env, tmp_path, lesion_loss_weight=4, train_limit=2, val_limit=1, max_epochs=1, sample_interval=0)
    trainer = p.get_parsed_content("train#trainer")
    assert isinstance(trainer.loss_function, WeightedMSELoss) and trainer.prepare_batch.lesion_loss_weight == 4.0
    assert p.get_parsed_content("validate#prepare_batch").lesion_loss_weight is None  # validation MSE stays plain


def test_conditioner_lr_mult_option(env, tmp_path):
    """conditioner_lr_mult 1 (default): one AdamW group over every parameter, as before the option existed; 10:
    the conditioner's trainable parameters in a second group whose first Adam step moves them 10x as far
    (Adam's first update is lr * g / (|g| + eps) = lr for g = 1); a boolean, 0 or a string: one error naming it."""
    from custom.engines.inference import describe_error

    p = make_parser(env, tmp_path, train_limit=2, val_limit=1, max_epochs=1, sample_interval=0)
    net, opt = p.get_parsed_content("network"), p.get_parsed_content("optimizer")
    assert len(opt.param_groups) == 1 and len(opt.param_groups[0]["params"]) == len(list(net.parameters()))

    p = make_parser(env, tmp_path / "x10", conditioner_lr_mult=10, lr=1e-3, train_limit=2, val_limit=1, max_epochs=1,
                    sample_interval=0)
    net, opt = p.get_parsed_content("network"), p.get_parsed_content("optimizer")
    cond = {id(q) for q in net.conditioner.parameters() if q.requires_grad}
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([1e-3, 1e-2])
    assert {id(q) for q in opt.param_groups[1]["params"]} == cond and cond
    assert sum(len(g["params"]) for g in opt.param_groups) == len([q for q in net.parameters() if q.requires_grad])
    before = {id(q): q.detach().clone() for g in opt.param_groups for q in g["params"]}
    for g in opt.param_groups:
        for q in g["params"]:
            q.grad = torch.ones_like(q)
    opt.step()
    for g, want in zip(opt.param_groups, (1e-3, 1e-2)):
        for q in g["params"]:
            assert (q.detach() - before[id(q)]).abs().sub(want).abs().max() <= want * 1e-3
    for bad in (True, 0, "ten"):
        p = make_parser(env, tmp_path / "bad", conditioner_lr_mult=bad)
        with pytest.raises(Exception) as info:
            p.get_parsed_content("optimizer")
        msg = describe_error(info.value)  # the one line a user sees
        assert msg is not None and msg.startswith("conditioner_lr_mult: must be a positive"), msg


def test_bad_stage2_option_is_one_error_line_before_the_latent_cache(env, tmp_path):
    """A bad loss / optimiser option ends `run training` in `initialize` with one ERROR line (exit 1), before the
    latent cache is encoded (it used to surface after encoding every training case, as a traceback)."""
    penv = {**os.environ, "PYTHONPATH": str(REPO)}
    penv.pop("MAMMO_GCDM_DEBUG", None)
    for option, value, line in (
        ("lesion_loss_weight", "0.5", "ERROR: lesion_loss_weight: must be a number >= 1 or null, got 0.5"),
        ("conditioner_lr_mult", "0", "ERROR: conditioner_lr_mult: must be a positive number, got 0"),
        ("spatial_feature_channels", "-2", "ERROR: spatial_feature_channels: must be an integer >= 0, got -2"),
    ):
        cache = tmp_path / option / "cache"
        res = subprocess.run(
            [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", json.dumps(FILES),
             "--prepared_dir", str(env["prepared"]), "--stage1_checkpoint", str(env["stage1"]),
             "--latent_cache_dir", str(cache), "--ckpt_dir", str(tmp_path / option / "models"),
             "--dm_output_dir", str(tmp_path / option / "runs"), f"--{option}", value],
            cwd=REPO, env=penv, capture_output=True, text=True, timeout=600)
        assert res.returncode == 1, res.stderr[-2000:]
        assert [x for x in res.stderr.splitlines() if x.startswith("ERROR:")] == [line], res.stderr[-2000:]
        assert "Traceback" not in res.stderr and not cache.exists()
