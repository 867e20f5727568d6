"""Loading DICOM MG files with MONAI's ``LoadImage`` restricted to :class:`~custom.dicom.MammoDicomReader`.

``LoadImage(reader=...)`` falls back on every other registered reader when the given one fails, and then reports
only that no reader could load the file. These transforms pass the reader at call time instead, so a bad file's
:class:`~custom.errors.MammoInputError` (file name + problem) reaches the user unchanged.

GPU decoding: when NVIDIA nvImageCodec (with CuPy and a CUDA device) is installed, :func:`enable_gpu_decoding`
registers MONAI's nvImageCodec pydicom decoder plugin (``monai.data.nvimgcodec_pydicom_plugin``, MONAI's
``NvImgCodecPydicomReader`` uses the same plugin), so JPEG 2000 / HTJ2K pixel data decode on the GPU; pydicom
keeps its CPU plugins (pylibjpeg-openjpeg, ...) as the fallback for anything the GPU decoder does not take. Without
it (this project's CPU machines) nothing changes: the CPU decoders run, and the reason is logged once.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import LoadImage, MapTransform, Transform

from custom.dicom import MammoDicomReader

__all__ = ["LoadMammogram", "LoadMammogramd", "enable_gpu_decoding"]

_logger = logging.getLogger(__name__)
_GPU_DECODING: bool | None = None  # per process: None = not tried yet


def enable_gpu_decoding(enabled: bool | None = None) -> bool:
    """Register the nvImageCodec pydicom decoder plugin once per process; returns whether GPU decoding is on.

    Args:
        enabled: ``None`` (auto): use it when nvImageCodec, CuPy and a CUDA device are present; ``False``: leave
            pydicom's CPU decoders alone; ``True``: like auto, but log a warning when it is not available.

    Any failure (missing package, no device, a plugin that does not register) leaves the CPU decoders in place and
    returns ``False``; decoding itself never depends on this call succeeding.
    """
    global _GPU_DECODING
    if enabled is False:
        return False
    if _GPU_DECODING is not None:
        return _GPU_DECODING
    reason = ""
    try:
        from monai.data import nvimgcodec_pydicom_plugin as plugin

        if not plugin.is_nvimgcodec_available():
            reason = "nvImageCodec, CuPy or a CUDA device missing"
        elif not plugin.register_as_decoder_plugin():
            reason = "the nvImageCodec pydicom plugin did not register"
    except Exception as err:  # optional GPU stack: any failure means the CPU decoders
        reason = f"{type(err).__name__}: {err}"
    _GPU_DECODING = not reason
    if reason:
        (_logger.warning if enabled else _logger.info)(f"GPU DICOM decoding off ({reason}); using the CPU decoders")
    else:
        _logger.info("GPU DICOM decoding on (nvImageCodec pydicom plugin)")
    return _GPU_DECODING


class LoadMammogram(Transform):
    """Path -> ``MetaTensor`` of stored values, ``(1, H, W)`` with ``ensure_channel_first`` (default) else ``(H, W)``;
    metadata as documented in :class:`~custom.dicom.MammoDicomReader`. ``gpu_decoding``: see
    :func:`enable_gpu_decoding` (``None``: on when available). ``dtype``: MONAI ``LoadImage``'s output dtype
    (float32 by default, as MONAI does); ``None`` keeps the stored integer dtype, which saves a full-size float copy
    and lets :class:`~custom.transforms.DicomGrayscale` index its look-up table directly (same display values).
    ``j2k_reduce``, ``j2k_min_side``: see :class:`~custom.dicom.MammoDicomReader` (0 = full resolution)."""

    def __init__(self, ensure_channel_first: bool = True, require_mammography: bool = True,
                 gpu_decoding: bool | None = None, dtype=np.float32, j2k_reduce: int | str = 0,
                 j2k_min_side: int = 512):
        self.gpu_decoding = enable_gpu_decoding(gpu_decoding)
        self.reader = MammoDicomReader(require_mammography=require_mammography, j2k_reduce=j2k_reduce,
                                       j2k_min_side=j2k_min_side)
        self.loader = LoadImage(image_only=True, ensure_channel_first=ensure_channel_first, dtype=dtype)

    def __call__(self, filename: str) -> MetaTensor:
        return self.loader(filename, reader=self.reader)


class LoadMammogramd(MapTransform):
    """Dictionary form of :class:`LoadMammogram`."""

    def __init__(self, keys: KeysCollection, ensure_channel_first: bool = True, require_mammography: bool = True,
                 allow_missing_keys: bool = False, gpu_decoding: bool | None = None):
        super().__init__(keys, allow_missing_keys)
        self.transform = LoadMammogram(ensure_channel_first, require_mammography, gpu_decoding)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.transform(d[key])
        return d
