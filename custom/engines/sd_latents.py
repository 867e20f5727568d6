"""Stable Diffusion's frozen KL-f8 VAE as the stage-2 latent encoder of the paper configs (``paper.json``).

A drop-in for :class:`custom.engines.diffusion.FrozenLatentEncoder` (same attributes and methods, so the latent cache,
training, sampling and decoding code paths are shared):

* image: the 1-channel mammogram in ``[0, 1]`` (float, 16-bit precision kept) -> ``2x - 1`` replicated to SD's 3 input
  channels -> ``z = 0.18215 * z_mu``: ``(B, 4, H/8, W/8)``, 4×32×32 at 256².
* soft mask -> one 4-channel latent, as the reference implementation encodes it: the reference blurs the 3-class label
  map ``{0, 1, 2}`` and min-max normalises it to ``[0, 1]``, then replicates it to 3 channels and encodes it as an
  image (without the ``2x - 1`` shift). Here the label map is rebuilt from the project's soft mask as
  ``(breast + 2 * lesion) / 2`` — the lesion channel carries the configured blur (``sigma``), background/breast stay
  sharp — which equals the reference's min-max scaling for every image that holds a lesion (the paper's mass-only
  data) and keeps a lesion-free image on the same scale instead of stretching it.
* decode: ``D(z / 0.18215)``, mean of the 3 output channels, ``(x + 1) / 2`` clamped to ``[0, 1]``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from custom.engines.diffusion import file_digest
from custom.networks.sd_weights import SD_SCALE_FACTOR, SD_V1_VAE_KWARGS, build_sd_vae, load_sd_vae, sd_source

__all__ = ["SDLatentEncoder", "soft_mask_to_label_image"]


def soft_mask_to_label_image(soft_mask: torch.Tensor) -> torch.Tensor:
    """``(B, 3, H, W)`` soft mask ``[background, breast, lesion]`` -> ``(B, 3, H, W)`` label image
    ``(breast + 2 * lesion) / 2`` in ``[0, 1]`` replicated to 3 channels (see the module docstring)."""
    if soft_mask.ndim != 4 or soft_mask.shape[1] != 3:
        raise ValueError(f"SDLatentEncoder: soft mask (B, 3, H, W) expected, got {tuple(soft_mask.shape)}")
    label = ((soft_mask[:, 1:2] + 2.0 * soft_mask[:, 2:3]) / 2.0).clamp(0.0, 1.0)
    return label.expand(-1, 3, -1, -1)


class SDLatentEncoder(nn.Module):
    """Frozen SD VAE (:func:`custom.networks.sd_weights.build_sd_vae`) with the stage-2 encoder interface.

    Args:
        sd_path: SD v1 weights (diffusers folder or original single file); ``None`` only with ``random_weights``.
        random_weights: keep a random SD-shaped VAE (wiring checks and timing only; images are meaningless).
        vae_kwargs: ``AutoencoderKL`` arguments over SD's (tests shrink the widths; the structure stays SD's).
        scale_factor: SD's 0.18215.

    Attributes:
        scale_factor, latent_channels (4), mask_latent_channels (4), mask_channels (``["label_map"]``, part of the
        latent-cache key), checkpoint_digest (SHA-256 of the weight file; ``"random"`` with random weights).
    """

    def __init__(self, sd_path: str | os.PathLike | None = None, random_weights: bool = False,
                 vae_kwargs: dict[str, Any] | None = None, scale_factor: float = SD_SCALE_FACTOR) -> None:
        super().__init__()
        self.vae = build_sd_vae(**dict(vae_kwargs or {}))
        if sd_path:
            report = load_sd_vae(self.vae, sd_path)
            self.checkpoint_digest = file_digest(report.source)
        elif random_weights:
            self.checkpoint_digest = "random"
        else:
            from custom.networks.sd_weights import check_paper_weights

            check_paper_weights(None, None, False)  # raises the download hint
        self.vae.eval().requires_grad_(False)
        self.scale_factor = float(scale_factor)
        self.latent_channels = int({**SD_V1_VAE_KWARGS, **dict(vae_kwargs or {})}["latent_channels"])
        self.mask_latent_channels = self.latent_channels
        self.mask_channels = ["label_map"]

    def train(self, mode: bool = True) -> "SDLatentEncoder":
        """Always stays in eval mode (frozen)."""
        return super().train(False)

    def _z(self, x: torch.Tensor) -> torch.Tensor:
        param = next(self.vae.parameters())
        z_mu, _ = self.vae.encode(x.to(param.dtype))
        return z_mu.float() * self.scale_factor

    @torch.no_grad()
    def encode(self, image: torch.Tensor) -> torch.Tensor:
        """``(B, 1, H, W)`` image in ``[0, 1]`` -> ``(B, 4, H/8, W/8)`` scaled latent."""
        if image.ndim != 4 or image.shape[1] != 1:
            raise ValueError(f"SDLatentEncoder: image (B, 1, H, W) expected, got {tuple(image.shape)}")
        return self._z((image.float() * 2.0 - 1.0).expand(-1, 3, -1, -1))

    @torch.no_grad()
    def encode_mask(self, soft_mask: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` soft mask -> ``(B, 4, H/8, W/8)`` scaled latent of its label image."""
        return self._z(soft_mask_to_label_image(soft_mask.float()))

    @torch.no_grad()
    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """Scaled latent -> ``(B, 1, H, W)`` image in ``[0, 1]``."""
        param = next(self.vae.parameters())
        x = self.vae.decode(latent.to(param.dtype) / self.scale_factor).float().mean(1, keepdim=True)
        return ((x + 1.0) / 2.0).clamp(0.0, 1.0)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.encode(image)
