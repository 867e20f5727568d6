"""Controllability metrics of the GCDM protocol: does a generated image hold the breast and lesion it was asked for?

For each generated image a 3-class prediction is built (:func:`segment_generated`): the breast by
:func:`custom.transforms.masks.breast_mask` (threshold + largest component + filled holes), the lesion by a
segmentation network's output inside that breast. It is compared with the label map the image was conditioned on
(``{0 background, 1 breast, 2 lesion}``):

* **one 3×3 confusion matrix pooled over the whole set** (:class:`ConfusionAccumulator`) gives Mass IoU (class 2),
  Breast IoU (class 1) and pixel accuracy, as in the paper (86.30 % / 97.63 % / 98.41 % on VinDr-Mammo). Pooling
  means large images/lesions weigh more; it is *not* the mean of per-image IoUs;
* **per-image lesion Dice** (:func:`lesion_dice`, summarised by :func:`summarise`) shows the spread over images.

All rates are fractions in [0, 1] (the paper prints percentages). Values that are undefined (a class absent from
both prediction and truth, no image with a lesion) are ``None`` in the reports, so they can go into a JSON file.

Differences from the reference protocol: its lesion segmenter is MedSAM prompted with the ground-truth lesion box;
here a network trained on the data set (:mod:`custom.metrics.segmenter`) predicts the lesion, optionally restricted
to a region (``roi``, e.g. the dilated ground-truth box) to mimic the box prompt (:func:`lesion_box_roi`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
from monai.metrics import compute_dice

from custom.metrics.arrays import as_numpy, batch_2d
from custom.transforms.masks import BACKGROUND, BREAST, LESION, breast_mask, label_map

__all__ = [
    "CLASS_NAMES",
    "ConfusionAccumulator",
    "controllability_metrics",
    "lesion_box_roi",
    "lesion_dice",
    "segment_generated",
    "summarise",
]

#: Class index -> name of the 3-class label maps.
CLASS_NAMES = {BACKGROUND: "background", BREAST: "breast", LESION: "lesion"}
NUM_CLASSES = 3


def _none_if_nan(x: float) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def _label_batch(x: Any, name: str) -> np.ndarray:
    """``(H, W)`` / ``(B, H, W)`` / ``(B, 1, H, W)`` integer label maps -> ``(B, H, W)`` int64, values checked."""
    arr = batch_2d(x, name)
    if arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)):
            raise ValueError(f"{name}: label maps must hold integer class indices")
    elif arr.dtype.kind not in "iub":
        raise ValueError(f"{name}: label maps must be integer arrays, got dtype {arr.dtype}")
    arr = arr.astype(np.int64)
    if arr.size and (arr.min() < 0 or arr.max() >= NUM_CLASSES):
        raise ValueError(f"{name}: class indices must be in 0..{NUM_CLASSES - 1}, found {sorted(np.unique(arr).tolist())[:10]}")
    return arr


class ConfusionAccumulator:
    """3-class (background / breast / lesion) confusion matrix pooled over a set of images.

    ``matrix[t, p]`` counts the pixels of true class ``t`` predicted as class ``p`` (rows = truth, columns =
    prediction), summed over every image passed to :meth:`update`.

    Example::

        acc = ConfusionAccumulator()
        for pred, true in pairs:          # (H, W) or (B, H, W) int maps with values in {0, 1, 2}
            acc.update(pred, true)
        acc.report()   # {"mass_iou": ..., "breast_iou": ..., "pixel_accuracy": ..., ...}
    """

    def __init__(self, num_classes: int = NUM_CLASSES):
        if num_classes != NUM_CLASSES:
            raise ValueError(f"the GCDM protocol uses {NUM_CLASSES} classes, got {num_classes}")
        self.num_classes = num_classes
        self.reset()

    def reset(self) -> None:
        """Forget every update."""
        self._matrix = np.zeros((self.num_classes, self.num_classes), dtype=np.int64)
        self.n_images = 0

    @property
    def matrix(self) -> np.ndarray:
        """``(3, 3)`` int64 pixel counts, rows = true class, columns = predicted class (a copy)."""
        return self._matrix.copy()

    def update(self, pred_labels: Any, true_labels: Any) -> ConfusionAccumulator:
        """Add images to the matrix.

        Args:
            pred_labels, true_labels: ``(H, W)`` or ``(B, H, W)`` (also ``(B, 1, H, W)``) integer label maps with
                values in {0, 1, 2}; NumPy arrays or tensors of the same shape.

        Returns:
            ``self`` (for chaining).
        """
        pred = _label_batch(pred_labels, "pred_labels")
        true = _label_batch(true_labels, "true_labels")
        if pred.shape != true.shape:
            raise ValueError(f"prediction {pred.shape} and truth {true.shape} differ in shape")
        k = self.num_classes
        self._matrix += np.bincount((true * k + pred).ravel(), minlength=k * k).reshape(k, k)
        self.n_images += pred.shape[0]
        return self

    def merge(self, other: ConfusionAccumulator) -> ConfusionAccumulator:
        """Add another accumulator's counts (e.g. from another worker). Returns ``self``."""
        self._matrix += other._matrix
        self.n_images += other.n_images
        return self

    def iou(self, c: int) -> float:
        """Intersection over union of class ``c``: ``M[c,c] / (row_c + col_c - M[c,c])`` in [0, 1]; NaN when the
        class is absent from both truth and prediction."""
        m = self._matrix
        tp = m[c, c]
        denom = m[c, :].sum() + m[:, c].sum() - tp
        return float(tp / denom) if denom > 0 else float("nan")

    def dice(self, c: int) -> float:
        """Pooled Dice of class ``c``: ``2 M[c,c] / (row_c + col_c)``; NaN when the class is absent everywhere."""
        m = self._matrix
        denom = m[c, :].sum() + m[:, c].sum()
        return float(2 * m[c, c] / denom) if denom > 0 else float("nan")

    def pixel_accuracy(self) -> float:
        """Fraction of correctly classified pixels, ``trace(M) / sum(M)``, in [0, 1]; NaN before any update."""
        total = self._matrix.sum()
        return float(np.trace(self._matrix) / total) if total > 0 else float("nan")

    def report(self) -> dict[str, Any]:
        """JSON-ready summary: ``mass_iou`` (class 2), ``breast_iou`` (class 1), ``background_iou``, ``mean_iou``
        (of the three), ``mass_dice_pooled``, ``pixel_accuracy`` (fractions in [0, 1], ``None`` when undefined),
        ``n_images``, ``n_pixels`` and the ``confusion_matrix`` as nested lists (rows = truth)."""
        ious = [self.iou(c) for c in range(self.num_classes)]
        finite = [v for v in ious if math.isfinite(v)]
        return {
            "mass_iou": _none_if_nan(ious[LESION]),
            "breast_iou": _none_if_nan(ious[BREAST]),
            "background_iou": _none_if_nan(ious[BACKGROUND]),
            "mean_iou": _none_if_nan(float(np.mean(finite))) if finite else None,
            "mass_dice_pooled": _none_if_nan(self.dice(LESION)),
            "pixel_accuracy": _none_if_nan(self.pixel_accuracy()),
            "n_images": int(self.n_images),
            "n_pixels": int(self._matrix.sum()),
            "confusion_matrix": self._matrix.tolist(),
        }


def lesion_dice(pred_masks: Any, true_masks: Any) -> np.ndarray:
    """Per-image Dice of binary lesion masks (``monai.metrics.compute_dice``).

    Args:
        pred_masks, true_masks: ``(H, W)`` or ``(B, H, W)`` bool/0-1 masks (nonzero = lesion).

    Returns:
        float64 ``(B,)`` in [0, 1]; NaN for an image whose true mask is empty (MONAI's ``ignore_empty``
        convention: Dice is undefined without a target lesion), whatever the prediction.
    """
    p, t = as_numpy(pred_masks), as_numpy(true_masks)
    if p.ndim == 2:
        p = p[None]
    if t.ndim == 2:
        t = t[None]
    if p.shape != t.shape or p.ndim != 3:
        raise ValueError(f"expected matching (H, W) or (B, H, W) masks, got {p.shape} and {t.shape}")
    pt = torch.from_numpy(p != 0).float()[:, None]
    tt = torch.from_numpy(t != 0).float()[:, None]
    return compute_dice(pt, tt, include_background=True, ignore_empty=True)[:, 0].double().numpy()


def summarise(values: Iterable[float], prefix: str = "") -> dict[str, Any]:
    """``{prefix}mean / std (population, ddof 0) / median / min / max`` of the finite values and ``{prefix}n``
    (their count) and ``{prefix}n_undefined`` (NaNs left out); ``None`` statistics when no value is finite."""
    arr = np.asarray(list(values), dtype=np.float64)
    ok = arr[np.isfinite(arr)]
    stats = {"mean": np.mean, "std": np.std, "median": np.median, "min": np.min, "max": np.max}
    out: dict[str, Any] = {f"{prefix}{k}": (float(f(ok)) if ok.size else None) for k, f in stats.items()}
    out[f"{prefix}n"] = int(ok.size)
    out[f"{prefix}n_undefined"] = int(arr.size - ok.size)
    return out


def segment_generated(
    image: Any,
    lesion_prob_or_mask: Any,
    threshold: float = 0.5,
    roi: Any | None = None,
    breast_threshold: float | None = None,
    border: float = 0.01,
) -> np.ndarray:
    """3-class prediction for one (generated) image, as in the GCDM protocol.

    Args:
        image: ``(H, W)`` or ``(1, H, W)`` float in [0, 1] (0 = air).
        lesion_prob_or_mask: ``(H, W)`` or ``(1, H, W)``: a lesion probability in [0, 1] (thresholded at
            ``threshold``) or a bool/0-1 mask (e.g. :func:`custom.metrics.segmenter.predict_lesion`).
        threshold: lesion where ``prob > threshold`` (a 0/1 mask is unaffected by any threshold in [0, 1)).
        roi: optional ``(H, W)`` bool region outside which lesion predictions are dropped (e.g. the dilated
            ground-truth lesion box, the analogue of MedSAM's box prompt in the reference protocol).
        breast_threshold, border: passed to :func:`custom.transforms.masks.breast_mask` (``None`` = its
            automatic threshold).

    Returns:
        ``(H, W)`` uint8 label map: 0 background, 1 breast, 2 lesion; the lesion is kept only inside the breast.
    """
    img = as_numpy(image).astype(np.float32)
    prob = as_numpy(lesion_prob_or_mask)
    img = img[0] if img.ndim == 3 and img.shape[0] == 1 else img
    prob = prob[0] if prob.ndim == 3 and prob.shape[0] == 1 else prob
    if img.ndim != 2 or prob.shape != img.shape:
        raise ValueError(f"expected an (H, W) image and a lesion map of the same shape, got {img.shape} and {prob.shape}")
    breast = breast_mask(img, border=border, threshold=breast_threshold)
    lesion = (prob.astype(np.float32) > threshold) & breast
    if roi is not None:
        roi = as_numpy(roi)
        roi = roi[0] if roi.ndim == 3 and roi.shape[0] == 1 else roi
        if roi.shape != img.shape:
            raise ValueError(f"roi shape {roi.shape} does not match the image {img.shape}")
        lesion &= roi.astype(bool)
    return label_map(breast, lesion)


def lesion_box_roi(lesion_mask: Any, margin: int = 4) -> np.ndarray:
    """The box-prompt analogue for :func:`segment_generated`'s ``roi``: the union of the bounding boxes of the
    8-connected lesion components of ``lesion_mask`` (``(H, W)``, nonzero = lesion), each grown by ``margin``
    pixels and clamped to the image. Returns ``(H, W)`` bool (all False without a lesion)."""
    from scipy import ndimage

    m = as_numpy(lesion_mask)
    m = m[0] if m.ndim == 3 and m.shape[0] == 1 else m
    if m.ndim != 2:
        raise ValueError(f"expected an (H, W) lesion mask, got shape {m.shape}")
    out = np.zeros(m.shape, dtype=bool)
    labels, _ = ndimage.label(m != 0, structure=np.ones((3, 3)))
    for sl in ndimage.find_objects(labels):
        if sl is None:
            continue
        r0, r1 = max(sl[0].start - margin, 0), min(sl[0].stop + margin, m.shape[0])
        c0, c1 = max(sl[1].start - margin, 0), min(sl[1].stop + margin, m.shape[1])
        out[r0:r1, c0:c1] = True
    return out


def controllability_metrics(
    images: Any,
    lesion_probs_or_masks: Any,
    true_labels: Any,
    threshold: float = 0.5,
    rois: Sequence[Any] | None = None,
    breast_threshold: float | None = None,
) -> dict[str, Any]:
    """Controllability of a set of generated images: :func:`segment_generated` on each image, one pooled
    :class:`ConfusionAccumulator` and the per-image lesion Dice.

    Args:
        images: ``(B, 1, H, W)`` or ``(B, H, W)`` generated images in [0, 1].
        lesion_probs_or_masks: ``(B, 1, H, W)`` or ``(B, H, W)`` lesion probabilities/masks for them.
        true_labels: ``(B, 1, H, W)`` or ``(B, H, W)`` condition label maps in {0, 1, 2}.
        threshold, breast_threshold: see :func:`segment_generated`.
        rois: optional per-image ``(H, W)`` bool regions for the lesion (see :func:`segment_generated`).

    Returns:
        :meth:`ConfusionAccumulator.report` plus ``mass_dice_{mean,std,median,min,max,n,n_undefined}`` of the
        per-image lesion Dice (images without a true lesion are undefined and left out).
    """
    imgs = as_numpy(images)
    probs = as_numpy(lesion_probs_or_masks)
    true = _label_batch(true_labels, "true_labels")
    imgs = imgs[:, 0] if imgs.ndim == 4 else imgs
    probs = probs[:, 0] if probs.ndim == 4 else probs
    if imgs.ndim != 3 or imgs.shape != probs.shape or imgs.shape != true.shape:
        raise ValueError(f"images {imgs.shape}, lesion maps {probs.shape} and labels {true.shape} must all be (B, H, W)")
    if rois is not None and len(rois) != imgs.shape[0]:
        raise ValueError(f"{len(rois)} rois for {imgs.shape[0]} images")
    acc = ConfusionAccumulator()
    preds = np.stack([
        segment_generated(imgs[i], probs[i], threshold, None if rois is None else rois[i], breast_threshold)
        for i in range(imgs.shape[0])
    ])
    acc.update(preds, true)
    dice = lesion_dice(preds == LESION, true == LESION)
    return {**acc.report(), **summarise(dice, prefix="mass_dice_")}
