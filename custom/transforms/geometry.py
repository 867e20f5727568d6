"""Mammogram geometry: laterality flip, breast crop, aspect-preserving resize and pad — applied identically to the
image, every mask and every box of a case, recorded as a :class:`MammoGeometry`, and invertible.

Forward order: flip (right breasts are mirrored so every chest wall is on the left) -> crop to the breast bounding
box plus a margin -> resize by one scale factor (aspect ratio kept) -> pad to ``(size, size)`` (padding on the
right, away from the chest wall, and split top/bottom). :meth:`MammoGeometry.invert_image` maps a model-resolution
array back onto the source grid (outside the crop filled with ``fill``).

Arrays are channel-first ``(C, H, W)`` (rows first); boxes are ``[xmin, ymin, xmax, ymax]`` in pixel edge
coordinates (x = column, a pixel ``i`` spans ``[i, i+1)``).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, Transform

from custom.transforms.masks import chest_wall_side

__all__ = ["MammoGeometry", "compute_geometry", "ApplyGeometry", "ApplyGeometryd", "InvertGeometry", "MammoGeometryd"]

_MODES = ("image", "mask", "nearest")


@dataclass(frozen=True)
class MammoGeometry:
    """Everything needed to map source pixels to model pixels and back.

    Attributes:
        source_shape: ``(H, W)`` of the source image.
        flip: the source was mirrored left-right first (a right breast, or chest wall found on the right).
        crop: ``(y0, y1, x0, x1)`` half-open crop window in the (flipped) source.
        scale: model pixels per source pixel.
        resized_shape: ``(h, w)`` of the crop after resizing.
        pad: ``(top, bottom, left, right)`` padding added to reach ``output_shape``.
        output_shape: ``(size, size)``.
    """

    source_shape: tuple[int, int]
    flip: bool
    crop: tuple[int, int, int, int]
    scale: float
    resized_shape: tuple[int, int]
    pad: tuple[int, int, int, int]
    output_shape: tuple[int, int]

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> MammoGeometry:
        return cls(
            source_shape=tuple(int(v) for v in d["source_shape"]),
            flip=bool(d["flip"]),
            crop=tuple(int(v) for v in d["crop"]),
            scale=float(d["scale"]),
            resized_shape=tuple(int(v) for v in d["resized_shape"]),
            pad=tuple(int(v) for v in d["pad"]),
            output_shape=tuple(int(v) for v in d["output_shape"]),
        )

    # ------------------------------------------------------------------ images
    def apply_image(self, arr: np.ndarray | torch.Tensor, mode: str = "image") -> torch.Tensor:
        """Source ``(C, H, W)`` -> model ``(C, size, size)`` float32.

        ``mode``: ``"image"`` (area averaging when shrinking, bilinear when enlarging; pad value 0),
        ``"mask"`` (a binary mask resized by area and re-thresholded at 0.5, keeping thin structures better than
        nearest), ``"nearest"`` (label or instance maps).
        """
        # crop first, then flip and convert the crop only: the same values as flipping and converting the whole
        # source first (columns [x0, x1) of the flipped image are source columns [W - x1, W - x0), mirrored)
        y0, y1, x0, x1 = self.crop
        if self.flip:
            x0, x1 = self.source_shape[1] - x1, self.source_shape[1] - x0
        x = _as_chw_float(arr, self.source_shape, (slice(y0, y1), slice(x0, x1)))
        if self.flip:
            x = torch.flip(x, dims=[-1])
        x = _resize(x, self.resized_shape, mode)
        top, bottom, left, right = self.pad
        return F.pad(x, (left, right, top, bottom), value=0.0)

    def invert_image(self, arr: np.ndarray | torch.Tensor, mode: str = "image", fill: float = 0.0) -> torch.Tensor:
        """Model ``(C, size, size)`` -> source ``(C, H, W)`` float32; outside the crop window is ``fill``."""
        x = _as_chw_float(arr, self.output_shape)
        top, _, left, _ = self.pad
        h, w = self.resized_shape
        x = x[:, top : top + h, left : left + w]
        y0, y1, x0, x1 = self.crop
        x = _resize(x, (y1 - y0, x1 - x0), mode)
        out = torch.full((x.shape[0], *self.source_shape), float(fill), dtype=torch.float32)
        out[:, y0:y1, x0:x1] = x
        return torch.flip(out, dims=[-1]) if self.flip else out

    # ------------------------------------------------------------------ boxes
    def apply_boxes(self, boxes: Sequence[Sequence[float]] | np.ndarray) -> np.ndarray:
        """``(N, 4)`` source boxes ``[xmin, ymin, xmax, ymax]`` -> model boxes, clamped to the output image."""
        b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4).copy()
        if self.flip:
            b[:, [0, 2]] = self.source_shape[1] - b[:, [2, 0]]
        y0, y1, x0, x1 = self.crop
        b[:, [0, 2]] = np.clip(b[:, [0, 2]], x0, x1)
        b[:, [1, 3]] = np.clip(b[:, [1, 3]], y0, y1)
        sy, sx = self._axis_scales()
        top, _, left, _ = self.pad
        b[:, [0, 2]] = (b[:, [0, 2]] - x0) * sx + left
        b[:, [1, 3]] = (b[:, [1, 3]] - y0) * sy + top
        return b

    def invert_boxes(self, boxes: Sequence[Sequence[float]] | np.ndarray) -> np.ndarray:
        """Inverse of :meth:`apply_boxes` (up to the clamping)."""
        b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4).copy()
        y0, _, x0, _ = self.crop
        sy, sx = self._axis_scales()
        top, _, left, _ = self.pad
        b[:, [0, 2]] = (b[:, [0, 2]] - left) / sx + x0
        b[:, [1, 3]] = (b[:, [1, 3]] - top) / sy + y0
        if self.flip:
            b[:, [0, 2]] = self.source_shape[1] - b[:, [2, 0]]
        return b

    def _axis_scales(self) -> tuple[float, float]:
        """Exact per-axis scales (the integer resized shape differs from ``scale`` by < 1 pixel)."""
        y0, y1, x0, x1 = self.crop
        return self.resized_shape[0] / (y1 - y0), self.resized_shape[1] / (x1 - x0)


def _as_chw_float(arr: np.ndarray | torch.Tensor, expected: Sequence[int],
                  window: tuple[slice, slice] | None = None) -> torch.Tensor:
    """``(C, H, W)`` float32 tensor of ``arr`` (``(H, W)`` gets a channel), optionally only its ``window`` of
    rows/columns (cut before the copy and the conversion, so a crop of a large image costs only the crop)."""
    x = arr.detach().cpu() if isinstance(arr, torch.Tensor) else np.asarray(arr)
    x = x.as_subclass(torch.Tensor) if isinstance(x, MetaTensor) else x
    if x.ndim == 2:
        x = x[None]
    if x.ndim != 3 or tuple(x.shape[-2:]) != tuple(expected):
        raise ValueError(f"expected an array of spatial shape {tuple(expected)}, got {tuple(x.shape)}")
    if window is not None:
        x = x[:, window[0], window[1]]
    x = torch.as_tensor(np.ascontiguousarray(x)) if isinstance(x, np.ndarray) else x
    return x.float()


def _resize(x: torch.Tensor, size: Sequence[int], mode: str) -> torch.Tensor:
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
    size = (int(size[0]), int(size[1]))
    if tuple(x.shape[-2:]) == size:
        return x.clone()
    if mode == "nearest":
        return F.interpolate(x[None], size=size, mode="nearest-exact")[0]
    shrinking = size[0] <= x.shape[-2] and size[1] <= x.shape[-1]
    y = F.interpolate(x[None], size=size, mode="area")[0] if shrinking else F.interpolate(
        x[None], size=size, mode="bilinear", align_corners=False
    )[0]
    return (y >= 0.5).float() if mode == "mask" else y


def compute_geometry(
    breast: np.ndarray,
    laterality: str | None,
    size: int,
    margin: float = 0.02,
) -> tuple[MammoGeometry, dict[str, Any]]:
    """Geometry of one case from its source breast mask.

    Args:
        breast: ``(H, W)`` bool breast mask of the source image (see :func:`custom.transforms.breast_mask`).
        laterality: ``"L"``/``"R"`` from the DICOM tags or the dataset CSV; ``None`` falls back on image content
            (the chest wall is on the side holding more tissue).
        size: output side length in pixels.
        margin: crop margin as a fraction of the breast bounding box's larger side.

    Returns:
        ``(geometry, info)``; ``info`` has ``"laterality_source"`` (``"tag"`` or ``"intensity"``) and
        ``"laterality_conflict"`` (True when the tag says one side but the image content the other).
    """
    breast = np.asarray(breast, dtype=bool)
    if breast.ndim != 2:
        raise ValueError(f"breast mask must be (H, W), got {breast.shape}")
    if not breast.any():
        raise ValueError("empty breast mask: no breast found in the image")
    h, w = breast.shape
    side = chest_wall_side(breast)
    if laterality in ("L", "R"):
        flip = laterality == "R"
        info = {"laterality_source": "tag", "laterality_conflict": (side == "right") != flip}
    else:
        flip = side == "right"
        info = {"laterality_source": "intensity", "laterality_conflict": False}
    if flip:
        breast = breast[:, ::-1]
    rows, cols = np.nonzero(breast.any(axis=1))[0], np.nonzero(breast.any(axis=0))[0]
    m = int(round(margin * max(rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1)))
    y0, y1 = max(int(rows[0]) - m, 0), min(int(rows[-1]) + 1 + m, h)
    x0, x1 = max(int(cols[0]) - m, 0), min(int(cols[-1]) + 1 + m, w)
    ch, cw = y1 - y0, x1 - x0
    scale = size / max(ch, cw)
    rh, rw = max(1, min(size, int(round(ch * scale)))), max(1, min(size, int(round(cw * scale))))
    pad_v = size - rh
    pad = (pad_v // 2, pad_v - pad_v // 2, 0, size - rw)
    geom = MammoGeometry((h, w), bool(flip), (y0, y1, x0, x1), float(scale), (rh, rw), pad, (size, size))
    return geom, info


class ApplyGeometry(Transform):
    """Array form: apply a recorded :class:`MammoGeometry` to a ``(C, H, W)`` array (see ``apply_image`` modes)."""

    def __init__(self, geometry: MammoGeometry | Mapping[str, Any], mode: str = "image"):
        self.geometry = geometry if isinstance(geometry, MammoGeometry) else MammoGeometry.from_dict(geometry)
        self.mode = mode

    def __call__(self, img: torch.Tensor | np.ndarray) -> torch.Tensor:
        return self.geometry.apply_image(img, self.mode)


class InvertGeometry(Transform):
    """Array form of the inverse: model ``(C, size, size)`` -> source ``(C, H, W)``."""

    def __init__(self, geometry: MammoGeometry | Mapping[str, Any], mode: str = "image", fill: float = 0.0):
        self.geometry = geometry if isinstance(geometry, MammoGeometry) else MammoGeometry.from_dict(geometry)
        self.mode, self.fill = mode, fill

    def __call__(self, img: torch.Tensor | np.ndarray) -> torch.Tensor:
        return self.geometry.invert_image(img, self.mode, self.fill)


class ApplyGeometryd(MapTransform):
    """Dictionary form of :class:`ApplyGeometry`, reading the geometry from ``d[geometry_key]``."""

    def __init__(self, keys: KeysCollection, modes: str | Sequence[str] = "image", geometry_key: str = "geometry",
                 allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.modes = [modes] * len(self.keys) if isinstance(modes, str) else list(modes)
        self.geometry_key = geometry_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        geom = d[self.geometry_key]
        geom = geom if isinstance(geom, MammoGeometry) else MammoGeometry.from_dict(geom)
        for key, mode in self.key_iterator(d, self.modes):
            d[key] = geom.apply_image(d[key], mode)
        return d


class MammoGeometryd(MapTransform):
    """Compute the geometry from ``d[breast_key]`` (``(1, H, W)`` bool) and the laterality, apply it to ``keys``
    (each with its mode) and to the boxes at ``boxes_key`` (``(N, 4)``), and store it at ``geometry_key``
    (a :class:`MammoGeometry`) with the decision details at ``geometry_key + "_info"``.

    Args:
        keys: arrays to transform, e.g. ``["image", "breast", "lesions"]``.
        modes: one of ``"image"``, ``"mask"``, ``"nearest"`` per key.
        breast_key: key of the source breast mask (also transformed if listed in ``keys``).
        laterality_key: key holding ``"L"``/``"R"``/``None``; falls back on ``d[image].meta["laterality"]``.
        size: output side length.
        margin: crop margin (fraction of the breast box's larger side).
    """

    def __init__(self, keys: KeysCollection, modes: str | Sequence[str], size: int, breast_key: str = "breast",
                 laterality_key: str = "laterality", boxes_key: str | None = None, geometry_key: str = "geometry",
                 margin: float = 0.02):
        super().__init__(keys)
        self.modes = [modes] * len(self.keys) if isinstance(modes, str) else list(modes)
        if len(self.modes) != len(self.keys):
            raise ValueError("one mode per key")
        self.size, self.margin = int(size), float(margin)
        self.breast_key, self.laterality_key = breast_key, laterality_key
        self.boxes_key, self.geometry_key = boxes_key, geometry_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        laterality = d.get(self.laterality_key)
        if laterality is None:
            first = d[self.keys[0]]
            laterality = first.meta.get("laterality") if isinstance(first, MetaTensor) else None
        breast = d[self.breast_key]
        breast = breast.detach().cpu().numpy() if isinstance(breast, torch.Tensor) else np.asarray(breast)
        geom, info = compute_geometry(breast[0] if breast.ndim == 3 else breast, laterality, self.size, self.margin)
        for key, mode in zip(self.keys, self.modes):
            d[key] = geom.apply_image(d[key], mode)
        if self.boxes_key is not None and self.boxes_key in d:
            d[self.boxes_key] = geom.apply_boxes(d[self.boxes_key])
        d[self.geometry_key] = geom
        d[f"{self.geometry_key}_info"] = info
        return d
