"""The ``synthesize`` workflow: a labelled synthetic cohort sampled from the training distribution.

``python -m monai.bundle run synthesize --config_file bundle/configs/synthesize.json --num_images N --output_dir D``
(and the same line under ``torchrun --nproc_per_node G [--nnodes K ...]``) writes ``N`` synthetic mammograms with
their label maps in the layout ``prepare`` writes, so the project's training (and any MONAI training script) reads the
folder unchanged::

    D/images/<id>.png     16-bit grayscale (value = round(x * 65535)), model resolution S x S
    D/labels/<id>.png     3-class label map (0 background, 1 breast, 2 lesion)
    D/lesions/<id>.png    lesion instance map (0 none, k = lesion k)
    D/dicom/<id>.dcm      16-bit synthetic MG DICOM (with ``formats`` containing "dcm")
    D/records/<id>.json   the datalist entry + the image's **recipe** and seed (written last: "this image is done")
    D/shards/rank<r>.json what rank r wrote in its last run and its images/s
    D/datalist.json       MONAI datalist: ``training`` = every synthetic image (``synthetic: true``, findings with
                          box / category / BI-RADS, ``malignancy``, raw ``lesion_features``, seed), empty
                          ``validation`` / ``test`` (evaluate on real data)
    D/features.csv        raw radiomic features of every synthetic lesion (the 67 PyRadiomics names)
    D/feature_normalisation.json  the normaliser the conditions were built with (the model's)
    D/synthesis.json      the run's identity (model and stage-1 hashes, condition sampler, sampling parameters)
    D/synthesis_summary.json      counts, lesion/malignancy mix, throughput per rank and in total
    D/mixed/              with ``mix_with``: a prepared folder whose training list is real + synthetic (ratio
                          recorded in ``mixed/mix.json``), validation/test the real ones (paths point into both folders)

Steps (numbered as the run prints them):

1. **checks** (every rank, before any work; :meth:`SynthesisRun.prepare`): ``num_images`` >= 1, a reachable mix
   ratio, an output folder that is empty or holds *this* run (same model, stage-1 and condition/sampling settings:
   the run resumes; anything else is refused with one ``ERROR:`` line and nothing is touched);
2. **condition library** (:class:`ConditionLibrary`): the training split's breast masks, its lesion library (lesion
   masks, raw features, BI-RADS), a lesion-position prior (2-D histogram of lesion centres in breast-box coordinates)
   and the lesion presets (:func:`custom.features.presets.build_presets`);
3. **recipes** (:func:`sample_recipe`): image ``i`` gets its own generator seeded by ``(seed, i)``: a training
   breast mask (optionally mirrored top-bottom - the chest wall stays on the left - and warped by an anisotropic
   scale), a lesion count from ``lesion_count_probs``, a benign/malignant class (``malignant_fraction``), lesions
   from the library (or a preset and one of its member shapes) scaled and rotated, placed by the position prior
   entirely inside the breast without touching each other; the sampling noise seed of the image. A recipe is plain
   JSON and :func:`render_recipe` turns it into the conditions with no randomness, so any image regenerates from its
   record;
4. **sharding**: image ``i`` belongs to rank ``i % world_size`` (:func:`shard_indices`); a rank skips the images
   whose record already exists with the same recipe (resume), removes temporary files a killed run left behind,
   and samples the rest in batches of ``batch_size`` through the stock ``monai.engines.SupervisedEvaluator`` with the
   inference parts (:class:`~custom.engines.inference.GCDMInferencePrepareBatch`,
   :class:`~custom.engines.inference.GCDMSamplingInferer`, :class:`~custom.engines.inference.GCDMCheckpointLoader`);
   :class:`CohortWriter` writes each image's files and then its record;
5. **merge** (rank 0 after a barrier, :func:`merge_cohort`): every index ``0..N-1`` must have exactly one record;
   the datalist, ``features.csv`` and the summary are written atomically; with ``mix_with`` the mixed folder
   (:func:`mix_cohort`).

Image ids are ``syn<run tag>_<index>`` (run tag = 8 hex digits of the identity), so cohorts of different runs never
collide in a combined datalist. No source-patient identifier is written: the breast source is named by its prepared
``case_id`` in the recipe only.

Under ``torchrun`` the process group is ``gloo`` on CPU and ``nccl`` on GPUs (``cuda:LOCAL_RANK``); a single process
needs no process group.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events
from PIL import Image
from scipy import ndimage

from custom.errors import MammoInputError

__all__ = [
    "RECIPE_FORMAT",
    "SynthesisSpec",
    "LibraryLesion",
    "ConditionLibrary",
    "sample_recipe",
    "render_recipe",
    "recipe_lesion_labels",
    "recipe_attributes",
    "source_breast_attributes",
    "scale_shape_features",
    "shard_indices",
    "image_id",
    "SynthesisDataset",
    "CohortWriter",
    "SynthesisRun",
    "merge_cohort",
    "mix_cohort",
    "dist_info",
    "rank_device",
]

logger = logging.getLogger(__name__)

RECIPE_FORMAT = "mammo_gcdm/synthesis-recipe"
MANIFEST_FORMAT = "mammo_gcdm/synthesis-run"
MIN_LESION_PIXELS = 4
#: radiomic shape features and the power of the linear scale factor they change by (others are scale-free)
SHAPE_SCALING = {
    "original_shape2D_MeshSurface": 2, "original_shape2D_PixelSurface": 2, "original_shape2D_Perimeter": 1,
    "original_shape2D_MaximumDiameter": 1, "original_shape2D_MajorAxisLength": 1,
    "original_shape2D_MinorAxisLength": 1, "original_shape2D_PerimeterSurfaceRatio": -1,
}
_SUBDIRS = ("images", "labels", "lesions", "records", "dicom", "shards")


# ---------------------------------------------------------------------------------------------------- distributed
def dist_info() -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` from the initialised process group, else torchrun's environment."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size(), int(os.environ.get("LOCAL_RANK", 0))
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def rank_device() -> torch.device:
    """``cuda:LOCAL_RANK`` when CUDA is available, else the CPU."""
    if torch.cuda.is_available():
        return torch.device(f"cuda:{dist_info()[2]}")
    return torch.device("cpu")


def _init_distributed() -> None:
    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(dist_info()[2])
        torch.distributed.init_process_group(backend=backend)


def _barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def _all_ok(ok: bool) -> bool:
    """Whether ``ok`` holds on every rank (so that all ranks stop together when one of them failed its checks)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return ok
    flag = torch.tensor([0 if ok else 1], device="cuda" if torch.distributed.get_backend() == "nccl" else "cpu")
    torch.distributed.all_reduce(flag)
    return int(flag.item()) == 0


def shard_indices(num_images: int, rank: int, world_size: int) -> list[int]:
    """The image indices rank ``rank`` of ``world_size`` owns: ``i % world_size == rank`` (balanced to one image;
    every index belongs to exactly one rank)."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} of world size {world_size}")
    return list(range(int(rank), int(num_images), int(world_size)))


def image_id(run_tag: str, index: int) -> str:
    """File stem / ``case_id`` of image ``index`` of the run with tag ``run_tag``."""
    return f"syn{run_tag}_{int(index):06d}"


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _file_sha256(path: str | os.PathLike | None) -> str | None:
    if not path or not Path(path).is_file():
        return None
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------------- the spec
@dataclass
class SynthesisSpec:
    """How the conditions are sampled (all of it is part of the run's identity).

    Attributes:
        seed: base seed; image ``i`` uses generators seeded by ``(seed, i)``.
        lesion_count_probs: probability of 0, 1, 2, ... lesions per image (sums to 1; length <= max_lesions + 1).
        malignant_fraction: share of lesion-bearing images whose lesions are malignant (BI-RADS 4-6); the rest benign
            (BI-RADS 2-3).
        feature_source: ``"library"`` (a training lesion's own features and shape) or ``"preset"`` (a lesion preset
            of the wanted class, weighted by its size: its median features, the shape of one of its members).
        mirror_prob: probability of mirroring the breast mask top-bottom.
        warp: anisotropic breast scale factors drawn in ``[1 - warp, 1 + warp]`` per axis (0 = none).
        scale_range: lesion scale factor range (relative to the library lesion).
        rotation_deg: lesion rotation drawn in ``[-rotation_deg, rotation_deg]``.
        position_bins: bins per axis of the lesion-position prior.
        max_tries: placement attempts per lesion before the fallback at the breast's deepest point.
    """

    seed: int = 0
    lesion_count_probs: Sequence[float] = (0.3, 0.6, 0.1)
    malignant_fraction: float = 0.5
    feature_source: str = "library"
    mirror_prob: float = 0.5
    warp: float = 0.1
    scale_range: Sequence[float] = (0.8, 1.25)
    rotation_deg: float = 180.0
    position_bins: int = 6
    max_tries: int = 60

    def check(self, max_lesions: int) -> None:
        probs = [float(p) for p in self.lesion_count_probs]
        if not probs or any(p < 0 or not math.isfinite(p) for p in probs) or not math.isclose(sum(probs), 1.0, abs_tol=1e-6):
            raise MammoInputError("lesion_count_probs", f"must be non-negative probabilities of 0, 1, ... lesions "
                                                        f"summing to 1, got {list(self.lesion_count_probs)!r}")
        if len(probs) - 1 > int(max_lesions) and any(p > 0 for p in probs[int(max_lesions) + 1:]):
            raise MammoInputError("lesion_count_probs", f"asks for up to {len(probs) - 1} lesions per image but the "
                                                        f"model has {max_lesions} lesion slots")
        if not 0.0 <= float(self.malignant_fraction) <= 1.0:
            raise MammoInputError("malignant_fraction", f"must be in [0, 1], got {self.malignant_fraction!r}")
        if self.feature_source not in ("library", "preset"):
            raise MammoInputError("feature_source", f"must be 'library' or 'preset', got {self.feature_source!r}")
        if not 0.0 <= float(self.mirror_prob) <= 1.0:
            raise MammoInputError("mirror_prob", f"must be in [0, 1], got {self.mirror_prob!r}")
        if not 0.0 <= float(self.warp) < 0.5:
            raise MammoInputError("warp", f"must be in [0, 0.5), got {self.warp!r}")
        lo, hi = (float(v) for v in self.scale_range)
        if not 0 < lo <= hi:
            raise MammoInputError("scale_range", f"must be [low, high] with 0 < low <= high, got {list(self.scale_range)!r}")
        if int(self.position_bins) < 1 or int(self.max_tries) < 1:
            raise MammoInputError("position_bins", "position_bins and max_tries must be at least 1")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["lesion_count_probs"] = [float(p) for p in self.lesion_count_probs]
        d["scale_range"] = [float(v) for v in self.scale_range]
        return d


# ---------------------------------------------------------------------------------------------------- the library
@dataclass
class LibraryLesion:
    """One training lesion: its binary mask cropped to its box (prepared resolution), raw features, BI-RADS."""

    key: str
    mask: np.ndarray
    features: dict[str, float]
    birads: str | None
    category: str | None
    malignancy: str | None


def _resize_binary(mask: np.ndarray, size: int) -> np.ndarray:
    """Area-resize a binary mask to ``size x size`` and threshold at 0.5 (as ``prepare`` resizes masks)."""
    if mask.shape == (size, size):
        return mask.astype(bool)
    img = Image.fromarray(mask.astype(np.float32))
    return np.asarray(img.resize((size, size), Image.BOX)) >= 0.5


@dataclass
class ConditionLibrary:
    """What the conditions are sampled from, learnt from the training split of a prepared folder.

    Attributes:
        image_size: model resolution ``S`` (conditions are rendered at ``S x S``).
        prepared_size: resolution of the prepared images (lesion crops and raw features are in its pixel units).
        breasts: ``[(case_id, view, (S, S) bool breast mask)]`` of every training image.
        lesions: the training lesions with features (:class:`LibraryLesion`), keyed ``"case_id:lesion_index"``.
        prior: ``(bins, bins)`` probabilities of a lesion centre per cell of the breast's bounding box (rows, cols);
            training centres counted, plus 0.5 per cell (a cell never seen keeps a small chance).
        presets: :class:`custom.features.presets.Preset` list built from the same lesions.
        digest: SHA-256 of the prepared datalist + feature file (part of the run identity).
    """

    image_size: int
    prepared_size: int
    breasts: list[tuple[str, str | None, np.ndarray]]
    lesions: dict[str, LibraryLesion]
    prior: np.ndarray
    presets: list[Any]
    digest: str
    prepared_dir: str = ""

    @classmethod
    def from_prepared(cls, prepared_dir: str | os.PathLike, image_size: int, position_bins: int = 6,
                      min_members: int = 3) -> "ConditionLibrary":
        from custom.features.presets import build_presets, load_training_lesions

        root = Path(prepared_dir)
        records, info = load_training_lesions(root, "training")  # raises a clear error on a missing folder/split
        datalist = json.loads((root / "datalist.json").read_text())
        by_key = {r.key: r for r in records}
        breasts, lesions = [], {}
        counts = np.zeros((int(position_bins), int(position_bins)), dtype=np.float64)
        prepared_size = None
        for item in datalist["training"]:
            cid = str(item["case_id"])
            try:
                label = np.asarray(Image.open(root / item["label"]))
                inst = np.asarray(Image.open(root / item["lesions"]))
            except OSError as err:
                raise MammoInputError(root / item["label"], f"unreadable prepared mask ({err})") from None
            prepared_size = prepared_size or int(label.shape[0])
            breast = label > 0
            if not breast.any():
                continue
            breasts.append((cid, item.get("view"), _resize_binary(breast, int(image_size))))
            rows, cols = np.nonzero(breast)
            y0, y1, x0, x1 = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
            findings = {int(f.get("lesion_index", i)): f for i, f in enumerate(item.get("findings") or [])}
            for k in range(1, int(inst.max()) + 1):
                m = inst == k
                if not m.any():
                    continue
                cy, cx = ndimage.center_of_mass(m)
                u = min(max((cy - y0) / max(y1 - y0, 1), 0.0), 0.999999)
                v = min(max((cx - x0) / max(x1 - x0, 1), 0.0), 0.999999)
                counts[int(u * position_bins), int(v * position_bins)] += 1
                key = f"{cid}:{k - 1}"
                if key not in by_key:
                    continue
                r, c = np.nonzero(m)
                rec = by_key[key]
                lesions[key] = LibraryLesion(key=key, mask=m[r.min():r.max() + 1, c.min():c.max() + 1].copy(),
                                             features=dict(rec.features), birads=rec.birads,
                                             category=findings.get(k - 1, {}).get("category"), malignancy=rec.malignancy)
        if not breasts:
            raise MammoInputError(root / "datalist.json", "no training image with a breast mask to sample from")
        prior = counts + 0.5
        prior /= prior.sum()
        presets = []
        if records:
            try:
                presets, _ = build_presets(records, min_members=min_members, image_size=info.get("image_size"))
            except MammoInputError:
                presets = []
        digest = hashlib.sha256()
        for name in ("datalist.json", "features.csv"):
            p = root / name
            digest.update(p.read_bytes() if p.is_file() else b"")
        return cls(image_size=int(image_size), prepared_size=int(prepared_size or image_size), breasts=breasts,
                   lesions=lesions, prior=prior, presets=presets, digest=digest.hexdigest(), prepared_dir=str(root))

    def candidates(self, malignancy: str | None) -> list[str]:
        """Library keys of lesions of ``malignancy`` (all lesions when ``None``), sorted."""
        return sorted(k for k, les in self.lesions.items() if malignancy is None or les.malignancy == malignancy)

    def preset_choices(self, malignancy: str | None) -> list[Any]:
        """Presets usable for ``malignancy``: the most specific level that exists for it, members in the library."""
        usable = [p for p in self.presets if p.malignancy == malignancy and any(m in self.lesions for m in p.members)]
        if not usable:
            return []
        level = min(p.level for p in usable)
        return [p for p in usable if p.level == level]

    def check_spec(self, spec: SynthesisSpec) -> None:
        """Raise when the spec asks for lesions the library cannot give (an unmeetable benign/malignant mix)."""
        probs = [float(p) for p in spec.lesion_count_probs]
        if sum(probs[1:]) <= 0:
            return
        wanted = [m for m, share in (("malignant", spec.malignant_fraction), ("benign", 1 - spec.malignant_fraction))
                  if share > 0]
        for m in wanted:
            have = self.candidates(m) if spec.feature_source == "library" else self.preset_choices(m)
            if not have:
                what = "lesion" if spec.feature_source == "library" else "preset"
                raise MammoInputError("malignant_fraction", f"asks for {m} lesions but the training split of "
                                      f"{self.prepared_dir} has no {m} {what} (BI-RADS {'4-6' if m == 'malignant' else '2-3'})"
                                      f": set malignant_fraction to {1.0 if m == 'benign' else 0.0}")


# ---------------------------------------------------------------------------------------------------- recipes
def _seed_of(seed: int, index: int) -> int:
    """The sampling-noise seed of image ``index`` (31 bits, a function of ``(seed, index)`` only)."""
    return int(np.random.SeedSequence([int(seed), int(index), 7]).generate_state(1)[0] >> 1)


def _breast(library: ConditionLibrary, source: str, mirror: bool, warp: Sequence[float]) -> np.ndarray:
    masks = {cid: m for cid, _, m in library.breasts}
    if source not in masks:
        raise MammoInputError("recipe", f"breast source {source!r} is not in the training split of {library.prepared_dir}")
    m = masks[source]
    if mirror:
        m = m[::-1]
    sy, sx = (float(w) for w in warp)
    if sy != 1.0 or sx != 1.0:
        s = m.shape[0]
        # output (r, c) <- input ((r - s/2) / sy + s/2, c / sx): scaled about the vertical centre and the chest wall
        m = ndimage.affine_transform(m.astype(np.float32), np.diag([1 / sy, 1 / sx]),
                                     offset=[(s / 2) * (1 - 1 / sy), 0.0], order=1, mode="constant", cval=0.0) >= 0.5
    return np.ascontiguousarray(m)


def _lesion_mask(library: ConditionLibrary, key: str, scale: float, rotation: float, center: Sequence[float]) -> np.ndarray:
    """The lesion ``key`` rotated by ``rotation`` degrees, scaled by ``scale`` (times S / prepared size) and centred
    at ``center`` (row, col) of an ``S x S`` frame: ``(S, S)`` bool."""
    s = library.image_size
    crop = library.lesions[key].mask.astype(np.float32)
    crop = np.pad(crop, 1)
    if rotation:
        crop = ndimage.rotate(crop, float(rotation), reshape=True, order=1, mode="constant", cval=0.0)
    zoom = float(scale) * s / library.prepared_size
    crop = ndimage.zoom(crop, zoom, order=1, mode="constant", cval=0.0) >= 0.5
    out = np.zeros((s, s), dtype=bool)
    h, w = crop.shape
    r0 = int(round(center[0] - h / 2.0))
    c0 = int(round(center[1] - w / 2.0))
    rs, cs = max(r0, 0), max(c0, 0)
    re, ce = min(r0 + h, s), min(c0 + w, s)
    if re > rs and ce > cs:
        out[rs:re, cs:ce] = crop[rs - r0:re - r0, cs - c0:ce - c0]
    if out.sum() < crop.sum():  # clipped by the frame: reject (a lesion must lie wholly inside the breast)
        out[:] = False
    return out


def _fits(lesion: np.ndarray, breast: np.ndarray, occupied: np.ndarray) -> bool:
    return (int(lesion.sum()) >= MIN_LESION_PIXELS and bool(breast[lesion].all())
            and not bool((ndimage.binary_dilation(lesion, iterations=1) & occupied).any()))


def sample_recipe(library: ConditionLibrary, spec: SynthesisSpec, index: int, run_tag: str = "") -> dict[str, Any]:
    """The recipe of image ``index``: a JSON-able dict that :func:`render_recipe` turns into its conditions.

    Depends only on ``(library, spec, index)`` - not on the rank, the batch or the number of images."""
    rng = np.random.default_rng([int(spec.seed), int(index)])
    b = int(rng.integers(len(library.breasts)))
    source, view, _ = library.breasts[b]
    mirror = bool(rng.random() < float(spec.mirror_prob))
    w = float(spec.warp)
    warp = [float(1 + rng.uniform(-w, w)), float(1 + rng.uniform(-w, w))] if w > 0 else [1.0, 1.0]
    breast = _breast(library, source, mirror, warp)
    probs = np.asarray([float(p) for p in spec.lesion_count_probs])
    n = int(rng.choice(len(probs), p=probs / probs.sum()))
    malignancy = None
    if n > 0:
        malignancy = "malignant" if rng.random() < float(spec.malignant_fraction) else "benign"
    s = library.image_size
    rows, cols = np.nonzero(breast)
    y0, y1, x0, x1 = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    bins = library.prior.shape[0]
    occupied = np.zeros((s, s), dtype=bool)
    lesions, dropped = [], 0
    lo, hi = (float(v) for v in spec.scale_range)
    for _ in range(n):
        if spec.feature_source == "preset":
            choices = library.preset_choices(malignancy)
            weights = np.asarray([p.count for p in choices], dtype=np.float64)
            preset = choices[int(rng.choice(len(choices), p=weights / weights.sum()))]
            members = sorted(m for m in preset.members if m in library.lesions)
            key = members[int(rng.integers(len(members)))]
            feature_source = f"preset:{preset.name}"
        else:
            keys = library.candidates(malignancy)
            key = keys[int(rng.integers(len(keys)))]
            feature_source = "library"
        placed = None
        for _try in range(int(spec.max_tries)):
            scale = float(rng.uniform(lo, hi))
            rotation = float(rng.uniform(-spec.rotation_deg, spec.rotation_deg))
            cell = int(rng.choice(bins * bins, p=library.prior.ravel()))
            u, v = (cell // bins + rng.random()) / bins, (cell % bins + rng.random()) / bins
            center = [float(y0 + u * (y1 - y0)), float(x0 + v * (x1 - x0))]
            m = _lesion_mask(library, key, scale, rotation, center)
            if _fits(m, breast, occupied):
                placed = (scale, rotation, center, m)
                break
        if placed is None:  # fallback: the smallest scale, no rotation, at the deepest free point of the breast
            free = breast & ~ndimage.binary_dilation(occupied, iterations=2)
            if free.any():
                dist = ndimage.distance_transform_edt(free)
                r, c = np.unravel_index(int(np.argmax(dist)), dist.shape)
                center = [float(r), float(c)]
                m = _lesion_mask(library, key, lo, 0.0, center)
                if _fits(m, breast, occupied):
                    placed = (lo, 0.0, center, m)
        if placed is None:
            dropped += 1
            continue
        scale, rotation, center, m = placed
        occupied |= m
        les = library.lesions[key]
        lesions.append({"shape": key, "features": feature_source, "scale": round(scale, 6),
                        "rotation_deg": round(rotation, 6), "center": [round(center[0], 4), round(center[1], 4)],
                        "birads": les.birads, "category": les.category or "Mass"})
    if not lesions:
        malignancy = None
    return {
        "format": RECIPE_FORMAT,
        "format_version": 1,
        "index": int(index),
        "case_id": image_id(run_tag, index) if run_tag else f"syn_{int(index):06d}",
        "seed": _seed_of(spec.seed, index),
        "image_size": int(s),
        "breast": {"case_id": source, "view": view, "mirror": mirror, "warp": [round(x, 6) for x in warp]},
        "malignancy": malignancy,
        "lesions": lesions,
        "dropped_lesions": int(dropped),
    }


def scale_shape_features(features: Mapping[str, float], scale: float) -> dict[str, float]:
    """Raw features of a lesion scaled by ``scale``: lengths x s, areas x s^2, perimeter/area ratio / s; sphericity,
    elongation and the intensity/texture features unchanged (:data:`SHAPE_SCALING`)."""
    out = dict(features)
    for name, power in SHAPE_SCALING.items():
        if name in out:
            out[name] = float(out[name]) * float(scale) ** power
    return out


def render_recipe(recipe: Mapping[str, Any], library: ConditionLibrary, normaliser: Any, max_lesions: int):
    """A recipe -> ``(Conditions, instance map (S, S) uint8, raw feature rows)`` with no randomness.

    Raises:
        MammoInputError: a recipe of another resolution, or naming a breast / lesion / preset not in the library.
    """
    from custom.data.conditions import Conditions
    from custom.features.feature_file import rows_to_matrix

    s = library.image_size
    if int(recipe.get("image_size", s)) != s:
        raise MammoInputError("recipe", f"recipe for {recipe.get('image_size')} px, the model works at {s} px")
    br = recipe["breast"]
    breast = _breast(library, br["case_id"], bool(br["mirror"]), br["warp"])
    inst = np.zeros((s, s), dtype=np.uint8)
    rows = []
    presets = {p.name: p for p in library.presets}
    for k, les in enumerate(recipe["lesions"], start=1):
        if les["shape"] not in library.lesions:
            raise MammoInputError("recipe", f"lesion {les['shape']!r} is not in the library of {library.prepared_dir}")
        m = _lesion_mask(library, les["shape"], les["scale"], les["rotation_deg"], les["center"])
        inst[m & (inst == 0)] = k
        src = str(les["features"])
        if src.startswith("preset:"):
            name = src.split(":", 1)[1]
            if name not in presets:
                raise MammoInputError("recipe", f"preset {name!r} not found for {library.prepared_dir}")
            raw = presets[name].features
        else:
            raw = library.lesions[les["shape"]].features
        rows.append({"case_id": recipe["case_id"], "lesion_index": k - 1, **scale_shape_features(raw, les["scale"])})
    from custom.transforms.masks import label_map

    label = label_map(breast, inst)
    n = len(rows)
    if n > max_lesions:
        raise MammoInputError("recipe", f"{n} lesions but the model has {max_lesions} slots")
    masks = np.zeros((max_lesions, s, s), dtype=np.float32)
    feats = np.zeros((max_lesions, 67), dtype=np.float32)
    present = np.zeros((max_lesions,), dtype=np.float32)
    clipping: dict[str, Any] = {}
    for k in range(n):
        masks[k] = inst == k + 1
        present[k] = 1.0
    if n:
        feats[:n], report = normaliser.transform(rows_to_matrix(rows))
        clipping = report.to_dict()
    cond = Conditions(
        case_id=str(recipe["case_id"]), label=label.astype(np.uint8), lesion_masks=masks, features=feats,
        lesion_present=present, geometry=None, raw_features=rows, clipping=clipping,
        source={"mask": {"mode": "synthesis_recipe", "frame": "model"}, "features": {"mode": "synthesis_recipe"},
                "recipe_sha256": _digest(dict(recipe)), "image_size": s, "max_lesions": int(max_lesions),
                "num_lesions": n},
    )
    return cond, inst, rows


# ---------------------------------------------------------------------------------------------------- engine parts
def _recipe_findings(recipe: Mapping[str, Any]) -> list[dict[str, Any]]:
    """``{"category", "birads"}`` of each recipe lesion, in slot order, as its record's findings say (a lesion
    without its own BI-RADS gets its image class's: benign 3, malignant 4)."""
    return [{"category": les.get("category") or "Mass", "birads": _birads_label(recipe.get("malignancy"), les)}
            for les in recipe.get("lesions") or []]


def recipe_lesion_labels(recipe: Mapping[str, Any], names: Sequence[str]) -> list[dict[str, str]]:
    """Per-lesion labels of a recipe, one dict per lesion in slot order: the category and BI-RADS its record's
    findings will carry (:class:`CohortWriter`), among ``names``; a value the vocabulary does not know (BI-RADS 6)
    is not given (:func:`custom.data.lesion_labels.labels_from_finding`)."""
    from custom.data.lesion_labels import labels_from_finding

    return [{k: v for k, v in labels_from_finding(f, str(recipe.get("case_id"))).items() if k in names}
            for f in _recipe_findings(recipe)]


#: what a synthetic image keeps of its source breast (the other attributes are its own)
SOURCE_ATTRIBUTES = ("view", "laterality", "density", "manufacturer")


def source_breast_attributes(entry: Mapping[str, Any] | None, root: str | os.PathLike | None = None) -> dict[str, str]:
    """:data:`SOURCE_ATTRIBUTES` of a training entry (the manufacturer from its source DICOM's tag when the entry
    has none: :func:`custom.data.attributes.attributes_from_entry`)."""
    from custom.data.attributes import attributes_from_entry

    if not entry:
        return {}
    bare = {k: v for k, v in entry.items() if k not in ("label", "findings", "num_lesions", "breast_birads")}
    return {k: v for k, v in attributes_from_entry(bare, root).items() if k in SOURCE_ATTRIBUTES}


def recipe_attributes(recipe: Mapping[str, Any], source: Mapping[str, str], label: np.ndarray,
                      names: Sequence[str]) -> dict[str, str]:
    """The clinical attributes an image of ``recipe`` is asked for, among ``names``: what it keeps of its source
    breast (``source``: :func:`source_breast_attributes`), the ``area`` bin of its rendered label map ``label``
    (breast + lesion pixels over all, MAM-E's rule), and the image-level ``lesion_category`` / ``lesion_birads`` of
    the recipe's own lesions (``none`` without any, else the most suspicious, as its record's findings say).
    ``breast_birads`` is not asked (the source's describes lesions the image does not have)."""
    from custom.data.attributes import area_bin, attributes_from_entry

    findings = _recipe_findings(recipe)
    own = attributes_from_entry({"case_id": str(recipe.get("case_id")), "findings": findings,
                                 "num_lesions": len(findings)})
    attrs = {**dict(source), **{k: v for k, v in own.items() if k in ("lesion_category", "lesion_birads")},
             "area": area_bin(float((np.asarray(label) > 0).mean()))}
    return {k: v for k, v in attrs.items() if k in names}


class SynthesisDataset(torch.utils.data.Dataset):
    """Recipes rendered lazily into :class:`~custom.engines.inference.InferenceCase` objects (one sample each, the
    recipe's seed); ``case.extra`` keeps the recipe, the instance map and the raw feature rows for the writer.

    ``lesion_label_names`` (a model trained with per-lesion labels): every lesion is asked for its recipe's category /
    BI-RADS (:func:`recipe_lesion_labels`; ``case.extra["lesion_label_codes"]`` for the sampler and
    ``case.extra["lesion_labels"]`` for the record), so the cohort's findings say what the model was asked for.
    ``attribute_names`` (a model trained with clinical attributes): every image is asked for
    :func:`recipe_attributes` (``case.extra["attribute_codes"]`` / ``["attributes"]``)."""

    def __init__(self, recipes: Sequence[Mapping[str, Any]], library: ConditionLibrary, normaliser: Any,
                 max_lesions: int, lesion_label_names: Sequence[str] = (), attribute_names: Sequence[str] = ()) -> None:
        from custom.data.attributes import check_attribute_names
        from custom.data.lesion_labels import check_lesion_label_names

        self.recipes, self.library, self.normaliser, self.max_lesions = list(recipes), library, normaliser, int(max_lesions)
        self.lesion_label_names = check_lesion_label_names(lesion_label_names)
        self.attribute_names = check_attribute_names(attribute_names, "attribute_names")
        self.sources: dict[str, dict[str, str]] = {}  # source breast -> its attributes, read once per breast
        self._entries: dict[str, Mapping[str, Any]] = {}
        if self.attribute_names:  # the training entries the recipes' breasts come from
            datalist = json.loads((Path(library.prepared_dir) / "datalist.json").read_text())
            self._entries = {str(e["case_id"]): e for e in datalist.get("training", [])}

    def __len__(self) -> int:
        return len(self.recipes)

    def __getitem__(self, i: int):
        from custom.engines.inference import InferenceCase

        recipe = self.recipes[i]
        cond, inst, rows = render_recipe(recipe, self.library, self.normaliser, self.max_lesions)
        extra: dict[str, Any] = {"recipe": dict(recipe), "instances": inst, "rows": rows}
        if self.lesion_label_names:
            from custom.data.lesion_labels import decode_lesion_labels, encode_lesion_labels

            n = len(rows)
            codes = encode_lesion_labels(recipe_lesion_labels(recipe, self.lesion_label_names), self.lesion_label_names,
                                         self.max_lesions, num_lesions=n, source=f"recipe {recipe['case_id']}")
            extra["lesion_label_codes"] = codes
            extra["lesion_labels"] = decode_lesion_labels(codes[:n], self.lesion_label_names)
        if self.attribute_names:
            from custom.data.attributes import encode_attributes

            src = str(recipe["breast"]["case_id"])
            if src not in self.sources:
                self.sources[src] = source_breast_attributes(self._entries.get(src), self.library.prepared_dir)
            attrs = recipe_attributes(recipe, self.sources[src], cond.label, self.attribute_names)
            extra["attributes"] = attrs
            extra["attribute_codes"] = encode_attributes(attrs, self.attribute_names)
        return InferenceCase(name=str(recipe["case_id"]), conditions=cond, seeds=[int(recipe["seed"])], extra=extra)


def _png(path: Path, arr: np.ndarray) -> None:
    from custom.io import atomic_path

    with atomic_path(path) as tmp:
        Image.fromarray(arr).save(tmp, format="PNG")


def _birads_label(malignancy: str | None, les: Mapping[str, Any]) -> str | None:
    return les.get("birads") or ({"benign": "BI-RADS 3", "malignant": "BI-RADS 4"}.get(malignancy) if malignancy else None)


class CohortWriter:
    """Write each generated image in ``prepare``'s layout and then its record (the completion marker).

    The record is the datalist entry (paths relative to the output folder, ``synthetic: true``, findings with box,
    area, category and BI-RADS, the raw features of each lesion) plus the recipe, the seed and the run tag. Files
    are written atomically; a killed run leaves at worst image files without a record, which the resumed run
    rewrites.
    """

    def __init__(self, output_dir: str | os.PathLike, parameters: Mapping[str, Any] | None = None,
                 formats: Sequence[str] | str = ("png",), run_tag: str = "") -> None:
        self.output_dir = Path(output_dir)
        self.parameters = dict(parameters or {})
        self.formats = [formats] if isinstance(formats, str) else [str(f).lower() for f in formats]
        bad = [f for f in self.formats if f not in ("png", "dcm")]
        if bad or "png" not in self.formats:
            raise MammoInputError("formats", f"synthesize writes 'png' (always, training reads it) and optionally "
                                             f"'dcm'; got {list(self.formats)!r}")
        self.run_tag = run_tag
        self.written: list[str] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def write(self, case: Any, image: np.ndarray) -> dict[str, Any]:
        from custom.data.export import to_uint16, write_synthetic_dicom
        from custom.io import atomic_write_json

        recipe, inst, rows = case.extra["recipe"], case.extra["instances"], case.extra["rows"]
        cid = case.name
        out = self.output_dir
        rel = {k: f"{k}/{cid}.png" for k in ("images", "labels", "lesions")}
        _png(out / rel["images"], to_uint16(image))
        _png(out / rel["labels"], case.conditions.label.astype(np.uint8))
        _png(out / rel["lesions"], inst.astype(np.uint8))
        if "dcm" in self.formats:
            write_synthetic_dicom(out / "dicom" / f"{cid}.dcm", image, conditions_summary=case.conditions.summary(),
                                  parameters={**self.parameters, "seed": int(recipe["seed"])})
        findings = []
        for k, f in enumerate(_recipe_findings(recipe)):
            r, c = np.nonzero(inst == k + 1)
            findings.append({**f, "lesion_index": k, "box": [int(c.min()), int(r.min()), int(c.max()) + 1, int(r.max()) + 1],
                             "area_px": int(r.size)})
        s = int(image.shape[-1])
        record = {
            "case_id": cid, "image": rel["images"], "label": rel["labels"], "lesions": rel["lesions"],
            "study_id": cid, "dataset_split": "training", "laterality": None, "view": recipe["breast"].get("view"),
            "density": None, "breast_birads": max((f["birads"] for f in findings), default=None),
            "num_lesions": len(findings), "findings": findings, "malignancy": recipe["malignancy"],
            "geometry": {"output_shape": [s, s]}, "synthetic": True, "seed": int(recipe["seed"]),
            "run_tag": self.run_tag, "recipe": recipe, "recipe_sha256": _digest(recipe),
            "features": [{k: v for k, v in row.items()} for row in rows],
        }
        if "dcm" in self.formats:
            record["dicom"] = f"dicom/{cid}.dcm"
        if "lesion_labels" in case.extra:  # what a model with per-lesion labels was asked for, lesion by lesion
            record["lesion_labels_requested"] = [dict(d) for d in case.extra["lesion_labels"]]
        if "attributes" in case.extra:  # what a model with clinical attributes was asked for
            attrs = dict(case.extra["attributes"])
            record["attributes_requested"] = attrs
            record["laterality"] = attrs.get("laterality", record["laterality"])
            record["density"] = attrs.get("density", record["density"])
        atomic_write_json(out / "records" / f"{cid}.json", record)
        self.written.append(cid)
        return record

    def __call__(self, engine: Engine) -> None:
        pred = engine.state.output["pred"]
        for r, case in enumerate(engine.state.batch["case"]):
            self.write(case, pred[r, 0].detach().float().cpu().clamp(0, 1).numpy())


def _clean_temporaries(output_dir: Path) -> int:
    """Remove the temporary files (``.<name>.<random>.tmp*``) a killed run left in the cohort's sub-folders."""
    n = 0
    for sub in _SUBDIRS:
        d = output_dir / sub
        if d.is_dir():
            for p in d.iterdir():
                if p.name.startswith(".") and ".tmp" in p.name:
                    p.unlink(missing_ok=True)
                    n += 1
    return n


def _read_record(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# ---------------------------------------------------------------------------------------------------- merge / mix
def merge_cohort(output_dir: str | os.PathLike, num_images: int, run_tag: str, normaliser_file: str | os.PathLike,
                 extra_summary: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Rank 0's final step: one datalist of images ``0..num_images-1`` from their records.

    Raises:
        MammoInputError: an index without a valid record (the run did not finish: run the same command again).

    Writes ``datalist.json`` (``training`` = the images in index order, empty ``validation``/``test``),
    ``features.csv``, ``feature_normalisation.json`` and ``synthesis_summary.json``, each atomically.
    """
    from custom.features.feature_file import write_feature_csv
    from custom.io import atomic_write_json

    out = Path(output_dir)
    entries, rows, missing = [], [], []
    for i in range(int(num_images)):
        cid = image_id(run_tag, i)
        rec = _read_record(out / "records" / f"{cid}.json")
        if rec is None or rec.get("case_id") != cid or not (out / rec["image"]).is_file():
            missing.append(i)
            continue
        rows.extend(rec.get("features") or [])
        entry = {k: v for k, v in rec.items() if k not in ("features", "recipe")}
        entry["lesion_features"] = [{k: v for k, v in row.items() if k != "case_id"} for row in rec.get("features") or []]
        entries.append(entry)
    if missing:
        shown = ", ".join(map(str, missing[:10])) + (f", ... ({len(missing)} in all)" if len(missing) > 10 else "")
        raise MammoInputError(out, f"images {shown} are not finished: run the same command again to complete them")
    if rows:
        write_feature_csv(out / "features.csv", rows)
    else:
        from custom.features.radiomics import FEATURE_NAMES

        from custom.io import atomic_write_text

        atomic_write_text(out / "features.csv", ",".join(["case_id", "lesion_index", *FEATURE_NAMES]) + "\n")
    shutil.copyfile(normaliser_file, out / ".feature_normalisation.json.tmp")
    os.replace(out / ".feature_normalisation.json.tmp", out / "feature_normalisation.json")
    atomic_write_json(out / "datalist.json", {"training": entries, "validation": [], "test": []})
    n_les = Counter(e["num_lesions"] for e in entries)
    malig = Counter(e.get("malignancy") or "none" for e in entries)
    summary = {
        "images": len(entries),
        "lesions": int(sum(e["num_lesions"] for e in entries)),
        "lesions_per_image": {str(k): n_les[k] for k in sorted(n_les)},
        "malignancy": dict(malig),
        "dropped_lesions": int(sum(json.loads((out / "records" / f"{e['case_id']}.json").read_text())["recipe"]
                                   .get("dropped_lesions", 0) for e in entries)),
        **dict(extra_summary or {}),
    }
    atomic_write_json(out / "synthesis_summary.json", json.loads(json.dumps(summary, default=str)))
    return summary


def _mix_count(num_real: int, ratio: float) -> int:
    """Synthetic images needed so that they are ``ratio`` of a training list with ``num_real`` real images."""
    return int(round(float(ratio) * num_real / (1.0 - float(ratio))))


def check_mix(mix_with: str | os.PathLike | None, mix_ratio: Any, num_images: int) -> dict[str, Any] | None:
    """Validate ``mix_with`` / ``mix_ratio`` before any work; returns the plan or ``None`` without mixing."""
    if mix_with in (None, "", "null"):
        if mix_ratio not in (None, "", "null"):
            raise MammoInputError("mix_ratio", "is only used with --mix_with <prepared_dir>")
        return None
    real = Path(mix_with)
    dl = real / "datalist.json"
    if not dl.is_file():
        raise MammoInputError(dl, "mix_with must be a prepared folder (datalist.json not found: run `prepare` first)")
    try:
        datalist = json.loads(dl.read_text())
    except (OSError, ValueError) as err:
        raise MammoInputError(dl, f"unreadable datalist ({err})") from None
    n_real = len(datalist.get("training") or [])
    if n_real == 0:
        raise MammoInputError(dl, "its training split is empty: nothing to mix with")
    if not (real / "features.csv").is_file() or not (real / "feature_normalisation.json").is_file():
        raise MammoInputError(real, "features.csv / feature_normalisation.json missing: not a complete prepared folder")
    if mix_ratio in (None, "", "null"):
        n_syn = int(num_images)
        ratio = n_syn / (n_syn + n_real)
    else:
        try:
            ratio = float(mix_ratio)
        except (TypeError, ValueError):
            raise MammoInputError("mix_ratio", f"must be a number in [0, 1), got {mix_ratio!r}") from None
        if not 0.0 <= ratio < 1.0:
            raise MammoInputError("mix_ratio", f"the synthetic share of the training list must be in [0, 1), got {ratio}"
                                               " (a synthetic-only list is the cohort's own datalist.json)")
        n_syn = _mix_count(n_real, ratio)
        if n_syn > int(num_images):
            raise MammoInputError("mix_ratio", f"{ratio} cannot be met: {n_real} real training images need {n_syn} "
                                               f"synthetic ones but num_images is {num_images} (raise --num_images "
                                               f"to {n_syn} or lower --mix_ratio)")
    return {"mix_with": str(real), "n_real": n_real, "n_synthetic": n_syn, "requested_ratio": None if mix_ratio in
            (None, "", "null") else float(mix_ratio), "ratio": n_syn / (n_syn + n_real) if n_syn + n_real else 0.0}


def mix_cohort(output_dir: str | os.PathLike, plan: Mapping[str, Any], mixed_dir: str | os.PathLike | None = None) -> Path:
    """Write a prepared folder ``mixed_dir`` (default ``<output_dir>/mixed``) whose ``training`` list is the real
    training images plus the first ``plan["n_synthetic"]`` synthetic images, ``validation`` / ``test`` the real ones;
    ``features.csv`` holds both feature sets, ``feature_normalisation.json`` is the real folder's (the training
    normaliser) and ``mix.json`` records the ratio. Paths are relative to ``mixed_dir``."""
    from custom.features.feature_file import read_feature_file, write_feature_csv
    from custom.io import atomic_write_json

    out, real = Path(output_dir), Path(plan["mix_with"])
    mixed = Path(mixed_dir) if mixed_dir else out / "mixed"
    mixed.mkdir(parents=True, exist_ok=True)
    real_dl = json.loads((real / "datalist.json").read_text())
    syn_dl = json.loads((out / "datalist.json").read_text())
    syn = syn_dl["training"][: int(plan["n_synthetic"])]

    def moved(entry: Mapping[str, Any], root: Path) -> dict[str, Any]:
        e = dict(entry)
        for k in ("image", "label", "lesions", "dicom"):
            if e.get(k):
                e[k] = os.path.relpath((root / e[k]).resolve(), mixed.resolve())
        return e

    datalist = {"training": [moved(e, real) for e in real_dl.get("training", [])] + [moved(e, out) for e in syn],
                "validation": [moved(e, real) for e in real_dl.get("validation", [])],
                "test": [moved(e, real) for e in real_dl.get("test", [])]}
    chosen = {e["case_id"] for e in syn}
    rows = list(read_feature_file(real / "features.csv"))
    syn_path = out / "features.csv"
    if syn_path.is_file() and chosen:
        rows += [r for r in read_feature_file(syn_path) if str(r["case_id"]) in chosen]
    write_feature_csv(mixed / "features.csv", rows)
    shutil.copyfile(real / "feature_normalisation.json", mixed / ".feature_normalisation.json.tmp")
    os.replace(mixed / ".feature_normalisation.json.tmp", mixed / "feature_normalisation.json")
    atomic_write_json(mixed / "datalist.json", datalist)
    atomic_write_json(mixed / "mix.json", {**dict(plan), "synthetic_dir": str(out),
                                           "synthetic_ids": sorted(chosen)})
    return mixed


# ---------------------------------------------------------------------------------------------------- the run
def check_num_images(value: Any) -> int:
    """``num_images`` as an integer >= 1 (the first step of the run, before the model is loaded); else one
    :class:`MammoInputError` naming the option."""
    try:
        n = int(str(value))
    except (TypeError, ValueError):
        raise MammoInputError("num_images", f"must be a whole number >= 1, got {value!r}") from None
    if n <= 0:
        raise MammoInputError("num_images", f"must be at least 1, got {n}")
    return n


class SynthesisRun:
    """Checks, recipes, sharding, resume and the final merge of one ``synthesize`` run (see the module docstring).

    Args:
        output_dir: the cohort folder.
        prepared_dir: the prepared folder whose training split is sampled from.
        num_images: ``N`` (>= 1).
        spec: the condition sampler (:class:`SynthesisSpec` or its dict).
        image_size, max_lesions: the model's.
        normaliser_file: the feature normaliser the model was trained with.
        model_path, stage1_path: weights (their SHA-256 is part of the identity; a missing model is reported here).
        sampling: sampling parameters recorded in the identity (ddim steps, guidance, sigma, eta, conditioning mode).
        formats: ``["png"]`` or ``["png", "dcm"]``.
        mix_with, mix_ratio: the real prepared folder for a combined datalist and the synthetic share.
        batch_size: images per sampling step (one batch of rows through the sampler).
        lesion_label_names: the model's per-lesion labels (empty: none); each lesion is asked for its recipe's
            category / BI-RADS (:class:`SynthesisDataset`).
        attribute_names: the model's clinical attributes (empty: none); each image is asked for
            :func:`recipe_attributes`.
    """

    def __init__(self, output_dir: str | os.PathLike, prepared_dir: str | os.PathLike, num_images: Any, spec: Any,
                 image_size: int, max_lesions: int, normaliser_file: str | os.PathLike,
                 model_path: str | os.PathLike, stage1_path: str | os.PathLike | None = None,
                 sampling: Mapping[str, Any] | None = None, formats: Sequence[str] | str = ("png",),
                 mix_with: str | None = None, mix_ratio: Any = None, batch_size: int = 4,
                 min_members: int = 3, lesion_label_names: Sequence[str] = (),
                 attribute_names: Sequence[str] = ()) -> None:
        self.output_dir = Path(output_dir)
        self.prepared_dir = Path(prepared_dir)
        self.num_images_raw = num_images
        self.spec = spec if isinstance(spec, SynthesisSpec) else SynthesisSpec(**dict(spec or {}))
        self.image_size, self.max_lesions = int(image_size), int(max_lesions)
        self.normaliser_file = Path(normaliser_file)
        self.model_path = Path(model_path)
        self.stage1_path = Path(stage1_path) if stage1_path else None
        self.sampling = dict(sampling or {})
        self.formats = [formats] if isinstance(formats, str) else list(formats)
        self.mix_with, self.mix_ratio = mix_with, mix_ratio
        self.batch_size = int(batch_size)
        self.min_members = int(min_members)
        self.lesion_label_names = list(lesion_label_names or ())
        self.attribute_names = list(attribute_names or ())
        self.rank, self.world_size, _ = dist_info()
        self.pending: list[dict[str, Any]] = []
        self.library: ConditionLibrary | None = None
        self.normaliser = None
        self.identity: dict[str, Any] = {}
        self.run_tag = ""
        self.plan: dict[str, Any] | None = None
        self.stats: dict[str, Any] = {}
        self._start = 0.0

    # 1. checks -------------------------------------------------------------------------------------------------
    def _num_images(self) -> int:
        return check_num_images(self.num_images_raw)

    def _check_output(self) -> None:
        from custom.engines.inference import check_output_dir

        check_output_dir(self.output_dir)
        manifest = self.output_dir / "synthesis.json"
        if manifest.is_file():
            try:
                old = json.loads(manifest.read_text())
            except (OSError, ValueError) as err:
                raise MammoInputError(manifest, f"unreadable run manifest ({err}): use a new --output_dir") from None
            before = old.get("identity", {})
            diff = sorted(k for k in set(before) | set(self.identity) if before.get(k) != self.identity.get(k))
            if diff:
                what = ("a different model" if any(k in ("model_sha256", "stage1_sha256") for k in diff) else
                        "a different configuration")
                shown = "; ".join(f"{k}: {before.get(k)!r} there, {self.identity.get(k)!r} now" for k in diff[:3])
                raise MammoInputError(manifest, f"this folder holds a synthesis run made with {what} ({shown}); "
                                                "resume only with the same model and settings, or use a new --output_dir")
            return
        if self.output_dir.is_dir() and any(self.output_dir.iterdir()):
            raise MammoInputError(self.output_dir, "the output folder is not empty and holds no synthesis run "
                                                   "(synthesis.json): use a new or empty --output_dir")

    def prepare(self) -> "SynthesisRun":
        """Step 1-4 up to the sampling: checks (all ranks agree before anyone writes), library, recipes, manifest."""
        from custom.features.normalisation import FeatureNormaliser

        _init_distributed()
        self.rank, self.world_size, _ = dist_info()
        error: BaseException | None = None
        try:
            n = self.num_images = self._num_images()
            self.spec.check(self.max_lesions)
            self.plan = check_mix(self.mix_with, self.mix_ratio, n)
            if not self.model_path.is_file():
                raise MammoInputError(self.model_path, "stage-2 model not found: run `make train` first (or point "
                                                       "--ckpt_dir at a model folder)")
            if not self.normaliser_file.is_file():
                raise MammoInputError(self.normaliser_file, "feature normaliser not found: run `prepare` first")
            self.normaliser = FeatureNormaliser.load(self.normaliser_file)
            self.library = ConditionLibrary.from_prepared(self.prepared_dir, self.image_size, self.spec.position_bins,
                                                          self.min_members)
            self.library.check_spec(self.spec)
            self.identity = {
                "format": MANIFEST_FORMAT, "model_sha256": _file_sha256(self.model_path),
                "stage1_sha256": _file_sha256(self.stage1_path), "normaliser_sha256": _file_sha256(self.normaliser_file),
                "library_sha256": self.library.digest, "image_size": self.image_size, "max_lesions": self.max_lesions,
                "spec": self.spec.to_dict(), "sampling": json.loads(json.dumps(self.sampling, default=str)),
                "formats": sorted(self.formats),
            }
            self.run_tag = _digest(self.identity)[:8]
            self._check_output()
        except BaseException as err:  # noqa: BLE001 - re-raised below once every rank knows
            error = err
        if not _all_ok(error is None):
            if error is not None:
                raise error
            raise MammoInputError(self.output_dir, "another rank refused the run (see its ERROR line)")
        if self.rank == 0 and not (self.output_dir / "synthesis.json").is_file():
            from custom.io import atomic_write_json

            import custom

            atomic_write_json(self.output_dir / "synthesis.json", {
                "identity": self.identity, "run_tag": self.run_tag, "mammo_gcdm_version": custom.__version__,
                "prepared_dir": str(self.prepared_dir), "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            })
        _barrier()
        removed = _clean_temporaries(self.output_dir) if self.rank == 0 else 0
        _barrier()
        mine = shard_indices(self.num_images, self.rank, self.world_size)
        done = 0
        for i in mine:
            recipe = sample_recipe(self.library, self.spec, i, self.run_tag)
            rec = _read_record(self.output_dir / "records" / f"{recipe['case_id']}.json")
            if rec is not None and rec.get("recipe_sha256") == _digest(recipe) and (self.output_dir / rec["image"]).is_file():
                done += 1
                continue
            self.pending.append(recipe)
        self.stats = {"rank": self.rank, "world_size": self.world_size, "assigned": len(mine), "already_done": done,
                      "to_sample": len(self.pending), "stale_temporaries_removed": removed}
        print(f"synthesize [rank {self.rank}/{self.world_size}]: {len(mine)} of {self.num_images} image(s) assigned, "
              f"{done} already done, {len(self.pending)} to sample (batch {self.batch_size})", flush=True)
        self._start = time.time()
        return self

    def dataset(self) -> SynthesisDataset:
        return SynthesisDataset(self.pending, self.library, self.normaliser, self.max_lesions, self.lesion_label_names,
                                self.attribute_names)

    # 5. merge ----------------------------------------------------------------------------------------------------
    def finish(self, writer: CohortWriter | None = None) -> dict[str, Any] | None:
        """Record this rank's throughput, wait for every rank, and on rank 0 merge (and mix)."""
        from custom.io import atomic_write_json

        seconds = time.time() - self._start
        written = len(writer.written) if writer is not None else 0
        self.stats.update(written=written, seconds=round(seconds, 3),
                          images_per_s=round(written / seconds, 4) if written and seconds > 0 else None)
        atomic_write_json(self.output_dir / "shards" / f"rank{self.rank}.json", self.stats)
        if written:
            print(f"synthesize [rank {self.rank}/{self.world_size}]: {written} image(s) in {seconds:.1f} s = "
                  f"{written / seconds:.3f} images/s", flush=True)
        _barrier()
        summary = None
        if self.rank == 0:
            shards = [_read_record(self.output_dir / "shards" / f"rank{r}.json") or {} for r in range(self.world_size)]
            total = sum(int(s.get("written", 0)) for s in shards)
            wall = max((float(s.get("seconds", 0)) for s in shards), default=0.0)
            throughput = {"world_size": self.world_size, "batch_size": self.batch_size,
                          "device": str(rank_device()), "per_rank": shards, "written_this_run": total,
                          "wall_seconds": round(wall, 3),
                          "images_per_s_total": round(total / wall, 4) if total and wall > 0 else None}
            summary = merge_cohort(self.output_dir, self.num_images, self.run_tag, self.normaliser_file,
                                   {"run_tag": self.run_tag, "spec": self.spec.to_dict(), "throughput": throughput})
            lines = [f"synthesize: {summary['images']} image(s) in {self.output_dir}/datalist.json "
                     f"(lesions per image {summary['lesions_per_image']}, malignancy {summary['malignancy']})"]
            if total:
                lines.append(f"  throughput: {total} image(s) in {wall:.1f} s on {self.world_size} rank(s) = "
                             f"{total / wall:.3f} images/s in total")
            if self.plan is not None:
                mixed = mix_cohort(self.output_dir, self.plan)
                lines.append(f"  mixed datalist: {mixed}/datalist.json ({self.plan['n_real']} real + "
                             f"{self.plan['n_synthetic']} synthetic, synthetic share {self.plan['ratio']:.3f})")
                summary["mix"] = dict(self.plan)
            print("\n".join(lines), flush=True)
        _barrier()
        return summary


class ThroughputBar:
    """The ignite ``ProgressBar`` over sampling batches, on rank 0 only (the other ranks report at the end)."""

    def __init__(self, enabled: bool = True) -> None:
        from custom.engines.inference import as_bool

        self.enabled = as_bool(enabled) and dist_info()[0] == 0

    def attach(self, engine: Engine) -> None:
        if self.enabled:
            from ignite.handlers import ProgressBar

            ProgressBar(persist=True, desc=f"synthesize rank 0/{dist_info()[1]} (batches)").attach(engine)
