"""GCDM's evaluation protocol (the reference ``evaluation.py``), as functions over arrays.

* test-set selection: mass test images only (the ground-truth label map holds class 2);
* sampling settings :data:`GCDM_SAMPLING`: one sample per mask, 50 DDIM steps, eta 1.0, guidance 3.0;
* breast region of an image by the reference's threshold rule (:func:`reference_breast_mask`): 8-bit image, pixels
  ``>= 15`` -> 1, erode 5×5 once, keep the largest region, dilate 5×5 twice, erode 5×5 once;
* lesion region by a box-prompted segmenter: MedSAM / SAM through transformers' ``SamModel`` from a local folder
  (:class:`SamBoxSegmenter`), prompted with each ground-truth lesion's box; a lesion pixel overrides breast;
* one 3-class confusion matrix pooled over the test set (:class:`PooledConfusion`) -> Mass IoU, Breast IoU, pixel
  accuracy; run on the real test images it gives the segmenter's ceiling.

The reference finds the largest region with OpenCV contours (``RETR_TREE``, contour area); here it is the largest
8-connected component by pixel count (scipy), which selects the same region except for near-ties in area.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from custom.errors import MammoInputError

__all__ = ["GCDM_SAMPLING", "gcdm_test_entries", "reference_breast_mask", "lesion_boxes", "compose_label",
           "PooledConfusion", "SamBoxSegmenter", "to_8bit", "gcdm_confusion"]

#: Sampling settings of GCDM's evaluation.
GCDM_SAMPLING: dict[str, Any] = {"samples_per_mask": 1, "ddim_steps": 50, "ddim_eta": 1.0, "guidance_scale": 3.0}
_KERNEL = np.ones((5, 5), dtype=bool)


def gcdm_test_entries(entries: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The mass test images: datalist entries whose lesion count is positive (``num_lesions`` > 0)."""
    return [e for e in entries if int(e.get("num_lesions", 0) or 0) > 0]


def reference_breast_mask(image_8bit: np.ndarray, threshold: int = 15) -> np.ndarray:
    """The reference's breast mask of an 8-bit image ``(H, W)``: bool ``(H, W)`` (see the module docstring).

    Erosion treats outside pixels as foreground (OpenCV's default border), dilation as background."""
    from scipy import ndimage

    img = np.asarray(image_8bit)
    if img.ndim != 2:
        raise ValueError(f"reference_breast_mask: (H, W) image expected, got {img.shape}")
    mask = img >= threshold
    mask = ndimage.binary_erosion(mask, _KERNEL, border_value=1)
    labels, n = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    if n == 0:
        return np.zeros_like(mask)
    sizes = np.bincount(labels.ravel())[1:]
    mask = labels == (1 + int(np.argmax(sizes)))
    mask = ndimage.binary_dilation(mask, _KERNEL, iterations=2)
    return ndimage.binary_erosion(mask, _KERNEL, border_value=1)


def lesion_boxes(instances: np.ndarray) -> list[tuple[int, int, int, int]]:
    """``(x_min, y_min, x_max, y_max)`` pixel boxes (inclusive) of each lesion of an instance map (0 = none)."""
    boxes = []
    for k in sorted(int(v) for v in np.unique(instances) if v > 0):
        ys, xs = np.nonzero(instances == k)
        boxes.append((int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())))
    return boxes


def compose_label(breast: np.ndarray, lesion: np.ndarray) -> np.ndarray:
    """Label map uint8 ``(H, W)``: 0 background, 1 breast, 2 lesion (lesion overrides breast)."""
    out = np.asarray(breast, dtype=bool).astype(np.uint8)
    out[np.asarray(lesion, dtype=bool)] = 2
    return out


class PooledConfusion:
    """A ``num_classes`` × ``num_classes`` confusion matrix (rows: truth, columns: prediction) summed over images."""

    def __init__(self, num_classes: int = 3):
        self.num_classes = int(num_classes)
        self.matrix = np.zeros((self.num_classes, self.num_classes), dtype=np.int64)

    def update(self, prediction: np.ndarray, truth: np.ndarray) -> None:
        p, t = np.asarray(prediction).astype(np.int64).ravel(), np.asarray(truth).astype(np.int64).ravel()
        if p.shape != t.shape:
            raise ValueError(f"PooledConfusion: prediction {np.shape(prediction)} and truth {np.shape(truth)} differ")
        keep = (t >= 0) & (t < self.num_classes) & (p >= 0) & (p < self.num_classes)
        self.matrix += np.bincount(self.num_classes * t[keep] + p[keep],
                                   minlength=self.num_classes**2).reshape(self.num_classes, self.num_classes)

    def iou(self) -> np.ndarray:
        """Per-class ``TP / (TP + FP + FN)`` (NaN for a class absent from both)."""
        tp = np.diag(self.matrix).astype(float)
        union = self.matrix.sum(0) + self.matrix.sum(1) - tp
        with np.errstate(invalid="ignore", divide="ignore"):
            return tp / union

    def pixel_accuracy(self) -> float:
        total = self.matrix.sum()
        return float(np.trace(self.matrix) / total) if total else float("nan")

    def scores(self) -> dict[str, float]:
        """``{"mass_iou", "breast_iou", "pixel_accuracy"}`` in percent, as the paper reports them."""
        iou = self.iou()
        return {"mass_iou": 100 * float(iou[2]), "breast_iou": 100 * float(iou[1]),
                "pixel_accuracy": 100 * self.pixel_accuracy()}


class SamBoxSegmenter:
    """Box-prompted lesion segmentation with transformers' ``SamModel`` / ``SamProcessor`` read from a local folder
    (MedSAM's weights in that format, or any SAM), offline. ``__call__(image, boxes)`` -> bool ``(H, W)``: the union
    of the masks of all boxes.

    Args:
        path: local folder with the model and processor files (``save_pretrained``).
        device: torch device.
        threshold: on the model's mask probability (the reference uses 0.5).
    """

    name = "MedSAM/SAM (box-prompted)"

    def __init__(self, path: str | os.PathLike, device: Any = "cpu", threshold: float = 0.5):
        import torch
        from transformers import SamModel, SamProcessor

        path = Path(path)
        if not (path / "config.json").is_file():
            raise MammoInputError(path, "no config.json: not a transformers SAM/MedSAM folder (segmenter_path)")
        try:
            self.processor = SamProcessor.from_pretrained(str(path), local_files_only=True)
            self.model = SamModel.from_pretrained(str(path), local_files_only=True).to(device).eval()
        except (OSError, ValueError) as err:
            raise MammoInputError(path, f"cannot load SAM/MedSAM ({err})") from err
        self.device, self.threshold, self._torch = torch.device(device), float(threshold), torch

    def __call__(self, image: np.ndarray, boxes: Sequence[Sequence[float]]) -> np.ndarray:
        """``image``: ``(H, W)`` float in ``[0, 1]`` or uint8; ``boxes``: ``(x_min, y_min, x_max, y_max)`` pixels."""
        img = np.asarray(image)
        if img.dtype != np.uint8:
            img = (np.clip(img, 0, 1) * 255).round().astype(np.uint8)
        out = np.zeros(img.shape[:2], dtype=bool)
        if not len(boxes):
            return out
        rgb = np.repeat(img[..., None], 3, axis=-1)
        inputs = self.processor(images=rgb, input_boxes=[[list(map(float, b)) for b in boxes]], return_tensors="pt")
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        with self._torch.no_grad():
            pred = self.model(**inputs, multimask_output=False).pred_masks
        masks = self.processor.post_process_masks(self._torch.sigmoid(pred).cpu(), inputs["original_sizes"].cpu(),
                                                  inputs["reshaped_input_sizes"].cpu(), binarize=False)[0]
        return (masks[:, 0] > self.threshold).any(0).numpy()


def to_8bit(image: np.ndarray) -> np.ndarray:
    """``(H, W)`` float image in [0, 1] (clipped) -> uint8 ``round(255 x)``, as the reference's 8-bit PNGs; uint8 kept."""
    img = np.asarray(image)
    if img.dtype == np.uint8:
        return img
    return (np.clip(img.astype(np.float64), 0.0, 1.0) * 255.0).round().astype(np.uint8)


def gcdm_confusion(
    images: np.ndarray,
    labels: np.ndarray,
    instances: np.ndarray,
    segment_lesion: Any,
    breast_threshold: int = 15,
) -> PooledConfusion:
    """The reference's evaluation of a set of images against the label maps they were conditioned on.

    For each image: breast = :func:`reference_breast_mask` of its 8-bit version; lesion = ``segment_lesion(i, image,
    boxes)`` prompted with the ground-truth lesion boxes (:func:`lesion_boxes` of ``instances[i]``; not called for an
    image without lesion); predicted label = :func:`compose_label`; ONE confusion matrix pooled over all images.

    Args:
        images: ``(N, H, W)`` or ``(N, 1, H, W)`` float in [0, 1] (generated, or the real images for the ceiling).
        labels: ``(N, H, W)`` truth label maps {0 background, 1 breast, 2 lesion}.
        instances: ``(N, H, W)`` lesion instance maps (0 = none, k = lesion k).
        segment_lesion: ``(index, (H, W) image, boxes) -> bool (H, W)``.
        breast_threshold: the reference's threshold on the 8-bit image.

    Returns:
        the pooled :class:`PooledConfusion` (rows truth, columns prediction).
    """
    imgs = np.asarray(images)
    if imgs.ndim == 4:
        imgs = imgs[:, 0]
    labels, instances = np.asarray(labels), np.asarray(instances)
    if not (imgs.shape == labels.shape == instances.shape):
        raise ValueError(f"gcdm_confusion: images {imgs.shape}, labels {labels.shape}, instances {instances.shape} differ")
    conf = PooledConfusion(3)
    for i in range(imgs.shape[0]):
        breast = reference_breast_mask(to_8bit(imgs[i]), threshold=breast_threshold)
        boxes = lesion_boxes(instances[i])
        lesion = np.asarray(segment_lesion(i, imgs[i], boxes), dtype=bool) if boxes else np.zeros(breast.shape, bool)
        conf.update(compose_label(breast, lesion), labels[i])
    return conf
