"""Image-similarity metrics: sample diversity (pairwise MS-SSIM) and autoencoder reconstruction quality (SSIM, PSNR).

Both use MONAI's metrics on images in [0, 1] (``data_range = 1``).

**Diversity** (:func:`ms_ssim_diversity`): the mean MS-SSIM over all pairs of samples generated for one condition;
1 = identical samples, lower = more diverse. MS-SSIM settings (:func:`ms_ssim_settings`): a Gaussian window of
``kernel_size = 7`` (sigma 1.5) instead of the usual 11, and as many of the 5 standard scales (weights
0.0448, 0.2856, 0.3001, 0.2363, 0.1333) as the image allows, the used weights renormalised to sum to 1. MONAI computes
SSIM without padding and requires ``side // (n_scales - 1)^2 > kernel_size - 1``, so 64×64 images get 4 scales
(coarsest 8×8), 32×32 images 3 and 256×256 all 5. The settings are part of the result - values computed with
different settings are not comparable. Negative contrast terms are clipped at 0 by MONAI (``relu``), so
unrelated images give values near 0, not NaN.

**Reconstruction** (:func:`reconstruction_metrics`): per-image SSIM (``SSIMMetric``, 11-pixel Gaussian window, or the
largest odd window that fits a smaller image) and PSNR (``PSNRMetric``, ``max_val = 1``; a perfect reconstruction
would be +inf and is capped at ``max_psnr`` = 100 dB so the result stays JSON-serialisable), averaged over images.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from monai.metrics import MultiScaleSSIMMetric, PSNRMetric, SSIMMetric

from custom.metrics.arrays import batch_2d

__all__ = ["MS_SSIM_WEIGHTS", "ms_ssim_diversity", "ms_ssim_settings", "reconstruction_metrics", "saturated_fraction"]

#: The standard MS-SSIM scale weights (Wang et al. 2003), finest scale first.
MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)


def _images(x: Any, name: str) -> torch.Tensor:
    t = x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    t = t.as_tensor() if hasattr(t, "as_tensor") else t
    t = t.detach().cpu().float()
    if t.ndim == 3:
        t = t[:, None]
    if t.ndim != 4:
        raise ValueError(f"{name}: expected (N, 1, H, W) or (N, H, W) images, got {tuple(t.shape)}")
    if not torch.isfinite(t).all():
        raise ValueError(f"{name}: images contain NaN or inf")
    return t


def ms_ssim_settings(height: int, width: int | None = None, kernel_size: int = 7, max_scales: int = 5) -> dict[str, Any]:
    """MS-SSIM settings for an image size (see the module docstring).

    Returns:
        ``{"kernel_size", "kernel_sigma", "weights" (tuple, sum 1), "n_scales"}``.

    Raises:
        ValueError: the image is too small for even 2 scales with this kernel.
    """
    side = min(int(height), int(width if width is not None else height))
    n = 0
    for k in range(2, min(max_scales, len(MS_SSIM_WEIGHTS)) + 1):
        coarsest = side // 2 ** (k - 1)
        if not (side // max(1, k - 1) ** 2 > kernel_size - 1 and coarsest >= kernel_size):
            break
        n = k
    if n < 2:
        raise ValueError(f"images of side {side} are too small for MS-SSIM with kernel_size {kernel_size}")
    w = np.asarray(MS_SSIM_WEIGHTS[:n], dtype=np.float64)
    return {"kernel_size": int(kernel_size), "kernel_sigma": 1.5, "weights": tuple(float(v) for v in w / w.sum()), "n_scales": n}


def ms_ssim_diversity(samples: Any, kernel_size: int = 7, max_pairs: int | None = None, seed: int = 0,
                      batch_size: int = 256) -> dict[str, Any]:
    """Mean pairwise MS-SSIM among samples of one condition (lower = more diverse).

    Args:
        samples: ``(N, 1, H, W)`` or ``(N, H, W)`` images in [0, 1], ``N >= 2``.
        kernel_size: Gaussian window side (see :func:`ms_ssim_settings`).
        max_pairs: evaluate at most this many of the ``N (N - 1) / 2`` pairs (drawn with ``seed``); ``None`` = all.
        batch_size: pairs per MONAI call.

    Returns:
        ``{"ms_ssim_mean", "ms_ssim_std", "ms_ssim_n_pairs", "ms_ssim_kernel_size", "ms_ssim_n_scales"}``
        (mean/std in [0, 1]).
    """
    x = _images(samples, "samples")
    n = x.shape[0]
    if n < 2:
        raise ValueError(f"diversity needs at least 2 samples, got {n}")
    settings = ms_ssim_settings(x.shape[2], x.shape[3], kernel_size)
    ii, jj = np.triu_indices(n, k=1)
    if max_pairs is not None and len(ii) > int(max_pairs):
        pick = np.sort(np.random.default_rng(seed).choice(len(ii), size=int(max_pairs), replace=False))
        ii, jj = ii[pick], jj[pick]
    metric = MultiScaleSSIMMetric(spatial_dims=2, data_range=1.0, kernel_size=settings["kernel_size"],
                                  kernel_sigma=settings["kernel_sigma"], weights=settings["weights"], reduction="none")
    values = []
    for s in range(0, len(ii), int(batch_size)):
        a, b = torch.as_tensor(ii[s : s + batch_size]), torch.as_tensor(jj[s : s + batch_size])
        values.append(metric(x[a], x[b]).reshape(-1).double())
    v = torch.cat(values).numpy()
    return {"ms_ssim_mean": float(v.mean()), "ms_ssim_std": float(v.std()), "ms_ssim_n_pairs": int(v.size),
            "ms_ssim_kernel_size": settings["kernel_size"], "ms_ssim_n_scales": settings["n_scales"]}


def reconstruction_metrics(reconstructions: Any, targets: Any, max_psnr: float = 100.0) -> dict[str, Any]:
    """SSIM and PSNR of autoencoder reconstructions against their inputs.

    Args:
        reconstructions, targets: ``(N, 1, H, W)`` or ``(N, H, W)`` images in [0, 1] (reconstructions are clipped
            to [0, 1] first, as they would be when saved).
        max_psnr: cap (dB) for a perfect reconstruction.

    Returns:
        ``{"ssim_mean", "ssim_std", "psnr_mean", "psnr_std", "n_images"}`` - SSIM in [-1, 1] (1 = identical),
        PSNR in dB.
    """
    rec = _images(reconstructions, "reconstructions").clamp(0.0, 1.0)
    tgt = _images(targets, "targets")
    if rec.shape != tgt.shape:
        raise ValueError(f"reconstructions {tuple(rec.shape)} and targets {tuple(tgt.shape)} differ in shape")
    side = min(rec.shape[2:])
    k = min(11, side if side % 2 else side - 1)
    ssim = SSIMMetric(spatial_dims=2, data_range=1.0, win_size=k, reduction="none")(rec, tgt).reshape(-1).double()
    psnr = PSNRMetric(max_val=1.0, reduction="none")(rec, tgt).reshape(-1).double()
    psnr = torch.nan_to_num(psnr, posinf=max_psnr).clamp(max=max_psnr)
    out = {"ssim_mean": float(ssim.mean()), "ssim_std": float(ssim.std(unbiased=False)),
           "psnr_mean": float(psnr.mean()), "psnr_std": float(psnr.std(unbiased=False)), "n_images": int(rec.shape[0])}
    if not all(math.isfinite(v) for k_, v in out.items() if k_ != "n_images"):
        raise ValueError("non-finite SSIM/PSNR")
    return out


def saturated_fraction(images: Any, masks: Any, level: float = 0.995) -> dict[str, Any]:
    """Clipping inside a region: the fraction of region pixels at or above ``level``, pooled over the batch.

    Generated images are clamped to ``[0, 1]`` after decoding, so a lesion driven past the top of the range by the
    sampler shows up as a run of pixels at exactly 1.0, which real (and stage-1 reconstructed) lesions do not have.
    Such saturation flattens a lesion's texture and makes texture features (GLSZM zone emphases, percentiles)
    degenerate, which is what can blow up a Fréchet distance of radiomic features.

    Args:
        images: ``(B, 1, H, W)`` / ``(B, H, W)`` / ``(H, W)`` in ``[0, 1]``.
        masks: same spatial shape; the region is ``mask > 0`` (e.g. the lesion instance map).
        level: the saturation threshold in ``[0, 1]``.

    Returns:
        ``{"fraction": float | None, "n_pixels": int, "n_images_with_region": int, "level": float}``;
        ``fraction`` is ``None`` when no image has region pixels.
    """
    imgs = batch_2d(images, "images").astype(np.float64)
    regions = batch_2d(masks, "masks") > 0
    if imgs.shape != regions.shape:
        raise ValueError(f"images {imgs.shape} and masks {regions.shape} differ in shape")
    if not 0.0 <= float(level) <= 1.0:
        raise ValueError(f"level must be in [0, 1], got {level}")
    n = int(regions.sum())
    fraction = float((imgs[regions] >= float(level)).mean()) if n else None
    return {"fraction": fraction, "n_pixels": n, "n_images_with_region": int(regions.reshape(len(regions), -1).any(1).sum()),
            "level": float(level)}
