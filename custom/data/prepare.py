"""The ``prepare`` workflow: a dataset on disk -> model-ready images, label maps, datalist and feature files.

Run it through the bundle: ``python -m monai.bundle run prepare --config_file bundle/configs/prepare.json
--dataset_dir <dir> --output_dir <dir>``. Outputs under ``output_dir``:

- ``images/<case_id>.png``: 16-bit grayscale, value = round(x * 65535) for the display value x in [0, 1];
- ``labels/<case_id>.png``: 8-bit 3-class label map, 0 background, 1 breast, 2 lesion;
- ``lesions/<case_id>.png``: 8-bit lesion instance map, 0 none, k = lesion k (lesion_index k-1);
- ``records/<case_id>.json``: the per-case record (also the marker that the case is complete);
- ``datalist.json``: MONAI datalist with ``training`` / ``validation`` / ``test`` lists (split by study);
- ``features.csv``: the 67 raw PyRadiomics features per lesion (all splits), keyed by case_id + lesion_index;
- ``feature_normalisation.json``: per-feature statistics fitted on the training split only (training copies it
  beside the model it trains; ``prepare`` never writes into a model folder);
- ``summary.json``: counts per split, skipped cases with reasons, clipping report, parameters;
- ``preview.png``: a contact sheet of prepared cases with the label contours drawn on them.

Every file is written atomically. A re-run reuses finished cases (same preprocessing parameters) and the radiomics
cache, so an interrupted run can simply be started again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, asdict
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

import custom
from custom.data.cases import MammoCase, Skipped, assign_split
from custom.data.folder import load_folder_cases
from custom.data.mask_io import load_mask_file
from custom.data.vindr import load_vindr_cases
from custom.errors import MammoInputError, check_path_option, option_float, option_int
from custom.io import atomic_path, atomic_write_json
from custom.transforms.geometry import MammoGeometry, compute_geometry
from custom.transforms.masks import (
    breast_mask,
    label_map,
    lesion_instances_from_boxes,
    lesion_instances_from_mask,
)

__all__ = ["PreprocessSettings", "PrepareWorkflow", "load_display_image", "preprocess_case"]

logger = logging.getLogger(__name__)

MIN_BREAST_FRACTION = 0.02  # below this share of the image the breast detection is not trusted
MIN_LESION_INSIDE = 0.5  # a lesion must lie at least this much inside the breast


@dataclass(frozen=True)
class PreprocessSettings:
    """Per-case preprocessing parameters (their hash decides whether a finished case can be reused)."""

    image_size: int = 256
    margin: float = 0.02
    border: float = 0.01
    lesion_shape: str = "ellipse"
    window_index: int = 0
    #: JPEG 2000 decoded at reduced resolution: "off" (default, full resolution), "auto" or a number of levels
    j2k_reduce: str = "off"

    def digest(self) -> str:
        d = asdict(self)
        if d["j2k_reduce"] == "off":  # the default leaves the digest of earlier prepared datasets unchanged
            del d["j2k_reduce"]
        return hashlib.sha1(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

    def reader_j2k_reduce(self) -> int | str:
        """The :class:`~custom.dicom.MammoDicomReader` ``j2k_reduce`` argument (0 = off)."""
        return 0 if self.j2k_reduce == "off" else ("auto" if self.j2k_reduce == "auto" else int(self.j2k_reduce))


def parse_j2k_reduce(value: Any) -> str:
    """The ``j2k_reduce`` option: ``"off"`` (or 0 / None / False), ``"auto"``, or a number of wavelet levels 1..8
    (as a string); anything else is one clear :class:`MammoInputError`."""
    if value is None or value is False or str(value).strip().lower() in ("off", "0", "none", "false", ""):
        return "off"
    if str(value).strip().lower() == "auto":
        return "auto"
    return str(option_int("j2k_reduce", value, 1, 8))


def load_display_image(path: str | os.PathLike, window_index: int = 0, j2k_reduce: int | str = 0,
                       j2k_min_side: int = 512) -> tuple[np.ndarray, dict[str, Any]]:
    """Load a source image as display values.

    DICOM (``.dcm``/``.dicom``/no suffix) goes through :class:`~custom.transforms.LoadMammogram` (MONAI
    ``LoadImage`` with :class:`~custom.dicom.MammoDicomReader`) and :class:`~custom.transforms.DicomGrayscale`; PNG is scaled by
    its dtype maximum. Returns ``(image (H, W) float32 in [0, 1], info)`` with ``info`` keys ``laterality``
    (tag or None), ``view_position``, ``grayscale`` (what the pipeline applied), ``presentation_intent``,
    ``j2k_reduce`` (wavelet levels discarded: the image is ``2**j2k_reduce`` times smaller per side than the
    DICOM's Rows x Columns, ``full_shape``; 0 unless ``j2k_reduce`` is asked for and the file is JPEG 2000, see
    :func:`custom.dicom.decode_j2k_reduced`).

    The stored values stay integers (``LoadImage(dtype=None)``) so the grayscale look-up table indexes them
    directly: the same display values as the float32 hand-over, without a full-size float copy.
    """
    from custom.transforms.intensity import DicomGrayscale
    from custom.transforms.loading import LoadMammogram

    path = Path(path)
    if path.suffix.lower() == ".png":
        try:
            with Image.open(path) as im:
                arr = np.asarray(im)
        except Exception as err:
            raise MammoInputError(path, f"unreadable PNG ({err})") from err
        if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.integer):
            raise MammoInputError(path, f"PNG image must be single-channel 8/16-bit grayscale, got {arr.dtype} {arr.shape}")
        image = arr.astype(np.float32) / float(np.iinfo(arr.dtype).max)
        _check_dynamic_range(image, path)
        return image, {
            "laterality": None, "view_position": None, "grayscale": {"voi": "png"}, "presentation_intent": None,
            "j2k_reduce": 0, "full_shape": image.shape}
    img = LoadMammogram(ensure_channel_first=False, dtype=None, j2k_reduce=j2k_reduce, j2k_min_side=j2k_min_side)(str(path))
    out = DicomGrayscale(window_index=window_index)(img)
    meta = img.meta
    _check_dynamic_range(out.numpy(), path)
    return out.numpy(), {
        "sop_instance_uid": meta.get("sop_instance_uid"),
        "laterality": meta.get("laterality"),
        "view_position": meta.get("view_position"),
        "grayscale": out.meta["grayscale"],
        "presentation_intent": meta.get("presentation_intent"),
        "j2k_reduce": int(meta.get("j2k_reduce") or 0),
        "j2k_reduce_skipped": meta.get("j2k_reduce_skipped"),
        "full_shape": tuple(int(v) for v in meta.get("full_shape") or out.shape),
    }


#: a display image whose values span less than this is blank (one 16-bit level)
MIN_DYNAMIC_RANGE = 1.0 / 65535.0


def _check_dynamic_range(image: np.ndarray, path) -> None:
    """Refuse an image with no dynamic range (constant or blank, or a window that maps every pixel to one value):
    there is no breast to find, and an export of it would carry a degenerate window."""
    lo, hi = float(np.min(image)), float(np.max(image))
    if not (hi - lo >= MIN_DYNAMIC_RANGE):
        raise MammoInputError(path, f"the image has no dynamic range (every displayed pixel is {lo:.4g}): a blank or "
                                    "constant image, or a VOI window that maps all values to one level")


def _write_png(path: Path, arr: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        Image.fromarray(arr).save(tmp, format="PNG")


def _resize_instances(geom, instances: np.ndarray, source: str) -> np.ndarray:
    """Each lesion instance resized on its own as a binary mask (area + threshold), later ids on top."""
    out = np.zeros(geom.output_shape, dtype=np.uint8)
    for k in range(1, int(instances.max()) + 1):
        m = geom.apply_image((instances == k)[None], "mask")[0].numpy() > 0
        if not m.any():
            raise MammoInputError(source, f"lesion {k - 1} is smaller than one pixel at {geom.output_shape[0]} px")
        out[m] = k
    return out


#: relative aspect-ratio difference above which an annotated size is not a rescaled copy of the image
MAX_ASPECT_DIFFERENCE = 0.01


def _boxes_for_image(case: MammoCase, boxes: list[list[float]], shape: tuple[int, int]) -> list[list[float]]:
    """Boxes on the grid of the image read: unchanged when the annotation's ``height``/``width`` match it; scaled
    when the image is a resized copy (same aspect ratio within 1 %); refused otherwise (they would land elsewhere)."""
    if not boxes or not case.annotated_shape or tuple(case.annotated_shape) == tuple(shape):
        return boxes
    ah, aw = case.annotated_shape
    h, w = shape
    sy, sx = h / ah, w / aw
    if abs(sy - sx) > MAX_ASPECT_DIFFERENCE * max(sy, sx):
        raise MammoInputError(case.image_path, f"the annotations were drawn on a {ah}x{aw} image (height x width in "
                                               f"the CSV) but the image is {h}x{w} with another aspect ratio: the "
                                               "boxes cannot be placed")
    logger.info("%s: image %dx%d, annotated at %dx%d: boxes scaled by %.4g", case.case_id, h, w, ah, aw, sx)
    return [[b[0] * sx, b[1] * sy, b[2] * sx, b[3] * sy] for b in boxes]


def preprocess_case(case: MammoCase, output_dir: str, settings: PreprocessSettings) -> dict[str, Any]:
    """Preprocess one case and write its files; returns its record (a datalist entry without the split).

    Raises:
        MammoInputError: any problem with the case's files (the caller reports it as a skip).
    """
    out = Path(output_dir)
    # JPEG 2000 at reduced resolution (settings.j2k_reduce), not for a case with a full-resolution lesion mask file
    reduce = 0 if case.mask_path else settings.reader_j2k_reduce()
    image, info = load_display_image(case.image_path, settings.window_index, reduce, 2 * settings.image_size)
    h, w = image.shape
    level = info["j2k_reduce"]
    breast = breast_mask(image, border=settings.border)
    if breast.mean() < MIN_BREAST_FRACTION:
        raise MammoInputError(case.image_path, f"no breast found (foreground {100 * breast.mean():.1f}% of the image)")

    if case.mask_path:
        mask = load_mask_file(case.mask_path, expected_shape=(h, w),
                              referenced_sop_instance_uid=info.get("sop_instance_uid"))
        if not (mask > 0).any():
            raise MammoInputError(case.mask_path, "empty lesion mask (no nonzero pixel)")
        try:
            instances = lesion_instances_from_mask(mask)
        except ValueError as err:
            raise MammoInputError(case.mask_path, str(err)) from err
        findings = [{"category": "lesion", "birads": None} for _ in range(int(instances.max()))]
    else:
        boxes = [list(f.box) for f in case.findings]
        boxes = _boxes_for_image(case, boxes, info["full_shape"])
        if level:  # boxes on the reduced grid: full-resolution pixel edges / 2**level
            boxes = [[v / 2**level for v in b] for b in boxes]
        for f, box in zip(case.findings, boxes):
            x0, y0, x1, y1 = box
            if x1 <= 0 or y1 <= 0 or x0 >= w or y0 >= h:
                raise MammoInputError(case.image_path, f"lesion box {box} lies outside the image ({w}x{h})")
        instances = lesion_instances_from_boxes((h, w), boxes, kind=settings.lesion_shape)
        findings = [{"category": f.category, "birads": f.birads} for f in case.findings]
    for k in range(1, int(instances.max()) + 1):
        lesion = instances == k
        if not lesion.any():
            raise MammoInputError(case.mask_path or case.image_path, f"lesion {k - 1} is hidden by an overlapping lesion")
        inside = float(breast[lesion].mean())
        if inside < MIN_LESION_INSIDE:
            raise MammoInputError(
                case.mask_path or case.image_path, f"lesion {k - 1} lies outside the breast ({100 * inside:.0f}% inside)"
            )
    breast |= instances > 0

    laterality = case.laterality or info["laterality"]
    geom, geom_info = compute_geometry(breast, laterality, settings.image_size, settings.margin)
    image_out = geom.apply_image(image[None], "image")[0].numpy().clip(0.0, 1.0)
    breast_out = geom.apply_image(breast[None], "mask")[0].numpy() > 0  # converted to float on the crop only
    inst_out = _resize_instances(geom, instances, case.mask_path or case.image_path)
    labels = label_map(breast_out, inst_out)

    for k, finding in enumerate(findings, start=1):
        rows, cols = np.nonzero(inst_out == k)
        finding.update(
            lesion_index=k - 1,
            box=[int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1],
            area_px=int(rows.size),
        )

    rel = {k: f"{k}/{case.case_id}.png" for k in ("images", "labels", "lesions")}
    _write_png(out / rel["images"], np.round(image_out * 65535.0).astype(np.uint16))
    _write_png(out / rel["labels"], labels)
    _write_png(out / rel["lesions"], inst_out)
    record = {
        "case_id": case.case_id,
        "image": rel["images"],
        "label": rel["labels"],
        "lesions": rel["lesions"],
        "study_id": case.study_id,
        "dataset_split": case.split,
        "laterality": laterality or ("R" if geom.flip else "L"),
        "view": case.view or info["view_position"],
        "density": case.density,
        "breast_birads": case.breast_birads,
        "num_lesions": len(findings),
        "findings": findings,
        "geometry": (geom if not level else _full_resolution_geometry(geom, level, info["full_shape"])).to_dict(),
        "laterality_source": "annotation" if case.laterality else geom_info["laterality_source"],
        "laterality_conflict": bool(geom_info["laterality_conflict"]),
        "grayscale": info["grayscale"],
        "presentation_intent": info["presentation_intent"],
        "source_image": case.image_path,
        "settings_digest": settings.digest(),
    }
    if level:
        record["j2k_reduce"] = level
    atomic_write_json(out / "records" / f"{case.case_id}.json", record)
    return record


def _full_resolution_geometry(geom, level: int, full_shape: tuple[int, int]):
    """The geometry found on an image decoded ``2**level`` times smaller, expressed on the full-resolution source
    grid (crop edges times ``2**level``, clamped to the image; scale divided by it; output unchanged), so a record
    always maps its source file's pixels, to within one reduced pixel."""
    f, (h, w) = 2**level, full_shape
    y0, y1, x0, x1 = geom.crop
    return MammoGeometry((int(h), int(w)), geom.flip, (y0 * f, min(y1 * f, h), x0 * f, min(x1 * f, w)),
                         geom.scale / f, geom.resized_shape, geom.pad, geom.output_shape)


def _reusable_record(case: MammoCase, out: Path, settings: PreprocessSettings) -> dict[str, Any] | None:
    path = out / "records" / f"{case.case_id}.json"
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if record.get("settings_digest") != settings.digest() or record.get("source_image") != case.image_path:
        return None
    if not all((out / record[k]).is_file() for k in ("image", "label", "lesions")):
        return None
    return record


def _run_case(args: tuple[MammoCase, str, PreprocessSettings]) -> tuple[str, dict[str, Any] | None, dict | None]:
    case, output_dir, settings = args
    try:
        return case.case_id, preprocess_case(case, output_dir, settings), None
    except MammoInputError as err:
        return case.case_id, None, Skipped(case.case_id, err.source or case.image_path, err.reason).to_dict()
    except OSError as err:  # unreadable file, name too long, disk full, ...
        return case.case_id, None, Skipped(case.case_id, err.filename or case.image_path,
                                           f"cannot read or write a file: {err.strerror or err}").to_dict()
    except Exception as err:  # an unexpected failure of one case must not abort the dataset
        text = (str(err).splitlines() or [""])[0][:200]
        return case.case_id, None, Skipped(case.case_id, case.image_path,
                                           f"could not be prepared (unexpected {type(err).__name__}: {text}); "
                                           "please report this file").to_dict()


class PrepareWorkflow:
    """Prepare a dataset for GCDM training (see the module docstring for the outputs).

    Args:
        dataset_dir: the dataset root.
        output_dir: where the prepared dataset is written.
        params_file: PyRadiomics params file (``bundle/configs/radiomics_params.yaml``).
        adapter: ``"vindr"``, ``"folder"`` or ``"auto"`` (VinDr when ``finding_annotations.csv`` exists).
        image_size: side of the square model-resolution images.
        margin: breast crop margin (fraction of the breast box's larger side).
        border: image-edge fraction ignored when finding the breast (edge artefacts).
        lesion_shape: ``"ellipse"`` (inscribed in each box) or ``"box"``, for box annotations.
        lesion_categories: finding categories that count as lesions (VinDr).
        other_findings: images whose only findings are of other categories: ``"exclude"`` (default) or
            ``"healthy"`` (kept as lesion-free); counted in the summary either way.
        views: keep only these views (e.g. ``["CC"]``), ``None`` = all.
        validation_fraction, test_fraction: split shares (by study; the dataset's own test split is kept).
        seed: split seed.
        num_workers: processes for preprocessing and radiomics (default: all cores).
        normalisation_copy: also write the normalisation file here, or ``None`` (default). A folder that holds a
            trained model (``model.pt``, ``autoencoder.pt`` or ``diffusion_info.json``) is refused: the normaliser a
            model was trained with is written with the model by training, and ``prepare`` never touches it.
        preview_cases: cases on the contact sheet (0 disables it).
        progress: progress bars.
        split_file: a split file fixing which cases go into which split.
        j2k_reduce: ``"off"`` (default): every image decoded at full resolution. ``"auto"``: JPEG 2000 images are
            decoded with as many wavelet levels discarded as keep the shorter side >= 2 x ``image_size`` (for
            4084 x 3328 and 256: 2 levels, 1021 x 832, about 8x faster to decode); an integer: that many levels.
            The prepared image then differs slightly from full decoding + the same resize (measured in the tests
            and ``bundle/docs/benchmarks.md``). Not applied to other transfer syntaxes, to images with pixel
            padding or signed pixels, or to cases with a lesion mask file (those decode in full).
    """

    def __init__(
        self,
        dataset_dir: str,
        output_dir: str,
        params_file: str,
        adapter: str = "auto",
        image_size: int = 256,
        margin: float = 0.02,
        border: float = 0.01,
        lesion_shape: str = "ellipse",
        lesion_categories: Sequence[str] = ("Mass",),
        views: Sequence[str] | None = None,
        other_findings: str = "exclude",
        validation_fraction: float = 0.1,
        test_fraction: float = 0.2,
        seed: int = 0,
        window_index: int = 0,
        num_workers: int | None = None,
        normalisation_copy: str | None = None,
        preview_cases: int = 16,
        progress: bool = True,
        split_file: str | None = None,
        j2k_reduce: str | int | None = "off",
    ):
        # every option checked before any work, one clear line each
        for key, value in dict(dataset_dir=dataset_dir, output_dir=output_dir, params_file=params_file,
                               normalisation_copy=normalisation_copy).items():
            check_path_option(key, value)
        if str(adapter) not in ("auto", "vindr", "folder"):
            raise MammoInputError("adapter", f"must be 'auto', 'vindr' or 'folder', got {str(adapter)[:40]!r}")
        if str(lesion_shape) not in ("ellipse", "box"):
            raise MammoInputError("lesion_shape", f"must be 'ellipse' or 'box', got {str(lesion_shape)[:40]!r}")
        image_size = option_int("image_size", image_size, 8, 8192)
        margin = option_float("crop_margin", margin, 0.0, 1.0)
        border = option_float("border_fraction", border, 0.0, 0.45)
        window_index = option_int("window_index", window_index, 0, 1000)
        validation_fraction = option_float("validation_fraction", validation_fraction, 0.0, 1.0)
        test_fraction = option_float("test_fraction", test_fraction, 0.0, 1.0 - validation_fraction)
        seed = option_int("split_seed", seed, 0, 2**63 - 1)
        num_workers = None if num_workers in (None, "", 0) else option_int("num_workers", num_workers, 1, 1024)
        preview_cases = option_int("preview_cases", preview_cases, 0, 1000)
        j2k_reduce = parse_j2k_reduce(j2k_reduce)
        self.dataset_dir, self.output_dir = Path(dataset_dir), Path(output_dir)
        self.params_file = str(params_file)
        self.adapter = adapter
        self.settings = PreprocessSettings(int(image_size), float(margin), float(border), lesion_shape, int(window_index),
                                           j2k_reduce)
        self.lesion_categories, self.views = list(lesion_categories), None if views is None else list(views)
        self.other_findings = str(other_findings).strip().lower()
        if self.other_findings not in ("exclude", "healthy"):
            raise MammoInputError("other_findings", f"must be 'exclude' or 'healthy', got {other_findings!r}")
        self.validation_fraction, self.test_fraction, self.seed = float(validation_fraction), float(test_fraction), int(seed)
        self.num_workers = int(num_workers or os.cpu_count() or 1)
        self.normalisation_copy = normalisation_copy
        self.preview_cases, self.progress = int(preview_cases), bool(progress)
        self.split_selection = None
        if split_file:
            from custom.data.split_file import SplitSelection

            self.split_selection = SplitSelection(split_file)  # read (and checked) before any expensive work

    # ------------------------------------------------------------------ steps
    def load_cases(self) -> tuple[list[MammoCase], list[Skipped], dict[str, int]]:
        if not self.dataset_dir.is_dir():
            raise MammoInputError(self.dataset_dir, "dataset folder not found")
        adapter = self.adapter
        if adapter == "auto":
            adapter = "vindr" if (self.dataset_dir / "finding_annotations.csv").is_file() else "folder"
        if adapter == "vindr":
            cases, skipped, counts = load_vindr_cases(self.dataset_dir, self.lesion_categories, self.views,
                                                      other_findings=self.other_findings)
        elif adapter == "folder":
            cases, skipped, counts = load_folder_cases(self.dataset_dir)
        else:
            raise ValueError(f"unknown adapter {self.adapter!r} (use 'vindr', 'folder' or 'auto')")
        if self.split_selection is not None:
            cases, left_out, missing = self.split_selection.select(cases)
            counts = {**counts, "not_in_split_file": left_out, "split_file_entries_not_found": sum(missing.values())}
            if any(missing.values()):
                logger.warning("%s: entries not found in the dataset (after the view/category filters): %s",
                               self.split_selection.path, missing)
        return cases, skipped, counts

    def preprocess(self, cases: list[MammoCase]) -> tuple[list[dict], list[dict], int]:
        records, skipped, todo, reused = [], [], [], 0
        for case in cases:
            record = _reusable_record(case, self.output_dir, self.settings)
            if record is not None:
                records.append(record)
                reused += 1
            else:
                todo.append((case, str(self.output_dir), self.settings))
        bar = tqdm(total=len(todo), desc="preprocess", unit="img", disable=not self.progress or not todo)
        if self.num_workers > 1 and len(todo) > 1:
            # "spawn": a forked child of a process whose torch/OpenMP thread pool is running can deadlock
            with ProcessPoolExecutor(min(self.num_workers, len(todo)), mp_context=multiprocessing.get_context("spawn")) as pool:
                results = pool.map(_run_case, todo, chunksize=1)
                for result in results:
                    self._collect(result, records, skipped)
                    bar.update()
        else:
            for item in todo:
                self._collect(_run_case(item), records, skipped)
                bar.update()
        bar.close()
        return records, skipped, reused

    @staticmethod
    def _collect(result, records: list, skipped: list) -> None:
        _, record, skip = result
        if record is not None:
            records.append(record)
        else:
            skipped.append(skip)

    def extract_features(self, records: list[dict]) -> tuple[list[dict], list[dict], dict[str, int]]:
        from custom.features.radiomics import LesionJob, extract_features

        jobs = [
            LesionJob(r["case_id"], str(self.output_dir / r["image"]), str(self.output_dir / r["lesions"]))
            for r in records
            if r["num_lesions"] > 0
        ]
        result = extract_features(
            jobs, self.params_file, cache_dir=self.output_dir / "cache" / "radiomics",
            num_workers=self.num_workers, progress=self.progress, mp_context="spawn",
        )
        return result.rows, result.failures, {"computed": result.n_computed, "cached": result.n_cached}

    #: files of a trained model: ``prepare`` never writes beside them
    MODEL_FILES = ("model.pt", "autoencoder.pt", "diffusion_info.json")

    def check_normalisation_copy(self) -> None:
        """Refuse (before any work) a ``normalisation_copy`` that would overwrite a trained model's normaliser."""
        if not self.normalisation_copy:
            return
        target = Path(self.normalisation_copy)
        found = [n for n in self.MODEL_FILES if (target.parent / n).is_file()]
        if found:
            raise MammoInputError(target, f"normalisation_copy would overwrite the normaliser of the trained model in "
                                          f"{target.parent} ({', '.join(found)}): a model keeps the normaliser it was "
                                          "trained with; leave normalisation_copy unset (the prepared folder holds "
                                          "its own feature_normalisation.json)")

    # ------------------------------------------------------------------ run
    def run(self) -> dict[str, Any]:
        from custom.features.feature_file import write_feature_csv
        from custom.features.normalisation import FeatureNormaliser

        start = time.time()
        self.check_normalisation_copy()
        self.output_dir.mkdir(parents=True, exist_ok=True)
        cases, adapter_skipped, counts = self.load_cases()
        logger.info("%d cases found in %s", len(cases), self.dataset_dir)
        records, skipped, reused = self.preprocess(cases)
        skipped = [s.to_dict() for s in adapter_skipped] + skipped

        rows, failures, radiomics_counts = self.extract_features(records)
        failed_cases = {f["case_id"] for f in failures}
        for f in failures:
            lesion = "" if f["lesion_index"] is None else f" lesion {f['lesion_index']}"
            skipped.append({"case_id": f["case_id"], "source": f["source"], "reason": f"radiomics failed for{lesion}: {f['reason']}"})
        records = sorted((r for r in records if r["case_id"] not in failed_cases), key=lambda r: r["case_id"])
        rows = [r for r in rows if r["case_id"] not in failed_cases]

        fixed = {c.case_id: c.split for c in cases} if self.split_selection is not None else {}
        for r in records:
            r["split"] = fixed.get(r["case_id"]) or assign_split(r["study_id"], r.get("dataset_split"), self.validation_fraction, self.test_fraction, self.seed)
        datalist = {s: [r for r in records if r["split"] == s] for s in ("training", "validation", "test")}
        split_of = {r["case_id"]: r["split"] for r in records}
        train_rows = [row for row in rows if split_of[row["case_id"]] == "training"]
        if not train_rows:
            raise MammoInputError(self.dataset_dir, "no lesion in the training split: cannot fit the feature normalisation")

        normaliser = FeatureNormaliser().fit(train_rows)
        clipping = {}
        for split in ("validation", "test"):
            split_rows = [row for row in rows if split_of[row["case_id"]] == split]
            if split_rows:
                from custom.features.feature_file import rows_to_matrix

                _, report = normaliser.transform(rows_to_matrix(split_rows))
                clipping[split] = report.to_dict()

        write_feature_csv(self.output_dir / "features.csv", rows)
        normaliser.save(self.output_dir / "feature_normalisation.json")
        if self.normalisation_copy:
            normaliser.save(self.normalisation_copy)
        atomic_write_json(self.output_dir / "datalist.json", datalist)
        preview = self.write_preview(records) if self.preview_cases > 0 else None

        summary = {
            "mammo_gcdm_version": custom.__version__,
            "dataset_dir": str(self.dataset_dir),
            "output_dir": str(self.output_dir),
            "settings": asdict(self.settings),
            "cases_found": len(cases),
            "cases_prepared": len(records),
            "cases_reused": reused,
            "splits": {
                s: {
                    "images": len(v),
                    "studies": len({r["study_id"] for r in v}),
                    "lesions": sum(r["num_lesions"] for r in v),
                    "images_with_lesion": sum(r["num_lesions"] > 0 for r in v),
                }
                for s, v in datalist.items()
            },
            "views": dict(Counter(r["view"] for r in records)),
            "laterality_conflicts": sum(r["laterality_conflict"] for r in records),
            "excluded_by_view": counts.get("excluded_view", 0),
            "ignored_findings": counts.get("ignored_findings", 0),
            "other_findings": {
                "policy": self.other_findings,
                "excluded_images": counts.get("excluded_other_findings", 0),
                "kept_as_healthy_images": counts.get("kept_other_findings_as_healthy", 0),
            },
            "radiomics": {**radiomics_counts, "lesions": len(rows), "failures": len(failures)},
            "feature_clipping": clipping,
            "skipped": skipped,
            "files": {
                "datalist": "datalist.json",
                "features": "features.csv",
                "normalisation": "feature_normalisation.json",
                "preview": preview,
            },
            "seconds": round(time.time() - start, 1),
        }
        atomic_write_json(self.output_dir / "summary.json", summary)
        print(format_summary(summary))
        return summary

    def write_preview(self, records: list[dict]) -> str | None:
        if not records:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        # lesion cases first, the views taking turns
        by_view: dict[str, list[dict]] = {}
        for r in sorted(records, key=lambda r: (-min(r["num_lesions"], 1), r["case_id"])):
            by_view.setdefault(r["view"] or "", []).append(r)
        queues = list(by_view.values())
        chosen = [q[i] for i in range(max(map(len, queues))) for q in queues if i < len(q)][: self.preview_cases]
        n = len(chosen)
        cols = min(n, 8)
        rows = (n + cols - 1) // cols
        fig, axes = plt.subplots(rows, cols, figsize=(2.3 * cols, 2.9 * rows), squeeze=False)
        for ax in axes.ravel():
            ax.axis("off")
        for ax, r in zip(axes.ravel(), chosen):
            img = np.asarray(Image.open(self.output_dir / r["image"]), dtype=np.float32) / 65535.0
            lab = np.asarray(Image.open(self.output_dir / r["label"]))
            ax.imshow(img, cmap="gray", vmin=0, vmax=1)
            ax.contour(lab >= 1, levels=[0.5], colors=["#33cc33"], linewidths=0.6)
            if (lab == 2).any():
                ax.contour(lab == 2, levels=[0.5], colors=["#ff3333"], linewidths=0.8)
            ax.set_title(f"{r['case_id'][:8]} {r['laterality']}-{r['view']}\n{r['split']}, {r['num_lesions']} lesion(s)", fontsize=7)
        fig.suptitle("prepared cases: breast (green), lesion (red)", fontsize=9)
        fig.tight_layout()
        path = self.output_dir / "preview.png"
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=110, format="png")
        plt.close(fig)
        return "preview.png"


def format_summary(summary: dict[str, Any]) -> str:
    """Plain-text table of a prepare summary."""
    lines = [
        f"prepared {summary['cases_prepared']} of {summary['cases_found']} cases "
        f"({summary['cases_reused']} reused) in {summary['seconds']} s -> {summary['output_dir']}",
        f"{'split':<12}{'images':>8}{'studies':>9}{'lesions':>9}{'w/ lesion':>11}",
    ]
    for split, c in summary["splits"].items():
        lines.append(f"{split:<12}{c['images']:>8}{c['studies']:>9}{c['lesions']:>9}{c['images_with_lesion']:>11}")
    rad = summary["radiomics"]
    lines.append(f"radiomics: {rad['lesions']} lesions ({rad['computed']} computed, {rad['cached']} cached, {rad['failures']} failed)")
    other = summary.get("other_findings") or {}
    if other.get("excluded_images") or other.get("kept_as_healthy_images"):
        lines.append(f"images whose only findings are not lesions (policy {other['policy']}): "
                     f"{other['excluded_images']} excluded, {other['kept_as_healthy_images']} kept as healthy")
    if summary["skipped"]:
        lines.append(f"skipped {len(summary['skipped'])}:")
        lines += [f"  {s['case_id']}: {s['source']}: {s['reason']}" for s in summary["skipped"][:20]]
        if len(summary["skipped"]) > 20:
            lines.append(f"  ... {len(summary['skipped']) - 20} more in summary.json")
    if summary["files"].get("preview"):
        lines.append(f"preview: {Path(summary['output_dir']) / summary['files']['preview']}")
    return "\n".join(lines)
