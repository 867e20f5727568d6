"""FD-radiomics67 - the project's Fréchet distance of the 67 GCDM radiomic features between a real and a generated
image set.

**Not the published FRD** (the ``frd-score`` package: ≈464 features incl. LoG/wavelet images, its own normalisation
and a log transform; see :mod:`custom.metrics.frd_published`). Renamed in 0.x from ``frd`` (metrics.json keys
``frd`` -> ``fd_radiomics67``, option ``--frd_region`` -> ``--fd_radiomics67_region``) so the two are never
confused.

Each lesion (default) or each whole breast is described by the 67 PyRadiomics features of the GCDM condition vector
(:func:`custom.features.extract_lesion_features`, settings ``bundle/configs/radiomics_params.yaml``). The two
feature sets are normalised and the distance is the Fréchet distance (:func:`custom.metrics.frechet.frechet_distance`)
between their Gaussian fits.

Normalisation (:class:`RadiomicsScaler`): **z-scores with the real set's statistics** - each feature minus the real
set's mean, divided by the real set's (population) standard deviation. Both sets go through the same affine map,
so the distance is 0 for identical sets and measures the generated set in units of the real set's spread. The raw features
span many orders of magnitude (``TotalEnergy`` ~1e6, ``Sphericity`` ~1), which would otherwise let a few features
dominate. A feature that is constant in the real set (std <= 1e-12 x max(1, |mean|)) is scaled by the pooled standard
deviation of both sets instead, or by 1 when that is zero too, so it neither divides by zero nor disappears.

Regions (:func:`extract_radiomic_features`):

* ``region="lesion"``: one vector per lesion instance (a binary mask is split into 8-connected components; an
  instance map's ids are used as they are). For generated images pass the lesion mask the image was conditioned on
  (the region where the requested lesion should be) or a segmenter's prediction - the caller decides;
* ``region="breast"``: one vector per image for its whole breast (:func:`custom.transforms.masks.breast_mask`).

Images are clipped to [0, 1] before extraction (a generator's output may overshoot slightly). Regions PyRadiomics
rejects (fewer than 4 pixels, a flat region ...) are skipped and counted, never silently replaced.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from custom.errors import MammoInputError
from custom.metrics.arrays import as_numpy, batch_2d
from custom.metrics.frechet import frechet_distance_from_features
from custom.transforms.masks import breast_mask, lesion_instances_from_mask

__all__ = [
    "DEFAULT_PARAMS_FILE",
    "RadiomicsScaler",
    "extract_radiomic_features",
    "frechet_radiomics_distance",
    "fd_radiomics67_metrics",
    "feature_contributions",
]

logger = logging.getLogger(__name__)

#: ``bundle/configs/radiomics_params.yaml`` of this repository (the file the condition vectors are built with).
DEFAULT_PARAMS_FILE = Path(__file__).resolve().parents[2] / "bundle" / "configs" / "radiomics_params.yaml"
REGIONS = ("lesion", "breast")


def extract_radiomic_features(
    images: Any,
    lesion_masks: Any | None = None,
    params_file: str | os.PathLike = DEFAULT_PARAMS_FILE,
    region: str = "lesion",
) -> tuple[np.ndarray, dict[str, Any]]:
    """The 67 radiomic features of every lesion (or breast) of a set of images.

    Args:
        images: ``(B, 1, H, W)``, ``(B, H, W)`` or ``(H, W)`` float images in [0, 1] (clipped to it).
        lesion_masks: same batch/spatial shape; a binary mask (nonzero = lesion, split into 8-connected components)
            or an instance map (0 = none, k = lesion k). Required for ``region="lesion"``, ignored for ``"breast"``.
        params_file: PyRadiomics parameter file (default: the bundle's ``radiomics_params.yaml``).
        region: ``"lesion"`` (one vector per lesion instance) or ``"breast"`` (one per image).

    Returns:
        ``(features, info)``: float64 ``(N, 67)`` in :data:`custom.features.FEATURE_NAMES` order (raw, not
        normalised) and ``{"n_images", "n_regions" (= N), "n_empty" (images without any region), "n_failed",
        "failures" (the first 10 reasons)}``.
    """
    from custom.features import FEATURE_NAMES, extract_lesion_features

    if region not in REGIONS:
        raise ValueError(f"region must be one of {REGIONS}, got {region!r}")
    imgs = batch_2d(images, "images").astype(np.float64)
    if region == "lesion":
        if lesion_masks is None:
            raise ValueError("region='lesion' needs lesion_masks")
        masks = batch_2d(lesion_masks, "lesion_masks")
        if masks.shape != imgs.shape:
            raise ValueError(f"lesion masks {masks.shape} and images {imgs.shape} differ in shape")
    if not np.all(np.isfinite(imgs)):
        raise ValueError("images contain NaN or inf")
    imgs = np.clip(imgs, 0.0, 1.0)
    if not Path(params_file).is_file():
        raise MammoInputError(params_file, "PyRadiomics parameter file not found")

    rows: list[list[float]] = []
    n_empty, failures = 0, []
    for i, img in enumerate(imgs):
        if region == "breast":
            regions = [breast_mask(img.astype(np.float32))]
        else:
            inst = lesion_instances_from_mask(masks[i])
            regions = [inst == k for k in np.unique(inst) if k != 0]
        regions = [r for r in regions if r.any()]
        if not regions:
            n_empty += 1
            continue
        for j, r in enumerate(regions):
            try:
                feats = extract_lesion_features(img, r, params_file, source=f"image {i} {region} {j}")
            except MammoInputError as err:
                if err.source and Path(err.source).resolve() == Path(params_file).resolve():  # a bad parameter file is not a per-region failure
                    raise
                failures.append(str(err))
                continue
            rows.append([feats[name] for name in FEATURE_NAMES])
    if failures:
        logger.warning("radiomics: %d %s region(s) skipped, e.g. %s", len(failures), region, failures[0])
    features = np.asarray(rows, dtype=np.float64).reshape(len(rows), len(FEATURE_NAMES))
    info = {"n_images": int(imgs.shape[0]), "n_regions": int(len(rows)), "n_empty": int(n_empty),
            "n_failed": int(len(failures)), "failures": failures[:10]}
    return features, info


class RadiomicsScaler:
    """Z-scores with a reference (real) set's statistics; see the module docstring for constant features.

    ``fit(real, generated=None)`` stores ``mean_`` and ``scale_`` (``(D,)``); ``transform(x) = (x - mean_) / scale_``.
    """

    def __init__(self, rel_tol: float = 1e-12):
        self.rel_tol = float(rel_tol)
        self.mean_: np.ndarray | None = None
        self.scale_: np.ndarray | None = None

    def fit(self, real: Any, generated: Any | None = None) -> RadiomicsScaler:
        """Fit on the real features ``(N, D)``; ``generated`` (``(M, D)``) is only used for features constant in the
        real set (their scale is the pooled std of both sets, or 1)."""
        r = np.asarray(real, dtype=np.float64)
        if r.ndim != 2 or r.shape[0] < 1:
            raise ValueError(f"real features must be (N, D) with N >= 1, got {r.shape}")
        mean, std = r.mean(axis=0), r.std(axis=0)
        const = std <= self.rel_tol * np.maximum(1.0, np.abs(mean))
        if const.any():
            pooled = np.concatenate([r, np.asarray(generated, dtype=np.float64)]) if generated is not None else r
            fallback = pooled.std(axis=0)
            fallback = np.where(fallback > self.rel_tol * np.maximum(1.0, np.abs(mean)), fallback, 1.0)
            std = np.where(const, fallback, std)
        self.mean_, self.scale_ = mean, std
        return self

    def transform(self, x: Any) -> np.ndarray:
        if self.mean_ is None:
            raise RuntimeError("RadiomicsScaler.transform called before fit")
        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.mean_.shape[0]:
            raise ValueError(f"features must be (N, {self.mean_.shape[0]}), got {x.shape}")
        return (x - self.mean_) / self.scale_


def frechet_radiomics_distance(real_features: Any, generated_features: Any, eps: float = 1e-6) -> float:
    """FD-radiomics67 of two raw feature sets ``(N_real, D)``, ``(N_gen, D)`` (each N >= 2):
    z-score both with the real set's statistics (:class:`RadiomicsScaler`), then the Fréchet distance of their
    Gaussian fits. ``>= 0``; 0 for identical sets."""
    real = np.asarray(real_features, dtype=np.float64)
    gen = np.asarray(generated_features, dtype=np.float64)
    if real.ndim != 2 or gen.ndim != 2 or real.shape[1] != gen.shape[1]:
        raise ValueError(f"feature sets must be (N, D) with the same D, got {real.shape} and {gen.shape}")
    scaler = RadiomicsScaler().fit(real, gen)
    return frechet_distance_from_features(scaler.transform(real), scaler.transform(gen), eps=eps)


def feature_contributions(real_features: Any, generated_features: Any, total: float | None = None,
                          top: int = 3) -> list[dict[str, Any]]:
    """Which features drive FD-radiomics67: per feature, the one-dimensional Fréchet distance of the two sets in the
    real set's z-units (:class:`RadiomicsScaler`), ``(mu_g - mu_r)^2 + (sd_g - sd_r)^2``, largest first. With
    uncorrelated features these terms add up to the distance; with correlated ones they are a guide. ``share`` is a
    term over ``total`` (the whole distance, when given): a share near 1 says one feature's shift or spread is the
    distance (e.g. a texture feature made degenerate by lesions clipped at white), not a spread-out difference.

    Returns:
        up to ``top`` dicts ``{"feature", "squared_mean_difference", "squared_std_difference", "distance",
        "share" (None without total)}``.
    """
    from custom.features import FEATURE_NAMES

    real = np.asarray(real_features, dtype=np.float64)
    gen = np.asarray(generated_features, dtype=np.float64)
    if real.ndim != 2 or gen.ndim != 2 or real.shape[1] != gen.shape[1] or real.shape[1] != len(FEATURE_NAMES):
        raise ValueError(f"feature sets must be (N, {len(FEATURE_NAMES)}), got {real.shape} and {gen.shape}")
    scaler = RadiomicsScaler().fit(real, gen)
    zr, zg = scaler.transform(real), scaler.transform(gen)
    mean_sq = (zg.mean(axis=0) - zr.mean(axis=0)) ** 2
    std_sq = (zg.std(axis=0) - zr.std(axis=0)) ** 2
    dist = mean_sq + std_sq
    order = np.argsort(-dist, kind="stable")[: max(0, int(top))]
    return [{"feature": FEATURE_NAMES[i], "squared_mean_difference": float(mean_sq[i]),
             "squared_std_difference": float(std_sq[i]), "distance": float(dist[i]),
             "share": float(dist[i] / total) if total else None} for i in order]


def fd_radiomics67_metrics(
    real_images: Any,
    real_masks: Any | None,
    generated_images: Any,
    generated_masks: Any | None,
    params_file: str | os.PathLike = DEFAULT_PARAMS_FILE,
    region: str = "lesion",
) -> dict[str, Any]:
    """Extract the features of both sets (:func:`extract_radiomic_features`) and compute :func:`frechet_radiomics_distance`.

    Returns:
        ``{"fd_radiomics67": float, "fd_radiomics67_top_features"`` (:func:`feature_contributions`),
        ``"fd_radiomics67_region", "fd_radiomics67_normalisation": "zscore_real",
        "fd_radiomics67_n_real", "fd_radiomics67_n_generated", "fd_radiomics67_n_failed_real",
        "fd_radiomics67_n_failed_generated"}``. ``fd_radiomics67`` is ``None`` when either set has fewer than 2
        regions (a covariance needs two).
    """
    real, info_r = extract_radiomic_features(real_images, real_masks, params_file, region)
    gen, info_g = extract_radiomic_features(generated_images, generated_masks, params_file, region)
    value = frechet_radiomics_distance(real, gen) if real.shape[0] >= 2 and gen.shape[0] >= 2 else None
    return {
        "fd_radiomics67": value,
        "fd_radiomics67_top_features": feature_contributions(real, gen, value) if value is not None else [],
        "fd_radiomics67_region": region,
        "fd_radiomics67_normalisation": "zscore_real",
        "fd_radiomics67_n_real": info_r["n_regions"],
        "fd_radiomics67_n_generated": info_g["n_regions"],
        "fd_radiomics67_n_failed_real": info_r["n_failed"],
        "fd_radiomics67_n_failed_generated": info_g["n_failed"],
    }
