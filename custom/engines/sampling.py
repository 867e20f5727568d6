"""DDIM sampling with classifier-free guidance (CFG) for the GCDM denoiser, plus a RePaint-style "keep the rest" hook.

The loop (diffusers style, :func:`ddim_sample`)::

    1. x_T ~ N(0, I)                                      fixed by `seed` (one generator per row with a seed list)
    2. ctx = network.context(conditions)                   once per run: cond rows + uncond rows (2B tokens)
    3. for t in scheduler.timesteps:                       e.g. 20 DDIM steps, 999 -> 0
           [known region] x_t = r * x_t + (1 - r) * add_noise(z_known, noise, t)     (RePaint "keep the rest")
           eps = eps_uncond + s * (eps_cond - eps_uncond)  uncond: features AND mask dropped; one 2B forward
                 [attribute_guidance s_a] + the attributes' own term, one 3B forward (guided_noise)
           x_{t-1} = ddim_step(eps, t, x_t)
           [resample U > 1] U - 1 more times: x_t = renoise(x_{t-1}); known merge, eps, step again  (RePaint jumps)
    4. [known region] x_0 = r * x_0 + (1 - r) * z_known
    5. image = clamp(decode(x_0 / scale_factor), 0, 1)

With ``guidance_scale == 1`` the formula is the conditional prediction itself, so the unconditional pass is skipped.

The lesion context (CLIP mask encoder + gated fusion) does not depend on ``x_t`` or ``t``: step 2 computes it once
and every step reuses it (``context_once=False`` recomputes it per step, the reference behaviour; same output). With
a *list* of seeds every row draws its noise (initial, ``eta`` and RePaint noise) from its own generator, so a
row's image does not depend on which other rows share the batch: ``ddim_sample(rows, seed=[s0, s1])`` gives, within
float tolerance, the images of ``ddim_sample(row0, seed=s0)`` and ``ddim_sample(row1, seed=s1)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = ["SAMPLERS", "SampleOutput", "guided_noise", "ddim_sample", "pndm_sample", "row_generators", "draw_noise"]

#: the sampler choices (``sampler`` in ``inference.json`` / ``evaluate.json``): DDIM (:func:`ddim_sample`, the default,
#: with ``eta`` and the RePaint keep hook) or MONAI's PNDM / PLMS (:func:`pndm_sample`: deterministic, no eta, whole
#: images only)
SAMPLERS = ("ddim", "pndm")


@dataclass
class SampleOutput:
    """Result of :func:`ddim_sample` / :func:`pndm_sample`: ``latents`` ``(B, C, h, w)`` (scaled latent space) and ``images``
    ``(B, 1, H, W)`` in ``[0, 1]`` (``None`` without a decoder)."""

    latents: torch.Tensor
    images: torch.Tensor | None


def _batch_cond(cond: dict[str, Any], b: int, drop: bool, device: torch.device) -> dict[str, Any]:
    """The conditioning kwargs with CFG drop flags for ``b`` samples (all dropped or none)."""
    flag = torch.full((b,), bool(drop), dtype=torch.bool, device=device)
    return {**cond, "drop_features": flag, "drop_mask": flag}


def _cfg_flags(b: int, device: torch.device) -> torch.Tensor:
    """``(2B,)`` drop flags: ``B`` conditional rows (False) then ``B`` unconditional rows (True)."""
    return torch.cat([torch.zeros(b, dtype=torch.bool), torch.ones(b, dtype=torch.bool)]).to(device)


def _doubled(cond: dict[str, Any]) -> dict[str, Any]:
    return {k: (torch.cat([v, v]) if isinstance(v, torch.Tensor) else v) for k, v in cond.items()}


def _attribute_rows(cond: dict[str, Any], attribute_guidance: float | None) -> bool:
    """Whether a run uses the separate attribute guidance (a scale given and attribute codes among the inputs)."""
    return attribute_guidance is not None and isinstance(cond.get("attributes"), torch.Tensor)


def _tripled(cond: dict[str, Any]) -> dict[str, Any]:
    """``cond`` for ``3B`` rows: conditional, unconditional, and conditional with every attribute "not given"."""
    out = {k: (torch.cat([v, v, v]) if isinstance(v, torch.Tensor) else v) for k, v in cond.items()}
    attrs = cond["attributes"]
    out["attributes"] = torch.cat([attrs, attrs, torch.full_like(attrs, -1)])
    return out


def _three_flags(b: int, device: torch.device) -> torch.Tensor:
    """``(3B,)`` drop flags of :func:`_tripled`'s rows: only the middle ``B`` (unconditional) are dropped."""
    return torch.cat([torch.zeros(b, dtype=torch.bool), torch.ones(b, dtype=torch.bool),
                      torch.zeros(b, dtype=torch.bool)]).to(device)


def guided_noise(network: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: dict[str, Any], guidance_scale: float,
                 context: torch.Tensor | None = None, attribute_guidance: float | None = None) -> torch.Tensor:
    """CFG noise ``eps_u + s * (eps_c - eps_u)``; ``eps_u`` drops both features and mask. One batched forward
    of ``2B`` samples when ``s != 1``, the conditional forward alone when ``s == 1``.

    ``attribute_guidance`` ``s_a`` (with ``cond["attributes"]``): the attributes get their own scale, as in
    InstructPix2Pix's two-term guidance: ``eps_u + s * (eps_n - eps_u) + s_a * (eps_c - eps_n)``, where ``eps_n`` is
    the conditional prediction with every attribute "not given" (one ``3B`` forward). ``s_a == s`` is the plain
    formula (within float rounding); a larger ``s_a`` pushes harder towards the requested attributes.

    ``context``: the precomputed cross-attention context of those rows (``(2B, T, D)`` conditional rows then
    unconditional rows when ``s != 1``, ``(B, T, D)`` otherwise, ``(3B, T, D)`` with attribute guidance), e.g. from
    :func:`sampling_context`; ``None`` lets the network compute it."""
    b = x.shape[0]
    extra = {} if context is None else {"context": context}
    if _attribute_rows(cond, attribute_guidance):
        flags = _three_flags(b, x.device)
        eps = network(torch.cat([x, x, x]), torch.cat([t, t, t]), **_tripled(cond), drop_features=flags,
                      drop_mask=flags, **extra)
        eps_c, eps_u, eps_n = eps[:b], eps[b : 2 * b], eps[2 * b :]
        return eps_u + guidance_scale * (eps_n - eps_u) + float(attribute_guidance) * (eps_c - eps_n)
    if guidance_scale == 1.0:
        return network(x, t, **_batch_cond(cond, b, False, x.device), **extra)
    flags = _cfg_flags(b, x.device)
    eps = network(torch.cat([x, x]), torch.cat([t, t]), **_doubled(cond), drop_features=flags, drop_mask=flags, **extra)
    eps_cond, eps_uncond = eps[:b], eps[b:]
    return eps_uncond + guidance_scale * (eps_cond - eps_uncond)


def sampling_context(network: nn.Module, cond: dict[str, Any], b: int, guidance_scale: float,
                     device: torch.device, attribute_guidance: float | None = None) -> torch.Tensor | None:
    """The cross-attention context of a sampling run, computed once (``None`` when ``network`` has no
    ``context`` method): ``(2B, T, D)`` for CFG (conditional rows, then rows with features and mask dropped),
    ``(B, T, D)`` when ``guidance_scale == 1``, ``(3B, T, D)`` with attribute guidance (:func:`guided_noise`)."""
    if not callable(getattr(network, "context", None)):
        return None
    keys = ("features", "lesion_masks", "lesion_present")
    token_inputs = {k: v for k, v in cond.items() if k not in ("mask_latent", "extra_concat", *keys)}
    if _attribute_rows(cond, attribute_guidance):
        three = _tripled({k: cond[k] for k in (*keys, "attributes")})
        rest = {k: torch.cat([v, v, v]) if isinstance(v, torch.Tensor) else v for k, v in token_inputs.items()
                if k != "attributes"}
        flags = _three_flags(b, device)
        return network.context(*(three[k] for k in keys), drop_features=flags, drop_mask=flags,
                               attributes=three["attributes"], **rest)
    if guidance_scale == 1.0:
        flag = torch.zeros(b, dtype=torch.bool, device=device)
        return network.context(*(cond[k] for k in keys), drop_features=flag, drop_mask=flag, **token_inputs)
    both = _doubled({k: cond[k] for k in keys})
    flags = _cfg_flags(b, device)
    return network.context(*(both[k] for k in keys), drop_features=flags, drop_mask=flags, **_doubled(token_inputs))


def row_generators(seeds: Sequence[int]) -> list[torch.Generator]:
    """One CPU ``torch.Generator`` per row, seeded with ``seeds[i]``."""
    return [torch.Generator().manual_seed(int(s)) for s in seeds]


def draw_noise(shape: Sequence[int], generator: torch.Generator | Sequence[torch.Generator] | None,
               device: torch.device) -> torch.Tensor:
    """Standard normal noise of ``shape`` ``(B, ...)`` drawn on the CPU (so a seed gives the same image on every
    device) and moved to ``device``: from one generator for the whole batch, or row ``i`` from ``generator[i]``."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"draw_noise: {len(generator)} generators for {shape[0]} rows")
        rows = [torch.randn((1, *shape[1:]), generator=g) for g in generator]
        noise = torch.cat(rows) if rows else torch.zeros(tuple(shape))
    else:
        noise = torch.randn(tuple(shape), generator=generator)
    return noise.to(device)


def _initial_latent(caller: str, network: nn.Module, scheduler: Any, mask_latent: torch.Tensor,
                    seed: int | Sequence[int] | None, generator: Any) -> tuple[Any, tuple[int, ...], torch.Tensor]:
    """Step 1 of both samplers: the run's generator(s) (from ``seed`` unless ``generator`` is given; a seed list gives
    one generator per row) and the initial latent ``x_T = noise * init_noise_sigma`` of shape
    ``(B, latent_channels, h, w)`` (``B, h, w`` from ``mask_latent``). Returns ``(generator, shape, x_T)``."""
    b, (h, w) = mask_latent.shape[0], mask_latent.shape[2:]
    if generator is None and seed is not None:
        generator = row_generators(seed) if isinstance(seed, (list, tuple)) else torch.Generator().manual_seed(int(seed))
    if isinstance(generator, (list, tuple)) and len(generator) != b:
        raise ValueError(f"{caller}: {len(generator)} seeds/generators for {b} rows")
    shape = (b, int(getattr(network, "latent_channels", 4)), h, w)
    x = draw_noise(shape, generator, mask_latent.device) * float(getattr(scheduler, "init_noise_sigma", 1.0))
    return generator, shape, x


def _renoise(scheduler: Any, x_prev: torch.Tensor, t: int, noise: torch.Tensor) -> torch.Tensor:
    """``x_t`` from ``x_{t-1}`` of a DDIM step at ``t`` (forward diffusion over one step of the inference schedule):
    ``sqrt(a_t / a_prev) x_prev + sqrt(1 - a_t / a_prev) noise`` with the scheduler's cumulative alphas (``a_prev``
    its final alpha past step 0, as :meth:`step` uses)."""
    prev = t - scheduler.num_train_timesteps // scheduler.num_inference_steps
    a_t = scheduler.alphas_cumprod[t]
    a_prev = scheduler.alphas_cumprod[prev] if prev >= 0 else scheduler.final_alpha_cumprod
    ratio = (a_t / a_prev).to(device=x_prev.device, dtype=x_prev.dtype)
    return ratio.sqrt() * x_prev + (1 - ratio).sqrt() * noise.to(x_prev.dtype)


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
    seed: int | Sequence[int] | None = 0,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    eta: float = 0.0,
    decoder: Any | None = None,
    known_latent: torch.Tensor | None = None,
    region: torch.Tensor | None = None,
    progress: bool = True,
    context_once: bool = True,
    resample: int = 1,
    attribute_guidance: float | None = None,
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
        seed: an int: seed of one fresh CPU ``torch.Generator`` for the whole batch's noise (initial, ``eta`` and
            RePaint noise): same seed, same images. A list of ``B`` ints: one generator per row, so row ``i`` is the
            image that ``seed=seed[i]`` gives for that row alone (independent of the batch). Ignored when
            ``generator`` is given.
        generator: an explicit generator (or a list of ``B``, one per row) instead of ``seed`` (``None`` with
            ``seed=None``: global RNG).
        eta: DDIM stochasticity (0 = deterministic DDIM).
        decoder: object with ``decode(latents) -> images in [0, 1]`` (a ``FrozenLatentEncoder``); ``None`` returns
            latents only.
        known_latent: ``(B, C, h, w)`` latent of a known image for "keep the rest" editing (RePaint-style).
        region: ``(B, 1, h, w)`` in ``[0, 1]``, 1 where new content is generated, 0 where ``known_latent`` is kept.
        progress: show a tqdm bar over the steps.
        context_once: compute the lesion cross-attention context once per run (it does not depend on the step);
            ``False`` recomputes it at every step (same output, slower; kept for checking).
        resample: RePaint's resampling ("jumps", Lugmayr et al. 2022): each step is done ``resample`` times; after
            every pass but the last, ``x_{t-1}`` is re-noised back to ``x_t`` (``sqrt(a_t / a_{t-1}) x_{t-1} +
            sqrt(1 - a_t / a_{t-1}) n``, ``a`` the cumulative alphas) and the known region merged in again, so the
            generated region is harmonised with what is kept. ``1`` (default) is plain DDIM, bit for bit; ``U``
            costs ``U`` times the denoiser calls.
        attribute_guidance: a separate CFG scale for the clinical attributes (:func:`guided_noise`); ``None``
            (default): the attributes follow ``guidance_scale``. Needs ``attributes`` among ``extra_cond``.
        extra_cond: further network inputs (``extra_concat``, token-source inputs).

    Returns:
        :class:`SampleOutput`.
    """
    from tqdm.auto import tqdm

    if (known_latent is None) != (region is None):
        raise ValueError("ddim_sample: known_latent and region go together")
    if isinstance(resample, bool) or not isinstance(resample, int) or resample < 1:
        raise ValueError(f"ddim_sample: resample must be an integer >= 1, got {resample!r}")
    device = mask_latent.device
    b = mask_latent.shape[0]
    generator, shape, x = _initial_latent("ddim_sample", network, scheduler, mask_latent, seed, generator)
    per_row = isinstance(generator, (list, tuple))
    was_training = network.training
    network.eval()
    cond = dict(mask_latent=mask_latent, features=features, lesion_masks=lesion_masks, lesion_present=lesion_present, **extra_cond)
    scheduler.set_timesteps(int(num_inference_steps), device=device)
    # eta noise comes from the scheduler's own draw: the matching generator when it lives on the sampling device
    if per_row:
        step_generators = [g if g.device.type == device.type else None for g in generator]
    else:
        step_generator = generator if generator is not None and generator.device.type == device.type else None
    try:
        context = (sampling_context(network, cond, b, guidance_scale, device, attribute_guidance) if context_once
                   else None)
        for t in tqdm(scheduler.timesteps, desc="DDIM", disable=not progress, leave=False):
            t_batch = torch.full((b,), int(t), dtype=torch.long, device=device)
            for u in range(resample):
                if u > 0:  # RePaint jump: x_{t-1} back to x_t
                    x = _renoise(scheduler, x, int(t), draw_noise(shape, generator, device))
                if known_latent is not None:
                    renoised = scheduler.add_noise(known_latent, draw_noise(shape, generator, device), t_batch)
                    x = region * x + (1 - region) * renoised
                eps = guided_noise(network, x, t_batch, cond, guidance_scale, context=context,
                                   attribute_guidance=attribute_guidance).to(x.dtype)
                if per_row and eta > 0:  # each row's eta noise from its own generator
                    x = torch.cat([scheduler.step(eps[i : i + 1], int(t), x[i : i + 1], eta=eta, generator=g)[0]
                                   for i, g in enumerate(step_generators)])
                else:
                    x, _ = scheduler.step(eps, int(t), x, eta=eta, generator=None if per_row else step_generator)
        if known_latent is not None:
            x = region * x + (1 - region) * known_latent
    finally:
        network.train(was_training)
    images = decoder.decode(x) if decoder is not None else None
    return SampleOutput(latents=x, images=images)


@torch.no_grad()
def pndm_sample(
    network: nn.Module,
    scheduler: Any,
    mask_latent: torch.Tensor,
    features: torch.Tensor,
    lesion_masks: torch.Tensor,
    lesion_present: torch.Tensor,
    num_inference_steps: int = 20,
    guidance_scale: float = 3.0,
    seed: int | Sequence[int] | None = 0,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    decoder: Any | None = None,
    progress: bool = True,
    attribute_guidance: float | None = None,
    **extra_cond: Any,
) -> SampleOutput:
    """Sample latents (and images) with MONAI's PNDM scheduler (the sibling of :func:`ddim_sample`)::

        1. x_T ~ N(0, I)                                  as ddim_sample (one generator per row with a seed list)
        2. ctx = network.context(conditions)               once per run
        3. for t in scheduler.timesteps:                   the scheduler's own list (PLMS with skip_prk_steps)
               eps = eps_uncond + s * (eps_cond - eps_uncond)
               x = scheduler.step(eps, t, x)               linear multistep over the last 4 predictions
        4. image = decode(x_0)

    PNDM is deterministic: the only noise is the initial ``x_T``, so a row's image depends on its seed alone.
    There is no ``eta`` and no RePaint "keep" hook (use :func:`ddim_sample` for keep mode).

    Args:
        scheduler: a ``monai.networks.schedulers.PNDMScheduler`` with the training noise schedule and prediction type
            (``pndm_scheduler`` in ``common.json``: ``skip_prk_steps=True``, ``set_alpha_to_one=True``). Its
            ``step`` keeps state, so ``set_timesteps`` (called here) resets it for each run.
        num_inference_steps: the scheduler's ``set_timesteps`` argument = network evaluations per CFG branch.
        others: as :func:`ddim_sample`.

    Returns:
        :class:`SampleOutput`.
    """
    from monai.networks.schedulers import PNDMScheduler
    from tqdm.auto import tqdm

    if not isinstance(scheduler, PNDMScheduler):
        raise TypeError(f"pndm_sample: a monai PNDMScheduler is needed, got {type(scheduler).__name__}")
    device = mask_latent.device
    b = mask_latent.shape[0]
    generator, _, x = _initial_latent("pndm_sample", network, scheduler, mask_latent, seed, generator)
    was_training = network.training
    network.eval()
    cond = dict(mask_latent=mask_latent, features=features, lesion_masks=lesion_masks, lesion_present=lesion_present,
                **extra_cond)
    scheduler.set_timesteps(int(num_inference_steps), device=device)
    try:
        context = sampling_context(network, cond, b, guidance_scale, device, attribute_guidance)
        for t in tqdm(scheduler.timesteps, desc="PNDM", disable=not progress, leave=False):
            t_batch = torch.full((b,), int(t), dtype=torch.long, device=device)
            eps = guided_noise(network, x, t_batch, cond, guidance_scale, context=context,
                               attribute_guidance=attribute_guidance).to(x.dtype)
            x, _ = scheduler.step(eps, int(t), x)
    finally:
        network.train(was_training)
    images = decoder.decode(x) if decoder is not None else None
    return SampleOutput(latents=x, images=images)
