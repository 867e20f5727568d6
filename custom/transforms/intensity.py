"""The DICOM grayscale pipeline for mammograms: stored values -> display values in [0, 1].

Order (DICOM PS3.3 C.11, C.7.6.3.1): pixel padding masked on the stored values -> Modality LUT
(RescaleSlope/RescaleIntercept or Modality LUT Sequence) -> VOI LUT (window centre/width with VOILUTFunction
LINEAR, LINEAR_EXACT or SIGMOID, or a VOI LUT Sequence) -> MONOCHROME1 inversion. pydicom's own functions do the
LUT arithmetic; the output range is normalised to [0, 1] from the VOI output range (never from a fixed maximum),
as float32, so the source's full bit depth is kept (no 8-bit quantisation).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, Transform
from pydicom.pixels import apply_modality_lut, apply_voi, apply_windowing

from custom.dicom import header_from_params
from custom.errors import MammoInputError

__all__ = ["DicomGrayscale", "DicomGrayscaled", "apply_dicom_grayscale"]

# Windowing output range used internally: unsigned 16 bit, so pydicom's y-range is [0, 65535].
_WINDOW_BITS = 16


def _padding_mask(stored: np.ndarray, params: dict[str, Any]) -> np.ndarray:
    """True where the stored value is pixel padding (PixelPaddingValue, or the range up to PixelPaddingRangeLimit)."""
    if "PixelPaddingValue" not in params:
        return np.zeros(stored.shape, dtype=bool)
    lo = params["PixelPaddingValue"]
    hi = params.get("PixelPaddingRangeLimit", lo)
    lo, hi = min(lo, hi), max(lo, hi)
    return (stored >= lo) & (stored <= hi)


def apply_dicom_grayscale(
    stored: np.ndarray,
    params: dict[str, Any],
    window_index: int = 0,
    prefer_voi_lut: bool = True,
    source: str | None = None,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Stored pixel values -> display values in [0, 1] (float32), following the DICOM grayscale pipeline.

    Args:
        stored: stored pixel values, any shape (typically ``(H, W)``), integer or float.
        params: the grayscale tags, as produced by :func:`custom.dicom.grayscale_params`.
        window_index: which window (or VOI LUT) to use when several are present.
        prefer_voi_lut: use a VOI LUT Sequence over windows when both are present.
        source: file name for error messages.

    Returns:
        ``(display, info)``: ``display`` float32 in [0, 1], 0 = darkest (air), 1 = brightest (dense tissue) for
        both photometric interpretations; pixel padding is set to 0. ``info`` records what was applied
        (``"voi"``: ``"window"``, ``"voi_lut"`` or ``"data_range"``, the window used, ``"inverted"``, ``"n_padding"``).
    """
    ds = header_from_params(params)
    photometric = str(params.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise MammoInputError(source, f"unsupported PhotometricInterpretation {photometric!r}")
    stored = np.asarray(stored)
    padding = _padding_mask(stored, params)
    info: dict[str, Any] = {"n_padding": int(padding.sum())}

    values = np.asarray(apply_modality_lut(stored, ds), dtype=np.float64)

    n_windows = min(len(params.get("WindowCenter", [])), len(params.get("WindowWidth", [])))
    n_luts = len(params.get("VOILUTSequence", []))
    use_lut = n_luts > 0 and (prefer_voi_lut or n_windows == 0)
    if use_lut:
        if window_index >= n_luts:
            raise MammoInputError(source, f"VOI LUT index {window_index} requested but only {n_luts} VOI LUT(s) present")
        voi_ds = header_from_params({"VOILUTSequence": params["VOILUTSequence"]})
        voi_ds.PhotometricInterpretation = photometric
        # LUT inputs are the (integer) modality output values
        out = np.asarray(apply_voi(np.round(values).astype(np.int64), voi_ds, index=window_index), dtype=np.float64)
        bits = int(params["VOILUTSequence"][window_index]["LUTDescriptor"][2])
        display = out / float(2**bits - 1)
        info.update(voi="voi_lut", lut_bits=bits)
    elif n_windows > 0:
        if window_index >= n_windows:
            raise MammoInputError(source, f"window index {window_index} requested but only {n_windows} window(s) present")
        center = float(params["WindowCenter"][window_index])
        width = float(params["WindowWidth"][window_index])
        function = str(params.get("VOILUTFunction", "LINEAR") or "LINEAR").upper()
        # A dataset with only the VOI tags and an unsigned 16-bit range: pydicom then outputs [0, 65535].
        win_ds = header_from_params(
            {
                "PhotometricInterpretation": photometric,
                "BitsStored": _WINDOW_BITS,
                "PixelRepresentation": 0,
                "WindowCenter": [center],
                "WindowWidth": [width],
                "VOILUTFunction": function,
            }
        )
        try:
            out = np.asarray(apply_windowing(values, win_ds, index=0), dtype=np.float64)
        except ValueError as err:
            raise MammoInputError(source, f"invalid VOI window (center {center}, width {width}, {function}): {err}") from err
        display = out / float(2**_WINDOW_BITS - 1)
        info.update(voi="window", window_center=center, window_width=width, voi_function=function)
    else:
        # No VOI transform in the file: stretch the modality values of the non-padding pixels.
        valid = values[~padding] if (~padding).any() else values
        lo, hi = float(valid.min()), float(valid.max())
        display = (values - lo) / (hi - lo) if hi > lo else np.zeros_like(values)
        info.update(voi="data_range", data_min=lo, data_max=hi)

    display = np.clip(display, 0.0, 1.0)
    if photometric == "MONOCHROME1":
        display = 1.0 - display
    info["inverted"] = photometric == "MONOCHROME1"
    display[padding] = 0.0
    return display.astype(np.float32), info


class DicomGrayscale(Transform):
    """Array form: stored values (``MetaTensor`` from :class:`~custom.dicom.MammoDicomReader`) -> [0, 1].

    Input: ``(1, H, W)`` or ``(H, W)`` stored values whose ``meta["dicom_grayscale"]`` holds the tags (or pass
    ``params`` explicitly). Output: same shape, float32 in [0, 1], 0 = air/dark, 1 = dense/bright;
    ``meta["grayscale"]`` records what was applied.

    Args:
        window_index: which of several windows / VOI LUTs to apply (default the first).
        prefer_voi_lut: when both a VOI LUT Sequence and windows are present, use the LUT.
    """

    backend = [MetaTensor.__name__]

    def __init__(self, window_index: int = 0, prefer_voi_lut: bool = True):
        self.window_index = window_index
        self.prefer_voi_lut = prefer_voi_lut

    def __call__(self, img: torch.Tensor | np.ndarray, params: dict[str, Any] | None = None) -> MetaTensor:
        meta = dict(img.meta) if isinstance(img, MetaTensor) else {}
        source = meta.get("filename_or_obj")
        if params is None:
            params = meta.get("dicom_grayscale")
        if params is None:
            raise MammoInputError(source, "no DICOM grayscale tags in the image metadata (load it with MammoDicomReader)")
        stored = img.detach().cpu().numpy() if isinstance(img, torch.Tensor) else np.asarray(img)
        display, info = apply_dicom_grayscale(
            stored, params, window_index=self.window_index, prefer_voi_lut=self.prefer_voi_lut, source=source
        )
        out = MetaTensor(torch.from_numpy(display), meta=meta)
        if isinstance(img, MetaTensor):
            out.affine = img.affine
        out.meta["grayscale"] = info
        return out


class DicomGrayscaled(MapTransform):
    """Dictionary form of :class:`DicomGrayscale`."""

    backend = DicomGrayscale.backend

    def __init__(
        self, keys: KeysCollection, window_index: int = 0, prefer_voi_lut: bool = True, allow_missing_keys: bool = False
    ):
        super().__init__(keys, allow_missing_keys)
        self.transform = DicomGrayscale(window_index=window_index, prefer_voi_lut=prefer_voi_lut)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.transform(d[key])
        return d
