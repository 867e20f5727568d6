"""Reading lesion (or label) mask files: PNG, NIfTI and DICOM SEG, all returned rows first as ``(H, W)``.

- PNG (8 or 16 bit, grayscale or palette): the pixel values as stored.
- NIfTI (``.nii``, ``.nii.gz``): voxel index order ``(i, j[, 1])`` as written by ITK, 3D Slicer and MONAI, where
  ``i`` runs along image columns, so the array is transposed to ``(rows, columns)``.
- DICOM SEG: the union of all segment frames (binary; fractional segments thresholded at half their maximum).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from custom.errors import MammoInputError

__all__ = ["load_mask_file", "MASK_SUFFIXES"]

MASK_SUFFIXES = (".png", ".nii", ".nii.gz", ".dcm", ".dicom")


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


def load_mask_file(path: str | os.PathLike, expected_shape: tuple[int, int] | None = None,
                   referenced_sop_instance_uid: str | None = None) -> np.ndarray:
    """Load a mask file as an ``(H, W)`` integer array.

    Args:
        path: a PNG, NIfTI or DICOM SEG file.
        expected_shape: if given, the ``(H, W)`` the mask must have (the image's shape).
        referenced_sop_instance_uid: DICOM SEG only: the SOP Instance UID of the image the mask is for; only the
            frames that reference it are used (a SEG may cover several source images). Without it, a SEG whose
            frames reference more than one image is refused.

    Raises:
        MammoInputError: unreadable file, unsupported format, not 2D, or the wrong size; a SEG without frames of the
        image, or covering several images when the image is not named.
    """
    path = Path(path)
    try:
        found = path.is_file()
    except OSError as err:  # e.g. a file name longer than the file system allows
        raise MammoInputError(path, f"unusable mask path ({err.strerror or err})") from None
    if not found:
        raise MammoInputError(path, "mask file not found")
    suffix = _suffix(path)
    try:
        if suffix == ".png":
            from PIL import Image

            with Image.open(path) as im:
                arr = np.asarray(im)
        elif suffix in (".nii", ".nii.gz"):
            import nibabel as nib

            arr = np.asarray(nib.load(str(path)).dataobj)
            arr = np.squeeze(arr)
            if arr.ndim == 2:
                arr = arr.T
        elif suffix in (".dcm", ".dicom"):
            arr = _load_dicom_seg(path, referenced_sop_instance_uid)
        else:
            raise MammoInputError(path, f"unsupported mask format {suffix!r} (use one of {', '.join(MASK_SUFFIXES)})")
    except MammoInputError:
        raise
    except Exception as err:
        raise MammoInputError(path, f"unreadable mask file ({type(err).__name__}: {err})") from err
    if arr.ndim != 2:
        raise MammoInputError(path, f"mask must be a single-channel 2D image, got array shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer) and not np.issubdtype(arr.dtype, np.bool_):
        if not np.all(np.isfinite(arr)) or not np.all(np.equal(np.mod(arr, 1), 0)):
            raise MammoInputError(path, "mask values must be integers (label or instance ids)")
    arr = arr.astype(np.int64)
    if expected_shape is not None and tuple(arr.shape) != tuple(expected_shape):
        raise MammoInputError(path, f"mask size {tuple(arr.shape)} does not match the image size {tuple(expected_shape)}")
    return arr


def _frame_references(ds: Any) -> list[set[str]]:
    """Per frame of a SEG, the SOP Instance UIDs of the source images it was derived from (empty when not given)."""
    out = []
    for group in ds.get("PerFrameFunctionalGroupsSequence", []) or []:
        refs = set()
        for derivation in group.get("DerivationImageSequence", []) or []:
            for src in derivation.get("SourceImageSequence", []) or []:
                uid = str(src.get("ReferencedSOPInstanceUID", "") or "")
                if uid:
                    refs.add(uid)
        out.append(refs)
    return out


def _load_dicom_seg(path: Path, referenced: str | None = None) -> np.ndarray:
    import pydicom

    ds = pydicom.dcmread(str(path))
    if str(ds.get("Modality", "")).upper() != "SEG":
        raise MammoInputError(path, f"DICOM mask must be a Segmentation (Modality SEG), got {ds.get('Modality')!r}")
    frames = np.asarray(ds.pixel_array)
    if frames.ndim == 2:
        frames = frames[None]
    refs = _frame_references(ds)
    if len(refs) == frames.shape[0]:
        images = set().union(*refs) if refs else set()
        if referenced is not None and images:
            keep = [i for i, r in enumerate(refs) if str(referenced) in r]
            if not keep:
                raise MammoInputError(path, f"no frame of this SEG references the image (SOP Instance UID "
                                            f"{referenced}); it covers {len(images)} other image(s)")
            frames = frames[keep]
        elif referenced is None and len(images) > 1:
            raise MammoInputError(path, f"the SEG covers {len(images)} source images: name the image it is used for "
                                        "(its frames are selected by the referenced SOP Instance UID)")
    if str(ds.get("SegmentationType", "BINARY")).upper() == "FRACTIONAL":
        max_value = float(ds.get("MaximumFractionalValue", frames.max() or 1))
        frames = frames >= 0.5 * max_value
    return (frames > 0).any(axis=0).astype(np.uint8)
