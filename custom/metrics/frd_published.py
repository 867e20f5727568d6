"""The published FRD (Fréchet Radiomics Distance): the ``frd-score`` package (Apache-2.0, offline, PyRadiomics),
run on PNG folders as it expects.

``frd-score``'s default (v1): PyRadiomics features of the original, LoG and wavelet images of each whole image
(≈464 features), normalised jointly over both sets, Fréchet distance, then ``log`` (its ``FRD = log(d_F^2)``). It is a
different number from the project's :mod:`custom.metrics.radiomics_distance` (``fd_radiomics67``: 67 GCDM lesion
features, z-scored with the real set, no log). The images are written as 8-bit PNGs (``round(255 x)``, the
reference evaluates 8-bit PNG folders) into a temporary folder per set; ``frd-score`` then reads them.

``log`` of a zero distance (identical sets) is ``-inf``; it is returned as ``None`` with a note.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from custom.errors import MammoInputError

__all__ = ["frd_score_available", "require_frd_score", "published_frd", "write_png_folder"]


def frd_score_available() -> bool:
    try:
        import frd_score  # noqa: F401
    except ImportError:
        return False
    return True


def require_frd_score(option: str = "--published_frd") -> str:
    """The installed ``frd-score`` version; one clear error when it is missing (before any expensive work)."""
    try:
        import frd_score
    except ImportError as err:
        raise MammoInputError(option, "the published FRD needs the frd-score package (pip install 'mammo_gcdm[frd]', "
                                      f"installed by `make env`): {err}") from None
    return str(frd_score.__version__)


def write_png_folder(images: Any, folder: str | Path) -> list[Path]:
    """``(N, 1, H, W)`` / ``(N, H, W)`` float images in [0, 1] -> ``folder/00000.png ...`` (8-bit grey)."""
    from PIL import Image

    x = np.asarray(images.detach().cpu().numpy() if hasattr(images, "detach") else images, dtype=np.float64)
    if x.ndim == 4:
        x = x[:, 0]
    if x.ndim != 3:
        raise ValueError(f"write_png_folder: images must be (N, 1, H, W) or (N, H, W), got {x.shape}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, img in enumerate(x):
        p = folder / f"{i:05d}.png"
        Image.fromarray((np.clip(img, 0.0, 1.0) * 255.0).round().astype(np.uint8)).save(p)
        paths.append(p)
    return paths


def published_frd(real_images: Any, generated_images: Any, num_workers: int = 1) -> dict[str, Any]:
    """``frd_score.compute_frd`` (its defaults, v1) of two image sets written as 8-bit PNG folders.

    Returns:
        ``{"frd": float | None, "package": "frd-score <version>", "version": "v1", "n_real", "n_generated", "note"}``.
    """
    version = require_frd_score()
    import logging

    from frd_score import compute_frd

    with tempfile.TemporaryDirectory(prefix="frd_") as tmp:
        a = write_png_folder(real_images, Path(tmp) / "real")
        b = write_png_folder(generated_images, Path(tmp) / "generated")
        level = logging.getLogger().level
        try:
            value = float(compute_frd([str(Path(tmp) / "real"), str(Path(tmp) / "generated")],
                                      num_workers=int(num_workers)))
        finally:
            logging.getLogger().setLevel(level)
    note = None
    if not math.isfinite(value):
        note = f"frd-score returned {value} (log of a zero distance: identical feature sets)"
        value = None
    return {"frd": value, "package": f"frd-score {version}", "version": "v1", "n_real": len(a), "n_generated": len(b),
            "note": note}
