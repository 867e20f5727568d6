"""Edit and reconstruction-loop measurements: seam score of an edited region, per-lesion radiomics fidelity,
attribute accuracy.

* :func:`boundary_jump` / :func:`seam_score`: how visible the border of a regenerated region is. For every pair of
  4-neighbour pixels with one pixel inside the region and one outside, the absolute intensity difference; the jump is
  the mean over all such pairs. The seam score of an edited image is its jump minus the jump of the real image over
  the same boundary (``seam_excess``; 0 = the border is as smooth as real anatomy there) and their ratio.
* :func:`radiomics_fidelity`: Spearman correlation, per feature, between the features *requested* for each generated
  lesion and the features *measured* on it, and their mean over the features (features constant in either set have no
  correlation and are counted apart). Run on real-vs-real pairs (the same lesions measured twice) it gives the ceiling.
* :func:`removal_error` / :func:`ring_fill`: a removed lesion against the lesion-free truth, and the trivial fill (the
  region set to the mean of the ring of pixels around it) whose error is one reference for it.
* :func:`attribute_accuracy`: per-attribute accuracy of an attribute classifier's predictions against the requested
  attributes (the reconstruction loop); on real images it gives the ceiling.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["boundary_jump", "seam_score", "radiomics_fidelity", "attribute_accuracy", "removal_error", "ring_fill",
           "lesion_radiomics_fidelity"]


def _as2d(x: Any, what: str) -> np.ndarray:
    a = np.asarray(x.detach().cpu().numpy() if hasattr(x, "detach") else x)
    a = np.squeeze(a)
    if a.ndim != 2:
        raise ValueError(f"{what}: a 2-D image expected, got shape {a.shape}")
    return a


def boundary_jump(image: Any, region: Any) -> float:
    """Mean ``|I(p) - I(q)|`` over 4-neighbour pairs ``(p, q)`` with ``p`` in ``region`` and ``q`` outside.

    Args:
        image: ``(H, W)`` intensities (any range; [0, 1] in this project).
        region: ``(H, W)`` bool (nonzero = inside).

    Returns:
        The mean jump; ``nan`` when the region has no boundary (empty or the whole image).
    """
    img = _as2d(image, "boundary_jump").astype(np.float64)
    reg = _as2d(region, "boundary_jump") > 0
    if img.shape != reg.shape:
        raise ValueError(f"boundary_jump: image {img.shape} and region {reg.shape} differ")
    cross_x = reg[:, :-1] != reg[:, 1:]
    cross_y = reg[:-1, :] != reg[1:, :]
    jumps = np.concatenate([np.abs(img[:, :-1] - img[:, 1:])[cross_x], np.abs(img[:-1, :] - img[1:, :])[cross_y]])
    return float(jumps.mean()) if jumps.size else float("nan")


def seam_score(edited: Any, region: Any, real: Any) -> dict[str, float]:
    """Seam of an edited image against the real image over the same region boundary.

    Returns:
        ``{"jump": edited jump, "real_jump": real jump, "seam_excess": jump - real_jump, "seam_ratio": jump /
        real_jump}`` (``nan`` ratio when the real jump is 0).
    """
    j, r = boundary_jump(edited, region), boundary_jump(real, region)
    return {"jump": j, "real_jump": r, "seam_excess": j - r, "seam_ratio": j / r if r > 0 else float("nan")}


def radiomics_fidelity(requested: Any, measured: Any, names: Sequence[str] | None = None) -> dict[str, Any]:
    """Per-feature Spearman correlation between requested and measured features of the same lesions.

    Args:
        requested: ``(N, F)`` features asked for (raw or normalised: Spearman is rank-based).
        measured: ``(N, F)`` features measured on the generated lesions (same order).
        names: ``F`` feature names (default ``f0 ..``).

    Returns:
        ``{"per_feature": {name: rho or None}, "mean": mean rho over features with a correlation (None if none),
        "n_lesions": N,
        "n_features": F, "n_undefined": features without a correlation (constant, or N < 3)}``.
    """
    from scipy.stats import spearmanr

    a, b = np.asarray(requested, dtype=np.float64), np.asarray(measured, dtype=np.float64)
    if a.ndim != 2 or a.shape != b.shape:
        raise ValueError(f"radiomics_fidelity: requested and measured must be (N, F) of one shape, got {a.shape}, {b.shape}")
    n, f = a.shape
    names = list(names) if names is not None else [f"f{i}" for i in range(f)]
    if len(names) != f:
        raise ValueError(f"radiomics_fidelity: {len(names)} names for {f} features")
    per: dict[str, float | None] = {}
    for i, name in enumerate(names):
        x, y = a[:, i], b[:, i]
        ok = np.isfinite(x) & np.isfinite(y)
        if ok.sum() < 3 or np.ptp(x[ok]) == 0 or np.ptp(y[ok]) == 0:
            per[name] = None
            continue
        rho = spearmanr(x[ok], y[ok]).statistic
        per[name] = float(rho) if np.isfinite(rho) else None
    vals = [v for v in per.values() if v is not None]
    return {"per_feature": per, "mean": float(np.mean(vals)) if vals else None, "n_lesions": int(n),
            "n_features": int(f), "n_undefined": int(f - len(vals))}


def attribute_accuracy(requested: Sequence[Mapping[str, str]], predicted: Sequence[Mapping[str, str]]) -> dict[str, dict[str, float]]:
    """Per attribute: accuracy of ``predicted`` against ``requested`` over the images where both give it.

    Returns:
        ``{name: {"accuracy": fraction correct, "n": images counted}}``.
    """
    if len(requested) != len(predicted):
        raise ValueError(f"attribute_accuracy: {len(requested)} requested vs {len(predicted)} predicted")
    names = sorted({k for r in requested for k in r} & {k for p in predicted for k in p})
    out = {}
    for name in names:
        pairs = [(r[name], p[name]) for r, p in zip(requested, predicted) if name in r and name in p]
        out[name] = {"accuracy": float(np.mean([a == b for a, b in pairs])), "n": len(pairs)}
    return out


def removal_error(removed: Any, truth: Any, original: Any, lesion: Any) -> dict[str, float]:
    """How well a lesion was removed, where the lesion-free truth is known (the phantom writes it).

    Args:
        removed: ``(H, W)`` image after ``--mode remove``.
        truth: ``(H, W)`` the same image without the lesion.
        original: ``(H, W)`` the image with the lesion (the input of the removal).
        lesion: ``(H, W)`` bool lesion mask.

    Returns:
        ``{"error": mean |removed - truth| in the lesion, "contrast": mean |original - truth| in the lesion (what the
        lesion added), "ratio": error / contrast}``: a ratio far below 1 means the lesion is gone and the tissue
        behind it is close to the truth.
    """
    les = _as2d(lesion, "removal_error") > 0
    if not les.any():
        raise ValueError("removal_error: empty lesion mask")
    rem, tru, org = (_as2d(x, "removal_error").astype(np.float64) for x in (removed, truth, original))
    if not rem.shape == tru.shape == org.shape == les.shape:
        raise ValueError(f"removal_error: shapes differ: {rem.shape}, {tru.shape}, {org.shape}, {les.shape}")
    err, con = float(np.abs(rem - tru)[les].mean()), float(np.abs(org - tru)[les].mean())
    return {"error": err, "contrast": con, "ratio": err / con if con > 0 else float("nan")}


def ring_fill(image: Any, region: Any, width: int = 3, within: Any = None) -> np.ndarray:
    """The trivial removal: ``image`` with every pixel of ``region`` set to the mean of the ring around it (the pixels
    outside ``region`` within ``width`` 8-connected dilation steps, restricted to ``within`` when given, e.g. the
    breast). The reference a generative removal should beat or match: a flat fill has the right local brightness
    and no texture.

    Args:
        image: ``(H, W)`` image.
        region: ``(H, W)`` bool region to fill.
        width: ring width in pixels (>= 1).
        within: optional ``(H, W)`` bool mask the ring is restricted to.

    Returns:
        ``(H, W)`` float64 copy of ``image`` with the region filled.

    Raises:
        ValueError: an empty region, ``width`` < 1, mismatched shapes, or an empty ring.
    """
    from scipy import ndimage

    img = _as2d(image, "ring_fill").astype(np.float64)
    reg = _as2d(region, "ring_fill") > 0
    if img.shape != reg.shape:
        raise ValueError(f"ring_fill: shapes differ: {img.shape}, {reg.shape}")
    if not reg.any():
        raise ValueError("ring_fill: empty region")
    if int(width) < 1:
        raise ValueError(f"ring_fill: width must be >= 1, got {width}")
    ring = ndimage.binary_dilation(reg, structure=np.ones((3, 3), bool), iterations=int(width)) & ~reg
    if within is not None:
        ring &= _as2d(within, "ring_fill") > 0
    if not ring.any():
        raise ValueError("ring_fill: no pixel around the region")
    out = img.copy()
    out[reg] = img[ring].mean()
    return out


def lesion_radiomics_fidelity(real: Any, generated: Any, retest: Any, instances: Any,
                              params_file: Any = None) -> dict[str, Any]:
    """"Does the radiomic control control": per lesion, the 67 features measured on the real image (what the
    generated lesion was asked for: the condition's features come from it) against those measured on the generated
    image at the same lesion mask; and, as the ceiling, real against a retest of the same real image (its stage-1
    reconstruction, which passes through the same decoder as a generated image).

    Args:
        real, generated, retest: ``(B, 1, H, W)`` or ``(B, H, W)`` images in [0, 1].
        instances: ``(B, H, W)`` lesion instance maps (0 none, k lesion k).
        params_file: PyRadiomics parameters (default: the bundle's).

    Returns:
        ``{"generated": radiomics_fidelity(real, generated), "retest": radiomics_fidelity(real, retest),
        "n_pairs": lesions measured in all three, "n_failed": lesions where an extraction failed}`` (per-feature
        tables included).
    """
    from custom.features import FEATURE_NAMES, extract_lesion_features
    from custom.metrics.radiomics_distance import DEFAULT_PARAMS_FILE

    params = params_file or DEFAULT_PARAMS_FILE
    sets = [np.asarray(x.detach().cpu().numpy() if hasattr(x, "detach") else x, dtype=np.float64).reshape(-1, *np.shape(instances)[-2:])
            for x in (real, generated, retest)]
    inst = np.asarray(instances).reshape(-1, *np.shape(instances)[-2:])
    rows: list[list[list[float]]] = [[], [], []]
    failed = 0
    for i in range(inst.shape[0]):
        for k in range(1, int(inst[i].max(initial=0)) + 1):
            lesion = inst[i] == k
            if not lesion.any():
                continue
            try:
                feats = [extract_lesion_features(np.clip(s[i], 0.0, 1.0), lesion, params) for s in sets]
            except Exception:  # noqa: BLE001 - PyRadiomics rejects some generated lesions (e.g. flat); counted
                failed += 1
                continue
            for j, f in enumerate(feats):
                rows[j].append([float(f[n]) for n in FEATURE_NAMES])
    names = list(FEATURE_NAMES)
    if len(rows[0]) < 3:
        empty = {"per_feature": {}, "mean": None, "n_lesions": len(rows[0]), "n_features": len(names),
                 "n_undefined": len(names), "note": "fewer than 3 lesions: no correlation"}
        return {"generated": empty, "retest": dict(empty), "n_pairs": len(rows[0]), "n_failed": failed}
    return {"generated": radiomics_fidelity(rows[0], rows[1], names), "retest": radiomics_fidelity(rows[0], rows[2], names),
            "n_pairs": len(rows[0]), "n_failed": failed}
