""""Next sample" strategies: pick an original mammogram to draw on, or open the newest synthetic image.

Synthetic images are recognised by their DICOM attributes, not by a datastore flag (a DICOMweb datastore keeps no
flags): a series whose SeriesDescription starts with :data:`SYNTHETIC_SERIES` (the product writes ``SYNTHETIC -
mammo_gcdm GCDM``, ``custom.data.export.SERIES_DESCRIPTION``; the phantom's own "SYNTHETIC PHANTOM" images are
originals here) is synthetic, and "newest" is the latest SeriesDate + SeriesTime. In a local datastore the
attributes are read from the files' headers; in the DICOMweb datastore from one QIDO-RS query
(``MammoDICOMWebDatastore.series_attributes``). Non-DICOM images (PNG) are originals.

Both return ``name`` (the file name with its extension) so that the 3D Slicer module saves a downloaded image under
a name it can load.
"""

from __future__ import annotations

import logging
import os
import random
from typing import Any, Dict

from fastapi import HTTPException

from monailabel.interfaces.tasks.strategy import Strategy

logger = logging.getLogger(__name__)

__all__ = ["OriginalImage", "LatestSynthetic", "is_synthetic", "series_attributes", "FIELDS", "SYNTHETIC_SERIES"]

FIELDS = ("SeriesDescription", "SeriesDate", "SeriesTime")
#: the start of the SeriesDescription of every synthetic image of the product
SYNTHETIC_SERIES = "SYNTHETIC - mammo_gcdm"
_HEADER_CACHE: Dict[str, tuple[float, Dict[str, str]]] = {}


def _file_attributes(path: str) -> Dict[str, str]:
    """SeriesDescription / SeriesDate / SeriesTime of a DICOM file (cached by modification time); {} otherwise."""
    if not path or not os.path.isfile(path):
        return {}
    mtime = os.path.getmtime(path)
    hit = _HEADER_CACHE.get(path)
    if hit and hit[0] == mtime:
        return hit[1]
    attrs: Dict[str, str] = {}
    try:
        import pydicom

        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=list(FIELDS))
        attrs = {f: str(ds.get(f, "") or "") for f in FIELDS}
    except Exception:  # not DICOM (a PNG mammogram): an original
        attrs = {}
    _HEADER_CACHE[path] = (mtime, attrs)
    return attrs


def series_attributes(datastore: Any) -> Dict[str, Dict[str, str]]:
    """``{image id: {SeriesDescription, SeriesDate, SeriesTime}}`` for every image of the datastore."""
    if hasattr(datastore, "series_attributes"):
        return datastore.series_attributes()
    return {i: _file_attributes(datastore.get_image_uri(i)) for i in datastore.list_images()}


def is_synthetic(attrs: Dict[str, str]) -> bool:
    return str(attrs.get("SeriesDescription", "")).strip().startswith(SYNTHETIC_SERIES)


def _when(attrs: Dict[str, str]) -> str:
    return f"{attrs.get('SeriesDate', '') or '00000000'}{(attrs.get('SeriesTime', '') or '000000').ljust(13, '0')}"


def _sample(datastore: Any, image_id: str) -> dict:
    info = datastore.get_image_info(image_id)
    return {"id": image_id, "name": info.get("name", image_id)}


class OriginalImage(Strategy):
    """A random original (not synthetic) mammogram; ``request["image"]`` (an option in the 3D Slicer module's
    Options table) picks one by id."""

    def __init__(self):
        super().__init__("An original mammogram (not a synthetic one): the one named in the 'image' option, else random")

    def info(self):
        return {**super().info(), "config": {"image": ""}}

    def __call__(self, request, datastore):
        images = datastore.list_images()
        wanted = str(request.get("image") or "").strip()
        if wanted:  # an unknown id is an error rather than a silently different image
            if wanted not in images:
                raise HTTPException(status_code=404, detail=f"image {wanted[:80]!r} not found in the datastore")
            return _sample(datastore, wanted)
        attrs = series_attributes(datastore)
        originals = [i for i in images if not is_synthetic(attrs.get(i, {}))]
        if not originals:
            return None
        return _sample(datastore, random.choice(originals))


class LatestSynthetic(Strategy):
    """The newest synthetic image (in a local datastore optionally of one source image: ``request["source_image"]``,
    which the datastore info records; a DICOMweb datastore keeps no such link, by design: the synthetic DICOM carries
    no source identifier)."""

    def __init__(self):
        super().__init__("The most recent synthetic mammogram (open it after running mammo_gcdm)")

    def __call__(self, request, datastore):
        source = request.get("source_image")
        attrs = series_attributes(datastore)
        best, best_key = None, ""
        for image_id in datastore.list_images():
            a = attrs.get(image_id, {})
            if not is_synthetic(a):
                continue
            if source and not hasattr(datastore, "series_attributes"):
                if datastore.get_image_info(image_id).get("source_image") != source:
                    continue
            key = _when(a) + str(datastore.get_image_info(image_id).get("ts", 0)).zfill(12)
            if key >= best_key:
                best, best_key = image_id, key
        return _sample(datastore, best) if best else None
