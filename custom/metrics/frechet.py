"""The Fréchet distance between two Gaussians, shared by FID/FSD (network embeddings) and FD-radiomics67 (radiomic features).

For Gaussians ``N(mu1, S1)`` and ``N(mu2, S2)``::

    d^2 = ||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2))

The value returned is this squared distance ``d^2`` (the quantity every FID implementation reports).

Why not ``monai.metrics.FIDMetric``: its ``get_fid_score`` computes the same formula (and the tests check that the two
agree), but calls ``scipy.linalg.sqrtm(..., disp=False)``, whose ``disp`` argument is deprecated in SciPy 1.17 and
removed in 1.18, prints instead of logging, and its covariance helper fails for a single feature. This module keeps
the formula in float64 NumPy with the usual guards:

* if ``sqrtm(S1 S2)`` is not finite (a singular product, e.g. fewer samples than features), ``eps`` is added to both
  diagonals and the root is taken again;
* a small imaginary part from round-off is dropped; one on the diagonal (only the trace matters) larger than
  ``imag_tol`` (relative to ``max(1, largest real magnitude)``) raises ``ValueError``;
* a result that is negative by round-off only is clamped to 0.

Few samples (:func:`frechet_distance_from_features` with ``N1 + N2 <= D``, e.g. FID of tens of images on 2048-d
Inception features): the covariances are low rank and the ``D x D`` matrix root (tens of seconds at ``D = 2048``) is
not needed. With ``A = (X1 - mu1)^T / sqrt(N1 - 1)`` ``(D, N1)`` and ``B`` likewise, ``S1 = A A^T`` and ``S2 = B B^T``;
the non-zero eigenvalues of ``S1 S2 = A (A^T B B^T)`` are those of ``A^T B B^T A = M^T M`` with ``M = B^T A``
``(N2, N1)``, and every eigenvalue of ``S1 S2`` is real and ``>= 0`` (it is similar to ``S1^(1/2) S2 S1^(1/2)``), so
``tr((S1 S2)^(1/2)) = sum_i sigma_i(M)``, the nuclear norm of ``M``: exact, from an ``N2 x N1`` SVD that always
succeeds, so it needs no ``eps`` (the ``eps`` above only rescues a matrix root that failed). ``tr(S1) = ||A||_F^2``.
The SciPy path computes the same quantity plus round-off (the tiny eigenvalues of a singular product each add
about ``sqrt(machine eps * |S|)``); ``tests/test_metrics.py`` checks the two agree.
"""

from __future__ import annotations

import logging
import warnings

import numpy as np
import scipy.linalg

__all__ = ["frechet_distance", "frechet_distance_from_features", "gaussian_fit"]

logger = logging.getLogger(__name__)


def _as_2d_features(x, name: str) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim == 1:
        arr = arr[:, None]
    if arr.ndim != 2:
        raise ValueError(f"{name}: expected features of shape (N, D), got {arr.shape}")
    if arr.shape[0] < 2:
        raise ValueError(f"{name}: a covariance needs at least 2 samples, got {arr.shape[0]}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name}: features contain NaN or inf")
    return arr


def gaussian_fit(features) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased, ``N - 1``) covariance of a feature matrix.

    Args:
        features: ``(N, D)`` array-like or tensor (``(N,)`` is taken as ``D = 1``), ``N >= 2``, finite.

    Returns:
        ``mu`` float64 ``(D,)`` and ``sigma`` float64 ``(D, D)``.
    """
    arr = _as_2d_features(features, "features")
    return arr.mean(axis=0), np.atleast_2d(np.cov(arr, rowvar=False))


def _sqrtm(m: np.ndarray) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Matrix is singular ..." - handled by the finiteness check
        return scipy.linalg.sqrtm(m)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6, imag_tol: float = 1e-3) -> float:
    """Squared Fréchet distance between ``N(mu1, sigma1)`` and ``N(mu2, sigma2)`` (see the module docstring).

    Args:
        mu1, mu2: means ``(D,)``.
        sigma1, sigma2: covariances ``(D, D)`` (symmetric positive semi-definite).
        eps: diagonal offset used when ``sqrtm(sigma1 @ sigma2)`` is not finite.
        imag_tol: largest tolerated imaginary part on the matrix root's diagonal, relative to ``max(1, max |real part|)``.

    Returns:
        float ``>= 0``; 0 for identical Gaussians.

    Raises:
        ValueError: shapes that do not match, non-finite input, or a matrix root with a large imaginary part.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, dtype=np.float64)), np.atleast_1d(np.asarray(mu2, dtype=np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, dtype=np.float64)), np.atleast_2d(np.asarray(sigma2, dtype=np.float64))
    d = mu1.shape[0]
    if mu1.shape != (d,) or mu2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(f"shape mismatch: mu1 {mu1.shape}, mu2 {mu2.shape}, sigma1 {s1.shape}, sigma2 {s2.shape}")
    for name, a in (("mu1", mu1), ("mu2", mu2), ("sigma1", s1), ("sigma2", s2)):
        if not np.all(np.isfinite(a)):
            raise ValueError(f"{name} contains NaN or inf")
    diff = mu1 - mu2
    covmean = _sqrtm(s1 @ s2)
    if not np.all(np.isfinite(covmean)):
        logger.warning("Fréchet distance: singular covariance product; adding %g to the diagonals", eps)
        offset = np.eye(d) * eps
        covmean = _sqrtm((s1 + offset) @ (s2 + offset))
    if np.iscomplexobj(covmean):
        scale = max(1.0, float(np.max(np.abs(covmean.real))))
        imag = float(np.max(np.abs(np.diagonal(covmean).imag)))  # only the trace enters the distance
        if imag > imag_tol * scale:
            raise ValueError(f"Fréchet distance: matrix square root has a large imaginary component ({imag:g})")
        covmean = covmean.real
    value = float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean))
    return max(value, 0.0)


def frechet_distance_from_features(features1, features2, eps: float = 1e-6) -> float:
    """Fréchet distance between the Gaussian fits (:func:`gaussian_fit`) of two feature sets ``(N1, D)``, ``(N2, D)``."""
    a = _as_2d_features(features1, "features1")
    b = _as_2d_features(features2, "features2")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature dimensions differ: {a.shape[1]} vs {b.shape[1]}")
    if a.shape[0] + b.shape[0] <= a.shape[1]:
        return _frechet_distance_low_rank(a, b)
    mu1, s1 = gaussian_fit(a)
    mu2, s2 = gaussian_fit(b)
    return frechet_distance(mu1, s1, mu2, s2, eps=eps)


def _frechet_distance_low_rank(a: np.ndarray, b: np.ndarray) -> float:
    """The squared Fréchet distance of the Gaussian fits of ``a`` ``(N1, D)`` and ``b`` ``(N2, D)`` (float64, checked
    by :func:`_as_2d_features`) without any ``D x D`` matrix: ``tr((S1 S2)^(1/2))`` is the nuclear norm of
    ``B^T A`` (module docstring). Exact for any ``N1, N2``; used when ``N1 + N2 <= D``, where it is much faster."""
    mu1, mu2 = a.mean(axis=0), b.mean(axis=0)
    fa = (a - mu1) / np.sqrt(a.shape[0] - 1)  # A^T (N1, D)
    fb = (b - mu2) / np.sqrt(b.shape[0] - 1)  # B^T (N2, D)
    trace_root = float(np.linalg.svd(fb @ fa.T, compute_uv=False).sum())
    diff = mu1 - mu2
    value = float(diff @ diff + np.sum(fa * fa) + np.sum(fb * fb) - 2.0 * trace_root)
    return max(value, 0.0)
