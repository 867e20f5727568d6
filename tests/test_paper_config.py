"""``paper.json`` as GCDM published it: SD weights from a local file, the SD VAE latents, a frozen CLIP from the same
file, AdamW groups; two training iterations and one sample end to end with tiny SD-structured weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
from monai.bundle import ConfigParser  # noqa: E402

from custom.networks.sd_weights import SDWeightsError  # noqa: E402
from sd_tiny import save_image_conditioned_single_file  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundle" / "configs"
FILES = [CONFIGS / "common.json", CONFIGS / "train_diffusion.json", CONFIGS / "paper.json",
         REPO / "tests" / "configs" / "paper_tiny.json"]


def _parser(tmp_path: Path, prepared: Path, **overrides) -> ConfigParser:
    p = ConfigParser()
    p.read_config([str(f) for f in FILES])
    p.update({"prepared_dir": str(prepared), "latent_cache_dir": str(tmp_path / "cache"),
              "ckpt_dir": str(tmp_path / "models"), "dm_output_dir": str(tmp_path / "runs"),
              "device": "$torch.device('cpu')", **overrides})
    return p


def test_paper_config_refuses_without_sd_path(tmp_path, prepared_dir):
    p = _parser(tmp_path, prepared_dir)
    with pytest.raises(Exception) as err:
        p.get_parsed_content("network_def")
    chain, e = [], err.value
    while e is not None:
        chain.append(e)
        e = e.__cause__ or e.__context__
    msg = next(str(x) for x in chain if isinstance(x, SDWeightsError))
    assert msg.startswith("sd_path: ") and "sd-image-conditioned-v2.ckpt" in msg and "--sd_path" in msg


def test_paper_config_trains_two_iterations_and_samples(tmp_path, prepared_dir):
    torch.manual_seed(0)
    ckpt = tmp_path / "sd-image-conditioned-tiny.safetensors"
    ref = save_image_conditioned_single_file(ckpt)
    p = _parser(tmp_path, prepared_dir, sd_path=str(ckpt))
    net = p.get_parsed_content("network")
    # UNet from the file, conv_in widened 4 -> 4 + 4 with zero weights; CLIP from the same file, frozen
    assert net.unet.conv_in.conv.weight.shape[1] == 8
    assert torch.count_nonzero(net.unet.conv_in.conv.weight[:, 4:]) == 0
    assert torch.equal(net.unet.conv_in.conv.weight[:, :4], ref["unet"].conv_in.weight)
    enc = net.conditioner.mask_encoder
    assert enc.clip_path == str(ckpt) and enc.freeze and not any(q.requires_grad for q in enc.model.parameters())
    assert torch.equal(enc.model.visual_projection.weight, ref["clip"].visual_projection.weight)
    # AdamW groups: UNet at lr, fusion/nulls at 10x
    opt = p.get_parsed_content("optimizer")
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([1e-4, 1e-3])
    cond_ids = {id(q) for q in net.conditioner.parameters()}
    assert all(id(q) in cond_ids for q in opt.param_groups[1]["params"])
    # SD VAE latents: 4 x 8 x 8 at 64^2, scale 0.18215
    latent_encoder = p.get_parsed_content("latent_encoder")
    x = torch.rand(1, 1, 64, 64)
    with torch.no_grad():
        want = ref["vae"].encode(x.expand(-1, 3, -1, -1) * 2 - 1).latent_dist.mean * 0.18215
    assert (latent_encoder.encode(x) - want).abs().max() <= 1e-4
    # two Ignite training iterations through the bundle config
    trainer = p.get_parsed_content("train#trainer")
    trainer.run()
    assert trainer.state.iteration == 2
    assert (tmp_path / "models" / "model.pt").is_file()
    # one sample end to end, decoded by the SD VAE
    from custom.engines.sampling import ddim_sample

    batch = next(iter(p.get_parsed_content("validate#dataloader")))
    sched = p.get_parsed_content("sampling_scheduler")
    out = ddim_sample(net, sched, batch["mask_latent"][:1], batch["features"][:1], batch["lesion_masks"][:1],
                      batch["lesion_present"][:1], num_inference_steps=2, guidance_scale=3.0, eta=1.0,
                      decoder=latent_encoder, progress=False)
    assert out.latents.shape == (1, 4, 8, 8) and out.images.shape == (1, 1, 64, 64)
    assert torch.isfinite(out.images).all() and 0 <= out.images.min() and out.images.max() <= 1
    # inference through the checkpoint record: the record says stage 1 is the SD VAE read from sd_path, so
    # BundleModel (run inference / evaluate / the label app) rebuilds it; no autoencoder.pt exists
    from custom.engines.sd_latents import SDLatentEncoder
    from custom.workflows.bundle import BundleModel

    models = tmp_path / "models"
    assert not (models / "autoencoder.pt").exists()
    bm = BundleModel(REPO / "bundle", models / "model.pt", models / "autoencoder.pt")
    assert bm["stage1_kind"] == "sd_vae" and bm["sd_path"] == str(ckpt) and bm["mask_latent_channels"] == 4
    enc = bm.latent_encoder
    assert isinstance(enc, SDLatentEncoder) and enc.scale_factor == pytest.approx(0.18215)
    with torch.no_grad():
        assert (enc.encode(x) - want).abs().max() <= 1e-4  # the file's VAE, 1 channel replicated to 3
    ema = torch.load(models / "model.pt", weights_only=True)["model"]
    assert all(torch.equal(v, ema[k]) for k, v in bm.network.state_dict().items())
    # the model moved to another machine: the same SD file at another path is accepted (verified by its SHA-256
    # against diffusion_info.json), another SD file is refused with one line naming it
    import shutil

    from custom.errors import MammoInputError

    moved = tmp_path / "elsewhere" / ckpt.name
    moved.parent.mkdir()
    shutil.copyfile(ckpt, moved)
    relocated = BundleModel(REPO / "bundle", models / "model.pt", models / "autoencoder.pt",
                            overrides={"sd_path": str(moved)})
    with torch.no_grad():
        assert (relocated.latent_encoder.encode(x) - want).abs().max() <= 1e-4
    other = tmp_path / "other-sd.safetensors"  # the same file with the last stored byte changed: other weights
    data = bytearray(ckpt.read_bytes())
    data[-1] ^= 0x01
    other.write_bytes(bytes(data))
    wrong = BundleModel(REPO / "bundle", models / "model.pt", models / "autoencoder.pt", overrides={"sd_path": str(other)})
    with pytest.raises(MammoInputError, match="--sd_path: not the weights this model was trained with"):
        wrong.latent_encoder
    from monai.bundle import run

    run("inference", config_file=[str(CONFIGS / "inference.json")], meta_file=str(CONFIGS / "metadata.json"),
        logging_file=False, ckpt_dir=str(models), datalist=str(Path(prepared_dir) / "datalist.json"), split="test",
        max_cases=1, ddim_steps=2, output_dir=str(tmp_path / "samples"), progress=False, device="$torch.device('cpu')")
    pngs = sorted((tmp_path / "samples").rglob("*.png"))
    assert len(pngs) == 1
    from PIL import Image

    with Image.open(pngs[0]) as im:
        assert im.size == (64, 64)
    # README "Reproducing GCDM" step 5: run evaluate --protocol gcdm with a box-prompted SAM from a local folder and
    # FID from a local FID-Inception file (random weights in the standard file format)
    from custom.metrics.inception import FIDInceptionV3
    from sd_tiny import save_tiny_sam

    sam = save_tiny_sam(tmp_path / "medsam")
    inception = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    torch.save(FIDInceptionV3().state_dict(), inception)
    seg_dir = tmp_path / "seg"
    run("training", config_file=[str(CONFIGS / "train_segmenter.json"), str(REPO / "tests" / "configs" / "inf_tiny.json")],
        meta_file=str(CONFIGS / "metadata.json"), logging_file=False, prepared_dir=str(prepared_dir),
        ckpt_dir=str(seg_dir), log_dir=str(tmp_path / "seg_log"), segmenter_channels=[4, 8], max_epochs=1, batch_size=4)
    torch.set_num_threads(1)
    run("evaluate", config_file=[str(CONFIGS / "evaluate.json")], meta_file=str(CONFIGS / "metadata.json"),
        logging_file=False, ckpt_dir=str(models), prepared_dir=str(prepared_dir), segmenter_path=str(seg_dir / "segmenter.pt"),
        results_dir=str(tmp_path / "eval"), label="gcdm", protocol="gcdm", sam_path=str(sam), fid_network=str(inception),
        ddim_steps=5, figure_cases=1, progress=False, device="$torch.device('cpu')")
    import hashlib
    import json

    m = json.loads((tmp_path / "eval" / "gcdm" / "metrics.json").read_text())
    assert m["protocol"] == "gcdm" and m["lesion_segmenter"].startswith("MedSAM/SAM (box-prompted")
    assert m["settings"]["protocol_deviations"] == {"ddim_steps": {"reference": 50, "used": 5}}  # shortened, recorded
    assert m["feature_distance"]["name"] == "fid" and m["metrics"]["feature_distance"] >= 0
    assert m["feature_distance"]["fid_feature_network_sha256"] == hashlib.sha256(inception.read_bytes()).hexdigest()
    assert m["frd_published"]["package"].startswith("frd-score")  # on by default under --protocol gcdm
    g = m["gcdm_protocol"]
    assert sum(map(sum, g["generated"]["confusion_matrix"])) == m["settings"]["n_cases"] * 64 * 64
    assert "Deviations from the reference protocol" in (tmp_path / "eval" / "gcdm" / "report.md").read_text()


def test_random_sd_weights_option_builds_without_files(tmp_path, prepared_dir):
    """--sd_random_weights true: SD-shaped UNet and VAE from random weights (what make bench / the GPU check time)."""
    p = _parser(tmp_path, prepared_dir, sd_random_weights=True, **{"clip_kwargs": {
        "image_size": 32, "patch_size": 16, "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
        "intermediate_size": 64, "projection_dim": 24, "output": "projected"}})
    net = p.get_parsed_content("network_def")
    assert net.unet.in_channels == 8 and net.conditioner.mask_encoder.clip_path is None
    enc = p.get_parsed_content("latent_encoder")
    assert enc.checkpoint_digest == "random"
    soft = torch.zeros(1, 3, 64, 64)
    soft[:, 1] = 1
    assert enc.encode(torch.rand(1, 1, 64, 64)).shape == (1, 4, 8, 8) and enc.encode_mask(soft).shape == (1, 4, 8, 8)
    assert enc.decode(torch.zeros(1, 4, 8, 8)).shape == (1, 1, 64, 64)


def test_paper_512_config_wiring_with_tiny_widths(tmp_path, prepared_dir):
    """paper_512.json over paper.json (tiny widths from paper_tiny.json, paper_512's own values last): 512² images give
    4×64×64 SD-VAE latents, the widened UNet denoises them, and the batch / accumulation settings are paper_512's."""
    p = ConfigParser()
    p.read_config([str(f) for f in FILES] + [str(CONFIGS / "paper_512.json")])
    p.update({"prepared_dir": str(prepared_dir), "latent_cache_dir": str(tmp_path / "cache"),
              "ckpt_dir": str(tmp_path / "models"), "device": "$torch.device('cpu')", "sd_random_weights": True,
              "clip_kwargs": {"image_size": 32, "patch_size": 16, "hidden_size": 32, "num_hidden_layers": 1,
                              "num_attention_heads": 2, "intermediate_size": 64, "projection_dim": 24,
                              "output": "projected"}})
    assert (p.get_parsed_content("image_size"), p.get_parsed_content("batch_size"),
            p.get_parsed_content("gradient_accumulation")) == (512, 4, 4)
    enc = p.get_parsed_content("latent_encoder")
    with torch.no_grad():
        z = enc.encode(torch.rand(1, 1, 512, 512))
        assert z.shape == (1, 4, 64, 64)  # KL-f8: 512 / 8
        assert enc.decode(z).shape == (1, 1, 512, 512)
        net = p.get_parsed_content("network_def")
        assert net.unet.in_channels == 8
        out = net.unet(torch.cat([z, torch.zeros_like(z)], 1), timesteps=torch.tensor([10]),
                       context=torch.zeros(1, 1, 24))
    assert out.shape == (1, 4, 64, 64)
