"""The clinician's drawing -> mask files for the product inference CLI.

Runs inside the MONAI Label environment (numpy, scipy, nibabel, pynrrd, Pillow; never the product's ``custom``
package). Conventions are those of the product's ``custom.data.mask_io``:

- NIfTI / NRRD labels are stored voxel-index first (``i`` = image column, as 3D Slicer, ITK and MONAI write them):
  a 2D label is transposed to ``(rows, columns)``; PNG labels are read as stored.
- Values: with ``label_info`` (what the 3D Slicer MONAI Label module sends: ``[{"name": segment name, "id": value}]``)
  a segment whose name contains ``lesion`` / ``mass`` / ``tumo(u)r`` / ``foreground`` (the scribbles foreground brush)
  is a lesion, one whose name contains ``breast`` is the breast, the others are ignored. Without it (or when no name
  is recognised): values {1, 2} = breast / lesion (the app's label ids), and a label holding a single nonzero value
  (binary 0/1, 0/255 ...) is the lesion.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["LabelError", "Drawing", "read_label", "split_label", "count_lesions", "parse_boxes", "roi_to_box",
           "write_png", "LESION_WORDS", "BREAST_WORDS"]

LESION_WORDS = ("lesion", "mass", "tumor", "tumour", "foreground")
BREAST_WORDS = ("breast",)
_EIGHT = np.ones((3, 3), dtype=bool)


class LabelError(ValueError):
    """A problem with the request's label / box, in words for the clinician (HTTP 400)."""


class Drawing:
    """What was drawn: ``lesion`` (H, W) bool (may be all False when a box is used), ``breast`` (H, W) bool or None."""

    def __init__(self, lesion: np.ndarray, breast: np.ndarray | None, how: str):
        self.lesion = lesion
        self.breast = breast
        self.how = how

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.lesion.shape)  # type: ignore[return-value]


def _suffix(path: Path) -> str:
    name = path.name.lower()
    for s in (".nii.gz", ".seg.nrrd"):
        if name.endswith(s):
            return s
    return path.suffix.lower()


def read_label(path: str | Path) -> np.ndarray:
    """Read an uploaded label file (NIfTI, NRRD or PNG) as an ``(H, W)`` int64 array, rows first."""
    path = Path(path)
    suffix = _suffix(path)
    try:
        if suffix in (".nii", ".nii.gz"):
            import nibabel as nib

            arr = np.asarray(nib.load(str(path)).dataobj)
            transpose = True
        elif suffix in (".nrrd", ".seg.nrrd"):
            import nrrd

            arr, _ = nrrd.read(str(path))  # Fortran (i, j, k) index order, like NIfTI
            transpose = True
        elif suffix == ".png":
            from PIL import Image

            with Image.open(path) as im:
                arr = np.asarray(im)
            transpose = False
        else:
            raise LabelError(f"unsupported label file type {suffix!r}: send NIfTI (.nii.gz), NRRD or PNG")
    except LabelError:
        raise
    except Exception as err:  # corrupt upload
        raise LabelError(f"unreadable label file ({type(err).__name__}: {err})") from None
    arr = np.squeeze(arr)
    if arr.ndim != 2:
        raise LabelError(f"the label must be a single 2D slice, got array shape {tuple(arr.shape)}")
    if transpose:
        arr = arr.T
    if not np.issubdtype(arr.dtype, np.integer) and not np.issubdtype(arr.dtype, np.bool_):
        if not np.all(np.isfinite(arr)):
            raise LabelError("the label holds NaN or infinite values")
        rounded = np.rint(arr)
        if np.abs(arr - rounded).max(initial=0) > 1e-3:
            raise LabelError("label values must be integers (segment ids)")
        arr = rounded
    return np.ascontiguousarray(arr.astype(np.int64))


def _ids_by_name(label_info: Any) -> tuple[list[int], list[int]]:
    lesion_ids, breast_ids = [], []
    if isinstance(label_info, str):
        try:
            label_info = json.loads(label_info)
        except ValueError:
            return [], []
    if isinstance(label_info, dict):  # {"name": id}
        label_info = [{"name": k, "id": v} for k, v in label_info.items()]
    for item in label_info or []:
        if not isinstance(item, dict):
            continue
        name = str(item.get("name", "")).lower()
        value = item.get("id", item.get("idx"))
        try:
            value = int(value)
        except (TypeError, ValueError):
            continue
        if any(w in name for w in LESION_WORDS) and "background" not in name:
            lesion_ids.append(value)
        elif any(w in name for w in BREAST_WORDS):
            breast_ids.append(value)
    return lesion_ids, breast_ids


def split_label(arr: np.ndarray, label_info: Any = None) -> Drawing:
    """Lesion and breast masks of a label (see the module docstring for the rules)."""
    values = [int(v) for v in np.unique(arr) if v != 0]
    lesion_ids, breast_ids = _ids_by_name(label_info)
    if lesion_ids or breast_ids:
        lesion = np.isin(arr, lesion_ids) if lesion_ids else np.zeros(arr.shape, bool)
        breast = np.isin(arr, breast_ids) if breast_ids else None
        how = "segment names"
    elif not values:
        lesion, breast, how = np.zeros(arr.shape, bool), None, "empty"
    elif set(values) <= {1, 2} and 2 in values:
        lesion = arr == 2
        breast = (arr == 1) if 1 in values else None
        how = "values 1 = breast, 2 = lesion"
    elif len(values) == 1:
        lesion, breast, how = arr == values[0], None, f"single value {values[0]} = lesion"
    else:
        shown = ", ".join(str(v) for v in values[:8]) + (" ..." if len(values) > 8 else "")
        raise LabelError(f"label values {shown} not understood: use 1 = breast and 2 = lesion, a binary lesion mask, "
                         "or segments named 'lesion' and 'breast'")
    if breast is not None and not breast.any():
        breast = None
    return Drawing(lesion.astype(bool), breast, how)


def count_lesions(lesion: np.ndarray) -> int:
    """Number of lesions the product will see: 8-connected components (its rule for binary masks / label maps)."""
    from scipy import ndimage

    return int(ndimage.label(lesion, structure=_EIGHT)[1])


def parse_boxes(value: Any) -> list[list[float]] | None:
    """``"x0,y0,x1,y1"``, ``[x0, y0, x1, y1]``, a JSON text of either, or a list of boxes -> list of boxes (pixel-edge
    coordinates, x = column); ``None`` / ``""`` / ``[]`` -> None."""
    if value is None:
        return None
    if isinstance(value, str):
        text = value.strip()
        if not text:
            return None
        try:
            value = json.loads(text if text.startswith("[") else f"[{text}]")
        except ValueError:
            raise LabelError(f"lesion_box: not a box x0,y0,x1,y1: {text!r}") from None
    if not isinstance(value, (list, tuple)) or not value:
        return None
    boxes = [value] if not isinstance(value[0], (list, tuple)) else list(value)
    out = []
    for i, b in enumerate(boxes):
        try:
            vals = [float(v) for v in b]
        except (TypeError, ValueError):
            raise LabelError(f"lesion_box {i}: values must be numbers, got {b!r}") from None
        if len(vals) != 4 or not all(math.isfinite(v) for v in vals):
            raise LabelError(f"lesion_box {i}: expected 4 numbers x0,y0,x1,y1, got {b!r}")
        out.append(vals)
    return out


def roi_to_box(roi: Any) -> list[float] | None:
    """The 3D Slicer MONAI Label module's ROI (``[i0, i1, j0, j1, k0, k1]`` voxel indices, ``i`` = column) ->
    ``[xmin, ymin, xmax, ymax]`` pixel edges; ``None`` when no ROI was placed."""
    if isinstance(roi, str):
        try:
            roi = json.loads(roi) if roi.strip() else None
        except ValueError:
            return None
    if not isinstance(roi, (list, tuple)) or len(roi) < 4:
        return None
    try:
        i0, i1, j0, j1 = (float(v) for v in roi[:4])
    except (TypeError, ValueError):
        return None
    return [min(i0, i1), min(j0, j1), max(i0, i1) + 1.0, max(j0, j1) + 1.0]


def write_png(path: str | Path, arr: np.ndarray) -> Path:
    """8-bit PNG of a small-integer mask (0/1/2 label map, or 0/255 binary mask)."""
    from PIL import Image

    Image.fromarray(np.asarray(arr, dtype=np.uint8)).save(str(path))
    return Path(path)


def safe_name(text: str, limit: int = 48) -> str:
    """A file-name-safe token (letters, digits, '.', '_', '-')."""
    token = re.sub(r"[^A-Za-z0-9._-]+", "-", str(text)).strip("-.")
    return token[:limit] or "x"


__all__.append("safe_name")
