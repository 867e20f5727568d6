"""User inputs -> GCDM conditions for one case (the input half of the ``inference`` workflow).

:func:`build_conditions` turns a mask (in one of three forms) and lesion features (from a feature file or measured on
a reference lesion) into a :class:`Conditions`: everything at the model resolution ``S x S``, validated, with the
geometry needed to map the synthetic image back onto the mask's source grid.

Mask forms (exactly one):

- ``mask_file``: a **3-class label map** (values a subset of {0 background, 1 breast, 2 lesion}); the lesions are
  the 8-connected components of the value-2 region (two touching lesions are one lesion: use the next form for them),
  or, with ``lesion_mask_file``, the instances of that instance map (which must cover exactly the value-2 pixels);
- ``breast_mask_file`` + ``lesion_mask_file``: a binary breast mask (values {0, 1} or {0, 255}) and a lesion mask,
  either binary (0 and one nonzero value; lesions = its 8-connected components) or an instance map (integer ids
  1..255, one id per lesion, ids need not be consecutive);
- ``breast_mask_file`` + ``lesion_box`` ``[xmin, ymin, xmax, ymax]`` (or a list of boxes) in the breast mask's
  pixel-edge coordinates (x = column): each lesion is the ellipse inscribed in its box
  (:func:`custom.transforms.lesion_instances_from_boxes`);
- ``breast_mask_file`` alone: a breast without lesion.

Files are PNG, NIfTI or DICOM SEG (:func:`custom.data.mask_io.load_mask_file`).

**Lesion identity.** A feature row belongs to a lesion through its ``lesion_index``, and the mask must say which lesion
that is: an instance map numbers them by id (ascending; ``prepare``'s ``lesions/<id>.png`` holds k = lesion_index
k-1, and may be given with a label map as ``mask_file`` + ``lesion_mask_file``), boxes by their order. The separate
regions of a label map or binary mask carry no number: they are ordered by the row-major position of their first
pixel, which is *not* the order ``prepare`` gave them, so two or more such lesions with feature rows that differ are
refused (identical rows, e.g. one preset for every lesion, pair the same in any order). The lesion with
lesion_index ``i`` goes to slot ``i``.

**Resolution.** A mask of exactly ``image_size x image_size`` is taken as already in the model frame (prepared data:
chest wall on the left, cropped, padded) and used as is (``geometry`` is None). A mask of any other size is in
*source geometry*: the breast region (breast pixels plus lesion pixels) gives a :class:`MammoGeometry`
(:func:`custom.transforms.compute_geometry`, the same flip / crop / resize / pad as ``prepare``, with the laterality
from the ``laterality`` argument, else the ``source_image`` DICOM tag, else the mask's content); the breast is
resized as a binary mask (area + threshold 0.5) and each lesion on its own the same way (later lesions on top), like
``prepare``. The geometry is kept so that the output can be mapped back onto the source grid.

**Features.** From a feature file (:func:`custom.features.read_feature_file`: CSV or JSON with the 67 native
PyRadiomics names and raw values; the case is chosen with ``feature_case_id`` when the file holds several), or
measured on a *reference lesion* (``reference_image`` + ``reference_lesion_mask`` in the reference image's own
geometry): the reference goes through exactly the ``prepare`` preprocessing — :func:`custom.data.prepare.preprocess_case`
itself, run into a temporary folder: display values (DICOM grayscale pipeline or PNG / dtype max), automatic breast
mask, lesion-inside-breast check, laterality flip, breast crop with the margin, aspect-preserving resize to ``S`` and
padding, lesion instances resized one by one; then the 16-bit PNG image and 8-bit instance map it wrote are read back
(:func:`custom.features.read_image_png` / ``read_instance_png``) and :func:`custom.features.extract_lesion_features`
measures each lesion — the very steps that produced the training features. Either way the raw values are mapped to
[0, 1] by the bundle's :class:`~custom.features.FeatureNormaliser` (values outside the training range are clipped
and the clipping is reported in ``Conditions.clipping``).

Every problem raises :class:`~custom.errors.MammoInputError` naming the file (or argument) and what is wrong.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from scipy import ndimage

from custom.errors import MammoInputError
from custom.transforms.geometry import MammoGeometry, compute_geometry
from custom.transforms.masks import LESION, chest_wall_side, label_map, lesion_instances_from_boxes

__all__ = ["Conditions", "build_conditions", "DEFAULT_PARAMS_FILE", "MIN_LESION_INSIDE", "N_FEATURES"]

logger = logging.getLogger(__name__)

N_FEATURES = 67
#: The bundle's PyRadiomics parameter file (used when ``params_file`` is not given).
DEFAULT_PARAMS_FILE = Path(__file__).resolve().parents[2] / "bundle" / "configs" / "radiomics_params.yaml"
#: A lesion must lie at least this much inside the breast (same rule as ``prepare``).
MIN_LESION_INSIDE = 0.5
#: box coordinates beyond this many pixels cannot belong to a mammogram
MAX_COORDINATE = 1e6
_EIGHT = ndimage.generate_binary_structure(2, 2)


@dataclass
class Conditions:
    """The conditions of one case, everything at model resolution ``S x S``.

    Attributes:
        case_id: name of the case (output naming); not a patient identifier.
        label: ``(S, S)`` uint8 label map, 0 background, 1 breast, 2 lesion.
        lesion_masks: ``(L, S, S)`` float32 {0, 1}; slot ``i`` holds lesion ``i`` (empty slots all zero).
        features: ``(L, 67)`` float32 in [0, 1], normalised; zeros (NO_LESION_VECTOR) in empty slots.
        lesion_present: ``(L,)`` float32, 1 where the slot holds a lesion.
        geometry: source geometry (mask given in source size), to map outputs back; None for a model-frame mask.
        raw_features: the raw rows used, ``{"case_id", "lesion_index", <67 names>: float}``, in slot order.
        clipping: the normaliser's clipping report (:meth:`NormalisationReport.to_dict`), ``{}`` without lesion.
        source: what was given (file names and content hashes, mode, laterality decision); no paths, no patient
            identifiers.
    """

    case_id: str
    label: np.ndarray
    lesion_masks: np.ndarray
    features: np.ndarray
    lesion_present: np.ndarray
    geometry: MammoGeometry | None
    raw_features: list[dict] = field(default_factory=list)
    clipping: dict = field(default_factory=dict)
    source: dict = field(default_factory=dict)

    @property
    def image_size(self) -> int:
        return int(self.label.shape[-1])

    @property
    def max_lesions(self) -> int:
        return int(self.lesion_masks.shape[0])

    @property
    def num_lesions(self) -> int:
        return int(self.lesion_present.sum())

    def lesions(self) -> list[dict[str, Any]]:
        """Per lesion (model frame): slot, area in pixels and pixel-edge box ``[xmin, ymin, xmax, ymax]``."""
        out = []
        for i in range(self.num_lesions):
            rows, cols = np.nonzero(self.lesion_masks[i] > 0)
            out.append({
                "slot": i,
                "area_px": int(rows.size),
                "box": [int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1],
            })
        return out

    def summary(self) -> dict[str, Any]:
        """A JSON-friendly summary without arrays (for logs and the DICOM description)."""
        return {
            "case_id": self.case_id,
            "image_size": self.image_size,
            "max_lesions": self.max_lesions,
            "num_lesions": self.num_lesions,
            "mask_mode": self.source.get("mask", {}).get("mode"),
            "feature_mode": self.source.get("features", {}).get("mode"),
            "source_geometry": self.geometry is not None,
            "lesions": self.lesions(),
            "n_clipped": int(self.clipping.get("n_clipped", 0)) if self.clipping else 0,
        }

    def to_batch(self, device: Any = None) -> dict[str, Any]:
        """Torch tensors with a batch dimension of 1: ``label`` (1, 1, S, S) float32, ``lesion_masks`` (1, L, S, S),
        ``features`` (1, L, 67), ``lesion_present`` (1, L) — the layout of :mod:`custom.data.training` batches."""
        import torch

        def t(a: np.ndarray) -> torch.Tensor:
            return torch.as_tensor(np.ascontiguousarray(a), dtype=torch.float32, device=device)[None]

        return {
            "label": t(self.label[None].astype(np.float32)),
            "lesion_masks": t(self.lesion_masks),
            "features": t(self.features),
            "lesion_present": t(self.lesion_present),
        }


# ---------------------------------------------------------------------------------------------------- helpers
def _file_info(path: str | os.PathLike) -> dict[str, str]:
    """Base name and SHA-256 of a file: provenance without the folder path (which may name a patient)."""
    p = Path(path)
    info = {"name": p.name}
    try:
        info["sha256"] = hashlib.sha256(p.read_bytes()).hexdigest()
    except OSError:
        pass
    return info


def _values_text(values: Sequence[Any], limit: int = 12) -> str:
    vals = [int(v) if float(v).is_integer() else float(v) for v in values]
    text = ", ".join(str(v) for v in vals[:limit])
    return text + (f", ... ({len(vals)} distinct values)" if len(vals) > limit else "")


def _load(path: str | os.PathLike, what: str) -> np.ndarray:
    from custom.data.mask_io import load_mask_file

    path = Path(path)
    if not path.exists():
        raise MammoInputError(path, f"{what} not found")
    return load_mask_file(path)


def _binary(arr: np.ndarray, path, what: str) -> np.ndarray:
    """A binary mask with values {0, 1} or {0, 255} (or only one of them) -> bool."""
    values = np.unique(arr)
    allowed = ({0, 1}, {0, 255})
    if not any(set(values.tolist()) <= a for a in allowed):
        unexpected = sorted(set(values.tolist()) - {0, 1, 255})
        if not unexpected:  # both 1 and 255
            unexpected = [1, 255]
        raise MammoInputError(
            path,
            f"{what} must be binary (values 0/1 or 0/255), found unexpected value(s) {_values_text(unexpected)} "
            f"(all values: {_values_text(values)})",
        )
    return arr > 0


def _order_components(mask: np.ndarray) -> np.ndarray:
    """8-connected components of ``mask`` numbered 1..K by the row-major position of their first pixel."""
    labels, n = ndimage.label(mask, structure=_EIGHT)
    if n == 0:
        return np.zeros(mask.shape, dtype=np.int32)
    flat = labels.ravel()
    idx = np.flatnonzero(flat)
    first = np.full(n + 1, flat.size, dtype=np.int64)
    np.minimum.at(first, flat[idx], idx)
    order = np.argsort(first[1:], kind="stable") + 1  # old labels, in first-pixel order
    remap = np.zeros(n + 1, dtype=np.int32)
    remap[order] = np.arange(1, n + 1, dtype=np.int32)
    return remap[labels]


def _lesion_instances(arr: np.ndarray, path) -> tuple[np.ndarray, str]:
    """Lesion mask -> instances 1..K (int32) and how they were found (``"components"`` or ``"instance_ids"``)."""
    values = np.unique(arr)
    nonzero = values[values != 0]
    if values.min() < 0 or values.max() > 255:
        bad = [v for v in values.tolist() if v < 0 or v > 255]
        raise MammoInputError(
            path, f"lesion mask values must be 0/1, 0/255 or instance ids 0..255; found {_values_text(bad)}"
        )
    if nonzero.size <= 1:
        return _order_components(arr > 0), "components"
    out = np.zeros(arr.shape, dtype=np.int32)
    for k, v in enumerate(nonzero.tolist(), start=1):  # ascending instance id
        out[arr == v] = k
    return out, "instance_ids"


def _parse_boxes(lesion_box: Any) -> list[list[float]]:
    """``[xmin, ymin, xmax, ymax]``, a list of them, or a string ``"x0,y0,x1,y1"`` / JSON -> list of boxes."""
    box = lesion_box
    if isinstance(box, str):
        text = box.strip()
        if len(text) > 100_000:
            raise MammoInputError("lesion_box", f"too long ({len(text)} characters)")
        try:
            box = json.loads(text if text.startswith("[") else f"[{text}]")
        except (ValueError, RecursionError):  # garbled, a number too long to convert, nesting too deep
            raise MammoInputError("lesion_box", f"not a box [xmin, ymin, xmax, ymax]: {lesion_box[:80]!r}") from None
    if hasattr(box, "tolist"):
        box = box.tolist()
    if not isinstance(box, (list, tuple)) or not box:
        raise MammoInputError("lesion_box", f"expected [xmin, ymin, xmax, ymax] or a list of such boxes, got {lesion_box!r}")
    boxes = [box] if not isinstance(box[0], (list, tuple)) else list(box)
    if len(boxes) > 255:
        raise MammoInputError("lesion_box", f"{len(boxes)} boxes; at most 255")
    out = []
    for i, b in enumerate(boxes):
        shown = repr(b)[:80]
        if not isinstance(b, (list, tuple)) or any(isinstance(v, (bool, list, tuple, dict)) for v in b):
            raise MammoInputError("lesion_box", f"box {i}: expected 4 numbers [xmin, ymin, xmax, ymax], got {shown}")
        try:
            vals = [float(v) for v in b]
        except (TypeError, ValueError, OverflowError):
            raise MammoInputError("lesion_box", f"box {i}: values must be numbers, got {shown}") from None
        if len(vals) != 4 or not all(math.isfinite(v) and abs(v) <= MAX_COORDINATE for v in vals):
            raise MammoInputError("lesion_box", f"box {i}: expected 4 finite numbers [xmin, ymin, xmax, ymax] within "
                                                f"+-{MAX_COORDINATE:g} pixels, got {shown}")
        if vals[2] <= vals[0] or vals[3] <= vals[1]:
            raise MammoInputError("lesion_box", f"box {i} {vals}: needs xmax > xmin and ymax > ymin")
        out.append(vals)
    return out


def _inside_fraction(breast: np.ndarray, lesion: np.ndarray, others: np.ndarray) -> float:
    """How much a lesion lies inside the breast: the larger of (a) the share of its pixels inside the breast with
    holes filled and (b) the share of its 1-pixel outer ring that is breast or another lesion. (a) handles breast
    masks that include the lesion; (b) handles label maps, where lesion pixels are not breast pixels and a lesion at
    the skin line makes a notch rather than a hole."""
    filled = ndimage.binary_fill_holes(breast)
    a = float(filled[lesion].mean())
    ring = ndimage.binary_dilation(lesion, structure=_EIGHT) & ~lesion
    b = float((breast | others)[ring].mean()) if ring.any() else 0.0
    return max(a, b)


def _check_lesions(breast: np.ndarray, instances: np.ndarray, source, where: str = "") -> None:
    for k in range(1, int(instances.max(initial=0)) + 1):
        lesion = instances == k
        if not lesion.any():
            raise MammoInputError(source, f"lesion {k - 1}{where} is hidden by an overlapping lesion (no pixel left)")
        inside = _inside_fraction(breast, lesion, (instances > 0) & ~lesion)
        if inside < MIN_LESION_INSIDE:
            rows, cols = np.nonzero(lesion)
            raise MammoInputError(
                source,
                f"lesion {k - 1}{where} lies outside the breast (only {100 * inside:.0f}% inside; lesion at rows "
                f"{rows.min()}-{rows.max()}, columns {cols.min()}-{cols.max()})",
            )


def _laterality_arg(laterality: Any) -> str | None:
    if laterality is None or (isinstance(laterality, str) and not laterality.strip()):
        return None
    text = str(laterality).strip().upper()
    if text in ("L", "LEFT"):
        return "L"
    if text in ("R", "RIGHT"):
        return "R"
    raise MammoInputError("laterality", f"must be 'L', 'R' or None, got {laterality!r}")


def _source_image_info(path: str | os.PathLike) -> dict[str, Any]:
    """Shape and laterality tag of the source image (DICOM header only, or PNG size)."""
    path = Path(path)
    if path.suffix.lower() == ".png":
        from PIL import Image

        try:
            with Image.open(path) as im:
                w, h = im.size
        except FileNotFoundError:
            raise MammoInputError(path, "source image not found") from None
        except Exception as err:
            raise MammoInputError(path, f"unreadable source image ({err})") from None
        return {"shape": (h, w), "laterality": None, "view_position": None}
    from custom.dicom import header_int, laterality_from_header, read_dicom_header

    ds = read_dicom_header(path)  # Rows and Columns validated there
    return {
        "shape": (header_int(ds, "Rows", str(path)), header_int(ds, "Columns", str(path))),
        "laterality": laterality_from_header(ds),
        "view_position": str(ds.get("ViewPosition", "")) or None,
    }


def _resize_lesions(geom: MammoGeometry, instances: np.ndarray, source, size: int) -> np.ndarray:
    """Each lesion resized on its own as a binary mask (area + threshold), later lesions on top (as ``prepare``)."""
    out = np.zeros(geom.output_shape, dtype=np.int32)
    for k in range(1, int(instances.max(initial=0)) + 1):
        lesion = instances == k
        m = geom.apply_image(lesion.astype(np.float32)[None], "mask")[0].numpy() > 0
        if not m.any():
            raise MammoInputError(
                source,
                f"lesion {k - 1} ({int(lesion.sum())} pixels) vanishes at the model resolution {size}x{size} "
                f"(smaller than one pixel after the {geom.scale:.3g}x resize): draw it larger",
            )
        out[m] = k
    for k in range(1, int(instances.max(initial=0)) + 1):
        if not (out == k).any():
            raise MammoInputError(
                source, f"lesion {k - 1} is covered by an overlapping lesion at the model resolution {size}x{size}"
            )
    return out


# ---------------------------------------------------------------------------------------------------- masks
def _read_masks(mask_file, breast_mask_file, lesion_mask_file, lesion_box):
    """Load the mask inputs -> (breast bool, instances int32, mode, source dict, the file to blame for lesions)."""
    given = {k: v is not None for k, v in
             dict(mask_file=mask_file, breast_mask_file=breast_mask_file, lesion_mask_file=lesion_mask_file,
                  lesion_box=lesion_box).items()}
    if mask_file is not None:
        extra = [k for k in ("breast_mask_file", "lesion_box") if given[k]]
        if extra:
            raise MammoInputError(mask_file, f"give either a 3-class label map (mask_file) or a breast mask, not both "
                                             f"(also given: {', '.join(extra)})")
        arr = _load(mask_file, "label map")
        values = np.unique(arr)
        unexpected = [v for v in values.tolist() if v not in (0, 1, 2)]
        if unexpected:
            hint = " (a binary breast mask goes to breast_mask_file)" if set(values.tolist()) <= {0, 255} else ""
            raise MammoInputError(
                mask_file,
                f"a 3-class label map holds only 0 (background), 1 (breast), 2 (lesion); found unexpected value(s) "
                f"{_values_text(unexpected)}{hint}",
            )
        if not (arr == 1).any():
            raise MammoInputError(mask_file, "empty breast: the label map has no breast pixel (value 1)")
        breast = arr == 1
        src = {"mode": "label_map", "mask_file": _file_info(mask_file), "lesion_order": "components"}
        if lesion_mask_file is None:
            return breast, _order_components(arr == LESION), src, mask_file
        # the lesion instance map of the label map (``prepare``'s lesions/<id>.png): lesion identity by instance id
        inst = _load(lesion_mask_file, "lesion instance map")
        if inst.shape != arr.shape:
            raise MammoInputError(lesion_mask_file, f"lesion instance map size {inst.shape[0]}x{inst.shape[1]} differs "
                                                    f"from the label map {Path(mask_file).name} size "
                                                    f"{arr.shape[0]}x{arr.shape[1]}")
        instances, order = _lesion_instances(inst, lesion_mask_file)
        if not np.array_equal(instances > 0, arr == LESION):
            n_diff = int(((instances > 0) != (arr == LESION)).sum())
            raise MammoInputError(lesion_mask_file, f"the lesion instance map does not match the lesions of the label "
                                                    f"map {Path(mask_file).name} ({n_diff} pixel(s) differ): give the "
                                                    "instance map written with that label map")
        src.update(lesion_mask_file=_file_info(lesion_mask_file), lesion_order=order)
        return breast, instances, src, mask_file
    if breast_mask_file is None:
        if given["lesion_mask_file"] or given["lesion_box"]:
            what = lesion_mask_file if given["lesion_mask_file"] else "lesion_box"
            raise MammoInputError(what, "a lesion needs a breast: give breast_mask_file too (or a 3-class mask_file)")
        raise MammoInputError("mask", "no mask given: use mask_file (3-class label map) or breast_mask_file "
                                      "(+ lesion_mask_file or lesion_box)")
    if given["lesion_mask_file"] and given["lesion_box"]:
        raise MammoInputError(lesion_mask_file, "give either a lesion mask file or a lesion box, not both")
    breast = _binary(_load(breast_mask_file, "breast mask"), breast_mask_file, "breast mask")
    if not breast.any():
        raise MammoInputError(breast_mask_file, "empty breast: the breast mask has no nonzero pixel")
    h, w = breast.shape
    if lesion_mask_file is not None:
        arr = _load(lesion_mask_file, "lesion mask")
        if arr.shape != breast.shape:
            raise MammoInputError(
                lesion_mask_file,
                f"lesion mask size {arr.shape[0]}x{arr.shape[1]} (rows x columns) differs from the breast mask "
                f"{Path(breast_mask_file).name} size {h}x{w}",
            )
        if not (arr != 0).any():
            raise MammoInputError(lesion_mask_file, "empty lesion mask: no nonzero pixel (for a breast without lesion, "
                                                    "leave lesion_mask_file out)")
        instances, order = _lesion_instances(arr, lesion_mask_file)
        src = {"mode": "breast_and_lesion_masks", "breast_mask_file": _file_info(breast_mask_file),
               "lesion_mask_file": _file_info(lesion_mask_file), "lesion_order": order}
        return breast, instances, src, lesion_mask_file
    if lesion_box is not None:
        boxes = _parse_boxes(lesion_box)
        for i, (x0, y0, x1, y1) in enumerate(boxes):
            if x1 <= 0 or y1 <= 0 or x0 >= w or y0 >= h:
                raise MammoInputError("lesion_box", f"box {i} {[x0, y0, x1, y1]} lies outside the mask "
                                                    f"{Path(breast_mask_file).name} ({w}x{h} pixels, width x height)")
        if len(boxes) > 255:
            raise MammoInputError("lesion_box", f"{len(boxes)} boxes; at most 255")
        instances = lesion_instances_from_boxes((h, w), boxes, kind="ellipse").astype(np.int32)
        for k in range(1, len(boxes) + 1):
            if not (instances == k).any():
                raise MammoInputError("lesion_box", f"box {k - 1} {boxes[k - 1]} covers no pixel (too small, or "
                                                    "hidden by a later box)")
        src = {"mode": "breast_mask_and_box", "breast_mask_file": _file_info(breast_mask_file),
               "lesion_box": boxes, "lesion_order": "box_order"}
        return breast, instances, src, f"lesion_box (on {Path(breast_mask_file).name})"
    src = {"mode": "breast_mask_only", "breast_mask_file": _file_info(breast_mask_file), "lesion_order": None}
    return breast, np.zeros(breast.shape, dtype=np.int32), src, breast_mask_file


# ---------------------------------------------------------------------------------------------------- identity
def _check_identity(rows: list[dict], n_lesions: int, mask_src: dict, lesion_source, feat_src: dict) -> None:
    """Refuse to pair lesions with feature rows by position when that pairing is a guess.

    A feature row belongs to one lesion through its ``lesion_index``; the mask must say which lesion that is. An
    instance map (ids), a list of boxes (box order) or a single lesion does; the connected components of a label map
    or binary mask do not (their first-pixel order is not the order in which ``prepare`` numbered them). With two or
    more lesions of that kind and feature rows that differ, the pairing would silently give one lesion the other's
    features, so it is an error; identical rows (one preset for every lesion) pair the same in any order."""
    if n_lesions < 2 or len(rows) < 2:
        return
    ambiguous = []
    if mask_src.get("lesion_order") == "components":
        ambiguous.append(str(lesion_source))
    if feat_src.get("lesion_order") == "components":
        ambiguous.append(str(feat_src.get("reference_lesion_mask", {}).get("name", "reference_lesion_mask")))
    if not ambiguous:
        return
    values = [[r.get(k) for k in sorted(r) if k not in ("case_id", "lesion_index")] for r in rows]
    if all(v == values[0] for v in values[1:]):
        return
    raise MammoInputError(
        ambiguous[0],
        f"{n_lesions} lesions without identity (the separate regions of a label map or binary mask have no lesion "
        "number) but different features per lesion: give the lesion instance map (lesion_mask_file, value k = "
        "lesion_index k-1, e.g. data/prepared/lesions/<case_id>.png beside the label map), or one box per lesion in "
        "lesion_index order",
    )


# ---------------------------------------------------------------------------------------------------- features
def _rows_from_file(feature_file, feature_case_id) -> tuple[list[dict], str]:
    from custom.features.feature_file import read_feature_file

    rows = read_feature_file(feature_file)  # its MammoInputError (names, NaN, ...) reaches the user unchanged
    cases = list(dict.fromkeys(r["case_id"] for r in rows))
    if feature_case_id is not None:
        feature_case_id = str(feature_case_id)
        if feature_case_id not in cases:
            shown = ", ".join(repr(c) for c in cases[:10]) + (f", ... ({len(cases)} cases)" if len(cases) > 10 else "")
            raise MammoInputError(feature_file, f"no rows for feature_case_id {feature_case_id!r}; the file holds "
                                                f"{shown or 'no case'}")
        case = feature_case_id
    elif len(cases) == 1:
        case = cases[0]
    elif not cases:
        raise MammoInputError(feature_file, "the feature file holds no lesion row")
    else:
        shown = ", ".join(repr(c) for c in cases[:10]) + (", ..." if len(cases) > 10 else "")
        raise MammoInputError(feature_file, f"the file holds {len(cases)} cases ({shown}): choose one with "
                                            "feature_case_id")
    chosen = sorted((r for r in rows if r["case_id"] == case), key=lambda r: r["lesion_index"])
    indices = [r["lesion_index"] for r in chosen]
    if indices != list(range(len(chosen))):
        raise MammoInputError(feature_file, f"case {case!r}: lesion_index values must be 0..{len(chosen) - 1} "
                                            f"(one row per lesion), got {indices}")
    return chosen, case


def _rows_from_reference(reference_image, reference_lesion_mask, params_file, image_size: int, settings) -> list[dict]:
    """Features of the reference lesions, measured exactly as ``prepare`` measures training lesions."""
    from custom.data.cases import MammoCase
    from custom.data.prepare import preprocess_case
    from custom.features.radiomics import extract_lesion_features, read_image_png, read_instance_png

    ref = Path(reference_image)
    if not ref.exists():
        raise MammoInputError(ref, "reference image not found")
    if not Path(reference_lesion_mask).exists():
        raise MammoInputError(reference_lesion_mask, "reference lesion mask not found")
    case = MammoCase(case_id="reference", image_path=str(ref), study_id="reference",
                     mask_path=str(reference_lesion_mask))
    with tempfile.TemporaryDirectory(prefix="mammo_gcdm_reference_") as tmp:
        record = preprocess_case(case, tmp, settings)
        image = read_image_png(Path(tmp) / record["image"])
        instances = read_instance_png(Path(tmp) / record["lesions"])
    rows = []
    for k in range(1, int(record["num_lesions"]) + 1):
        feats = extract_lesion_features(
            image, instances == k, params_file,
            source=f"{reference_lesion_mask} (reference lesion {k - 1}, at {image_size}x{image_size})",
        )
        rows.append({"case_id": f"reference:{ref.name}", "lesion_index": k - 1, **feats})
    return rows


def _mask_order(path) -> str:
    """``"instance_ids"`` when a lesion mask holds several nonzero values (an instance map), else ``"components"``."""
    from custom.data.mask_io import load_mask_file

    values = np.unique(load_mask_file(path))
    return "instance_ids" if (values != 0).sum() > 1 else "components"


# ---------------------------------------------------------------------------------------------------- main
def build_conditions(
    *,
    image_size: int,
    normaliser_file: str | os.PathLike,
    max_lesions: int = 2,
    mask_file: str | os.PathLike | None = None,
    breast_mask_file: str | os.PathLike | None = None,
    lesion_mask_file: str | os.PathLike | None = None,
    lesion_box: Any = None,
    feature_file: str | os.PathLike | None = None,
    feature_case_id: str | None = None,
    reference_image: str | os.PathLike | None = None,
    reference_lesion_mask: str | os.PathLike | None = None,
    params_file: str | os.PathLike | None = None,
    source_image: str | os.PathLike | None = None,
    laterality: str | None = None,
    case_id: str = "synthetic",
    margin: float = 0.02,
    border: float = 0.01,
) -> Conditions:
    """Build and validate the conditions of one case (see the module docstring for the input forms).

    Args:
        image_size: model side ``S``.
        normaliser_file: the bundle's ``feature_normalisation.json``.
        max_lesions: lesion slots of the model.
        mask_file: 3-class label map; or ``breast_mask_file`` (+ ``lesion_mask_file`` or ``lesion_box``).
        lesion_box: ``[xmin, ymin, xmax, ymax]`` (or a list of boxes, or ``"x0,y0,x1,y1"``) in mask pixels.
        feature_file: CSV/JSON feature file with raw values; ``feature_case_id`` picks the case when it has several.
        reference_image, reference_lesion_mask: a reference image (DICOM MG or PNG) and its lesion mask (same size):
            the features are measured on it (instead of ``feature_file``).
        params_file: PyRadiomics parameters (default: the bundle's ``radiomics_params.yaml``).
        source_image: the image the (source-size) mask belongs to: its size is checked against the mask and its
            laterality tag used; optional.
        laterality: ``"L"``/``"R"``, overrides the tag / content decision.
        case_id: name of the case.
        margin, border: the ``prepare`` settings (crop margin, breast-detection border), which must match training.

    Raises:
        MammoInputError: see the module docstring; the message names the file (or argument) and the problem.
    """
    from custom.data.prepare import PreprocessSettings
    from custom.features.feature_file import rows_to_matrix
    from custom.features.normalisation import FeatureNormaliser

    size = int(image_size)
    if size < 8:
        raise MammoInputError("image_size", f"must be at least 8, got {image_size!r}")
    if int(max_lesions) < 1:
        raise MammoInputError("max_lesions", f"must be at least 1, got {max_lesions!r}")
    max_lesions = int(max_lesions)
    lat_arg = _laterality_arg(laterality)
    if feature_file is not None and (reference_image is not None or reference_lesion_mask is not None):
        raise MammoInputError(feature_file, "give features either as a feature file or as a reference lesion "
                                            "(reference_image + reference_lesion_mask), not both")
    if (reference_image is None) != (reference_lesion_mask is None):
        missing = "reference_lesion_mask" if reference_lesion_mask is None else "reference_image"
        given = reference_image if reference_image is not None else reference_lesion_mask
        raise MammoInputError(given, f"a reference lesion needs both reference_image and reference_lesion_mask "
                                     f"({missing} is missing)")
    normaliser = FeatureNormaliser.load(normaliser_file)

    # ------------------------------------------------------------------ masks, at their own resolution
    breast, instances, mask_src, lesion_source = _read_masks(mask_file, breast_mask_file, lesion_mask_file, lesion_box)
    n_lesions = int(instances.max(initial=0))
    if n_lesions > max_lesions:
        raise MammoInputError(lesion_source, f"{n_lesions} lesions in the mask, but the model has only {max_lesions} "
                                             f"lesion slot(s) (max_lesions)")
    _check_lesions(breast, instances, lesion_source)
    h, w = breast.shape
    mask_src["mask_shape"] = [h, w]

    source_info = _source_image_info(source_image) if source_image is not None else None
    if source_info is not None:
        mask_src["source_image"] = _file_info(source_image)
    geometry = None
    if (h, w) == (size, size):
        inst_out = instances
        breast_out = breast | (instances > 0)
        mask_src["frame"] = "model"
        if chest_wall_side(breast_out) == "right":
            logger.warning("%s: the %dx%d mask is used as is (model frame) but its chest wall is on the right; "
                           "prepared data has it on the left", case_id, size, size)
            mask_src["note"] = "model-frame mask with the chest wall on the right"
    else:
        mask_file_for_size = mask_file or breast_mask_file
        if source_info is not None and tuple(source_info["shape"]) != (h, w):
            sh, sw = source_info["shape"]
            raise MammoInputError(
                mask_file_for_size,
                f"mask size {h}x{w} (rows x columns) differs from the source image {Path(source_image).name} "
                f"size {sh}x{sw}",
            )
        if lat_arg is not None:
            lat, lat_source = lat_arg, "argument"
        elif source_info is not None and source_info["laterality"] is not None:
            lat, lat_source = source_info["laterality"], "source_image_tag"
        else:
            lat, lat_source = None, "mask_content"
        region = breast | (instances > 0)
        geometry, info = compute_geometry(region, lat, size, margin)
        breast_out = geometry.apply_image(region.astype(np.float32)[None], "mask")[0].numpy() > 0
        inst_out = _resize_lesions(geometry, instances, lesion_source, size)
        mask_src.update(frame="source", laterality=lat or ("R" if geometry.flip else "L"),
                        laterality_source=lat_source, laterality_conflict=bool(info["laterality_conflict"]))
        if info["laterality_conflict"]:
            logger.warning("%s: laterality %s (%s) disagrees with the mask content (chest wall side)",
                           case_id, lat, lat_source)
    label = label_map(breast_out, inst_out)
    if not (label == 1).any():
        raise MammoInputError(mask_file or breast_mask_file, "empty breast at the model resolution: the lesions "
                                                             "cover the whole breast")

    # ------------------------------------------------------------------ features
    feat_src: dict[str, Any]
    rows: list[dict] = []
    if feature_file is not None:
        rows, chosen_case = _rows_from_file(feature_file, feature_case_id)
        feat_src = {"mode": "feature_file", "feature_file": _file_info(feature_file), "feature_case_id": chosen_case}
        feature_source = feature_file
    elif reference_image is not None:
        settings = PreprocessSettings(image_size=size, margin=float(margin), border=float(border))
        params = Path(params_file) if params_file is not None else DEFAULT_PARAMS_FILE
        rows = _rows_from_reference(reference_image, reference_lesion_mask, params, size, settings)
        feat_src = {"mode": "reference_lesion", "reference_image": _file_info(reference_image),
                    "reference_lesion_mask": _file_info(reference_lesion_mask), "params_file": _file_info(params),
                    "preprocessing": {"image_size": size, "margin": float(margin), "border": float(border)},
                    "lesion_order": _mask_order(reference_lesion_mask)}
        feature_source = reference_lesion_mask
    else:
        feat_src = {"mode": "none"}
        feature_source = None
    mask_name = Path(str(lesion_source)).name if lesion_box is None else "lesion_box"
    if feature_source is not None and n_lesions == 0:
        raise MammoInputError(feature_source, f"features for {len(rows)} lesion(s) were given, but the mask "
                                              f"({mask_name}) has no lesion")
    if feature_source is None and n_lesions > 0:
        raise MammoInputError(lesion_source, f"the mask has {n_lesions} lesion(s) but no lesion features were given "
                                             "(feature_file, or reference_image + reference_lesion_mask)")
    if feature_source is not None and len(rows) != n_lesions:
        what = "feature row(s)" if feature_file is not None else "reference lesion(s)"
        raise MammoInputError(feature_source, f"{len(rows)} {what} but {n_lesions} lesion(s) in the mask "
                                              f"({mask_name}): the counts must match")

    _check_identity(rows, n_lesions, mask_src, lesion_source, feat_src)

    features = np.zeros((max_lesions, N_FEATURES), dtype=np.float32)
    present = np.zeros((max_lesions,), dtype=np.float32)
    clipping: dict = {}
    if rows:
        y, report = normaliser.transform(rows_to_matrix(rows))
        features[:n_lesions] = y
        present[:n_lesions] = 1.0
        clipping = report.to_dict()
        if report.clipped:
            logger.warning("%s: lesion features outside the training range were clipped: %s", case_id,
                           report.summary())
    lesion_masks = np.stack([(inst_out == k + 1) for k in range(max_lesions)]).astype(np.float32)
    return Conditions(
        case_id=str(case_id),
        label=label.astype(np.uint8),
        lesion_masks=lesion_masks,
        features=features,
        lesion_present=present,
        geometry=geometry,
        raw_features=[dict(r) for r in rows],
        clipping=clipping,
        source={"mask": mask_src, "features": feat_src, "normaliser_file": _file_info(normaliser_file),
                "image_size": size, "max_lesions": max_lesions, "num_lesions": n_lesions},
    )
