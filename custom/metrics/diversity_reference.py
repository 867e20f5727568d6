"""Reference values for sample diversity: how alike *real* images are, at the model's resolution.

Diversity of a conditional generator is measured as the mean pairwise MS-SSIM among samples of one condition
(:func:`custom.metrics.image_quality.ms_ssim_diversity`; lower = more diverse). A number alone says little; two
references say what it should be:

- :func:`real_pairs_ms_ssim` — different real images of a split (different breasts, different lesions), resized to
  the model's side exactly as training resizes them (area averaging). Samples of *one* condition share the breast
  outline, the background and the lesions, so they cannot be as different as this; it is the lower bound.
- :func:`texture_sibling_ms_ssim` — phantom data only: *texture siblings*, real phantom images of one generation
  condition (same breast outline, pectoral muscle, masses, tags and grayscale variant; independent parenchymal
  texture, :func:`custom.data.phantom.phantom_image` with ``texture_seed``), each written as DICOM MG and prepared by
  ``prepare``'s own :func:`custom.data.prepare.preprocess_case`. This is how much real images of one condition
  differ: the value an ideal sampler reaches.

Both take ``(N, 1, S, S)`` images in [0, 1] through the same MS-SSIM settings as the evaluation.
"""

from __future__ import annotations

import json
import re
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from custom.data.cases import Finding, MammoCase
from custom.data.phantom import PHANTOM_README_NAME, _hex_id, _write_dicom, _write_lesion_free, phantom_image
from custom.data.prepare import PreprocessSettings, preprocess_case
from custom.data.training import load_prepared_datalist
from custom.metrics.image_quality import ms_ssim_diversity

__all__ = ["load_model_frame", "real_pairs_ms_ssim", "phantom_source", "sibling_frames", "texture_sibling_ms_ssim",
           "write_lesion_free_sibling"]


def load_model_frame(path: str | Path, image_size: int) -> np.ndarray:
    """A prepared 16-bit PNG as ``(image_size, image_size)`` float32 in [0, 1], area-resized as in training."""
    from PIL import Image

    with Image.open(path) as im:
        x = torch.from_numpy(np.asarray(im, dtype=np.float32) / 65535.0)[None, None]
    if x.shape[-1] != image_size or x.shape[-2] != image_size:
        x = F.interpolate(x, size=(int(image_size), int(image_size)), mode="area")
    return x[0, 0].numpy()


def real_pairs_ms_ssim(prepared_dir: str | Path, image_size: int, split: str = "test", max_images: int = 16) -> dict:
    """Mean pairwise MS-SSIM between different real images of ``split`` at ``image_size`` (the first
    ``max_images`` of the split, all pairs)."""
    items = load_prepared_datalist(str(prepared_dir), split, max_lesions=8)[: int(max_images)]
    if len(items) < 2:
        raise ValueError(f"{prepared_dir}: split {split!r} has {len(items)} image(s); need at least 2")
    x = np.stack([load_model_frame(it["image"], image_size) for it in items])[:, None]
    out = ms_ssim_diversity(x)
    out["n_images"] = len(items)
    return out


def _readme_value(text: str, key: str) -> str | None:
    m = re.search(rf"^{re.escape(key)}:\s*(.+)$", text, flags=re.M)
    return m.group(1).strip() if m else None


def phantom_source(record: dict[str, Any]) -> dict[str, Any] | None:
    """``{"seed", "study_index", "image_index", "image_shape"}`` of the phantom image a prepared record came from,
    or ``None`` when the source is not a phantom image (a real dataset: no siblings can be drawn)."""
    src = Path(str(record.get("source_image", "")))
    root = src.parents[2] if len(src.parents) >= 3 else None
    readme = root / PHANTOM_README_NAME if root is not None else None
    if readme is None or not readme.is_file():
        return None
    text = readme.read_text()
    seed, studies = _readme_value(text, "seed"), _readme_value(text, "studies")
    shape = _readme_value(text, "image shape (rows, columns)")
    if seed is None or studies is None or shape is None:
        return None
    seed_i, n_studies = int(seed), int(studies.split()[0])
    rows, cols = (int(v) for v in shape.split("x"))
    study_id, image_id = src.parent.name, src.stem
    for s in range(n_studies):
        if _hex_id(seed_i, "study", s) != study_id:
            continue
        for i in range(4):
            if _hex_id(seed_i, "image", s, i) == image_id:
                return {"seed": seed_i, "study_index": s, "image_index": i, "image_shape": (rows, cols)}
    return None


def sibling_frames(record: dict[str, Any], texture_seeds: Sequence[int | None], image_size: int,
                   work_dir: str | Path | None = None) -> np.ndarray:
    """``(len(texture_seeds), 1, S, S)``: texture siblings of the phantom image behind the datalist ``record`` (a raw
    ``datalist.json`` entry), each written as an uncompressed DICOM MG and prepared by :func:`preprocess_case` at
    the record's prepared size (lesions from the phantom's boxes, as the VinDr adapter reads them), then
    area-resized to ``image_size``. A seed of ``None`` is the dataset's own image (it reproduces the prepared file)."""
    src = phantom_source(record)
    if src is None:
        raise ValueError(f"{record.get('source_image')}: not a phantom image (texture siblings need the phantom)")
    prepared_size = int((record.get("geometry") or {}).get("output_shape", [256])[0])
    settings = PreprocessSettings(image_size=prepared_size)
    frames = []
    with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
        for k in texture_seeds:
            img = phantom_image(src["seed"], src["study_index"], src["image_index"], src["image_shape"],
                                texture_seed=k)
            path = Path(tmp) / f"sibling_{len(frames)}.dicom"
            _write_dicom(img.dataset, img.stored, "1.2.840.10008.1.2.1", path)
            case = MammoCase(
                case_id=f"sibling_{len(frames)}", image_path=str(path), study_id=img.study_id, laterality=img.laterality,
                view=img.view, findings=[Finding("Mass", None, [float(v) for v in m["box"]]) for m in img.masses],
                annotated_shape=list(src["image_shape"]),
            )
            rec = preprocess_case(case, str(Path(tmp) / "prepared"), settings)
            frames.append(load_model_frame(Path(tmp) / "prepared" / rec["image"], image_size))
    return np.stack(frames)[:, None]


def texture_sibling_ms_ssim(prepared_dir: str | Path, image_size: int, split: str = "test", n_cases: int = 3,
                            n_siblings: int = 4, require_lesion: bool = True,
                            roundtrip: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict:
    """Mean MS-SSIM among texture siblings, per condition then averaged, for the first ``n_cases`` phantom
    images of ``split`` (with a lesion when ``require_lesion``, as the evaluation's diversity conditions are).

    ``roundtrip``: optionally a map ``(N, 1, S, S) -> (N, 1, S, S)`` in [0, 1] (the stage-1 autoencoder's
    encode + decode); then ``roundtrip_ms_ssim_mean`` is the same measure on the round-tripped siblings: how much
    of the real images' difference survives stage 1, i.e. the best diversity any stage-2 sampler can reach."""
    datalist = json.loads((Path(prepared_dir) / "datalist.json").read_text())
    items = datalist.get(split) or []
    per_case = []
    for it in items:
        if len(per_case) >= int(n_cases):
            break
        if require_lesion and int(it.get("num_lesions", 0)) == 0:
            continue
        if phantom_source(it) is None:
            continue
        frames = sibling_frames(it, list(range(int(n_siblings))), image_size)
        row = {"case_id": it.get("case_id"), **ms_ssim_diversity(frames)}
        if roundtrip is not None:
            with torch.no_grad():
                rt = roundtrip(torch.from_numpy(frames).float()).clamp(0.0, 1.0)
            row["roundtrip_ms_ssim_mean"] = ms_ssim_diversity(rt)["ms_ssim_mean"]
        per_case.append(row)
    if not per_case:
        raise ValueError(f"{prepared_dir}: no phantom image in split {split!r} (texture siblings need the phantom)")
    out = {"ms_ssim_mean": float(np.mean([c["ms_ssim_mean"] for c in per_case])), "n_cases": len(per_case),
           "n_siblings": int(n_siblings), "per_case": per_case}
    if roundtrip is not None:
        out["roundtrip_ms_ssim_mean"] = float(np.mean([c["roundtrip_ms_ssim_mean"] for c in per_case]))
    return out


def write_lesion_free_sibling(source_image: str | Path, texture_seed: int | None, path: str | Path) -> Path:
    """Write the lesion-free *texture sibling* of a phantom image as DICOM MG at ``path``: the phantom's lesion-free
    truth of that image (same breast outline, pectoral muscle, tags, grayscale variant, same stored-value mapping)
    with an independent parenchymal texture (``texture_seed``), written as the phantom writes its own truth. It is a
    plausible lesion-free tissue from the same generator, not the hidden one: its error to the truth in a lesion box
    is the reference error of a perfect "plausible tissue" removal (the removal analogue of the diversity
    reference). ``texture_seed=None`` writes the phantom's own truth again (same pixels).

    Raises:
        ValueError: ``source_image`` is not a phantom image, or that image has no lesion (no lesion-free truth).
    """
    src = phantom_source({"source_image": str(source_image)})
    if src is None:
        raise ValueError(f"{source_image}: not a phantom image (texture siblings need the phantom)")
    img = phantom_image(src["seed"], src["study_index"], src["image_index"], src["image_shape"],
                        texture_seed=None if texture_seed is None else int(texture_seed))
    if img.lesion_free_stored is None:
        raise ValueError(f"{source_image}: the phantom image has no lesion, so no lesion-free truth")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    _write_lesion_free(img, out, src["seed"])
    return out
