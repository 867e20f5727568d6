"""DDIM sampling with classifier-free guidance (CFG) for the GCDM denoiser, plus a RePaint-style "keep the rest" hook.

The loop (diffusers style, :func:`ddim_sample`)::

    x_T ~ N(0, I)                                         fixed by `seed` / `generator`
    for t in scheduler.timesteps:                         e.g. 50 DDIM steps, 999 -> 0
        [known region] x_t = r * x_t + (1 - r) * add_noise(z_known, noise, t)     (RePaint "keep the rest")
        eps = eps_uncond + s * (eps_cond - eps_uncond)    uncond: features AND mask dropped
        x_{t-1} = ddim_step(eps, t, x_t)
    [known region] x_0 = r * x_0 + (1 - r) * z_known
    image = clamp(decode(x_0 / scale_factor), 0, 1)

With ``guidance_scale == 1`` the formula is the conditional prediction itself, so the unconditional pass is skipped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = ["SampleOutput", "guided_noise", "ddim_sample"]


@dataclass
class SampleOutput:
    """Result of :func:`ddim_sample`: ``latents`` ``(B, C, h, w)`` (scaled latent space) and ``images``
    ``(B, 1, H, W)`` in ``[0, 1]`` (``None`` without a decoder)."""

    latents: torch.Tensor
    images: torch.Tensor | None


def _batch_cond(cond: dict[str, Any], b: int, drop: bool, device: torch.device) -> dict[str, Any]:
    """The conditioning kwargs with CFG drop flags for ``b`` samples (all dropped or none)."""
    flag = torch.full((b,), bool(drop), dtype=torch.bool, device=device)
    return {**cond, "drop_features": flag, "drop_mask": flag}


def guided_noise(network: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: dict[str, Any], guidance_scale: float) -> torch.Tensor:
    """CFG noise ``eps_u + s * (eps_c - eps_u)``; ``eps_u`` drops both features and mask. One batched forward
    of ``2B`` samples when ``s != 1``, the conditional forward alone when ``s == 1``."""
    b = x.shape[0]
    if guidance_scale == 1.0:
        return network(x, t, **_batch_cond(cond, b, False, x.device))
    both = {k: (torch.cat([v, v]) if isinstance(v, torch.Tensor) else v) for k, v in cond.items()}
    flags = torch.cat([torch.zeros(b, dtype=torch.bool), torch.ones(b, dtype=torch.bool)]).to(x.device)
    eps = network(torch.cat([x, x]), torch.cat([t, t]), **both, drop_features=flags, drop_mask=flags)
    eps_cond, eps_uncond = eps[:b], eps[b:]
    return eps_uncond + guidance_scale * (eps_cond - eps_uncond)


@torch.no_grad()
def ddim_sample(
    network: nn.Module,
    scheduler: Any,
    mask_latent: torch.Tensor,
    features: torch.Tensor,
    lesion_masks: torch.Tensor,
    lesion_present: torch.Tensor,
    num_inference_steps: int = 50,
    guidance_scale: float = 3.0,
    seed: int | None = 0,
    generator: torch.Generator | None = None,
    eta: float = 0.0,
    decoder: Any | None = None,
    known_latent: torch.Tensor | None = None,
    region: torch.Tensor | None = None,
    progress: bool = True,
    **extra_cond: Any,
) -> SampleOutput:
    """Sample latents (and images) for a batch of conditions.

    Args:
        network: a :class:`~custom.networks.gcdm.GCDMNetwork` (e.g. the EMA copy); put in eval mode here.
        scheduler: a ``monai.networks.schedulers.DDIMScheduler`` with the training noise schedule
            (``clip_sample=False`` for latents).
        mask_latent: ``(B, mask_latent_channels, h, w)`` soft-mask latent; fixes the latent size.
        features, lesion_masks, lesion_present: lesion conditions (see ``GCDMNetwork.forward``).
        num_inference_steps: DDIM steps (50 in the paper).
        guidance_scale: CFG scale ``s`` (3.0 in the paper; 1 = plain conditional).
        seed: seed of a fresh CPU ``torch.Generator`` for the initial noise (and ``eta``/RePaint noise): same seed,
            same image. Ignored when ``generator`` is given.
        generator: an explicit generator instead of ``seed`` (``None`` with ``seed=None``: global RNG).
        eta: DDIM stochasticity (0 = deterministic DDIM).
        decoder: object with ``decode(latents) -> images in [0, 1]`` (a ``FrozenLatentEncoder``); ``None`` returns
            latents only.
        known_latent: ``(B, C, h, w)`` latent of a known image for "keep the rest" editing (RePaint-style).
        region: ``(B, 1, h, w)`` in ``[0, 1]``, 1 where new content is generated, 0 where ``known_latent`` is kept.
        progress: show a tqdm bar over the steps.
        extra_cond: further network inputs (``extra_concat``, token-source inputs).

    Returns:
        :class:`SampleOutput`.
    """
    from tqdm.auto import tqdm

    if (known_latent is None) != (region is None):
        raise ValueError("ddim_sample: known_latent and region go together")
    device = mask_latent.device
    was_training = network.training
    network.eval()
    if generator is None and seed is not None:
        generator = torch.Generator().manual_seed(int(seed))
    b, (h, w) = mask_latent.shape[0], mask_latent.shape[2:]
    shape = (b, int(getattr(network, "latent_channels", 4)), h, w)
    # noise is drawn on the CPU so a seed gives the same image on every device
    x = torch.randn(shape, generator=generator).to(device) * float(getattr(scheduler, "init_noise_sigma", 1.0))
    cond = dict(mask_latent=mask_latent, features=features, lesion_masks=lesion_masks, lesion_present=lesion_present, **extra_cond)
    scheduler.set_timesteps(int(num_inference_steps), device=device)
    step_generator = generator if generator is not None and generator.device.type == device.type else None
    try:
        for t in tqdm(scheduler.timesteps, desc="DDIM", disable=not progress, leave=False):
            t_batch = torch.full((b,), int(t), dtype=torch.long, device=device)
            if known_latent is not None:
                renoised = scheduler.add_noise(known_latent, torch.randn(shape, generator=generator).to(device), t_batch)
                x = region * x + (1 - region) * renoised
            eps = guided_noise(network, x, t_batch, cond, guidance_scale)
            x, _ = scheduler.step(eps.to(x.dtype), int(t), x, eta=eta, generator=step_generator)
        if known_latent is not None:
            x = region * x + (1 - region) * known_latent
    finally:
        network.train(was_training)
    images = decoder.decode(x) if decoder is not None else None
    return SampleOutput(latents=x, images=images)
