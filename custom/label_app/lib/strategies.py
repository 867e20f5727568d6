""""Next sample" strategies: pick an original mammogram to draw on, or open the newest synthetic image.

Both return ``name`` (the file name with its extension) so that the 3D Slicer module saves a downloaded image under
a name it can load.
"""

from __future__ import annotations

import random
from typing import Any

from fastapi import HTTPException

from monailabel.interfaces.tasks.strategy import Strategy

__all__ = ["OriginalImage", "LatestSynthetic", "is_synthetic"]


def is_synthetic(info: dict) -> bool:
    return bool(info.get("synthetic"))


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
        originals = [i for i in images if not is_synthetic(datastore.get_image_info(i))]
        if not originals:
            return None
        return _sample(datastore, random.choice(originals))


class LatestSynthetic(Strategy):
    """The newest synthetic image (optionally of one source image: ``request["source_image"]``)."""

    def __init__(self):
        super().__init__("The most recent synthetic mammogram (open it after running mammo_gcdm)")

    def __call__(self, request, datastore):
        source = request.get("source_image")
        best, best_ts = None, -1.0
        for image_id in datastore.list_images():
            info = datastore.get_image_info(image_id)
            if not is_synthetic(info) or (source and info.get("source_image") != source):
                continue
            ts = float(info.get("ts", 0))
            if ts >= best_ts:
                best, best_ts = image_id, ts
        return _sample(datastore, best) if best else None
