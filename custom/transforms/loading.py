"""Loading DICOM MG files with MONAI's ``LoadImage`` restricted to :class:`~custom.dicom.MammoDicomReader`.

``LoadImage(reader=...)`` falls back on every other registered reader when the given one fails, and then reports
only that no reader could load the file. These transforms pass the reader at call time instead, so a bad file's
:class:`~custom.errors.MammoInputError` (file name + problem) reaches the user unchanged.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import LoadImage, MapTransform, Transform

from custom.dicom import MammoDicomReader

__all__ = ["LoadMammogram", "LoadMammogramd"]


class LoadMammogram(Transform):
    """Path -> ``MetaTensor`` of stored values, ``(1, H, W)`` with ``ensure_channel_first`` (default) else ``(H, W)``;
    metadata as documented in :class:`~custom.dicom.MammoDicomReader`."""

    def __init__(self, ensure_channel_first: bool = True, require_mammography: bool = True):
        self.reader = MammoDicomReader(require_mammography=require_mammography)
        self.loader = LoadImage(image_only=True, ensure_channel_first=ensure_channel_first)

    def __call__(self, filename: str) -> MetaTensor:
        return self.loader(filename, reader=self.reader)


class LoadMammogramd(MapTransform):
    """Dictionary form of :class:`LoadMammogram`."""

    def __init__(self, keys: KeysCollection, ensure_channel_first: bool = True, require_mammography: bool = True,
                 allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.transform = LoadMammogram(ensure_channel_first, require_mammography)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.transform(d[key])
        return d
