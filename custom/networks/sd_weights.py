"""Stable Diffusion v1 weights from local files into the project's MONAI networks.

Sources (``sd_path``), never a model hub:

* a **diffusers folder**: ``unet/`` and ``vae/``, each with ``config.json`` and ``diffusion_pytorch_model.safetensors``
  (or ``.bin``; an ``.fp16`` variant is read when it is the only one);
* an **original-format single file** (``.safetensors`` / ``.ckpt``, the LDM layout): ``model.diffusion_model.*``
  (UNet), ``first_stage_model.*`` (KL-f8 VAE), ``cond_stage_model.*`` (text encoder, or for image-conditioned
  checkpoints such as ``sd-image-conditioned-v2.ckpt`` the OpenAI CLIP ViT-L/14 ``cond_stage_model.model.visual.*``).

Targets: ``monai.networks.nets.DiffusionModelUNet`` (built with SD v1's structure: channels 320/640/1280/1280,
attention on the first three levels, 2 res blocks, 8 heads, 1 transformer layer, ``norm_eps=1e-5``) and
:func:`build_sd_vae`, MONAI's ``AutoencoderKL`` with SD's "double z" encoder head (the encoder's last conv gives
``2 * latent_channels`` moments and ``quant_conv`` splits into MONAI's ``quant_conv_mu`` / ``quant_conv_log_sigma``),
so the SD VAE loads without folding or dropping a tensor. The CLIP image encoder goes into transformers'
``CLIPVisionModelWithProjection``.

The key mapping is built from the MONAI network's own structure (levels, res blocks, attention levels), block by
block, so it is complete by construction; loading is strict: every network parameter gets a tensor and every
checkpoint tensor in scope is used, else :class:`SDWeightsError` lists the missing / left-over / mis-shaped keys.
Tensors that image-conditioned SD checkpoints carry besides the three networks (noise-schedule buffers, the EMA copy,
Zero123's ``cc_projection``, the VAE's training loss, CLIP's text tower) are *known extras*: reported by name in the
:class:`LoadReport` and logged, not loaded. Anything else left over is an error.

The first convolution may be widened (``conv_in`` input channels 4 -> 4 + k, e.g. GCDM's mask latent): the new
input weights are zero, so the widened UNet computes exactly what the pretrained UNet computes whatever the extra
channels hold.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from custom.checkpoints import state_dict_mismatches
from custom.errors import MammoInputError

__all__ = [
    "SD_SCALE_FACTOR",
    "SD_V1_UNET_KWARGS",
    "SD_V1_VAE_KWARGS",
    "SDWeightsError",
    "LoadReport",
    "build_sd_vae",
    "read_state_dict",
    "sd_source",
    "unet_kwargs_from_diffusers",
    "load_sd_unet",
    "load_unet_state_dict",
    "load_sd_vae",
    "load_clip_vision_ldm",
    "diffusion_optimizer_params",
    "check_conditioner_lr_mult",
    "clip_vision_config_from_ldm",
    "unet_key_map",
    "vae_key_map",
]

logger = logging.getLogger(__name__)

#: Stable Diffusion v1's latent scale factor.
SD_SCALE_FACTOR = 0.18215
#: ``DiffusionModelUNet`` arguments of SD v1's UNet (besides in/out channels and the cross-attention width 768).
SD_V1_UNET_KWARGS: dict[str, Any] = {
    "channels": [320, 640, 1280, 1280],
    "attention_levels": [True, True, True, False],
    "num_res_blocks": 2,
    "num_head_channels": [40, 80, 160, 160],
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "transformer_num_layers": 1,
}
#: ``AutoencoderKL`` arguments of SD's KL-f8 VAE (3 image channels, 4 latent channels).
SD_V1_VAE_KWARGS: dict[str, Any] = {
    "channels": [128, 256, 512, 512],
    "attention_levels": [False, False, False, False],
    "num_res_blocks": 2,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "norm_eps": 1e-6,
    "with_encoder_nonlocal_attn": True,
    "with_decoder_nonlocal_attn": True,
}

_LDM_UNET = "model.diffusion_model."
_LDM_VAE = "first_stage_model."
_LDM_CLIP = "cond_stage_model.model.visual."
_WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin",
                 "diffusion_pytorch_model.fp16.safetensors", "diffusion_pytorch_model.fp16.bin")
_SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
#: Known extras of original-format files: (regular expression, what it is). Reported, not loaded.
KNOWN_EXTRAS: tuple[tuple[str, str], ...] = (
    (r"^(betas|alphas_cumprod(_prev)?|sqrt_\w+|log_one_minus_alphas_cumprod|posterior_\w+|logvar|lvlb_weights)$",
     "noise-schedule buffers (the bundle's scheduler config defines the schedule)"),
    (r"^model_ema\.", "EMA copy of the UNet (the live weights are loaded)"),
    (r"^cc_projection\.", "conditioning projection head of Zero123-style checkpoints (not part of GCDM)"),
    (r"^first_stage_model\.loss\.", "the VAE's training loss (LPIPS / discriminator)"),
    (r"^cond_stage_model\.(mean|std)$", "CLIP pixel mean/std buffers (MaskCLIPEncoder normalises itself)"),
    (r"^cond_stage_model\.(transformer\.|model\.(transformer|token_embedding|ln_final|text_projection|"
     r"positional_embedding|logit_scale))", "CLIP text tower (GCDM's context is the fusion output)"),
)


class SDWeightsError(MammoInputError):
    """A Stable Diffusion / CLIP weight source that cannot fill a network: message ``"<path>: <reason>"``."""


@dataclass
class LoadReport:
    """What a loader did: ``loaded`` network keys, ``widened`` (key, old in-channels, new in-channels) and
    ``ignored`` known extras, ``{description: count}``."""

    source: str
    loaded: int = 0
    widened: list[tuple[str, int, int]] = field(default_factory=list)
    ignored: dict[str, int] = field(default_factory=dict)

    def __str__(self) -> str:
        parts = [f"{self.source}: {self.loaded} tensors loaded"]
        parts += [f"{k} widened {a} -> {b} input channels (new weights zero)" for k, a, b in self.widened]
        parts += [f"ignored {n} × {what}" for what, n in self.ignored.items()]
        return "; ".join(parts)


class GroupNormSiLU(nn.GroupNorm):
    """``silu(GroupNorm(x))``: SD's VAE applies SiLU between its last GroupNorm and output conv (encoder and
    decoder); MONAI's ``Encoder`` / ``Decoder`` apply none there. Same parameters as ``nn.GroupNorm``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.silu(super().forward(x))


def _norm_silu(norm: nn.GroupNorm) -> GroupNormSiLU:
    return GroupNormSiLU(norm.num_groups, norm.num_channels, eps=norm.eps, affine=norm.affine)


def build_sd_vae(spatial_dims: int = 2, in_channels: int = 3, out_channels: int = 3, **vae_kwargs: Any) -> nn.Module:
    """MONAI ``AutoencoderKL`` with Stable Diffusion's encoder head ("double z").

    SD's VAE differs from MONAI's ``AutoencoderKL`` in three places, rebuilt here: SiLU after the last GroupNorm of
    encoder and decoder (:class:`GroupNormSiLU`); SD's decoder has ``num_res_blocks + 1`` res blocks per level (MONAI's ``Decoder`` is built with that count), and
    SD's encoder ends in a conv to ``2 * latent_channels`` moments and a 1x1 ``quant_conv`` over all of them; the
    mean is the first half. Here ``encoder.blocks[-1]`` is that conv (``2 * latent_channels`` outputs) and
    ``quant_conv_mu`` / ``quant_conv_log_sigma`` take all ``2 * latent_channels`` moments (SD's ``quant_conv`` rows
    split in two). Everything else is MONAI's network, unchanged; the returned module is an ``AutoencoderKL`` with
    ``sd_double_z = True``.

    Args:
        spatial_dims: 2.
        in_channels, out_channels: image channels (3 for SD; the mammogram is replicated to 3 channels).
        vae_kwargs: the remaining ``AutoencoderKL`` arguments, over :data:`SD_V1_VAE_KWARGS`.

    Inputs / outputs are MONAI's: ``encode(x)`` with ``x`` ``(B, 3, H, W)`` in SD's ``[-1, 1]`` range ->
    ``(z_mu, z_sigma)`` ``(B, 4, H/8, W/8)``; ``decode(z)`` -> ``(B, 3, H, W)`` in about ``[-1, 1]``.
    """
    from monai.networks.blocks import Convolution
    from monai.networks.nets import AutoencoderKL
    from monai.networks.nets.autoencoderkl import Decoder

    kwargs = {**SD_V1_VAE_KWARGS, **vae_kwargs}
    ae = AutoencoderKL(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=out_channels, **kwargs)
    latent = int(kwargs["latent_channels"])
    enc = ae.encoder
    # SD's decoder has one more res block per level than its encoder; MONAI's Decoder takes the count per level
    ae.decoder = Decoder(
        spatial_dims=spatial_dims, channels=enc.channels, in_channels=latent, out_channels=out_channels,
        num_res_blocks=[int(r) + 1 for r in enc.num_res_blocks], norm_num_groups=enc.norm_num_groups,
        norm_eps=enc.norm_eps, attention_levels=enc.attention_levels,
        with_nonlocal_attn=bool(kwargs["with_decoder_nonlocal_attn"]),
        use_convtranspose=bool(kwargs.get("use_convtranspose", False)),
        include_fc=bool(kwargs.get("include_fc", True)), use_combined_linear=bool(kwargs.get("use_combined_linear", False)),
        use_flash_attention=bool(kwargs.get("use_flash_attention", False)),
    )
    last = ae.encoder.blocks[-1]
    ae.encoder.blocks[-1] = Convolution(spatial_dims=spatial_dims, in_channels=last.in_channels,
                                        out_channels=2 * latent, strides=1, kernel_size=3, padding=1, conv_only=True)
    for name in ("quant_conv_mu", "quant_conv_log_sigma"):
        setattr(ae, name, Convolution(spatial_dims=spatial_dims, in_channels=2 * latent, out_channels=latent,
                                      strides=1, kernel_size=1, padding=0, conv_only=True))
    for part in (ae.encoder, ae.decoder):
        part.blocks[-2] = _norm_silu(part.blocks[-2])
    ae.sd_double_z = True
    return ae


# ----------------------------------------------------------------------------------------------------- reading


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file or a torch pickle (``weights_only=True``; a top-level ``state_dict`` is
    unwrapped). Raises :class:`SDWeightsError` naming the file when it is missing or unreadable."""
    path = Path(path)
    if not path.is_file():
        raise SDWeightsError(path, "weight file not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path), device="cpu")
        else:
            try:
                sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:  # not a zip archive: no mmap
                sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any reader failure becomes one clear line
        raise SDWeightsError(path, f"unreadable weight file ({type(err).__name__}: {str(err)[:200]}); a .ckpt must "
                                   "load with torch.load(weights_only=True) — convert it to .safetensors otherwise") from err
    if isinstance(sd, Mapping) and "state_dict" in sd and isinstance(sd["state_dict"], Mapping):
        sd = sd["state_dict"]
    if not isinstance(sd, Mapping) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise SDWeightsError(path, "not a state dict of tensors")
    return dict(sd)


def sd_source(sd_path: str | os.PathLike, component: str) -> tuple[str, Path, dict[str, torch.Tensor]]:
    """``(format, file, tensors)`` of one component (``"unet"`` or ``"vae"``) of ``sd_path``.

    ``format`` is ``"diffusers"`` (tensors as in the subfolder's file) or ``"ldm"`` (the single file's tensors, all
    of them: the caller selects its prefix)."""
    path = Path(sd_path)
    if path.is_dir():
        sub = path / component
        for name in _WEIGHT_NAMES:
            if (sub / name).is_file():
                return "diffusers", sub / name, read_state_dict(sub / name)
        raise SDWeightsError(path, f"no {component}/diffusion_pytorch_model.safetensors (or .bin): not a diffusers "
                                   "Stable Diffusion folder (sd_path)")
    if path.is_file():
        if path.suffix not in _SINGLE_FILE_SUFFIXES:
            raise SDWeightsError(path, f"unknown weight file type {path.suffix!r}; expected one of {_SINGLE_FILE_SUFFIXES}")
        return "ldm", path, read_state_dict(path)
    raise SDWeightsError(path, "Stable Diffusion weights not found (sd_path): a diffusers folder with unet/ and vae/ "
                               "or one original-format .safetensors/.ckpt file")


def unet_kwargs_from_diffusers(config: Mapping[str, Any] | str | os.PathLike) -> dict[str, Any]:
    """``DiffusionModelUNet`` arguments equivalent to a diffusers ``UNet2DConditionModel`` config (dict or
    ``config.json`` path): ``in_channels``, ``out_channels``, ``cross_attention_dim`` and the structure keys."""
    if not isinstance(config, Mapping):
        config = json.loads(Path(config).read_text())
    channels = [int(c) for c in config["block_out_channels"]]
    heads = config.get("attention_head_dim", 8)  # diffusers' legacy name: the number of heads in SD v1
    heads = [int(heads)] * len(channels) if isinstance(heads, int) else [int(h) for h in heads]
    layers = config.get("layers_per_block", 2)
    return {
        "in_channels": int(config.get("in_channels", 4)),
        "out_channels": int(config.get("out_channels", 4)),
        "cross_attention_dim": int(config.get("cross_attention_dim", 768)),
        "channels": channels,
        "attention_levels": [t.startswith("CrossAttn") for t in config["down_block_types"]],
        "num_res_blocks": int(layers) if isinstance(layers, int) else [int(x) for x in layers],
        "num_head_channels": [c // h for c, h in zip(channels, heads)],
        "norm_num_groups": int(config.get("norm_num_groups", 32)),
        "norm_eps": float(config.get("norm_eps", 1e-5)),
        "transformer_num_layers": int(config.get("transformer_layers_per_block", 1) or 1),
    }


# ------------------------------------------------------------------------------------------------- key maps

# (MONAI suffix fragment, source suffix fragment) replacements per block kind and source format.
_CONV = [(".conv.weight", ".weight"), (".conv.bias", ".bias")]
_UNET_RES = {
    "diffusers": [(".conv1.conv.", ".conv1."), (".conv2.conv.", ".conv2."), (".skip_connection.conv.", ".conv_shortcut.")],
    "ldm": [(".norm1.", ".in_layers.0."), (".conv1.conv.", ".in_layers.2."), (".time_emb_proj.", ".emb_layers.1."),
            (".norm2.", ".out_layers.0."), (".conv2.conv.", ".out_layers.3."), (".skip_connection.conv.", ".skip_connection.")],
}
_UNET_ATTN = [(".proj_in.conv.", ".proj_in."), (".proj_out.conv.", ".proj_out."), (".out_proj.", ".to_out.0."),
              (".ff.linear1.", ".ff.net.0.proj."), (".ff.linear2.", ".ff.net.2.")]
_VAE_RES = {
    "diffusers": [(".conv1.conv.", ".conv1."), (".conv2.conv.", ".conv2."), (".nin_shortcut.conv.", ".conv_shortcut.")],
    "ldm": [(".conv1.conv.", ".conv1."), (".conv2.conv.", ".conv2."), (".nin_shortcut.conv.", ".nin_shortcut.")],
}
_VAE_ATTN = {
    "diffusers": [(".norm.", ".group_norm."), (".attn.to_q.", ".to_q."), (".attn.to_k.", ".to_k."),
                  (".attn.to_v.", ".to_v."), (".attn.out_proj.", ".to_out.0.")],
    "ldm": [(".attn.to_q.", ".q."), (".attn.to_k.", ".k."), (".attn.to_v.", ".v."), (".attn.out_proj.", ".proj_out.")],
}
# older diffusers VAE files name the attention projections query/key/value/proj_attn
_VAE_ATTN_LEGACY = [(".norm.", ".group_norm."), (".attn.to_q.", ".query."), (".attn.to_k.", ".key."),
                    (".attn.to_v.", ".value."), (".attn.out_proj.", ".proj_attn.")]


def _translate(suffix: str, rules: Iterable[tuple[str, str]]) -> str:
    s = "." + suffix
    for a, b in rules:
        s = s.replace(a, b)
    return s[1:]


def _blocks_map(monai_keys: Iterable[str], blocks: list[tuple[str, str, list[tuple[str, str]]]]) -> dict[str, str]:
    """MONAI key -> source key for every MONAI key under one of the ``(monai_prefix, source_prefix, rules)``."""
    out: dict[str, str] = {}
    keys = list(monai_keys)
    for mp, sp, rules in blocks:
        for k in keys:
            if k.startswith(mp + "."):
                out[k] = sp + "." + _translate(k[len(mp) + 1:], rules)
    return out


def _levels(net: nn.Module) -> tuple[int, list[int], list[bool]]:
    """(levels, res blocks per level, attention per level) of a ``DiffusionModelUNet`` or an ``AutoencoderKL``."""
    if hasattr(net, "encoder"):
        net = net.encoder
    n = len(getattr(net, "block_out_channels", None) or net.channels)
    r = net.num_res_blocks
    res = [int(r)] * n if isinstance(r, int) else [int(x) for x in r]
    return n, res, [bool(a) for a in net.attention_levels]


def unet_key_map(unet: nn.Module, fmt: str) -> dict[str, str]:
    """MONAI ``DiffusionModelUNet`` key -> key in a ``fmt`` (``"diffusers"`` / ``"ldm"``, without the
    ``model.diffusion_model.`` prefix) checkpoint, for every parameter and buffer of ``unet``."""
    if fmt not in ("diffusers", "ldm"):
        raise ValueError(f"unet_key_map: fmt must be 'diffusers' or 'ldm', got {fmt!r}")
    n, res, attn = _levels(unet)
    d = fmt == "diffusers"
    blocks: list[tuple[str, str, list[tuple[str, str]]]] = [
        ("time_embed.0", "time_embedding.linear_1" if d else "time_embed.0", []),
        ("time_embed.2", "time_embedding.linear_2" if d else "time_embed.2", []),
        ("conv_in", "conv_in" if d else "input_blocks.0.0", [(".conv.", ".")]),
        ("out.0", "conv_norm_out" if d else "out.0", []),
        ("out.2", "conv_out" if d else "out.2", [(".conv.", ".")]),
    ]
    r_res, r_attn = _UNET_RES[fmt], _UNET_ATTN
    for lvl in range(n):
        for j in range(res[lvl]):
            idx = 1 + sum(res[:lvl]) + lvl + j  # one downsampler per earlier level
            blocks.append((f"down_blocks.{lvl}.resnets.{j}",
                           f"down_blocks.{lvl}.resnets.{j}" if d else f"input_blocks.{idx}.0", r_res))
            if attn[lvl]:
                blocks.append((f"down_blocks.{lvl}.attentions.{j}",
                               f"down_blocks.{lvl}.attentions.{j}" if d else f"input_blocks.{idx}.1", r_attn))
        if lvl < n - 1:
            idx = 1 + sum(res[: lvl + 1]) + lvl
            blocks.append((f"down_blocks.{lvl}.downsampler.op",
                           f"down_blocks.{lvl}.downsamplers.0.conv" if d else f"input_blocks.{idx}.0.op", [(".conv.", ".")]))
    for mk, dk, lk, rules in (("resnet_1", "resnets.0", "0", r_res), ("attention", "attentions.0", "1", r_attn),
                              ("resnet_2", "resnets.1", "2", r_res)):
        blocks.append((f"middle_block.{mk}", f"mid_block.{dk}" if d else f"middle_block.{lk}", rules))
    rev_res, rev_attn = res[::-1], attn[::-1]
    idx = 0
    for u in range(n):
        for j in range(rev_res[u] + 1):
            blocks.append((f"up_blocks.{u}.resnets.{j}", f"up_blocks.{u}.resnets.{j}" if d else f"output_blocks.{idx}.0", r_res))
            if rev_attn[u]:
                blocks.append((f"up_blocks.{u}.attentions.{j}",
                               f"up_blocks.{u}.attentions.{j}" if d else f"output_blocks.{idx}.1", r_attn))
            if u < n - 1 and j == rev_res[u]:
                sub = 2 if rev_attn[u] else 1
                blocks.append((f"up_blocks.{u}.upsampler.postconv",
                               f"up_blocks.{u}.upsamplers.0.conv" if d else f"output_blocks.{idx}.{sub}.conv", [(".conv.", ".")]))
            idx += 1
    return _blocks_map(unet.state_dict().keys(), blocks)


def vae_key_map(vae: nn.Module, fmt: str, legacy_attention: bool = False) -> dict[str, str]:
    """MONAI :func:`build_sd_vae` key -> key in a ``fmt`` checkpoint (``"ldm"`` keys without the
    ``first_stage_model.`` prefix). ``quant_conv_mu`` / ``quant_conv_log_sigma`` map to ``quant_conv`` (row halves,
    see :func:`load_sd_vae`)."""
    if fmt not in ("diffusers", "ldm"):
        raise ValueError(f"vae_key_map: fmt must be 'diffusers' or 'ldm', got {fmt!r}")
    if not getattr(vae, "sd_double_z", False):
        raise ValueError("vae_key_map: the VAE must come from build_sd_vae (SD's double-z encoder head)")
    n, res, attn = _levels(vae)
    if any(attn):
        raise ValueError("vae_key_map: SD's VAE has no per-level attention (attention_levels must be all False)")
    d = fmt == "diffusers"
    r_res = _VAE_RES[fmt]
    r_attn = _VAE_ATTN_LEGACY if (d and legacy_attention) else _VAE_ATTN[fmt]
    blocks: list[tuple[str, str, list[tuple[str, str]]]] = []
    i = 0

    def add(src: str, rules: list[tuple[str, str]], part: str) -> None:
        nonlocal i
        blocks.append((f"{part}.blocks.{i}", f"{part}.{src}", rules))
        i += 1

    add("conv_in", _CONV, "encoder")
    for lvl in range(n):
        for j in range(res[lvl]):
            add(f"down_blocks.{lvl}.resnets.{j}" if d else f"down.{lvl}.block.{j}", r_res, "encoder")
        if lvl < n - 1:
            add(f"down_blocks.{lvl}.downsamplers.0.conv" if d else f"down.{lvl}.downsample.conv",
                [(".conv.conv.", ".")], "encoder")
    mid = ["mid_block.resnets.0", "mid_block.attentions.0", "mid_block.resnets.1"] if d else \
          ["mid.block_1", "mid.attn_1", "mid.block_2"]
    for src, rules in zip(mid, (r_res, r_attn, r_res)):
        add(src, rules, "encoder")
    add("conv_norm_out" if d else "norm_out", [], "encoder")
    add("conv_out", _CONV, "encoder")
    i = 0
    add("conv_in", _CONV, "decoder")
    for src, rules in zip(mid, (r_res, r_attn, r_res)):
        add(src, rules, "decoder")
    dec_res = [int(r) for r in vae.decoder.num_res_blocks][::-1]
    for u in range(n):
        ldm_level = n - 1 - u
        for j in range(dec_res[u]):
            add(f"up_blocks.{u}.resnets.{j}" if d else f"up.{ldm_level}.block.{j}", r_res, "decoder")
        if u < n - 1:
            add(f"up_blocks.{u}.upsamplers.0.conv" if d else f"up.{ldm_level}.upsample.conv",
                [(".postconv.conv.", ".")], "decoder")
    add("conv_norm_out" if d else "norm_out", [], "decoder")
    add("conv_out", _CONV, "decoder")
    blocks += [("post_quant_conv", "post_quant_conv", [(".conv.", ".")]),
               ("quant_conv_mu", "quant_conv", [(".conv.", ".")]),
               ("quant_conv_log_sigma", "quant_conv", [(".conv.", ".")])]
    return _blocks_map(vae.state_dict().keys(), blocks)


# ------------------------------------------------------------------------------------------------------ loading


def _known_extra(key: str) -> str | None:
    for pattern, what in KNOWN_EXTRAS:
        if re.search(pattern, key):
            return what
    return None


def _fail(path: Path, what: str, missing: list[str], unexpected: list[str], mismatched: list[str]) -> None:
    def show(items: list[str], limit: int = 25) -> str:
        return ", ".join(items[:limit]) + (f", … (+{len(items) - limit})" if len(items) > limit else "")

    parts = []
    if missing:
        parts.append(f"{len(missing)} network parameters missing from the file: {show(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} file tensors left over: {show(unexpected)}")
    if mismatched:
        parts.append(f"{len(mismatched)} shape mismatches: {show(mismatched)}")
    raise SDWeightsError(path, f"{what} does not match the network ({'; '.join(parts)})")


def _strict_load(net: nn.Module, key_map: Mapping[str, str], source: Mapping[str, torch.Tensor], path: Path,
                 what: str, scope: Iterable[str], report: LoadReport,
                 special: Mapping[str, Any] | None = None, widen: bool = False) -> None:
    """Fill ``net`` from ``source`` through ``key_map`` (MONAI key -> source key); ``scope`` = the source keys that
    must all be used. ``special``: MONAI key -> callable(source) -> tensor for derived tensors."""
    target = net.state_dict()
    new: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    missing, mismatched = [], []
    for mk, tensor in target.items():
        if special and mk in special:
            value, srcs = special[mk](source)
            if value is None:
                missing.append(f"{mk} (<- {', '.join(srcs)})")
                continue
            used.update(srcs)
        else:
            sk = key_map.get(mk)
            if sk is None or sk not in source:
                missing.append(f"{mk} (<- {sk})" if sk else mk)
                continue
            value = source[sk]
            used.add(sk)
        value = value.detach()
        if value.ndim == 4 and tensor.ndim == 2 and value.shape[2:] == (1, 1):
            value = value[:, :, 0, 0]  # 1x1 conv attention projections of the LDM VAE -> Linear
        if value.shape != tensor.shape:
            if widen and mk == "conv_in.conv.weight" and value.ndim == 4 and value.shape[0] == tensor.shape[0] \
                    and value.shape[2:] == tensor.shape[2:] and value.shape[1] < tensor.shape[1]:
                wide = torch.zeros_like(tensor, dtype=value.dtype)
                wide[:, : value.shape[1]] = value
                report.widened.append((mk, int(value.shape[1]), int(tensor.shape[1])))
                value = wide
            else:
                mismatched.append(f"{mk}: file {tuple(value.shape)} vs network {tuple(tensor.shape)}")
                continue
        new[mk] = value.to(tensor.dtype)
    unexpected = sorted(k for k in scope if k not in used)
    if missing or unexpected or mismatched:
        _fail(path, what, missing, unexpected, mismatched)
    net.load_state_dict(new, strict=True)
    report.loaded += len(new)


def _report_extras(keys: Iterable[str], report: LoadReport) -> None:
    for k in keys:
        what = _known_extra(k)
        if what:
            report.ignored[what] = report.ignored.get(what, 0) + 1


def load_sd_unet(unet: nn.Module, sd_path: str | os.PathLike, widen_conv_in: bool = True) -> LoadReport:
    """Load an SD v1 UNet (diffusers folder or original single file) into a MONAI ``DiffusionModelUNet``, strictly.

    Args:
        unet: built with SD v1's structure (see :data:`SD_V1_UNET_KWARGS`) and ``with_conditioning=True``,
            ``cross_attention_dim=768``; ``in_channels`` may exceed the checkpoint's (``widen_conv_in``).
        sd_path: the diffusers folder (``unet/``) or the single file (``model.diffusion_model.*``).
        widen_conv_in: allow ``conv_in`` with more input channels than the file: the extra weights are zero.

    Returns:
        a :class:`LoadReport` (also logged).

    Raises:
        SDWeightsError: missing file, or keys missing / left over / mis-shaped (all listed in the message).
    """
    fmt, path, tensors = sd_source(sd_path, "unet")
    if fmt == "ldm":
        tensors = {k[len(_LDM_UNET):]: v for k, v in tensors.items() if k.startswith(_LDM_UNET)}
        if not tensors:
            raise SDWeightsError(path, f"no UNet tensors ({_LDM_UNET}*) in this file")
    return load_unet_state_dict(unet, tensors, fmt, path, widen_conv_in)


def load_unet_state_dict(unet: nn.Module, tensors: Mapping[str, torch.Tensor], fmt: str,
                         source: str | os.PathLike = "<state dict>", widen_conv_in: bool = True) -> LoadReport:
    """:func:`load_sd_unet` from tensors already in memory (``fmt`` ``"diffusers"`` keys, or ``"ldm"`` keys without
    the ``model.diffusion_model.`` prefix), e.g. a diffusers ``UNet2DConditionModel.state_dict()``."""
    path = Path(source)
    report = LoadReport(str(path))
    _strict_load(unet, unet_key_map(unet, fmt), tensors, path, "UNet", tensors.keys(), report, widen=widen_conv_in)
    logger.info("%s", report)
    return report


def load_sd_vae(vae: nn.Module, sd_path: str | os.PathLike) -> LoadReport:
    """Load SD's KL-f8 VAE into an :func:`build_sd_vae`, strictly (``quant_conv`` rows split into
    ``quant_conv_mu`` / ``quant_conv_log_sigma``). Raises :class:`SDWeightsError` like :func:`load_sd_unet`."""
    fmt, path, tensors = sd_source(sd_path, "vae")
    if fmt == "ldm":
        tensors = {k[len(_LDM_VAE):]: v for k, v in tensors.items()
                   if k.startswith(_LDM_VAE) and not k.startswith(_LDM_VAE + "loss.")}
        if not tensors:
            raise SDWeightsError(path, f"no VAE tensors ({_LDM_VAE}*) in this file")
    legacy = fmt == "diffusers" and any(".mid_block.attentions.0.query." in k for k in tensors)
    latent = int(vae.quant_conv_mu.conv.out_channels)

    def half(param: str, lo: int, hi: int):
        def get(src: Mapping[str, torch.Tensor]):
            t = src.get(f"quant_conv.{param}")
            return (None if t is None else t[lo:hi]), [f"quant_conv.{param}"]
        return get

    special = {"quant_conv_mu.conv.weight": half("weight", 0, latent),
               "quant_conv_mu.conv.bias": half("bias", 0, latent),
               "quant_conv_log_sigma.conv.weight": half("weight", latent, 2 * latent),
               "quant_conv_log_sigma.conv.bias": half("bias", latent, 2 * latent)}
    report = LoadReport(str(path))
    _strict_load(vae, vae_key_map(vae, fmt, legacy_attention=legacy), tensors, path, "VAE", tensors.keys(), report,
                 special=special)
    logger.info("%s", report)
    return report


def single_file_accounting(sd_path: str | os.PathLike, clip_used: bool) -> LoadReport:
    """Classify every tensor of an original-format file: UNet, VAE, CLIP vision tower (``clip_used``) or known
    extras (counted in the report). Raises :class:`SDWeightsError` listing any other tensor, so nothing in the
    file is silently dropped."""
    path = Path(sd_path)
    keys = list(read_state_dict(path).keys())
    report = LoadReport(str(path))
    unknown = []
    for k in keys:
        if k.startswith(_LDM_UNET) or (k.startswith(_LDM_VAE) and not k.startswith(_LDM_VAE + "loss.")):
            continue
        if k.startswith(_LDM_CLIP):
            if not clip_used:
                report.ignored["CLIP vision tower (clip_path is another source)"] = \
                    report.ignored.get("CLIP vision tower (clip_path is another source)", 0) + 1
            continue
        what = _known_extra(k)
        if what is None:
            unknown.append(k)
        else:
            report.ignored[what] = report.ignored.get(what, 0) + 1
    if unknown:
        _fail(path, "single file", [], sorted(unknown), [])
    logger.info("%s", report)
    return report


# -------------------------------------------------------------------------------------------------------- CLIP


def clip_vision_config_from_ldm(tensors: Mapping[str, torch.Tensor], prefix: str = _LDM_CLIP):
    """A ``CLIPVisionConfig`` read off the shapes of an OpenAI-layout vision tower (heads = width / 64, OpenAI's
    rule for every released ViT; QuickGELU, LayerNorm eps 1e-5)."""
    from transformers import CLIPVisionConfig

    conv = tensors[prefix + "conv1.weight"]
    width, patch = int(conv.shape[0]), int(conv.shape[-1])
    grid = int(round(math.sqrt(tensors[prefix + "positional_embedding"].shape[0] - 1)))
    layers = len({k.split(".")[len(prefix.split(".")) + 1] for k in tensors if k.startswith(prefix + "transformer.resblocks.")})
    return CLIPVisionConfig(
        hidden_size=width, patch_size=patch, image_size=grid * patch, num_hidden_layers=layers,
        num_attention_heads=width // 64 if width >= 64 else 1,
        intermediate_size=int(tensors[prefix + "transformer.resblocks.0.mlp.c_fc.weight"].shape[0]),
        projection_dim=int(tensors[prefix + "proj"].shape[1]), hidden_act="quick_gelu", layer_norm_eps=1e-5,
        num_channels=int(conv.shape[1]),
    )


def load_clip_vision_ldm(path: str | os.PathLike, num_attention_heads: int | None = None) -> nn.Module:
    """The CLIP image encoder of an image-conditioned original-format file (``cond_stage_model.model.visual.*``,
    OpenAI layout) as a transformers ``CLIPVisionModelWithProjection``, strictly (every tower tensor used, every
    parameter filled). Raises :class:`SDWeightsError` when the file has no vision tower or it does not fit."""
    from transformers import CLIPVisionModelWithProjection

    path = Path(path)
    tensors = read_state_dict(path)
    prefix = _LDM_CLIP
    if prefix + "conv1.weight" not in tensors:
        raise SDWeightsError(path, f"no CLIP image encoder ({prefix}*) in this file: use an image-conditioned SD "
                                   "checkpoint (sd-image-conditioned-v2.ckpt) or a transformers CLIP folder (clip_path)")
    config = clip_vision_config_from_ldm(tensors, prefix)
    if num_attention_heads:
        config.num_attention_heads = int(num_attention_heads)
    model = CLIPVisionModelWithProjection(config)
    src = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()

    def take(k: str) -> torch.Tensor:
        used.add(k)
        return src[k]

    v = "vision_model."
    try:
        out[v + "embeddings.patch_embedding.weight"] = take("conv1.weight")
        out[v + "embeddings.class_embedding"] = take("class_embedding")
        out[v + "embeddings.position_embedding.weight"] = take("positional_embedding")
        for a, b in (("ln_pre", "pre_layrnorm"), ("ln_post", "post_layernorm")):
            out[f"{v}{b}.weight"], out[f"{v}{b}.bias"] = take(f"{a}.weight"), take(f"{a}.bias")
        out["visual_projection.weight"] = take("proj").t().contiguous()
        for i in range(config.num_hidden_layers):
            s, t = f"transformer.resblocks.{i}.", f"{v}encoder.layers.{i}."
            qkv_w, qkv_b = take(s + "attn.in_proj_weight"), take(s + "attn.in_proj_bias")
            for name, w, b in zip(("q_proj", "k_proj", "v_proj"), qkv_w.chunk(3, 0), qkv_b.chunk(3, 0)):
                out[f"{t}self_attn.{name}.weight"], out[f"{t}self_attn.{name}.bias"] = w, b
            for a, b in (("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"),
                         ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
                out[f"{t}{b}.weight"], out[f"{t}{b}.bias"] = take(f"{s}{a}.weight"), take(f"{s}{a}.bias")
    except KeyError as err:
        raise SDWeightsError(path, f"CLIP image encoder incomplete: {prefix}{err.args[0]} missing") from err
    target = model.state_dict()
    diff = state_dict_mismatches(target, out, ignore=("position_ids",))
    missing = sorted(diff.missing)
    left = sorted(prefix + k for k in src if k not in used)  # left over = file tensors the conversion did not use
    mism = [f"{k}: file {theirs} vs network {ours}" for k, theirs, ours in diff.shapes]
    if missing or left or mism:
        _fail(path, "CLIP image encoder", missing, left, mism)
    model.load_state_dict(out, strict=False)
    return model


# ------------------------------------------------------------------------------------------- the paper config

#: What a user without ``sd_path`` is told (paper configs).
SD_DOWNLOAD_HINT = (
    "GCDM starts from Stable Diffusion v1 weights on disk: download the image-conditioned SD v1 checkpoint "
    "'sd-image-conditioned-v2.ckpt' (lambdalabs/stable-diffusion-image-conditioned, the file GCDM's README and "
    "Zero123 use; UNet + VAE + CLIP ViT-L/14 in one file) or a diffusers Stable Diffusion v1 folder (unet/, vae/), "
    "and pass --sd_path /path/to/it (and --mask_clip_path /path/to/clip-vit-large-patch14 when the file holds no "
    "CLIP image encoder); or pass --sd_random_weights true for random SD-shaped weights (wiring and timing checks only)"
)


def check_paper_weights(sd_path: str | os.PathLike | None, mask_clip_path: str | os.PathLike | None,
                        random_weights: bool = False) -> str | None:
    """Validate the paper configs' weight sources before anything is built and return the CLIP source.

    Returns ``mask_clip_path`` when given, else ``sd_path`` when it is an original-format single file holding a
    CLIP image encoder (``sd-image-conditioned-v2.ckpt``), else ``None`` (only allowed with ``random_weights``).

    Raises:
        SDWeightsError: no ``sd_path`` (message says what to download and where to point it), a missing path, or
            no CLIP image encoder anywhere at paper scale.
    """
    if random_weights:
        return None if mask_clip_path is None else str(mask_clip_path)
    if not sd_path:
        raise SDWeightsError("sd_path", SD_DOWNLOAD_HINT)
    path = Path(sd_path)
    if not path.exists():
        raise SDWeightsError(path, "Stable Diffusion weights not found (sd_path). " + SD_DOWNLOAD_HINT)
    if mask_clip_path:
        if not Path(mask_clip_path).exists():
            raise SDWeightsError(mask_clip_path, "CLIP image encoder not found (mask_clip_path)")
        return str(mask_clip_path)
    if path.is_file() and _LDM_CLIP + "conv1.weight" in _keys(path):
        return str(path)
    raise SDWeightsError(path, "holds no CLIP image encoder (cond_stage_model.model.visual.*) and no mask_clip_path "
                               "was given: GCDM's mask encoder is a pretrained, frozen CLIP ViT-L/14 — pass "
                               "--mask_clip_path /path/to/clip-vit-large-patch14 (a transformers folder)")


def _keys(path: Path) -> list[str]:
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    return list(read_state_dict(path).keys())


def pretrained_gcdm(network: nn.Module, sd_path: str | os.PathLike | None, random_weights: bool = False) -> nn.Module:
    """Fill a ``GCDMNetwork``'s UNet from ``sd_path`` (first conv widened to take the mask latent, new weights zero)
    and return the network; with ``random_weights`` leave its random SD-shaped initialisation. A single file is
    accounted for in full (:func:`single_file_accounting`)."""
    if random_weights:
        logger.warning("GCDM UNet: random SD-shaped weights (sd_random_weights); not the paper's initialisation")
        return network
    if not sd_path:
        raise SDWeightsError("sd_path", SD_DOWNLOAD_HINT)
    report = load_sd_unet(network.unet, sd_path)
    if Path(sd_path).is_file():
        enc = getattr(getattr(network, "conditioner", None), "mask_encoder", None)
        clip_src = getattr(enc, "clip_path", None)
        single_file_accounting(sd_path, clip_used=bool(clip_src) and Path(clip_src) == Path(sd_path))
    logger.info("GCDM UNet initialised from %s", report)
    return network


def check_conditioner_lr_mult(conditioner_lr_mult: Any) -> float:
    """``conditioner_lr_mult``: a positive finite number (a boolean is refused); else one :class:`MammoInputError`."""
    if isinstance(conditioner_lr_mult, bool) or not isinstance(conditioner_lr_mult, (int, float)) \
            or not math.isfinite(conditioner_lr_mult) or conditioner_lr_mult <= 0:
        raise MammoInputError("conditioner_lr_mult", f"must be a positive number, got {conditioner_lr_mult!r}")
    return float(conditioner_lr_mult)


def gcdm_param_groups(network: nn.Module, lr: float, conditioner_lr_mult: float = 10.0,
                      weight_decay: float = 0.0) -> list[dict[str, Any]]:
    """AdamW parameter groups of the paper recipe: the UNet (and any token sources) at ``lr``, the conditioner's
    trainable parameters (gated fusion, CFG nulls; a frozen CLIP has none) at ``lr * conditioner_lr_mult`` (GCDM:
    10×). Works on a ``DistributedDataParallel``-wrapped network too."""
    conditioner_lr_mult = check_conditioner_lr_mult(conditioner_lr_mult)
    inner = getattr(network, "module", network)
    cond = [p for p in inner.conditioner.parameters() if p.requires_grad]
    cond_ids = {id(p) for p in cond}
    rest = [p for p in inner.parameters() if p.requires_grad and id(p) not in cond_ids]
    return [
        {"params": rest, "lr": float(lr), "weight_decay": float(weight_decay)},
        {"params": cond, "lr": float(lr) * float(conditioner_lr_mult), "weight_decay": float(weight_decay)},
    ]


def diffusion_optimizer_params(network: nn.Module, lr: float, conditioner_lr_mult: float = 1.0,
                               weight_decay: float = 0.0) -> Iterable[nn.Parameter] | list[dict[str, Any]]:
    """What ``train_diffusion.json`` hands the optimizer: ``network.parameters()`` when ``conditioner_lr_mult`` is
    1 (the CPU default, one group, unchanged), else :func:`gcdm_param_groups` (the conditioner's trainable
    parameters at ``lr * conditioner_lr_mult``; GCDM trains them at 10×).

    Raises:
        MammoInputError: ``conditioner_lr_mult`` is not a positive number (a boolean included).
    """
    mult = check_conditioner_lr_mult(conditioner_lr_mult)
    if mult == 1.0:
        return network.parameters()
    return gcdm_param_groups(network, lr, mult, weight_decay)
