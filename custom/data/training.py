"""Loading a prepared dataset (the output of ``prepare``) for training and evaluation.

An item of :func:`load_prepared_datalist` is a dict::

    {"case_id": str, "image": path, "label": path, "lesions": path,
     "features": float32 (max_lesions, 67) normalised to [0, 1] (NO_LESION_VECTOR = zeros in empty slots),
     "lesion_present": float32 (max_lesions,) 1.0 where the slot holds a lesion, "num_lesions": int,
     "view": str, "laterality": str, "density": str | None, "split": str}

and :func:`prepared_transforms` turns it into tensors::

    image        (1, S, S) float32 in [0, 1]      the mammogram (16-bit source precision)
    label        (1, S, S) float32 in {0, 1, 2}    background / breast / lesion
    soft_mask    (3, S, S) float32                 [background, breast, lesion]; lesion channel blurred by sigma px
    lesion_masks (L, S, S) float32 in {0, 1}       one binary mask per lesion slot
    features     (L, 67)   float32 in [0, 1]
    lesion_present (L,)    float32 in {0, 1}
"""

from __future__ import annotations

import json
import logging
import os
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
from monai.data import PILReader
from monai.transforms import Compose, EnsureTyped, LoadImaged, Resized, ScaleIntensityRanged

from custom.errors import MammoInputError
from custom.transforms.masks import LesionSlotsd, SoftMaskd

__all__ = ["SPLITS", "load_prepared_datalist", "prepared_transforms", "model_frame"]

logger = logging.getLogger(__name__)
SPLITS = ("training", "validation", "test")


def load_prepared_datalist(
    prepared_dir: str | os.PathLike,
    split: str,
    feature_file: str | os.PathLike | None = None,
    normalisation_file: str | os.PathLike | None = None,
    max_lesions: int = 2,
    require_lesion: bool = False,
    limit: int | None = None,
) -> list[dict[str, Any]]:
    """Items of one split with absolute paths and normalised lesion features attached.

    Args:
        prepared_dir: output folder of ``prepare`` (holds ``datalist.json``).
        split: ``"training"``, ``"validation"`` or ``"test"``.
        feature_file: raw feature file (default ``<prepared_dir>/features.csv``).
        normalisation_file: normaliser fitted on the training split (default
            ``<prepared_dir>/feature_normalisation.json``).
        max_lesions: lesion slots per image; extra lesions are dropped from the conditions (counted in the log).
        require_lesion: keep only images with at least one lesion (GCDM trains on images with masses).
        limit: keep the first ``limit`` items (small runs, tests).

    Raises:
        MammoInputError: missing datalist/split, or a feature file that does not match the datalist (cases or
        lesions without features are listed).
    """
    from custom.features.feature_file import read_feature_file
    from custom.features.normalisation import FeatureNormaliser

    root = Path(prepared_dir)
    datalist_path = root / "datalist.json"
    if not datalist_path.is_file():
        raise MammoInputError(datalist_path, "datalist not found: run `prepare` first")
    try:
        datalist = json.loads(datalist_path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise MammoInputError(datalist_path, f"unreadable datalist ({err})") from err
    if split not in datalist:
        raise MammoInputError(datalist_path, f"no {split!r} list (has {', '.join(datalist)})")
    entries = [e for e in datalist[split] if e.get("num_lesions", 0) > 0 or not require_lesion]
    if limit is not None:
        entries = entries[: int(limit)]

    feature_file = Path(feature_file) if feature_file else root / "features.csv"
    normalisation_file = Path(normalisation_file) if normalisation_file else root / "feature_normalisation.json"
    rows = read_feature_file(feature_file)
    normaliser = FeatureNormaliser.load(normalisation_file)
    by_case: dict[str, dict[int, dict]] = defaultdict(dict)
    for row in rows:
        by_case[str(row["case_id"])][int(row["lesion_index"])] = row

    missing, truncated, items = [], 0, []
    for e in entries:
        n = int(e.get("num_lesions", 0))
        have = by_case.get(str(e["case_id"]), {})
        absent = [i for i in range(n) if i not in have]
        if absent:
            missing.append(f"{e['case_id']} lesion(s) {absent}")
            continue
        truncated += n > max_lesions
        features = np.zeros((max_lesions, 67), dtype=np.float32)
        present = np.zeros((max_lesions,), dtype=np.float32)
        if n:
            from custom.features.feature_file import rows_to_matrix

            k = min(n, max_lesions)
            features[:k], _ = normaliser.transform(rows_to_matrix([have[i] for i in range(k)]))
            present[:k] = 1.0
        items.append(
            {
                "case_id": e["case_id"],
                "image": str(root / e["image"]),
                "label": str(root / e["label"]),
                "lesions": str(root / e["lesions"]),
                "features": features,
                "lesion_present": present,
                "num_lesions": n,
                "view": e.get("view"),
                "laterality": e.get("laterality"),
                "density": e.get("density"),
                "split": split,
            }
        )
    if missing:
        shown = "; ".join(missing[:10]) + (f"; … {len(missing) - 10} more" if len(missing) > 10 else "")
        raise MammoInputError(feature_file, f"feature file does not match the datalist {datalist_path}: no features for {shown}")
    if truncated:
        logger.warning("%d %s image(s) have more than %d lesions; the extra lesions get no condition", truncated, split, max_lesions)
    return items


def prepared_transforms(image_size: int | None = None, sigma: float = 1.5, max_lesions: int = 2) -> Compose:
    """Dictionary transforms from a :func:`load_prepared_datalist` item to tensors (see the module docstring).

    Args:
        image_size: model side length; ``None`` keeps the prepared size. Masks are resized by nearest neighbour,
            the image by area averaging; the soft mask is computed *after* resizing, so ``sigma`` is in model pixels.
        sigma: soft-mask Gaussian sigma in pixels (0 = hard mask).
        max_lesions: lesion slots (must match the datalist's).
    """
    keys = ["image", "label", "lesions"]
    xforms: list = [
        LoadImaged(keys=keys, reader=PILReader(reverse_indexing=False), image_only=True, ensure_channel_first=True),
        ScaleIntensityRanged(keys="image", a_min=0.0, a_max=65535.0, b_min=0.0, b_max=1.0, clip=True),
    ]
    if image_size is not None:
        xforms.append(Resized(keys=keys, spatial_size=(int(image_size), int(image_size)), mode=("area", "nearest-exact", "nearest-exact")))
    xforms += [
        LesionSlotsd(keys="lesions", max_lesions=max_lesions, output_key="lesion_masks"),
        SoftMaskd(keys="label", sigma=sigma, output_key="soft_mask"),
        EnsureTyped(keys=["image", "label", "soft_mask", "lesion_masks", "features", "lesion_present"], dtype="float32", track_meta=False),
    ]
    return Compose(xforms)


def model_frame(transform: Compose, root: str | os.PathLike, entry: dict[str, Any], max_lesions: int = 8) -> dict[str, Any]:
    """One prepared datalist ``entry`` (paths relative to ``root``) through ``transform``
    (:func:`prepared_transforms` built with ``max_lesions`` slots): ``image`` ``(1, S, S)`` in [0, 1], ``label``,
    ``lesion_masks`` ``(L, S, S)`` as training sees them. The lesion features are not read (zeros)."""
    root = Path(root)
    return transform({"image": str(root / entry["image"]), "label": str(root / entry["label"]),
                      "lesions": str(root / entry["lesions"]), "features": np.zeros((max_lesions, 67), np.float32),
                      "lesion_present": np.zeros(max_lesions, np.float32)})
