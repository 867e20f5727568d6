"""Reading DICOM MG (digital mammography) files for MONAI's ``LoadImage``/``LoadImaged``.

:class:`MammoDicomReader` is a :class:`monai.data.ImageReader`. It validates the file (a readable DICOM, pixel
data present, a grayscale modality we support), decodes the pixel data (compressed transfer syntaxes included,
through pydicom's pixel-data plugins: pylibjpeg-openjpeg for JPEG 2000, pylibjpeg-libjpeg for JPEG / JPEG-LS,
pylibjpeg-rle or pydicom for RLE; deflate is handled by pydicom) and returns the **stored values** untouched,
shape ``(H, W)`` (rows first, *not* transposed as ITK-based readers do).

The tags the grayscale pipeline needs travel in the metadata under ``"dicom_grayscale"`` as a JSON-friendly dict
(see :func:`grayscale_params`); :class:`custom.transforms.DicomGrayscale` turns stored values into display values.
Source-patient identifiers are deliberately not copied into the metadata.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from monai.data import ImageReader
from monai.utils import ensure_tuple
from PIL import Image, features
from pydicom.dataset import Dataset
from pydicom.encaps import generate_fragmented_frames
from pydicom.errors import InvalidDicomError

from custom.errors import MammoInputError

__all__ = [
    "MAMMOGRAPHY_SOP_CLASSES",
    "MammoDicomReader",
    "decode_j2k_reduced",
    "j2k_reduce_level",
    "grayscale_params",
    "header_from_params",
    "read_dicom_header",
    "laterality_from_header",
]

#: SOP classes of Digital Mammography X-Ray Image Storage (for presentation / for processing).
MAMMOGRAPHY_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.1.2": "Digital Mammography X-Ray Image Storage - For Presentation",
    "1.2.840.10008.5.1.4.1.1.1.2.1": "Digital Mammography X-Ray Image Storage - For Processing",
}
_SUPPORTED_PHOTOMETRIC = ("MONOCHROME1", "MONOCHROME2")
_DICOM_SUFFIXES = (".dcm", ".dicom", ".dic", "")

# Tags copied verbatim (when present) into ``meta["dicom_grayscale"]``.
_SCALAR_TAGS = (
    "PhotometricInterpretation",
    "BitsStored",
    "BitsAllocated",
    "PixelRepresentation",
    "RescaleSlope",
    "RescaleIntercept",
    "RescaleType",
    "VOILUTFunction",
    "PixelPaddingValue",
    "PixelPaddingRangeLimit",
    "PresentationLUTShape",
)
_MULTI_TAGS = ("WindowCenter", "WindowWidth", "WindowCenterWidthExplanation")
_LUT_SEQUENCES = ("ModalityLUTSequence", "VOILUTSequence")


def _lut_item_to_dict(item: Dataset) -> dict[str, Any]:
    out: dict[str, Any] = {"LUTDescriptor": [int(v) for v in item.LUTDescriptor]}
    # pydicom decodes LUTData to a list of ints (or bytes for OW): keep a plain list of ints.
    data = item.LUTData
    if isinstance(data, (bytes, bytearray)):
        data = np.frombuffer(data, dtype="<u2")
    out["LUTData"] = [int(v) for v in np.asarray(data).ravel()]
    for key in ("LUTExplanation", "ModalityLUTType"):
        if key in item:
            out[key] = str(item.get(key))
    return out


def grayscale_params(ds: Dataset) -> dict[str, Any]:
    """The Modality-LUT, VOI-LUT and pixel-padding tags of ``ds`` as a JSON-friendly dict.

    Multi-valued window tags become lists; LUT sequences become lists of
    ``{"LUTDescriptor": [n, first, bits], "LUTData": [...]}``. Absent tags are absent keys.
    """
    params: dict[str, Any] = {}
    for key in _SCALAR_TAGS:
        if key in ds and ds[key].value is not None and ds[key].value != "":
            value = ds[key].value
            if key in ("RescaleSlope", "RescaleIntercept"):
                params[key] = float(value)  # a malformed value fails here, in the reader (one clear error)
            else:
                params[key] = value if isinstance(value, str) else int(value)
    for key in _MULTI_TAGS:
        if key in ds and ds[key].value not in (None, ""):
            elem = ds[key]
            values = list(elem.value) if elem.VM > 1 else [elem.value]
            params[key] = [str(v) for v in values] if key.endswith("Explanation") else [float(v) for v in values]
    for key in _LUT_SEQUENCES:
        if key in ds and len(ds[key].value):
            params[key] = [_lut_item_to_dict(item) for item in ds[key].value]
    return params


def header_from_params(params: dict[str, Any]) -> Dataset:
    """Rebuild a minimal pydicom :class:`~pydicom.dataset.Dataset` from :func:`grayscale_params` output,
    so pydicom's own LUT functions (``apply_modality_lut``, ``apply_voi``, ``apply_windowing``) can be used."""
    ds = Dataset()
    for key in _SCALAR_TAGS:
        if key in params:
            setattr(ds, key, params[key])
    for key in _MULTI_TAGS:
        if key in params:
            values = params[key]
            setattr(ds, key, values if len(values) > 1 else values[0])
    for key in _LUT_SEQUENCES:
        if key in params:
            items = []
            for entry in params[key]:
                item = Dataset()
                item.LUTDescriptor = list(entry["LUTDescriptor"])
                item.LUTData = list(entry["LUTData"])
                for extra in ("LUTExplanation", "ModalityLUTType"):
                    if extra in entry:
                        setattr(item, extra, entry[extra])
                items.append(item)
            setattr(ds, key, items)
    return ds


def laterality_from_header(ds: Dataset | dict) -> str | None:
    """``"L"``/``"R"`` from ImageLaterality, else Laterality, else ``None`` (tag missing or unusable)."""
    for key in ("ImageLaterality", "Laterality"):
        value = ds.get(key, None)
        if value is not None and str(value).strip().upper() in ("L", "R"):
            return str(value).strip().upper()
    return None


def read_dicom_header(path: str | os.PathLike, require_mammography: bool = True) -> Dataset:
    """Read and validate a DICOM file's header and pixel data presence (pixel data not decoded).

    Raises:
        MammoInputError: not a DICOM file, no pixel data, another modality, unsupported photometric interpretation.
    """
    path = str(path)
    try:
        ds = pydicom.dcmread(path, force=False)
    except InvalidDicomError as err:
        raise MammoInputError(path, f"not a DICOM file ({err})") from err
    except FileNotFoundError as err:
        raise MammoInputError(path, "file not found") from err
    except Exception as err:  # truncated/garbled files raise various errors inside pydicom
        raise MammoInputError(path, f"unreadable DICOM file ({type(err).__name__}: {err})") from err
    validate_mammogram_header(ds, path, require_mammography=require_mammography)
    return ds


#: header values that must be non-negative integers (Rows and Columns also present and positive)
_INTEGER_TAGS = ("Rows", "Columns", "BitsAllocated", "BitsStored", "PixelRepresentation", "SamplesPerPixel",
                 "NumberOfFrames")


def header_int(ds: Dataset, key: str, path: str, default: int | None = None) -> int | None:
    """An integer header value, or ``default`` when absent; a malformed value raises :class:`MammoInputError`."""
    try:
        if key not in ds or ds[key].value in (None, "", b""):
            return default
        value = ds[key].value
        number = float(value)
        if not np.isfinite(number) or number != int(number) or number < 0 or number > 2**31:
            raise ValueError(value)
        return int(number)
    except Exception:
        try:
            shown = repr(ds[key].value)[:40]
        except Exception:
            shown = "(unreadable)"
        raise MammoInputError(path, f"malformed DICOM header: {key} must be a non-negative integer, got {shown}") from None


def validate_mammogram_header(ds: Dataset, path: str, require_mammography: bool = True) -> None:
    """Check a dataset is a grayscale image we can process; raise :class:`MammoInputError` otherwise."""
    try:
        _validate_header(ds, path, require_mammography)
    except MammoInputError:
        raise
    except Exception as err:  # a header value pydicom cannot even convert
        raise MammoInputError(path, f"malformed DICOM header ({type(err).__name__}: {str(err)[:160]})") from None


def _validate_header(ds: Dataset, path: str, require_mammography: bool) -> None:
    for key in _INTEGER_TAGS:
        header_int(ds, key, path)
    for key in ("Rows", "Columns"):
        if not header_int(ds, key, path, 0):
            raise MammoInputError(path, f"malformed DICOM header: {key} is missing or zero")
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise MammoInputError(path, "DICOM file has no pixel data (PixelData element missing)")
    modality = str(ds.get("Modality", "")).upper()
    sop_class = str(ds.get("SOPClassUID", ""))
    if require_mammography and modality != "MG" and sop_class not in MAMMOGRAPHY_SOP_CLASSES:
        raise MammoInputError(
            path, f"not a mammogram: Modality is {modality or 'missing'!r} (expected 'MG'), SOP class {sop_class or 'missing'}"
        )
    photometric = str(ds.get("PhotometricInterpretation", "")).upper()
    if photometric not in _SUPPORTED_PHOTOMETRIC:
        raise MammoInputError(
            path, f"unsupported PhotometricInterpretation {photometric or 'missing'!r} (expected MONOCHROME1 or MONOCHROME2)"
        )
    if header_int(ds, "SamplesPerPixel", path, 1) != 1:
        raise MammoInputError(path, f"expected one sample per pixel, got {ds.SamplesPerPixel}")
    if (header_int(ds, "NumberOfFrames", path, 1) or 1) != 1:
        raise MammoInputError(path, f"expected a single-frame image, got {ds.NumberOfFrames} frames")


def decode_pixels(ds: Dataset, path: str) -> np.ndarray:
    """Decode the stored pixel values, shape (H, W), integer dtype as stored."""
    try:
        arr = ds.pixel_array
    except Exception as err:
        ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        name = getattr(ts, "name", ts)
        raise MammoInputError(path, f"cannot decode pixel data (transfer syntax {name}): {err}") from err
    if arr.ndim != 2:
        raise MammoInputError(path, f"expected a 2D image, decoded pixel array has shape {arr.shape}")
    return arr


#: JPEG 2000 transfer syntaxes whose codestream can be decoded at reduced resolution (lossless and lossy Part 1)
J2K_TRANSFER_SYNTAXES = ("1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91")


def _j2k_codestream_info(stream: bytes) -> dict[str, int] | None:
    """Precision, sign, offsets and decomposition levels of a JPEG 2000 codestream (SIZ and COD markers), or
    ``None`` when the main header is not the plain single-component layout this module decodes at reduced size."""
    if stream[:2] != b"\xff\x4f":  # SOC
        return None
    pos, info = 2, {}
    while pos + 4 <= len(stream) and len(info) < 2:
        marker, length = int.from_bytes(stream[pos:pos + 2], "big"), int.from_bytes(stream[pos + 2:pos + 4], "big")
        body = stream[pos + 4:pos + 2 + length]
        if marker == 0xFF51:  # SIZ
            if len(body) < 39 or int.from_bytes(body[34:36], "big") != 1:
                return None
            ssiz = body[36]
            info["siz"] = dict(x_offset=int.from_bytes(body[10:14], "big"), y_offset=int.from_bytes(body[14:18], "big"),
                               precision=(ssiz & 0x7F) + 1, signed=ssiz >> 7)
        elif marker == 0xFF52:  # COD
            if len(body) < 6:
                return None
            info["levels"] = body[5]
        elif marker in (0xFF90, 0xFF93, 0xFFD9):  # SOT, SOD, EOC: end of the main header
            break
        pos += 2 + length
    if "siz" not in info or "levels" not in info:
        return None
    return {**info["siz"], "levels": info["levels"]}


def j2k_reduce_level(rows: int, columns: int, min_side: int, levels: int) -> int:
    """Largest number of discarded wavelet levels (``r``, decoded size ``ceil(side / 2**r)``) that keeps the shorter
    side ``>= min_side`` and does not exceed the codestream's ``levels``."""
    r = 0
    while r < levels and -(-min(rows, columns) // 2 ** (r + 1)) >= min_side:
        r += 1
    return r


def decode_j2k_reduced(ds: Dataset, path: str, reduce: int | str, min_side: int = 512) -> tuple[np.ndarray, int, str]:
    """Decode a single-frame JPEG 2000 image with ``reduce`` wavelet levels discarded (OpenJPEG's ``reduce``, through
    Pillow's JPEG 2000 decoder): the image is ``2**r`` times smaller per side and decodes several times faster.

    The values are the codestream's low-pass (LL) band at that level, clipped to the stored range: close to, but not
    equal to, block averages of the full-resolution stored values (the 5/3 or 9/7 wavelet's low-pass filter is not
    a box filter). ``reduce="auto"`` picks :func:`j2k_reduce_level` for ``min_side``.

    Returns:
        ``(stored (h, w), r, reason)``: ``r`` levels applied (0 = the full image decoded by pydicom, with
        ``reason`` saying why the reduced path was not taken: another transfer syntax, pixel padding, a codestream
        this module does not take, ...).
    """
    ts = str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", ""))
    if ts not in J2K_TRANSFER_SYNTAXES:
        return decode_pixels(ds, path), 0, "not JPEG 2000"
    if not features.check("jpg_2000"):
        return decode_pixels(ds, path), 0, "Pillow was built without OpenJPEG"
    if "PixelPaddingValue" in ds:
        return decode_pixels(ds, path), 0, "pixel padding (a padding value cannot be told apart after filtering)"
    if int(ds.get("PixelRepresentation", 0) or 0) != 0:
        return decode_pixels(ds, path), 0, "signed pixel data"
    try:
        frame = b"".join(next(generate_fragmented_frames(ds.PixelData, number_of_frames=1)))
    except Exception as err:
        return decode_pixels(ds, path), 0, f"encapsulated frame not found ({type(err).__name__})"
    info = _j2k_codestream_info(frame)
    bits = header_int(ds, "BitsStored", path, 16) or 16
    if info is None or info["signed"] or info["x_offset"] or info["y_offset"] or info["precision"] != bits \
            or not 9 <= bits <= 16:
        return decode_pixels(ds, path), 0, "codestream layout (precision, sign, offset or components) not supported"
    rows, cols = int(ds.Rows), int(ds.Columns)
    level = j2k_reduce_level(rows, cols, min_side, info["levels"]) if reduce == "auto" else min(int(reduce), info["levels"])
    if level <= 0:
        return decode_pixels(ds, path), 0, "image too small to reduce"
    try:
        with Image.open(io.BytesIO(frame), formats=["JPEG2000"]) as im:
            im.reduce = level  # Pillow passes it to OpenJPEG (opj_set_decoded_resolution_factor)
            im.load()
            if im.mode != "I;16":
                raise ValueError(f"Pillow mode {im.mode}")
            arr = np.asarray(im)
    except Exception as err:
        raise MammoInputError(path, f"cannot decode pixel data at reduced resolution ({type(err).__name__}: {err})") from err
    f = 2**level
    if arr.shape != (-(-rows // f), -(-cols // f)):
        return decode_pixels(ds, path), 0, f"reduced decoder gave shape {arr.shape}"
    return (arr >> (16 - bits)).astype(np.uint16, copy=False), level, ""  # Pillow scales to 16 bits: undo


class MammoDicomReader(ImageReader):
    """MONAI image reader for DICOM MG files: stored values, shape ``(H, W)``, plus grayscale-pipeline tags.

    Use through :class:`custom.transforms.LoadMammogram` / ``LoadMammogramd`` (``LoadImage`` given this reader at
    call time, so its errors are not masked by MONAI's fallback to other readers); then apply
    :class:`custom.transforms.DicomGrayscale`.

    Metadata keys: ``"dicom_grayscale"`` (see :func:`grayscale_params`), ``"laterality"`` (``"L"``, ``"R"`` or
    ``None``), ``"view_position"``, ``"presentation_intent"``, ``"sop_class_uid"``, ``"pixel_spacing"``
    (row, col mm, or ``None``), ``"spatial_shape"`` ``(H, W)``, ``"original_channel_dim"`` (``"no_channel"``),
    ``"filename_or_obj"``. No patient identifiers are copied.

    With ``j2k_reduce`` (``"auto"`` or a number of levels > 0), JPEG 2000 pixel data are decoded at reduced
    resolution (:func:`decode_j2k_reduced`): the array is ``2**r`` times smaller per side, ``meta["j2k_reduce"]``
    holds ``r`` (0 when the image was decoded in full, with the reason at ``meta["j2k_reduce_skipped"]``) and
    ``meta["full_shape"]`` the header's ``(Rows, Columns)``.

    Args:
        require_mammography: reject files whose Modality is not ``MG`` (and SOP class is not a mammography one).
        j2k_reduce: 0 (full resolution, default), a number of wavelet levels to discard, or ``"auto"``.
        j2k_min_side: with ``"auto"``, the shorter side the reduced image keeps at least.
    """

    def __init__(self, require_mammography: bool = True, j2k_reduce: int | str = 0, j2k_min_side: int = 512):
        super().__init__()
        self.require_mammography = require_mammography
        if not (j2k_reduce == "auto" or (isinstance(j2k_reduce, int) and j2k_reduce >= 0)):
            raise ValueError(f"j2k_reduce must be 'auto' or an integer >= 0, got {j2k_reduce!r}")
        self.j2k_reduce, self.j2k_min_side = j2k_reduce, int(j2k_min_side)

    def verify_suffix(self, filename: Sequence[os.PathLike | str] | os.PathLike | str) -> bool:
        return all(Path(f).suffix.lower() in _DICOM_SUFFIXES for f in ensure_tuple(filename))

    def read(self, data: Sequence[os.PathLike | str] | os.PathLike | str, **kwargs) -> list[tuple[str, Dataset]]:
        files = ensure_tuple(data)
        if len(files) != 1:
            raise MammoInputError(", ".join(map(str, files)), "MammoDicomReader reads one 2D file at a time")
        path = str(files[0])
        return [(path, read_dicom_header(path, require_mammography=self.require_mammography))]

    def get_data(self, img: list[tuple[str, Dataset]] | tuple[str, Dataset]) -> tuple[np.ndarray, dict]:
        path, ds = img[0] if isinstance(img, list) else img
        level, skipped = 0, None
        if self.j2k_reduce:
            arr, level, skipped = decode_j2k_reduced(ds, path, self.j2k_reduce, self.j2k_min_side)
        else:
            arr = decode_pixels(ds, path)
        spacing = ds.get("PixelSpacing", None) or ds.get("ImagerPixelSpacing", None)
        try:
            params = grayscale_params(ds)
        except Exception as err:
            raise MammoInputError(path, f"malformed grayscale tags ({type(err).__name__}: {str(err)[:160]})") from None
        try:
            spacing = [float(v) * 2**level for v in spacing] if spacing else None  # of the (reduced) array
        except (TypeError, ValueError):
            spacing = None
        meta: dict[str, Any] = {
            "filename_or_obj": path,
            "dicom_grayscale": params,
            "laterality": laterality_from_header(ds),
            "view_position": str(ds.get("ViewPosition", "")) or None,
            "presentation_intent": str(ds.get("PresentationIntentType", "")) or None,
            "sop_class_uid": str(ds.get("SOPClassUID", "")),
            "sop_instance_uid": str(ds.get("SOPInstanceUID", "")) or None,
            "pixel_spacing": spacing,
            "spatial_shape": np.asarray(arr.shape),
            "full_shape": (int(ds.Rows), int(ds.Columns)),
            "j2k_reduce": level,
            "j2k_reduce_skipped": skipped or None,
            "original_channel_dim": "no_channel",
        }
        return arr, meta
