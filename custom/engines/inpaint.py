"""Trained lesion inpainting (MAM-E's method on the GCDM network): extra UNet input channels and their training.

An inpainting model is the GCDM network with ``extra_concat_channels = 1 + latent_channels``
(``bundle/configs/train_inpaint.json``); its UNet input is::

    z_t                    latent_channels        the noisy latent
    mask_latent            mask_latent_channels   the soft-mask latent (as GCDM)
    region_latent          1                      the region to generate, at latent resolution (1 = generate)
    masked_latent          latent_channels        E(image * (1 - region)): the latent of the region-blanked image

plus the lesion tokens (and attribute tokens) as in GCDM. :func:`inpaint_concat` builds the last two from an image
and a region; :class:`InpaintPrepareBatch` draws a region per training sample — a random box, the dilated lesion
masks, or the whole image (so the same model also generates from scratch) — and passes ``extra_concat``.

The region at latent resolution is every latent cell touching the pixel region (max pooling), as in keep mode, so
generated content covers the whole pixel region; pixels outside the region are pasted back from the source at
inference (:mod:`custom.engines.edit`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from custom.engines.diffusion import GCDMPrepareBatch

__all__ = ["inpaint_channels", "has_inpaint_channels", "region_to_latent", "inpaint_concat", "random_regions",
           "InpaintPrepareBatch"]


def inpaint_channels(latent_channels: int) -> int:
    """``extra_concat_channels`` of an inpainting model: region mask (1) + masked-image latent (``latent_channels``)."""
    return 1 + int(latent_channels)


def has_inpaint_channels(network: nn.Module) -> bool:
    """Whether ``network`` (a GCDMNetwork) was built with the inpainting channels."""
    lc = int(getattr(network, "latent_channels", 0))
    return lc > 0 and int(getattr(network, "extra_concat_channels", 0)) == inpaint_channels(lc)


def region_to_latent(region: torch.Tensor, latent_hw: tuple[int, int]) -> torch.Tensor:
    """``(B, 1, H, W)`` pixel region in [0, 1] -> ``(B, 1, h, w)`` {0, 1}: 1 in every latent cell touching it."""
    return (nn.functional.adaptive_max_pool2d(region.float(), tuple(int(s) for s in latent_hw)) > 0).float()


@torch.no_grad()
def inpaint_concat(encoder: Any, image: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
    """The inpainting channels ``(B, 1 + C, h, w)``: ``[region_latent, E(image * (1 - region))]``.

    Args:
        encoder: a :class:`~custom.engines.diffusion.FrozenLatentEncoder` (``encode``: image in [0, 1] -> latent).
        image: ``(B, 1, H, W)`` in [0, 1].
        region: ``(B, 1, H, W)`` in [0, 1], 1 where new content is generated (blanked to 0 in the image).
    """
    if image.shape != region.shape or image.ndim != 4 or image.shape[1] != 1:
        raise ValueError(f"inpaint_concat: image and region (B, 1, H, W) expected, got {tuple(image.shape)}, {tuple(region.shape)}")
    device = next(encoder.parameters()).device
    masked = image.float() * (1.0 - (region.float() > 0).float())
    z = encoder.encode(masked.to(device)).to(image.device)
    return torch.cat([region_to_latent(region.to(image.device), z.shape[-2:]), z], dim=1)


def random_regions(lesion_masks: torch.Tensor, lesion_present: torch.Tensor, generator: torch.Generator | None = None,
                   p_box: float = 0.4, p_full: float = 0.1, max_dilation: int = 4) -> torch.Tensor:
    """One training region per sample ``(B, 1, H, W)`` in {0, 1}.

    With probability ``p_full`` the whole image; else, for a sample with a lesion, with probability ``1 - p_box`` its
    lesion masks dilated by 1..``max_dilation`` pixels (a random radius) and otherwise a random box; a sample without
    lesion gets a random box (side 10-50 % of the image). ``generator`` (CPU) makes it reproducible.
    """
    b, _, h, w = lesion_masks.shape
    out = torch.zeros(b, 1, h, w)
    union = (lesion_masks * lesion_present[..., None, None]).amax(dim=1, keepdim=True).cpu() > 0
    for i in range(b):
        u = float(torch.rand((), generator=generator))
        if u < p_full:
            out[i] = 1.0
        elif union[i].any() and u >= p_full + p_box * (1.0 - p_full):
            r = int(torch.randint(1, max(1, int(max_dilation)) + 1, (1,), generator=generator))
            out[i] = (nn.functional.max_pool2d(union[i].float()[None], 2 * r + 1, stride=1, padding=r)[0] > 0).float()
        else:
            bh = int(torch.randint(max(1, h // 10), max(2, h // 2) + 1, (1,), generator=generator))
            bw = int(torch.randint(max(1, w // 10), max(2, w // 2) + 1, (1,), generator=generator))
            y0 = int(torch.randint(0, h - bh + 1, (1,), generator=generator))
            x0 = int(torch.randint(0, w - bw + 1, (1,), generator=generator))
            out[i, :, y0:y0 + bh, x0:x0 + bw] = 1.0
    return out.to(lesion_masks.device)


class InpaintPrepareBatch(GCDMPrepareBatch):
    """:class:`~custom.engines.diffusion.GCDMPrepareBatch` plus the inpainting channels (``extra_concat``) for a
    region drawn per sample by :func:`random_regions` (a custom piece: MONAI's ``DiffusionPrepareBatch`` has no
    masked-image conditioning).

    The batch must carry ``image`` ``(B, 1, S, S)`` (``diffusion_dataset(..., keep_images=True)``) and ``lesion_masks``;
    ``encoder`` (the frozen stage-1 encoder) is required. With ``seed`` set (validation) the regions are fixed.

    Args:
        p_box, p_full, max_dilation: see :func:`random_regions`.
        other arguments: as :class:`GCDMPrepareBatch`.
    """

    def __init__(self, num_train_timesteps: int, encoder: Any, p_box: float = 0.4, p_full: float = 0.1,
                 max_dilation: int = 4, **kwargs: Any) -> None:
        if encoder is None:
            raise ValueError("InpaintPrepareBatch: the frozen stage-1 encoder is required (masked-image latents)")
        super().__init__(num_train_timesteps, encoder=encoder, **kwargs)
        if not (0.0 <= p_box <= 1.0 and 0.0 <= p_full <= 1.0):
            raise ValueError(f"InpaintPrepareBatch: p_box and p_full must lie in [0, 1], got {p_box}, {p_full}")
        self.p_box, self.p_full, self.max_dilation = float(p_box), float(p_full), int(max_dilation)
        self.last_regions: torch.Tensor | None = None

    def __call__(self, batchdata: dict[str, Any], device: str | torch.device | None = None, non_blocking: bool = False,
                 **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor, tuple, dict]:
        z0, target, args, infer_kwargs = super().__call__(batchdata, device, non_blocking, **kwargs)
        if "image" not in batchdata:
            raise KeyError("InpaintPrepareBatch: the batch has no 'image' (build the dataset with keep_images=True)")
        image = torch.as_tensor(batchdata["image"]).float()
        masks = torch.as_tensor(batchdata["lesion_masks"]).float()
        present = torch.as_tensor(batchdata["lesion_present"]).float()
        gen = torch.Generator().manual_seed(int(self.seed) + 7) if self.seed is not None else None
        region = random_regions(masks.cpu(), present.cpu(), gen, self.p_box, self.p_full, self.max_dilation)
        self.last_regions = region
        concat = inpaint_concat(self.encoder, image.cpu(), region)
        infer_kwargs["extra_concat"] = concat.to(device=z0.device)
        return z0, target, args, infer_kwargs
