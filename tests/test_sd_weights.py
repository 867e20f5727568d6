"""Stable Diffusion weights into MONAI networks: numerical equality with diffusers' own forward passes, for the
diffusers folder and the original single-file layouts, plus strictness, widening and the CLIP image encoder."""

from __future__ import annotations

import pytest
import torch

from custom.networks import sd_weights as sw

diffusers = pytest.importorskip("diffusers")
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint  # noqa: E402

#: SD v1 structure, reduced widths (4 levels, attention on the first three, 2 res blocks, 1 transformer layer).
UNET_CFG = dict(
    sample_size=16, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(16, 16, 32, 32),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=24, attention_head_dim=2, norm_num_groups=8,
)
VAE_CFG = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, block_out_channels=(8, 8, 16, 16),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=4,
)
MONAI_VAE = dict(channels=[8, 8, 16, 16], norm_num_groups=4)


def _randomise(model: torch.nn.Module) -> torch.nn.Module:
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():  # diffusers zero-initialises conv_out / proj_out: make every tensor count
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model.eval()


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    """A random tiny SD v1 (diffusers UNet + VAE) saved as a diffusers folder (safetensors and .bin) and as one
    original-format file (safetensors and .ckpt)."""
    root = tmp_path_factory.mktemp("sd")
    unet = _randomise(diffusers.UNet2DConditionModel(**UNET_CFG))
    vae = _randomise(diffusers.AutoencoderKL(**VAE_CFG))
    for name, safe in (("st", True), ("bin", False)):
        unet.save_pretrained(root / name / "unet", safe_serialization=safe)
        vae.save_pretrained(root / name / "vae", safe_serialization=safe)
    # original layout: names from the project's maps, checked below against diffusers' own converter
    monai_unet = _monai_unet(4)
    monai_vae = sw.build_sd_vae(**MONAI_VAE)
    usd, vsd = unet.state_dict(), vae.state_dict()
    ldm = {}
    dm, lm = sw.unet_key_map(monai_unet, "diffusers"), sw.unet_key_map(monai_unet, "ldm")
    for k in dm:
        ldm["model.diffusion_model." + lm[k]] = usd[dm[k]].clone()
    dv, lv = sw.vae_key_map(monai_vae, "diffusers"), sw.vae_key_map(monai_vae, "ldm")
    for k in dv:
        t = vsd[dv[k]].clone()
        if ".mid.attn_1." in lv[k] and t.ndim == 2:
            t = t[:, :, None, None]  # LDM's VAE attention projections are 1x1 convolutions
        ldm["first_stage_model." + lv[k]] = t
    extras = {"betas": torch.linspace(0, 1, 10), "model_ema.decay": torch.tensor(0.999),
              "cc_projection.weight": torch.zeros(24, 28), "first_stage_model.loss.logvar": torch.zeros(())}
    ldm.update(extras)
    from safetensors.torch import save_file

    save_file(ldm, str(root / "sd.safetensors"))
    torch.save({"state_dict": ldm, "global_step": 1}, root / "sd.ckpt")
    return {"root": root, "unet": unet, "vae": vae, "ldm": ldm}


def _monai_unet(in_channels: int):
    from monai.networks.nets import DiffusionModelUNet

    kw = sw.unet_kwargs_from_diffusers({**UNET_CFG, "in_channels": in_channels})
    return DiffusionModelUNet(spatial_dims=2, with_conditioning=True, **kw).eval()


def test_ldm_names_agree_with_diffusers_converter(tiny_sd):
    """The original-layout names the project maps from are exactly those diffusers' single-file converter reads."""
    unet_cfg = dict(tiny_sd["unet"].config)
    back = convert_ldm_unet_checkpoint(dict(tiny_sd["ldm"]), unet_cfg)
    ref = tiny_sd["unet"].state_dict()
    assert set(back) == set(ref)
    assert all(torch.equal(back[k], ref[k]) for k in ref)
    vback = convert_ldm_vae_checkpoint(dict(tiny_sd["ldm"]), dict(tiny_sd["vae"].config))
    vref = tiny_sd["vae"].state_dict()
    assert set(vback) == set(vref)
    assert all(torch.equal(vback[k].reshape(vref[k].shape), vref[k]) for k in vref)


@pytest.mark.parametrize("source", ["st", "bin", "sd.safetensors", "sd.ckpt"])
def test_unet_equals_diffusers_forward(tiny_sd, source):
    unet = _monai_unet(4)
    report = sw.load_sd_unet(unet, tiny_sd["root"] / source)
    assert report.loaded == len(unet.state_dict()) and not report.widened
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 16, 16, generator=g)
    t = torch.tensor([10, 700])
    ctx = torch.randn(2, 1, 24, generator=g)
    with torch.no_grad():
        ours = unet(x, t, context=ctx)
        ref = tiny_sd["unet"](x, t, encoder_hidden_states=ctx).sample
    assert ref.abs().max() > 0.1
    assert (ours - ref).abs().max().item() <= 1e-4


@pytest.mark.parametrize("source", ["st", "bin", "sd.safetensors", "sd.ckpt"])
def test_vae_equals_diffusers_forward(tiny_sd, source):
    vae = sw.build_sd_vae(**MONAI_VAE).eval()
    sw.load_sd_vae(vae, tiny_sd["root"] / source)
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with torch.no_grad():
        mu, sigma = vae.encode(x)
        dist = tiny_sd["vae"].encode(x).latent_dist
        assert (mu - dist.mean).abs().max().item() <= 1e-4
        assert (sigma - dist.std).abs().max().item() <= 1e-4
        assert (vae.decode(mu) - tiny_sd["vae"].decode(dist.mean).sample).abs().max().item() <= 1e-4


def test_widened_conv_in_keeps_the_pretrained_output(tiny_sd):
    """4 -> 8 input channels, new weights zero: whatever the extra channels hold, the output is the pretrained one."""
    unet = _monai_unet(8)
    report = sw.load_sd_unet(unet, tiny_sd["root"] / "sd.safetensors")
    assert report.widened == [("conv_in.conv.weight", 4, 8)]
    assert torch.count_nonzero(unet.conv_in.conv.weight[:, 4:]) == 0
    g = torch.Generator().manual_seed(3)
    x, extra = torch.randn(1, 4, 16, 16, generator=g), torch.randn(1, 4, 16, 16, generator=g)
    t, ctx = torch.tensor([500]), torch.randn(1, 1, 24, generator=g)
    with torch.no_grad():
        ours = unet(torch.cat([x, extra], 1), t, context=ctx)
        ref = tiny_sd["unet"](x, t, encoder_hidden_states=ctx).sample
    assert (ours - ref).abs().max().item() <= 1e-4
    with pytest.raises(sw.SDWeightsError, match="conv_in.conv.weight"):
        sw.load_sd_unet(_monai_unet(8), tiny_sd["root"] / "st", widen_conv_in=False)


def test_strict_errors_name_the_keys(tiny_sd, tmp_path):
    from safetensors.torch import save_file

    ldm = dict(tiny_sd["ldm"])
    del ldm["model.diffusion_model.middle_block.1.proj_in.weight"]
    ldm["model.diffusion_model.some_new_head.weight"] = torch.zeros(3)
    save_file(ldm, str(tmp_path / "broken.safetensors"))
    with pytest.raises(sw.SDWeightsError) as err:
        sw.load_sd_unet(_monai_unet(4), tmp_path / "broken.safetensors")
    msg = str(err.value)
    assert msg.startswith(str(tmp_path / "broken.safetensors"))
    assert "middle_block.attention.proj_in.conv.weight (<- middle_block.1.proj_in.weight)" in msg
    assert "some_new_head.weight" in msg
    # a network of another width: shape mismatches listed
    from monai.networks.nets import DiffusionModelUNet

    kw = sw.unet_kwargs_from_diffusers(UNET_CFG)
    kw["cross_attention_dim"] = 32
    with pytest.raises(sw.SDWeightsError, match=r"attn2.to_k.weight: file \(16, 24\) vs network \(16, 32\)"):
        sw.load_sd_unet(DiffusionModelUNet(spatial_dims=2, with_conditioning=True, **kw), tiny_sd["root"] / "st")
    with pytest.raises(sw.SDWeightsError, match="weights not found"):
        sw.load_sd_unet(_monai_unet(4), tmp_path / "nowhere")


def test_single_file_accounting_reports_known_extras(tiny_sd, tmp_path):
    report = sw.single_file_accounting(tiny_sd["root"] / "sd.safetensors", clip_used=False)
    assert report.ignored == {
        "noise-schedule buffers (the bundle's scheduler config defines the schedule)": 1,
        "EMA copy of the UNet (the live weights are loaded)": 1,
        "conditioning projection head of Zero123-style checkpoints (not part of GCDM)": 1,
        "the VAE's training loss (LPIPS / discriminator)": 1,
    }
    from safetensors.torch import save_file

    save_file({**tiny_sd["ldm"], "mystery.weight": torch.zeros(2)}, str(tmp_path / "odd.safetensors"))
    with pytest.raises(sw.SDWeightsError, match="1 file tensors left over: mystery.weight"):
        sw.single_file_accounting(tmp_path / "odd.safetensors", clip_used=False)


def _openai_visual(model) -> dict[str, torch.Tensor]:
    """The OpenAI CLIP (``clip`` package) layout of a transformers vision tower, written out by hand."""
    sd, v, out = model.state_dict(), "vision_model.", {}
    p = "cond_stage_model.model.visual."
    out[p + "conv1.weight"] = sd[v + "embeddings.patch_embedding.weight"]
    out[p + "class_embedding"] = sd[v + "embeddings.class_embedding"]
    out[p + "positional_embedding"] = sd[v + "embeddings.position_embedding.weight"]
    out[p + "ln_pre.weight"], out[p + "ln_pre.bias"] = sd[v + "pre_layrnorm.weight"], sd[v + "pre_layrnorm.bias"]
    out[p + "ln_post.weight"], out[p + "ln_post.bias"] = sd[v + "post_layernorm.weight"], sd[v + "post_layernorm.bias"]
    out[p + "proj"] = sd["visual_projection.weight"].t().contiguous()
    for i in range(model.config.num_hidden_layers):
        s, t = f"{p}transformer.resblocks.{i}.", f"{v}encoder.layers.{i}."
        out[s + "attn.in_proj_weight"] = torch.cat([sd[f"{t}self_attn.{n}_proj.weight"] for n in "qkv"])
        out[s + "attn.in_proj_bias"] = torch.cat([sd[f"{t}self_attn.{n}_proj.bias"] for n in "qkv"])
        for a, b in (("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"),
                     ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
            out[f"{s}{a}.weight"], out[f"{s}{a}.bias"] = sd[f"{t}{b}.weight"], sd[f"{t}{b}.bias"]
    return out


def test_clip_image_encoder_from_single_file(tiny_sd, tmp_path):
    """An image-conditioned single file fills the CLIP ViT too (OpenAI layout -> transformers), same outputs."""
    from safetensors.torch import save_file
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    cfg = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=1,
                           image_size=32, patch_size=8, projection_dim=24, hidden_act="quick_gelu")
    ref = _randomise(CLIPVisionModelWithProjection(cfg))
    text_tower = {"cond_stage_model.model.token_embedding.weight": torch.zeros(5, 4)}
    save_file({**tiny_sd["ldm"], **_openai_visual(ref), **text_tower}, str(tmp_path / "imgcond.safetensors"))
    ours = sw.load_clip_vision_ldm(tmp_path / "imgcond.safetensors").eval()
    assert ours.config.num_attention_heads == 1 and ours.config.image_size == 32
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert (ours(pixel_values=x).image_embeds - ref(pixel_values=x).image_embeds).abs().max() <= 1e-4
    report = sw.single_file_accounting(tmp_path / "imgcond.safetensors", clip_used=True)
    assert report.ignored["CLIP text tower (GCDM's context is the fusion output)"] == 1
    with pytest.raises(sw.SDWeightsError, match="no CLIP image encoder"):
        sw.load_clip_vision_ldm(tiny_sd["root"] / "sd.safetensors")
