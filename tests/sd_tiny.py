"""Tiny random Stable-Diffusion-v1-structured weights saved in the real file formats (shared by the paper tests)."""

from __future__ import annotations

from pathlib import Path

import torch

UNET_CFG = dict(
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(16, 16, 32, 32),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=24, attention_head_dim=2, norm_num_groups=8,
)
VAE_CFG = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, block_out_channels=(8, 8, 16, 16),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=4,
)
MONAI_VAE = dict(channels=[8, 8, 16, 16], norm_num_groups=4)


def randomise(model: torch.nn.Module, seed: int = 0, std: float = 0.2) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model.eval()


def openai_visual(model, prefix: str = "cond_stage_model.model.visual.") -> dict[str, torch.Tensor]:
    """The OpenAI CLIP (``clip`` package) layout of a transformers vision tower, written out by hand."""
    sd, v, out, p = model.state_dict(), "vision_model.", {}, prefix
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


def tiny_clip():
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    cfg = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=1,
                           image_size=32, patch_size=8, projection_dim=24, hidden_act="quick_gelu")
    return randomise(CLIPVisionModelWithProjection(cfg), seed=5)


def save_image_conditioned_single_file(path: Path) -> dict:
    """A tiny ``sd-image-conditioned-v2``-like original-format file: UNet + VAE + CLIP image encoder + extras.
    Returns the diffusers reference models (``unet``, ``vae``, ``clip``)."""
    import diffusers
    from safetensors.torch import save_file

    from custom.networks import sd_weights as sw
    from monai.networks.nets import DiffusionModelUNet

    unet = randomise(diffusers.UNet2DConditionModel(**UNET_CFG), seed=1, std=0.05)
    vae = randomise(diffusers.AutoencoderKL(**VAE_CFG), seed=2, std=0.1)
    clip = tiny_clip()
    monai_unet = DiffusionModelUNet(spatial_dims=2, with_conditioning=True, **sw.unet_kwargs_from_diffusers(UNET_CFG))
    monai_vae = sw.build_sd_vae(**MONAI_VAE)
    usd, vsd, ldm = unet.state_dict(), vae.state_dict(), {}
    dm, lm = sw.unet_key_map(monai_unet, "diffusers"), sw.unet_key_map(monai_unet, "ldm")
    for k in dm:
        ldm["model.diffusion_model." + lm[k]] = usd[dm[k]].clone()
    dv, lv = sw.vae_key_map(monai_vae, "diffusers"), sw.vae_key_map(monai_vae, "ldm")
    for k in dv:
        t = vsd[dv[k]].clone()
        ldm["first_stage_model." + lv[k]] = t[:, :, None, None] if (".mid.attn_1." in lv[k] and t.ndim == 2) else t
    ldm.update(openai_visual(clip))
    ldm.update({"betas": torch.linspace(0, 1, 10), "cc_projection.weight": torch.zeros(24, 28)})
    save_file(ldm, str(path))
    return {"unet": unet, "vae": vae, "clip": clip}


def save_tiny_sam(folder):
    """A tiny random transformers ``SamModel`` + ``SamProcessor`` saved with ``save_pretrained`` (MedSAM's format)."""
    from transformers import (SamConfig, SamImageProcessor, SamMaskDecoderConfig, SamModel, SamProcessor,
                              SamPromptEncoderConfig, SamVisionConfig)

    vc = SamVisionConfig(hidden_size=32, output_channels=16, num_hidden_layers=2, num_attention_heads=2, image_size=64,
                         patch_size=16, mlp_dim=64, global_attn_indexes=[1], window_size=2, num_pos_feats=8)
    pc = SamPromptEncoderConfig(hidden_size=16, image_size=64, patch_size=16, mask_input_channels=4)
    mc = SamMaskDecoderConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, mlp_dim=32,
                              iou_head_hidden_dim=16)
    SamModel(SamConfig(vision_config=vc.to_dict(), prompt_encoder_config=pc.to_dict(),
                       mask_decoder_config=mc.to_dict())).save_pretrained(folder)
    SamProcessor(SamImageProcessor(size={"longest_edge": 64}, pad_size={"height": 64, "width": 64})).save_pretrained(folder)
    return folder
