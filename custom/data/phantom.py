"""Deterministic synthetic mammography phantom written as DICOM MG files in the VinDr-Mammo layout.

No real mammograms are needed to develop, test or demonstrate the pipeline: this module writes a small
dataset that the VinDr-Mammo adapter reads exactly as it reads the real download::

    <output_dir>/images/<study_id>/<image_id>.dicom      4 images per study: L-CC, L-MLO, R-CC, R-MLO
    <output_dir>/finding_annotations.csv                  one row per mass ("['No Finding']" row if none)
    <output_dir>/breast-level_annotations.csv             one row per image
    <output_dir>/PHANTOM_README.txt                       says what this is (synthetic, not patient data)
    <output_dir>/lesion_free/<study_id>/<image_id>.dicom  the same image without its masses (images with masses
                                                          only; same tags and window, uncompressed): removal truth

Everything is a function of ``seed``: each image draws from its own ``numpy.random.default_rng`` seeded by
``(seed, study index, image index)``, so results do not depend on generation order. The DICOM encodings
(photometric interpretation, bit depth, modality LUT, VOI LUT, padding, transfer syntax, for-processing,
missing ``ImageLaterality``) are *cycled* by the global image index ``g = 4 * study_index + image_index``
(see :func:`image_variant`), so that 4 studies (16 images) already contain every variant.

Image content (chest wall on column 0 for left breasts, on the last column for right breasts):
air background, breast outline with a skin line and peripheral thickness fall-off, power-law (1/f^beta)
parenchymal texture mixed with fat according to the BI-RADS density A-D, a pectoral muscle triangle in the
top chest-wall corner of MLO views, 0-2 masses (round, oval, lobulated, irregular, spiculated) denser than
their surroundings, and on some images a small bright artefact (label marker or detector-edge rows) away
from the breast. Each study is "acquired" on one of :data:`PHANTOM_VENDORS` (Manufacturer tag
``"<vendor> - mammo_gcdm phantom"``; a vendor-specific display tone curve and noise level) and each image draws a
breast-area class (a narrower or wider breast outline), so the clinical attributes of :mod:`custom.data.attributes`
(density, manufacturer, MAM-E's area bins) vary and are visible. Box coordinates in the CSV are pixel-edge coordinates of the mass core:
``xmin = first column``, ``xmax = last column + 1`` (same for rows), so ``img[int(ymin):int(ymax),
int(xmin):int(xmax)]`` is exactly the core's bounding box.

The *stored* values are transformed per variant so that, after the DICOM grayscale pipeline
(modality LUT -> VOI LUT/window -> MONOCHROME1 inversion), every image displays dense tissue bright and
air dark. For-processing images store a raw, exponentially attenuated exposure signal (air high) as
MONOCHROME1, and still carry window tags.
"""

from __future__ import annotations

import argparse
import copy
import csv
import hashlib
import io
import json
import sys
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import get_encoder
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

from custom.io import atomic_path, atomic_write_text

__all__ = [
    "GENERATOR_VERSION",
    "PHANTOM_SERIES_DESCRIPTION",
    "PHANTOM_VENDORS",
    "LESION_FREE_DIR",
    "VINDR_FINDING_COLUMNS",
    "VINDR_BREAST_COLUMNS",
    "VIEWS",
    "ImageVariant",
    "image_variant",
    "PhantomImage",
    "phantom_image",
    "generate_phantom_dataset",
    "main",
]

GENERATOR_VERSION = "1.1.0"
PHANTOM_SERIES_DESCRIPTION = "SYNTHETIC PHANTOM - not patient data"
PHANTOM_MANUFACTURER = "mammo_gcdm phantom"
#: Vendors the phantom imitates (DICOM Manufacturer = "<vendor> - mammo_gcdm phantom"), one per study, each with its
#: own display tone curve (gamma) and quantum-noise level, so the manufacturer attribute has something to learn.
PHANTOM_VENDORS: dict[str, dict[str, float]] = {
    "SIEMENS": {"gamma": 0.88, "noise": 0.004},
    "HOLOGIC": {"gamma": 1.0, "noise": 0.003},
    "GE MEDICAL SYSTEMS": {"gamma": 1.12, "noise": 0.006},
}
#: Breast-width factors of the three breast-area classes (MAM-E's small / medium / large), drawn per image.
_AREA_WIDTH_SCALE = {"small": 0.7, "medium": 1.0, "large": 1.3}
#: Folder (under the dataset root) of the lesion-free version of every image with masses (same encoding and tags).
LESION_FREE_DIR = "lesion_free"
PHANTOM_README_NAME = "PHANTOM_README.txt"

VINDR_FINDING_COLUMNS = [
    "image_id", "study_id", "series_id", "laterality", "view_position", "height", "width",
    "breast_birads", "breast_density", "finding_categories", "finding_birads",
    "xmin", "ymin", "xmax", "ymax", "split",
]
VINDR_BREAST_COLUMNS = [
    "study_id", "series_id", "image_id", "laterality", "view_position", "height", "width",
    "breast_birads", "breast_density", "split",
]

#: The 4 images of a study, in image-index order.
VIEWS: tuple[tuple[str, str], ...] = (("L", "CC"), ("L", "MLO"), ("R", "CC"), ("R", "MLO"))

MG_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.2"
MG_FOR_PROCESSING = "1.2.840.10008.5.1.4.1.1.1.2.1"

# --------------------------------------------------------------------------------------------------------
# Variety cycles, indexed by the global image index g = 4 * study_index + image_index. Every cycle is at most
# 16 long, so 4 studies (16 images) contain every entry; the main cycle lengths (3, 5, 7, 11, 13) are pairwise
# coprime and coprime to the 4 views, so over 40 studies the variants combine with each other and with every
# view instead of being locked together. The three flags reuse a cycle (noted) on purpose: for-processing
# images are never rescaled, missing-laterality images are RLE / deflated, padding takes 3 distinct VOI kinds.
# --------------------------------------------------------------------------------------------------------
BITS_STORED_CYCLE = (12, 14, 16)  # g % 3
PHOTOMETRIC_CYCLE = ("MONOCHROME2", "MONOCHROME1", "MONOCHROME2", "MONOCHROME1", "MONOCHROME2")  # g % 5
RESCALE_CYCLE: tuple[tuple[float, float] | None, ...] = (  # g % 7: (slope, intercept), None = no rescale tags
    None, (2.0, -1024.0), None, (0.5, 100.0), None, (1.0, -1024.0), None,
)
# g % 11: explicit LINEAR 4, implicit linear (no VOILUTFunction) 2, SIGMOID 2, two windows (LINEAR) 2,
# VOI LUT Sequence 1
VOI_CYCLE = (
    "LINEAR", "SIGMOID", "LINEAR_IMPLICIT", "LINEAR", "TWO_WINDOWS", "SIGMOID",
    "LINEAR_IMPLICIT", "LUT_SEQUENCE", "LINEAR", "LINEAR", "TWO_WINDOWS",
)
TRANSFER_SYNTAX_CYCLE = (  # g % 13: 9/13 uncompressed explicit VR little endian
    ExplicitVRLittleEndian, JPEG2000Lossless, ExplicitVRLittleEndian, JPEGLSLossless, ExplicitVRLittleEndian,
    ExplicitVRLittleEndian, RLELossless, ExplicitVRLittleEndian, ExplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, ExplicitVRLittleEndian, ExplicitVRLittleEndian,
)
FOR_PROCESSING_CYCLE, FOR_PROCESSING_AT = 7, (4,)  # shares the rescale cycle (position 4: no rescale)
MISSING_LATERALITY_CYCLE, MISSING_LATERALITY_AT = 13, (6, 9)  # shares the transfer-syntax cycle
PADDING_CYCLE, PADDING_AT = 11, (1, 4, 8)  # shares the VOI cycle (SIGMOID, TWO_WINDOWS, LINEAR)

MASS_SHAPES = ("round", "oval", "lobulated", "irregular", "spiculated")
_SHAPE_BIRADS = {
    "round": (2, 3), "oval": (2, 3), "lobulated": (3, 4), "irregular": (4, 5), "spiculated": (4, 5),
}
_SHAPE_MARGINS = {
    "round": ("circumscribed", "circumscribed", "obscured"),
    "oval": ("circumscribed", "circumscribed", "obscured"),
    "lobulated": ("circumscribed", "microlobulated", "obscured"),
    "irregular": ("ill-defined", "ill-defined", "obscured"),
    "spiculated": ("spiculated",),
}
_MARGIN_BLUR = {  # Gaussian sigma in pixels at 512 columns (scaled with the image width)
    "circumscribed": 0.5, "microlobulated": 0.9, "obscured": 1.8, "ill-defined": 3.0, "spiculated": 1.2,
}
DENSITIES = ("A", "B", "C", "D")
_DENSITY_P = (0.1, 0.4, 0.4, 0.1)
_DENSITY_GLAND_FRACTION = {"A": 0.07, "B": 0.25, "C": 0.5, "D": 0.78}

# display-domain intensities (0 = air/black, 1 = white)
_AIR = 0.02
_FAT = 0.28
_GLAND = 0.62
_SKIN = 0.32
_PECTORAL = 0.70
_ARTEFACT = 0.93


@dataclass(frozen=True)
class ImageVariant:
    """How one image is encoded; a pure function of its global index (see :func:`image_variant`)."""

    index: int
    transfer_syntax: str
    bits_stored: int
    photometric: str
    voi: str  # LINEAR, LINEAR_IMPLICIT, SIGMOID, TWO_WINDOWS, LUT_SEQUENCE
    rescale: tuple[float, float] | None
    for_processing: bool
    missing_laterality: bool
    padding: bool

    @property
    def voi_function(self) -> str:
        """Summary label: LINEAR (explicit, implicit or two windows), SIGMOID or LUT_SEQUENCE."""
        return {"LINEAR_IMPLICIT": "LINEAR", "TWO_WINDOWS": "LINEAR"}.get(self.voi, self.voi)


def image_variant(g: int) -> ImageVariant:
    """The encoding variant of the image with global index ``g = 4 * study_index + image_index``.

    Cycles: BitsStored ``(12, 14, 16)[g % 3]``; photometric ``PHOTOMETRIC_CYCLE[g % 5]`` (MONOCHROME1 at
    1, 3) except that for-processing images are always MONOCHROME1; rescale ``RESCALE_CYCLE[g % 7]``
    (slope/intercept 2/-1024 at 1, 0.5/100 at 3, 1/-1024 at 5; dropped on VOI-LUT-Sequence images so the LUT
    maps stored values); VOI ``VOI_CYCLE[g % 11]`` (SIGMOID at 1, 5; no VOILUTFunction at 2, 6; two windows
    at 4, 10; VOI LUT Sequence at 7, replaced by LINEAR on for-processing images, which always carry
    windows); transfer syntax ``TRANSFER_SYNTAX_CYCLE[g % 13]`` (JPEG 2000 at 1, JPEG-LS at 3, RLE at 6,
    deflated at 9, explicit VR little endian elsewhere); for-processing when ``g % 7 == 4``; no
    ImageLaterality when ``g % 13 in (6, 9)``; PixelPaddingValue when ``g % 11 in (1, 4, 8)``.
    """
    g = int(g)
    for_processing = g % FOR_PROCESSING_CYCLE in FOR_PROCESSING_AT
    voi = VOI_CYCLE[g % len(VOI_CYCLE)]
    if for_processing and voi == "LUT_SEQUENCE":
        voi = "LINEAR"
    rescale = RESCALE_CYCLE[g % len(RESCALE_CYCLE)]
    if voi == "LUT_SEQUENCE":
        rescale = None
    return ImageVariant(
        index=g,
        transfer_syntax=str(TRANSFER_SYNTAX_CYCLE[g % len(TRANSFER_SYNTAX_CYCLE)]),
        bits_stored=BITS_STORED_CYCLE[g % len(BITS_STORED_CYCLE)],
        photometric="MONOCHROME1" if for_processing else PHOTOMETRIC_CYCLE[g % len(PHOTOMETRIC_CYCLE)],
        voi=voi,
        rescale=rescale,
        for_processing=for_processing,
        missing_laterality=g % MISSING_LATERALITY_CYCLE in MISSING_LATERALITY_AT,
        padding=g % PADDING_CYCLE in PADDING_AT,
    )


# --------------------------------------------------------------------------------------------------------
# identifiers
# --------------------------------------------------------------------------------------------------------
def _hex_id(seed: int, *parts: Any) -> str:
    text = "|".join(["mammo_gcdm-phantom", str(seed), *map(str, parts)])
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


def _uid(seed: int, *parts: Any) -> str:
    return generate_uid(entropy_srcs=["mammo_gcdm-phantom", str(seed), *map(str, parts)])


# --------------------------------------------------------------------------------------------------------
# image synthesis (display domain, float in [0, 1], left-breast frame: chest wall on column 0)
# --------------------------------------------------------------------------------------------------------
def _powerlaw_noise(shape: tuple[int, int], beta: float, rng: np.random.Generator) -> np.ndarray:
    """Zero-mean, unit-std 2-D noise with power spectrum ~ 1/f^beta (FFT filtered white noise)."""
    h, w = shape
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.rfftfreq(w)[None, :]
    f = np.sqrt(fx * fx + fy * fy)
    f[0, 0] = 1.0
    amp = f ** (-beta / 2.0)
    amp[0, 0] = 0.0
    spec = np.fft.rfft2(rng.standard_normal((h, w))) * amp
    out = np.fft.irfft2(spec, s=(h, w))
    out -= out.mean()
    std = out.std()
    return out / (std if std > 0 else 1.0)


def _smooth_1d(n: int, rng: np.random.Generator, n_waves: int = 3) -> np.ndarray:
    t = np.linspace(0.0, 1.0, n)
    out = np.zeros(n)
    for k in range(1, n_waves + 1):
        out += rng.uniform(-1, 1) / k * np.sin(2 * np.pi * (k * t + rng.uniform()))
    return out


@dataclass
class _Mass:
    shape: str
    margin: str
    birads: int
    core: np.ndarray  # bool, full image, left frame
    box: tuple[int, int, int, int] = (0, 0, 0, 0)  # xmin, ymin, xmax, ymax (pixel edges), final frame


@dataclass
class _Rendered:
    display: np.ndarray  # float64 [0, 1], final frame
    display_lesion_free: np.ndarray  # float64 [0, 1], final frame: the same image without its masses
    breast: np.ndarray  # bool
    air: np.ndarray  # bool (background without artefacts)
    masses: list[_Mass]
    artefact: str  # "", "marker" or "edge"


def _breast_outline(h: int, w: int, view: str, rng: np.random.Generator,
                    width_scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Per-row horizontal extent of the breast (left frame) and its bool mask; ``width_scale`` widens or narrows the
    breast (the breast-area class)."""
    rows = np.arange(h, dtype=np.float64)
    if view == "CC":
        cy, a, b = h * rng.uniform(0.46, 0.54), h * rng.uniform(0.36, 0.44), w * rng.uniform(0.6, 0.78)
    else:  # MLO: taller, reaching the top edge (axilla) where the pectoral muscle sits
        cy, a, b = h * rng.uniform(0.40, 0.47), h * rng.uniform(0.52, 0.58), w * rng.uniform(0.6, 0.76)
    q = np.clip(1.0 - ((rows - cy) / a) ** 2, 0.0, None)
    x_edge = width_scale * b * np.sqrt(q) * (1.0 + 0.04 * _smooth_1d(h, rng))
    x_edge = np.minimum(x_edge, w * 0.86)
    cols = np.arange(w, dtype=np.float64)[None, :]
    return x_edge, cols < x_edge[:, None]


def _mass_core(
    shape: str, r: float, size: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Core mask of a mass in a (2*size+1)^2 window, its radius function R(theta) and theta."""
    yy, xx = np.mgrid[-size:size + 1, -size:size + 1].astype(np.float64)
    rho = np.hypot(yy, xx)
    theta = np.arctan2(yy, xx)
    if shape == "round":
        R = np.full_like(theta, r)
    elif shape == "oval":
        q, phi = rng.uniform(0.55, 0.8), rng.uniform(0, np.pi)
        R = r * q / np.sqrt((q * np.cos(theta - phi)) ** 2 + np.sin(theta - phi) ** 2)
    elif shape == "lobulated":
        k = int(rng.integers(3, 6))
        R = r * (1.0 + 0.17 * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
                 + 0.06 * np.cos((k + 2) * theta + rng.uniform(0, 2 * np.pi)))
    else:  # irregular / spiculated core: several random harmonics
        amp_scale = 0.32 if shape == "irregular" else 0.2
        R = np.ones_like(theta)
        for j in range(2, 8):
            R += rng.uniform(0.3, 1.0) * amp_scale / j ** 0.8 * np.cos(j * theta + rng.uniform(0, 2 * np.pi))
        R = r * np.clip(R, 0.55, None)
    return rho < R, R, theta


def _area_class(seed: int, study_index: int, image_index: int) -> str:
    """Breast-area class of an image (its own random stream, so the other draws do not move)."""
    rng = np.random.default_rng([int(seed), int(study_index), int(image_index), 31])
    return str(rng.choice(tuple(_AREA_WIDTH_SCALE), p=(0.3, 0.4, 0.3)))


def _render(
    seed: int, study_index: int, image_index: int, shape: tuple[int, int], density: str, g: int,
    vendor: str = "HOLOGIC", area_class: str = "medium", texture_seed: int | None = None,
) -> _Rendered:
    h, w = shape
    laterality, view = VIEWS[image_index]
    rng = np.random.default_rng([int(seed), int(study_index), int(image_index)])
    scale = w / 512.0

    x_edge, breast = _breast_outline(h, w, view, rng, _AREA_WIDTH_SCALE[area_class])
    dist = ndimage.distance_transform_edt(breast)
    rows = np.arange(h, dtype=np.float64)[:, None]
    cols = np.arange(w, dtype=np.float64)[None, :]

    # parenchyma: power-law texture, thresholded softly into glandular tissue according to the density
    texture = _powerlaw_noise((h, w), rng.uniform(2.5, 3.5), rng)
    fine = _powerlaw_noise((h, w), rng.uniform(1.6, 2.2), rng)
    if texture_seed is not None:
        # a texture sibling: the same draws are consumed from ``rng`` (so outline, masses and tags are unchanged),
        # only the parenchyma noise fields come from an independent generator
        trng = np.random.default_rng([int(seed), int(study_index), int(image_index), 1000 + int(texture_seed)])
        texture = _powerlaw_noise((h, w), trng.uniform(2.5, 3.5), trng)
        fine = _powerlaw_noise((h, w), trng.uniform(1.6, 2.2), trng)
    envelope = np.clip((dist - 0.03 * w) / (0.09 * w), 0.0, 1.0)
    inner = envelope > 0.5
    frac = _DENSITY_GLAND_FRACTION[density] * rng.uniform(0.85, 1.15)
    thr = np.quantile(texture[inner], 1.0 - frac) if inner.any() else 0.0
    gland = 1.0 / (1.0 + np.exp(-(texture - thr) / 0.3)) * envelope
    tissue = _FAT + (_GLAND + rng.uniform(-0.03, 0.03) - _FAT) * gland + 0.025 * fine
    # thinner tissue towards the periphery (compressed-breast thickness fall-off)
    tissue *= 1.0 - 0.25 * np.exp(-dist / (0.05 * w))

    pect = np.zeros((h, w), dtype=bool)
    if view == "MLO":
        pw = min(w * rng.uniform(0.22, 0.38), 0.85 * x_edge[0])
        ph = h * rng.uniform(0.3, 0.5)
        u = np.clip(rows / ph, 0.0, 1.0)
        pect = (cols / pw + rows / ph < 1.0 + 0.08 * np.sin(np.pi * u)) & breast
        soft = ndimage.gaussian_filter(pect.astype(np.float64), 1.2 * scale)
        pect_val = _PECTORAL + rng.uniform(-0.02, 0.03) + 0.02 * fine
        tissue = tissue * (1.0 - soft) + pect_val * soft

    # skin line: a thin band at the boundary (not along the chest wall / image edges)
    skin_px = max(1.5, 2.5 * scale)
    skin = breast & (dist <= skin_px)
    tissue = np.where(skin, _SKIN + 0.01 * fine, tissue)

    display = np.where(breast, tissue, _AIR)
    display_clean = display.copy()  # the lesion-free truth: everything below except the masses

    # masses: fully inside the breast (away from skin and pectoral muscle), not overlapping
    n_masses = int(rng.choice([0, 1, 2], p=[0.25, 0.5, 0.25]))
    allowed = breast & ~ndimage.binary_dilation(pect, iterations=max(2, int(4 * scale)))
    allowed_dist = ndimage.distance_transform_edt(allowed)
    masses: list[_Mass] = []
    placed: list[tuple[float, float, float]] = []  # (row, col, extent)
    for k in range(n_masses):
        shape_name = MASS_SHAPES[(3 * g + k) % len(MASS_SHAPES)]
        r = h * rng.uniform(0.02, 0.08)
        spic_len = r * rng.uniform(0.6, 1.3) if shape_name == "spiculated" else 0.0
        margin = str(rng.choice(_SHAPE_MARGINS[shape_name]))
        blur = _MARGIN_BLUR[margin] * scale
        ok = None
        for _ in range(5):
            # the core first (it fixes the bounding box), in a window holding core, spicules and blur
            size = int(np.ceil(2.0 * r + spic_len + 3.0 * blur)) + 2
            core_local, R, _theta = _mass_core(shape_name, r, size, rng)
            ys, xs = np.nonzero(core_local)
            if ys.size == 0:
                r *= 0.75
                spic_len *= 0.75
                continue
            by = np.array([ys.min(), ys.max() + 1], dtype=np.float64) - size
            bx = np.array([xs.min(), xs.max() + 1], dtype=np.float64) - size
            corner = float(np.sqrt(np.max(by ** 2) + np.max(bx ** 2)))  # the box lies in this disk
            extent = max(corner, float(R[core_local].max()) + spic_len) + 2.0 * blur + skin_px + 2.0
            cand = (allowed_dist >= extent) & (rows >= size) & (rows < h - size) & (cols >= size) & (cols < w - size)
            for (pr, pc, pe) in placed:
                cand &= (rows - pr) ** 2 + (cols - pc) ** 2 > (extent + pe + 3.0) ** 2
            idx = np.flatnonzero(cand)
            if idx.size:
                ok = divmod(int(idx[rng.integers(idx.size)]), w)
                break
            r *= 0.75
            spic_len *= 0.75
        if ok is None:
            continue
        cr, cc = ok
        rho = np.hypot(*np.mgrid[-size:size + 1, -size:size + 1].astype(np.float64))
        dome = 0.9 + 0.1 * np.sqrt(np.clip(1.0 - (rho / np.maximum(R, 1e-6)) ** 2, 0.0, 1.0))
        alpha = core_local.astype(np.float64)
        alpha = ndimage.gaussian_filter(alpha, blur) if blur > 0 else alpha
        spic = np.zeros_like(alpha)
        if shape_name == "spiculated":
            n_sp = int(rng.integers(8, 17))
            for ang in rng.uniform(0, 2 * np.pi, n_sp):
                # the core's radius in this direction (first sample outside it), then a thin line outwards
                ray = np.arange(0.0, float(size), 0.5)
                ry = np.clip(np.round(size + ray * np.sin(ang)).astype(int), 0, 2 * size)
                rx = np.clip(np.round(size + ray * np.cos(ang)).astype(int), 0, 2 * size)
                outside = np.flatnonzero(~core_local[ry, rx])
                r0 = 0.8 * float(ray[outside[0]] if outside.size else r)
                length = spic_len * rng.uniform(0.6, 1.0)
                t = np.linspace(0.0, 1.0, int(4 * (length + r0)) + 2)
                rad = r0 + t * length
                py = np.clip(np.round(size + rad * np.sin(ang)).astype(int), 0, 2 * size)
                px = np.clip(np.round(size + rad * np.cos(ang)).astype(int), 0, 2 * size)
                np.maximum.at(spic, (py, px), 1.0 - 0.7 * t)
            spic = ndimage.gaussian_filter(spic, 0.6 * max(scale, 0.5))
            spic /= max(spic.max(), 1e-6)
        amp = rng.uniform(0.12, 0.22)
        sl = (slice(cr - size, cr + size + 1), slice(cc - size, cc + size + 1))
        # a fairly homogeneous dense mass replacing the local parenchyma, brighter than the surrounding
        # tissue (and than glandular tissue), with a faint internal texture; spicules add thin lines
        local = float(np.mean(tissue[sl][breast[sl]]))
        level = max(local, _GLAND) + amp
        value = level * dome + 0.03 * fine[sl]
        display[sl] = display[sl] * (1.0 - alpha) + value * alpha + 0.5 * amp * spic * breast[sl]
        core = np.zeros((h, w), dtype=bool)
        core[sl] = core_local
        birads = int(rng.choice(_SHAPE_BIRADS[shape_name]))
        masses.append(_Mass(shape=shape_name, margin=margin, birads=birads, core=core))
        placed.append((float(cr), float(cc), extent))

    # quantum noise everywhere
    noise = rng.normal(0.0, 0.004, size=(h, w))
    display = display + noise
    display_clean = display_clean + noise
    air = ~breast

    # small artefact away from the breast on some images (far side from the chest wall)
    artefact = ""
    if rng.random() < 0.4:
        kind = "marker" if rng.random() < 0.6 else "edge"
        far = ndimage.binary_dilation(breast, iterations=max(3, int(8 * scale)))
        if kind == "marker":
            mh, mw = max(4, int(0.035 * h)), max(6, int(0.07 * w))
            r0 = int(0.03 * h) if rng.random() < 0.5 else h - int(0.03 * h) - mh
            c0 = w - int(0.04 * w) - mw
            box = (slice(r0, r0 + mh), slice(c0, c0 + mw))
            if not far[box].any():
                patch = np.full((mh, mw), _ARTEFACT)
                # a dark "L"-like glyph in the marker
                patch[mh // 4: mh - mh // 4, mw // 4: mw // 4 + max(1, mw // 8)] = _AIR
                patch[mh - mh // 4 - max(1, mh // 6): mh - mh // 4, mw // 4: mw - mw // 4] = _AIR
                display[box] = patch
                display_clean[box] = patch
                air[box] = False
                artefact = "marker"
        else:
            nrows = max(2, int(round(3 * scale)))
            box = (slice(h - nrows, h), slice(int(0.6 * w), w))
            if not far[box].any():
                display[box] = _ARTEFACT - 0.05
                display_clean[box] = _ARTEFACT - 0.05
                air[box] = False
                artefact = "edge"

    # vendor appearance: a tone curve and extra quantum noise (own stream: the draws above do not move)
    tone = PHANTOM_VENDORS[vendor]
    vendor_noise = np.random.default_rng([int(seed), int(study_index), int(image_index), 41]).normal(
        0.0, max(tone["noise"] - 0.003, 0.0) + 1e-12, size=(h, w))

    def finish(d: np.ndarray) -> np.ndarray:
        return np.clip(np.clip(d, 0.0, 1.0) ** tone["gamma"] + vendor_noise, 0.0, 1.0)

    display, display_clean = finish(display), finish(display_clean)
    if laterality == "R":  # right breasts: chest wall on the right image edge
        display = display[:, ::-1]
        display_clean = display_clean[:, ::-1]
        breast = breast[:, ::-1]
        air = air[:, ::-1]
        for m in masses:
            m.core = m.core[:, ::-1]
    for m in masses:
        rr = np.flatnonzero(m.core.any(axis=1))
        cc_ = np.flatnonzero(m.core.any(axis=0))
        m.box = (int(cc_[0]), int(rr[0]), int(cc_[-1]) + 1, int(rr[-1]) + 1)
    return _Rendered(
        display=np.ascontiguousarray(display), display_lesion_free=np.ascontiguousarray(display_clean),
        breast=np.ascontiguousarray(breast),
        air=np.ascontiguousarray(air), masses=masses, artefact=artefact,
    )


# --------------------------------------------------------------------------------------------------------
# DICOM encoding
# --------------------------------------------------------------------------------------------------------
def _stored_values(
    r: _Rendered, v: ImageVariant, rng: np.random.Generator
) -> tuple[np.ndarray, int | None, float]:
    """Stored pixel values (uint16) of the variant, the PixelPaddingValue (or None) and the median stored
    value of the air background before padding."""
    maxv = 2 ** v.bits_stored - 1
    d = r.display
    if v.for_processing:
        # raw detector signal: exposure transmitted through the breast, high for air, low for dense tissue
        k = rng.uniform(2.2, 3.0)
        val = maxv * (0.04 + 0.9 * np.exp(-k * d))
    else:
        offset, span = maxv * rng.uniform(0.02, 0.05), maxv * rng.uniform(0.85, 0.92)
        val = offset + span * d
        if v.photometric == "MONOCHROME1":
            val = maxv - val
    stored = np.clip(np.round(val), 1, maxv - 1).astype(np.uint16)
    air_value = float(np.median(stored[r.air])) if r.air.any() else float(maxv if v.photometric == "MONOCHROME1" else 0)
    pad = None
    if v.padding:
        air_is_high = v.photometric == "MONOCHROME1"
        pad = maxv if air_is_high else 0
        stored[r.air] = pad
    return stored, pad, air_value


def _voi_tags(ds: Dataset, v: ImageVariant, modality: np.ndarray, breast: np.ndarray, air_value: float,
              rng: np.random.Generator) -> None:
    """Window / VOI LUT tags from the breast's modality-value range: the far edge just past the densest
    tissue (99.9th percentile from the air side), the near edge half-way between the faintest tissue (1st
    percentile) and the air level, so that air displays black and peripheral fat dark grey."""
    vals = modality[breast]
    p_lo, p_hi = np.percentile(vals, [0.1, 99.9])
    p_near_lo, p_near_hi = np.percentile(vals, [1.0, 99.0])
    if np.median(vals) >= air_value:  # tissue above air (MONOCHROME2-like stored values)
        lo = p_near_lo - 0.5 * max(p_near_lo - air_value, 0.0)
        hi = p_hi + 0.04 * (p_hi - lo)
    else:  # tissue below air (MONOCHROME1, for-processing exposure)
        hi = p_near_hi + 0.5 * max(air_value - p_near_hi, 0.0)
        lo = p_lo - 0.04 * (hi - p_lo)
    if v.voi == "LUT_SEQUENCE":  # no rescale on these images: modality values == stored integers
        first = int(np.floor(lo))
        last = int(np.ceil(hi))
        n = max(2, min(last - first + 1, 65535))
        gamma = rng.uniform(0.7, 0.9)
        x = np.arange(n, dtype=np.float64) / (n - 1)
        lut = np.round(65535.0 * x ** gamma).astype("<u2")
        item = Dataset()
        item.add_new(0x00283002, "US", [n, first, 16])  # LUTDescriptor
        item.LUTExplanation = "PHANTOM GAMMA"
        item.add_new(0x00283006, "OW", lut.tobytes())  # LUTData
        ds.VOILUTSequence = [item]
        return
    center, width = (lo + hi) / 2.0, max(hi - lo, 2.0) * 1.04
    if v.voi == "TWO_WINDOWS":
        full_lo, full_hi = float(modality.min()), float(modality.max())
        ds.WindowCenter = [round(center, 2), round((full_lo + full_hi) / 2.0, 2)]
        ds.WindowWidth = [round(width, 2), round(max(full_hi - full_lo, 2.0), 2)]
        ds.WindowCenterWidthExplanation = ["PHANTOM BREAST", "PHANTOM FULL RANGE"]
        ds.VOILUTFunction = "LINEAR"
        return
    if v.voi == "SIGMOID":  # the sigmoid never clips: a narrower width keeps air near black
        width *= 0.8
    ds.WindowCenter = round(center, 2)
    ds.WindowWidth = round(width, 2)
    ds.WindowCenterWidthExplanation = "PHANTOM BREAST"
    if v.voi == "LINEAR":
        ds.VOILUTFunction = "LINEAR"
    elif v.voi == "SIGMOID":
        ds.VOILUTFunction = "SIGMOID"


def _build_dataset(
    *, seed: int, study_index: int, image_index: int, ids: dict[str, str], r: _Rendered,
    v: ImageVariant, shape: tuple[int, int], age: int, vendor: str = "HOLOGIC",
) -> tuple[Dataset, np.ndarray]:
    laterality, view = VIEWS[image_index]
    h, w = shape
    rng = np.random.default_rng([int(seed), int(study_index), int(image_index), 7])
    stored, pad, air_value = _stored_values(r, v, rng)
    sop_class = MG_FOR_PROCESSING if v.for_processing else MG_FOR_PRESENTATION
    study_uid = _uid(seed, "study", study_index)
    series_uid = _uid(seed, "series", study_index, image_index)
    sop_uid = _uid(seed, "sop", study_index, image_index)

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationVersionName = f"MGCDM_PHANTOM_{GENERATOR_VERSION.replace('.', '')}"[:16]

    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["DERIVED", "PRIMARY"]
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20000101"
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
    ds.AccessionNumber = f"PH{study_index:08d}"
    ds.Modality = "MG"
    ds.PresentationIntentType = "FOR PROCESSING" if v.for_processing else "FOR PRESENTATION"
    ds.Manufacturer = f"{vendor} - {PHANTOM_MANUFACTURER}"
    ds.ManufacturerModelName = "phantom generator"
    ds.SoftwareVersions = f"mammo_gcdm phantom {GENERATOR_VERSION}"
    ds.InstitutionName = "SYNTHETIC"
    ds.StudyDescription = "MAMMOGRAPHY PHANTOM"
    ds.SeriesDescription = PHANTOM_SERIES_DESCRIPTION
    ds.DerivationDescription = f"{PHANTOM_SERIES_DESCRIPTION}; generated by mammo_gcdm phantom {GENERATOR_VERSION}"
    ds.ImageComments = f"{PHANTOM_SERIES_DESCRIPTION} (seed {seed})"
    ds.PatientName = f"PHANTOM^{study_index:04d}"
    ds.PatientID = f"PHANTOM-{study_index:04d}"
    ds.PatientBirthDate = ""
    ds.PatientSex = "F"
    ds.PatientAge = f"{age:03d}Y"
    ds.BodyPartExamined = "BREAST"
    ds.ViewPosition = view
    if not v.missing_laterality:
        ds.ImageLaterality = laterality
    ds.PositionerType = "MAMMOGRAPHIC"
    ds.BurnedInAnnotation = "NO"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = ids["study_id"][:16]
    ds.SeriesNumber = image_index + 1
    ds.InstanceNumber = 1
    spacing = round(240.0 / h, 6)
    ds.ImagerPixelSpacing = [spacing, spacing]
    ds.PixelSpacing = [spacing, spacing]

    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = v.photometric
    ds.Rows, ds.Columns = h, w
    ds.BitsAllocated = 16
    ds.BitsStored = v.bits_stored
    ds.HighBit = v.bits_stored - 1
    ds.PixelRepresentation = 0
    if pad is not None:
        ds.add_new(0x00280120, "US", pad)  # PixelPaddingValue
    if v.rescale is not None:
        ds.RescaleSlope, ds.RescaleIntercept = v.rescale
        ds.RescaleType = "US"
        modality = stored.astype(np.float64) * v.rescale[0] + v.rescale[1]
    else:
        modality = stored.astype(np.float64)
    scale_air = (air_value * v.rescale[0] + v.rescale[1]) if v.rescale is not None else air_value
    _voi_tags(ds, v, modality, r.breast, scale_air, rng)
    ds.LossyImageCompression = "00"
    ds.add_new(0x7FE00010, "OW", stored.tobytes())  # PixelData, little endian
    return ds, stored


def _write_dicom(ds: Dataset, stored: np.ndarray, ts: str, path: Path) -> str:
    """Write ``ds`` with transfer syntax ``ts`` (lossless); returns the transfer syntax actually used.

    JPEG-LS needs the ``pyjpegls`` package and JPEG 2000 ``pylibjpeg-openjpeg``; if an encoder is missing the
    image is written uncompressed with a warning (the variety then lacks that transfer syntax).
    """
    if ts in (JPEG2000Lossless, JPEGLSLossless, RLELossless):
        encoder = get_encoder(ts)
        if encoder.is_available:
            ds.compress(ts, stored, generate_instance_uid=False)
        else:
            warnings.warn(
                f"no encoder for {pydicom.uid.UID(ts).name} ({'; '.join(encoder.missing_dependencies)}): "
                f"writing {path.name} uncompressed", RuntimeWarning, stacklevel=3,
            )
    elif ts == DeflatedExplicitVRLittleEndian:
        ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    with atomic_path(path) as tmp:
        ds.save_as(tmp, enforce_file_format=True)
    return str(ds.file_meta.TransferSyntaxUID)


@dataclass
class PhantomImage:
    """One phantom image before it is written: the uncompressed dataset and everything the CSVs need."""

    study_index: int
    image_index: int
    study_id: str
    series_id: str
    image_id: str
    laterality: str
    view: str
    density: str  # "A".."D"
    variant: ImageVariant
    dataset: Dataset  # Explicit VR Little Endian, uncompressed; written with ``variant.transfer_syntax``
    stored: np.ndarray  # uint16 (rows, cols): the stored pixel values every transfer syntax must reproduce
    masses: list[dict[str, Any]]  # {"shape", "margin", "birads", "box": (xmin, ymin, xmax, ymax)}
    breast_birads: int
    artefact: str  # "", "marker" or "edge"
    vendor: str = "HOLOGIC"  # a key of PHANTOM_VENDORS (DICOM Manufacturer "<vendor> - mammo_gcdm phantom")
    area_class: str = "medium"  # breast-area class the outline was drawn for (small / medium / large)
    lesion_free_stored: np.ndarray | None = None  # stored values of the same image without its masses (if any)


def phantom_image(
    seed: int, study_index: int, image_index: int, image_shape: tuple[int, int] = (640, 512),
    texture_seed: int | None = None,
) -> PhantomImage:
    """Synthesize image ``image_index`` (0..3 = L-CC, L-MLO, R-CC, R-MLO) of study ``study_index``.

    A pure function of its arguments (the dataset generator writes exactly this image), so a single image can
    be regenerated, e.g. to check that a compressed file decodes to ``stored`` exactly.

    ``texture_seed``: ``None`` gives the dataset's image; an integer gives a *texture sibling*: the same breast
    outline, pectoral muscle, masses, tags and grayscale variant with an independent parenchymal texture. Siblings
    are real images of one generation condition (breast mask + lesions), the reference for how much samples of one
    condition may differ (:mod:`custom.metrics.diversity_reference`).
    """
    seed, study_index, image_index = int(seed), int(study_index), int(image_index)
    if not 0 <= image_index < len(VIEWS):
        raise ValueError(f"image_index must be 0..{len(VIEWS) - 1}, got {image_index}")
    shape = (int(image_shape[0]), int(image_shape[1]))
    g = study_index * len(VIEWS) + image_index
    laterality, view = VIEWS[image_index]
    density, age = _study_meta(seed, study_index)
    vendor = _study_vendor(seed, study_index)
    area_class = _area_class(seed, study_index, image_index)
    ids = {
        "study_id": _hex_id(seed, "study", study_index),
        "series_id": _hex_id(seed, "series", study_index, image_index),
        "image_id": _hex_id(seed, "image", study_index, image_index),
    }
    v = image_variant(g)
    rendered = _render(seed, study_index, image_index, shape, density, g, vendor, area_class, texture_seed)
    ds, stored = _build_dataset(seed=seed, study_index=study_index, image_index=image_index, ids=ids,
                                r=rendered, v=v, shape=shape, age=age, vendor=vendor)
    lesion_free = None
    if rendered.masses:  # same stored-value mapping (same random draws) on the lesion-free display
        clean = _Rendered(display=rendered.display_lesion_free, display_lesion_free=rendered.display_lesion_free,
                          breast=rendered.breast, air=rendered.air, masses=[], artefact=rendered.artefact)
        lesion_free, _, _ = _stored_values(clean, v, np.random.default_rng([seed, study_index, image_index, 7]))
    if rendered.masses:
        breast_birads = max(m.birads for m in rendered.masses)
    else:
        breast_birads = 2 if np.random.default_rng([seed, study_index, image_index, 11]).random() < 0.2 else 1
    return PhantomImage(
        study_index=study_index, image_index=image_index, laterality=laterality, view=view, density=density,
        variant=v, dataset=ds, stored=stored, breast_birads=breast_birads, artefact=rendered.artefact,
        masses=[{"shape": m.shape, "margin": m.margin, "birads": m.birads, "box": m.box} for m in rendered.masses],
        vendor=vendor, area_class=area_class, lesion_free_stored=lesion_free, **ids,
    )


# --------------------------------------------------------------------------------------------------------
# dataset
# --------------------------------------------------------------------------------------------------------
def _write_lesion_free(img: PhantomImage, path: Path, seed: int) -> None:
    """The lesion-free version of ``img`` (the truth of lesion removal): its dataset with the lesion-free pixels, a
    new SOP instance UID and "LESION-FREE" in the descriptions; uncompressed."""
    ds = copy.deepcopy(img.dataset)
    uid = _uid(seed, "sop-lesion-free", img.study_index, img.image_index)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid
    ds.SeriesDescription = f"{PHANTOM_SERIES_DESCRIPTION} - LESION-FREE TRUTH"
    ds.ImageComments = f"{ds.ImageComments}; lesion-free version of image {img.image_id}"
    ds.PixelData = img.lesion_free_stored.tobytes()
    _write_dicom(ds, img.lesion_free_stored, ExplicitVRLittleEndian, path)


def _study_meta(seed: int, study_index: int) -> tuple[str, int]:
    rng = np.random.default_rng([int(seed), int(study_index), 1000])
    density = str(rng.choice(DENSITIES, p=_DENSITY_P))
    age = int(rng.integers(40, 76))
    return density, age


def _study_vendor(seed: int, study_index: int) -> str:
    """The vendor a study was "acquired" on (its own random stream)."""
    rng = np.random.default_rng([int(seed), int(study_index), 1001])
    return str(rng.choice(tuple(PHANTOM_VENDORS)))


def _split(seed: int, n_studies: int, test_fraction: float) -> list[str]:
    if not 0.0 <= test_fraction <= 1.0:
        raise ValueError(f"test_fraction must lie in [0, 1], got {test_fraction}")
    n_test = int(round(test_fraction * n_studies))
    if 0.0 < test_fraction < 1.0 and n_studies >= 2:
        n_test = min(max(n_test, 1), n_studies - 1)
    order = np.random.default_rng([int(seed), 2000]).permutation(n_studies)
    test = set(int(i) for i in order[:n_test])
    return ["test" if i in test else "training" for i in range(n_studies)]


def _readme(seed: int, n_studies: int, shape: tuple[int, int], test_fraction: float) -> str:
    return (
        f"{PHANTOM_SERIES_DESCRIPTION}\n\n"
        "This folder holds SYNTHETIC TEST DATA generated by mammo_gcdm's phantom generator\n"
        "(custom/data/phantom.py). It is NOT patient data: every image is a procedurally drawn\n"
        "breast phantom (power-law parenchyma, pectoral muscle, synthetic masses) written as DICOM MG\n"
        "in the VinDr-Mammo folder layout, with VinDr-style finding and breast-level CSV annotations.\n\n"
        f"generator: mammo_gcdm phantom\n"
        f"generator version: {GENERATOR_VERSION}\n"
        f"seed: {seed}\n"
        f"studies: {n_studies} (4 images each: L-CC, L-MLO, R-CC, R-MLO)\n"
        f"image shape (rows, columns): {shape[0]} x {shape[1]}\n"
        f"test fraction: {test_fraction}\n"
        "box convention: xmin/ymin = first column/row of the mass core, xmax/ymax = last + 1\n"
        f"regenerate: python -m custom.data.phantom --output_dir DIR --n_studies {n_studies} --seed {seed}"
        f" --image_shape {shape[0]} {shape[1]}\n"
    )


def _fmt(x: float) -> str:
    return repr(float(x))


def _csv_text(columns: list[str], rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def generate_phantom_dataset(
    output_dir,
    n_studies: int = 40,
    seed: int = 0,
    image_shape: tuple[int, int] = (640, 512),
    test_fraction: float = 0.2,
    progress: bool = True,
) -> dict:
    """Write a seeded synthetic VinDr-Mammo-layout dataset under ``output_dir`` and return a summary.

    Images are written first and the CSVs last, so ``finding_annotations.csv`` existing means the dataset is
    complete. Every file is written atomically. Files of an earlier run that this run does not produce are
    left alone (the CSVs define the dataset).
    """
    n_studies = int(n_studies)
    seed = int(seed)
    if n_studies < 1:
        raise ValueError(f"n_studies must be >= 1, got {n_studies}")
    if seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed}")
    h, w = (int(image_shape[0]), int(image_shape[1]))
    if h < 64 or w < 64:
        raise ValueError(f"image_shape must be at least (64, 64), got {image_shape}")
    shape = (h, w)
    splits = _split(seed, n_studies, test_fraction)
    out = Path(output_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)

    finding_rows: list[dict[str, Any]] = []
    breast_rows: list[dict[str, Any]] = []
    counts: dict[str, Counter] = {k: Counter() for k in (
        "view", "laterality", "photometric", "voi_function", "voi_variant", "transfer_syntax", "bits_stored",
        "presentation_intent", "density", "mass_shape", "mass_margin", "breast_birads", "artefact", "split",
        "area_class", "vendor",
    )}
    n_masses = n_missing_lat = n_padding = n_rescaled = n_lesion_free = 0

    jobs = [(s, i) for s in range(n_studies) for i in range(len(VIEWS))]
    iterator: Any = jobs
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(jobs, desc="phantom images", unit="img")
    for study_index, image_index in iterator:
        img = phantom_image(seed, study_index, image_index, shape)
        v, laterality, view, density = img.variant, img.laterality, img.view, img.density
        ids = {"study_id": img.study_id, "series_id": img.series_id, "image_id": img.image_id}
        if img.lesion_free_stored is not None:  # first: writing the image below may compress its dataset in place
            _write_lesion_free(img, out / LESION_FREE_DIR / img.study_id / f"{img.image_id}.dicom", seed)
            n_lesion_free += 1
        ts_used = _write_dicom(img.dataset, img.stored, v.transfer_syntax,
                               out / "images" / img.study_id / f"{img.image_id}.dicom")
        breast_birads = img.breast_birads
        ds = img.dataset
        base = {
            **ids, "laterality": laterality, "view_position": view, "height": h, "width": w,
            "breast_birads": f"BI-RADS {breast_birads}", "breast_density": f"DENSITY {density}",
            "split": splits[study_index],
        }
        breast_rows.append({k: base[k] for k in VINDR_BREAST_COLUMNS})
        if img.masses:
            for m in img.masses:
                xmin, ymin, xmax, ymax = m["box"]
                finding_rows.append({**base, "finding_categories": "['Mass']",
                                     "finding_birads": f"BI-RADS {m['birads']}", "xmin": _fmt(xmin),
                                     "ymin": _fmt(ymin), "xmax": _fmt(xmax), "ymax": _fmt(ymax)})
                counts["mass_shape"][m["shape"]] += 1
                counts["mass_margin"][m["margin"]] += 1
        else:
            finding_rows.append({**base, "finding_categories": "['No Finding']", "finding_birads": "",
                                 "xmin": "", "ymin": "", "xmax": "", "ymax": ""})

        n_masses += len(img.masses)
        n_missing_lat += int(v.missing_laterality)
        n_padding += int(v.padding)
        n_rescaled += int(v.rescale is not None)
        counts["view"][view] += 1
        counts["laterality"][laterality] += 1
        counts["photometric"][v.photometric] += 1
        counts["voi_function"][v.voi_function] += 1
        counts["voi_variant"][v.voi] += 1
        counts["transfer_syntax"][pydicom.uid.UID(ts_used).name] += 1
        counts["bits_stored"][str(v.bits_stored)] += 1
        counts["presentation_intent"][ds.PresentationIntentType] += 1
        counts["breast_birads"][f"BI-RADS {breast_birads}"] += 1
        counts["artefact"][img.artefact or "none"] += 1
        counts["area_class"][img.area_class] += 1
        if image_index == 0:
            counts["density"][f"DENSITY {density}"] += 1
            counts["vendor"][img.vendor] += 1
            counts["split"][splits[study_index]] += 1

    atomic_write_text(out / PHANTOM_README_NAME, _readme(seed, n_studies, shape, test_fraction))
    atomic_write_text(out / "breast-level_annotations.csv", _csv_text(VINDR_BREAST_COLUMNS, breast_rows))
    atomic_write_text(out / "finding_annotations.csv", _csv_text(VINDR_FINDING_COLUMNS, finding_rows))

    summary: dict[str, Any] = {
        "output_dir": str(out),
        "generator_version": GENERATOR_VERSION,
        "seed": seed,
        "image_shape": [h, w],
        "n_studies": n_studies,
        "n_images": len(breast_rows),
        "n_masses": n_masses,
        "n_finding_rows": len(finding_rows),
        "n_training_studies": counts["split"]["training"],
        "n_test_studies": counts["split"]["test"],
        "n_missing_laterality": n_missing_lat,
        "n_padding": n_padding,
        "n_rescaled": n_rescaled,
        "n_lesion_free": n_lesion_free,
    }
    for key, counter in counts.items():
        if key != "split":
            summary[f"by_{key}"] = dict(sorted(counter.items()))
    return summary


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        prog="python -m custom.data.phantom",
        description="Write a deterministic synthetic mammography phantom dataset in the VinDr-Mammo layout.",
    )
    parser.add_argument("--output_dir", required=True, help="folder to write into")
    parser.add_argument("--n_studies", type=int, default=40, help="number of studies (4 images each)")
    parser.add_argument("--seed", type=int, default=0, help="non-negative random seed")
    parser.add_argument("--image_shape", type=int, nargs=2, default=(640, 512), metavar=("ROWS", "COLS"))
    parser.add_argument("--test_fraction", type=float, default=0.2)
    parser.add_argument("--no_progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    summary = generate_phantom_dataset(
        args.output_dir, n_studies=args.n_studies, seed=args.seed, image_shape=tuple(args.image_shape),
        test_fraction=args.test_fraction, progress=not args.no_progress,
    )
    json.dump(summary, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return summary


if __name__ == "__main__":
    main()
