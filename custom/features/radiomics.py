"""PyRadiomics feature extraction for lesions: the 67-feature GCDM condition vector.

Each lesion instance of a preprocessed image is described by the 67 non-deprecated PyRadiomics features of the
classes ``shape2D`` (9), ``firstorder`` (18), ``glcm`` (24) and ``glszm`` (16), computed on the original
(unfiltered) image with the settings of ``bundle/configs/radiomics_params.yaml``.

Inputs (written by the prepare workflow):

- image: 16-bit grayscale PNG (uint16), shape (H, W); intensity = round(x * 65535) with x in [0, 1];
- instance map: 8-bit PNG (uint8), shape (H, W); 0 = background, k = 1..K = lesion instance k, whose
  ``lesion_index`` is k - 1.

Intensities are handed to PyRadiomics as ``x * INTENSITY_SCALE`` (float64, 0-255 scale).
"""

from __future__ import annotations

import concurrent.futures as cf
import functools
import hashlib
import io
import json
import logging
import math
import multiprocessing
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np

from custom.errors import MammoInputError
from custom.io import atomic_write_json

__all__ = [
    "FEATURE_CLASSES",
    "FEATURE_NAMES",
    "INTENSITY_SCALE",
    "FeatureExtractionResult",
    "LesionJob",
    "extract_features",
    "extract_lesion_features",
    "pyradiomics_version",
    "read_image_png",
    "read_instance_png",
]

#: PyRadiomics feature classes, in the canonical order of FEATURE_NAMES.
FEATURE_CLASSES: tuple[str, ...] = ("shape2D", "firstorder", "glcm", "glszm")

#: The [0, 1] image is multiplied by this before extraction: the reference implementation's 8-bit scale,
#: kept at full 16-bit precision (float64, no rounding to integers).
INTENSITY_SCALE: float = 255.0

_FEATURES_PER_CLASS: dict[str, tuple[str, ...]] = {
    "shape2D": (
        "Elongation", "MajorAxisLength", "MaximumDiameter", "MeshSurface", "MinorAxisLength", "Perimeter",
        "PerimeterSurfaceRatio", "PixelSurface", "Sphericity",
    ),
    "firstorder": (
        "10Percentile", "90Percentile", "Energy", "Entropy", "InterquartileRange", "Kurtosis", "Maximum",
        "MeanAbsoluteDeviation", "Mean", "Median", "Minimum", "Range", "RobustMeanAbsoluteDeviation", "RootMeanSquared",
        "Skewness", "TotalEnergy", "Uniformity", "Variance",
    ),
    "glcm": (
        "Autocorrelation", "ClusterProminence", "ClusterShade", "ClusterTendency", "Contrast", "Correlation",
        "DifferenceAverage", "DifferenceEntropy", "DifferenceVariance", "Id", "Idm", "Idmn", "Idn", "Imc1", "Imc2",
        "InverseVariance", "JointAverage", "JointEnergy", "JointEntropy", "MCC", "MaximumProbability",
        "SumAverage", "SumEntropy", "SumSquares",
    ),
    "glszm": (
        "GrayLevelNonUniformity", "GrayLevelNonUniformityNormalized", "GrayLevelVariance",
        "HighGrayLevelZoneEmphasis", "LargeAreaEmphasis", "LargeAreaHighGrayLevelEmphasis",
        "LargeAreaLowGrayLevelEmphasis", "LowGrayLevelZoneEmphasis", "SizeZoneNonUniformity",
        "SizeZoneNonUniformityNormalized", "SmallAreaEmphasis", "SmallAreaHighGrayLevelEmphasis",
        "SmallAreaLowGrayLevelEmphasis", "ZoneEntropy", "ZonePercentage", "ZoneVariance",
    ),
}

#: The 67 native PyRadiomics names (``original_<class>_<feature>``): classes in FEATURE_CLASSES order, features
#: within a class in the order PyRadiomics 3.0.1 emits them. That order is alphabetical by PyRadiomics' method
#: name (``get<Feature>FeatureValue``), so it matches plain alphabetical order except that
#: ``MeanAbsoluteDeviation`` comes before ``Mean``.
FEATURE_NAMES: tuple[str, ...] = tuple(
    f"original_{cls}_{name}" for cls in FEATURE_CLASSES for name in _FEATURES_PER_CLASS[cls]
)

# The lesion's bounding box is cut out and surrounded by a border of this many background pixels before it is
# handed to PyRadiomics. PyRadiomics only uses the lesion's pixels (it crops to the bounding box itself), so the
# features do not depend on it: cropping avoids whole-image work, and the border guarantees the mask has a
# background value (PyRadiomics rejects a mask without one, e.g. a lesion touching all four image borders).
_CROP_PAD = 1
_CACHE_FORMAT = "mammo_gcdm/radiomics-lesion-cache/1"
_log = logging.getLogger(__name__)


def pyradiomics_version() -> str:
    """The installed PyRadiomics version string (e.g. ``"v3.0.1"``), part of cache keys and normaliser files."""
    import radiomics

    return str(radiomics.__version__)


def _quiet_radiomics() -> None:
    """PyRadiomics logs at INFO and prints warnings to stderr; keep only errors.

    ``import radiomics`` sets its logger to INFO, so the package is imported before the level is set.
    """
    import radiomics  # noqa: F401

    logging.getLogger("radiomics").setLevel(logging.ERROR)
    logging.getLogger("pykwalify").setLevel(logging.ERROR)


@functools.lru_cache(maxsize=8)
def _extractor_for(path: str, digest: str):
    """Build (and memoise per process) a RadiomicsFeatureExtractor; the digest makes edits take effect."""
    del digest  # only part of the memoisation key
    _quiet_radiomics()
    from radiomics import featureextractor

    try:
        return featureextractor.RadiomicsFeatureExtractor(path)
    except Exception as exc:  # pykwalify SchemaError, YAML errors, ...
        raise MammoInputError(path, f"not a valid PyRadiomics parameter file: {exc}") from exc


def _read_bytes(path: str | os.PathLike, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise MammoInputError(path, f"{what} not found") from None
    except IsADirectoryError:
        raise MammoInputError(path, f"{what} is a directory, not a file") from None
    except OSError as exc:
        raise MammoInputError(path, f"cannot read {what}: {exc}") from None


def _get_extractor(params_file: str | os.PathLike):
    data = _read_bytes(params_file, "PyRadiomics parameter file")
    return _extractor_for(str(Path(params_file).resolve()), hashlib.sha256(data).hexdigest())


def _decode_png(data: bytes, source: str | os.PathLike, what: str) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt, mode = im.format, im.mode
            im.load()
            arr = np.asarray(im)  # rows first: (H, W)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise MammoInputError(source, f"{what} is not a readable image: {exc}") from None
    if fmt != "PNG":
        raise MammoInputError(source, f"{what} must be a PNG file, found format {fmt}")
    if arr.ndim != 2:
        raise MammoInputError(source, f"{what} must be single-channel (H, W), got mode {mode} shape {arr.shape}")
    return arr


def read_image_png(path: str | os.PathLike, data: bytes | None = None) -> np.ndarray:
    """Read a preprocessed image: 16-bit grayscale PNG -> float64 array (H, W) with values in [0, 1] (= v / 65535).

    ``data`` may hold the file's bytes already read. Raises MammoInputError for a missing or non-16-bit file.
    """
    data = _read_bytes(path, "image file") if data is None else data
    arr = _decode_png(data, path, "image")
    if arr.dtype != np.uint16:
        raise MammoInputError(path, f"image must be a 16-bit grayscale PNG (uint16), got dtype {arr.dtype}")
    return arr.astype(np.float64) / 65535.0


def read_instance_png(path: str | os.PathLike, data: bytes | None = None) -> np.ndarray:
    """Read a lesion instance map: 8-bit PNG -> uint8 array (H, W); 0 = background, k = lesion instance k.

    ``data`` may hold the file's bytes already read. Raises MammoInputError for a missing or non-8-bit file.
    """
    data = _read_bytes(path, "lesion instance map") if data is None else data
    arr = _decode_png(data, path, "lesion instance map")
    if arr.dtype != np.uint8:
        raise MammoInputError(path, f"lesion instance map must be an 8-bit PNG (uint8), got dtype {arr.dtype}")
    return np.ascontiguousarray(arr)


def extract_lesion_features(
    image: np.ndarray,
    lesion_mask: np.ndarray,
    params_file: str | os.PathLike,
    *,
    source: str | os.PathLike | None = None,
) -> dict[str, float]:
    """Compute the 67 PyRadiomics features of one lesion.

    Args:
        image: float array (H, W), the preprocessed image with values in [0, 1]; multiplied by INTENSITY_SCALE
            (-> 0..255, float64) before extraction.
        lesion_mask: bool array (H, W) (nonzero = lesion), the pixels of a single lesion.
        params_file: PyRadiomics parameter file (``bundle/configs/radiomics_params.yaml``).
        source: optional name (file or case id) used in error messages.

    Returns:
        ``{name: float}`` for every name of FEATURE_NAMES, in that order; all values finite.
        Shape features are in pixel units (spacing 1), intensity features on the 0-255 scale.

    Raises:
        MammoInputError: empty mask, shape mismatch, image not finite / outside [0, 1], a lesion PyRadiomics
            rejects (e.g. fewer than ``minimumROISize`` pixels), missing or non-finite features.
    """
    import SimpleITK as sitk

    image = np.asarray(image)
    mask = np.asarray(lesion_mask)
    if image.ndim != 2:
        raise MammoInputError(source, f"image must be 2D (H, W), got shape {image.shape}")
    if mask.shape != image.shape:
        raise MammoInputError(source, f"lesion mask shape {mask.shape} does not match image shape {image.shape}")
    mask = mask.astype(bool, copy=False)
    if not mask.any():
        raise MammoInputError(source, "lesion mask is empty (no lesion pixel)")
    if not np.issubdtype(image.dtype, np.number) or np.iscomplexobj(image):
        raise MammoInputError(source, f"image must be real-valued, got dtype {image.dtype}")

    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    crop = image[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1].astype(np.float64)
    crop_mask = mask[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    lesion_values = crop[crop_mask]
    if not np.all(np.isfinite(lesion_values)):
        raise MammoInputError(source, "image has non-finite (NaN/inf) values inside the lesion")
    if lesion_values.min() < 0.0 or lesion_values.max() > 1.0:
        raise MammoInputError(
            source,
            f"image values must lie in [0, 1]; lesion has range [{lesion_values.min():g}, {lesion_values.max():g}]",
        )
    crop = np.pad(np.where(crop_mask, crop, 0.0), _CROP_PAD)  # pixels outside the lesion never matter
    crop_mask = np.pad(crop_mask, _CROP_PAD)

    extractor = _get_extractor(params_file)
    label = int(extractor.settings.get("label", 1))
    sitk_image = sitk.GetImageFromArray((crop * INTENSITY_SCALE)[None])  # (1, h, w): z is the force2D axis
    sitk_mask = sitk.GetImageFromArray(crop_mask.astype(np.uint8)[None] * np.uint8(label))
    try:
        raw = extractor.execute(sitk_image, sitk_mask)
    except ValueError as exc:  # PyRadiomics' own mask checks (too small, too few dimensions, ...)
        raise MammoInputError(source, f"PyRadiomics rejected the lesion ({int(mask.sum())} pixels): {exc}") from None

    values = {k: v for k, v in raw.items() if not k.startswith("diagnostics_")}
    missing = [n for n in FEATURE_NAMES if n not in values]
    unexpected = sorted(set(values) - set(FEATURE_NAMES))
    if missing or unexpected:
        hint = ""
        if any(n.startswith("original_shape2D_") for n in missing) and len(cols) == 1:
            hint = " (PyRadiomics 3.0.1 skips shape2D for a lesion one pixel wide)"
        raise MammoInputError(
            source,
            f"PyRadiomics returned an unexpected feature set{hint}: missing {missing}, unexpected {unexpected}",
        )
    out: dict[str, float] = {}
    for name in FEATURE_NAMES:
        value = float(np.asarray(values[name]).item())
        if not math.isfinite(value):
            raise MammoInputError(source, f"feature {name} is not finite ({value})")
        out[name] = value
    return out


@dataclass(frozen=True)
class LesionJob:
    """One image and its lesion instance map; every instance k >= 1 in the map yields a lesion (index k - 1)."""

    case_id: str
    image_path: str | os.PathLike
    instances_path: str | os.PathLike


@dataclass
class FeatureExtractionResult:
    """Outcome of :func:`extract_features`.

    Attributes:
        rows: ``{"case_id": str, "lesion_index": int, **{name: float for name in FEATURE_NAMES}}``, one per
            successfully extracted lesion, sorted by (case_id, lesion_index).
        failures: ``{"case_id": str, "lesion_index": int | None, "source": str, "reason": str}``; lesion_index is
            None when the lesions of a case could not even be enumerated (unreadable instance map). Sorted like rows.
        n_computed: lesions extracted by PyRadiomics in this run (successfully).
        n_cached: lesions taken from the cache.
    """

    rows: list[dict] = field(default_factory=list)
    failures: list[dict] = field(default_factory=list)
    n_computed: int = 0
    n_cached: int = 0


@dataclass(frozen=True)
class _Task:
    case_id: str
    lesion_index: int
    instance_id: int
    image_path: str
    instances_path: str
    image_sha256: str
    instances_sha256: str
    key: str | None


def _cache_key(image_sha: str, inst_sha: str, lesion_index: int, params_sha: str) -> str:
    payload = json.dumps(
        [_CACHE_FORMAT, image_sha, inst_sha, int(lesion_index), params_sha, pyradiomics_version(),
         repr(INTENSITY_SCALE)],
        separators=(",", ":"),
    )
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def _cache_file(cache_dir: Path, key: str) -> Path:
    return cache_dir / key[:2] / f"{key}.json"


def _cache_load(cache_dir: Path, key: str) -> dict[str, float] | None:
    """The cached features for ``key``, or None when absent or unusable (then the lesion is recomputed)."""
    path = _cache_file(cache_dir, key)
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
        feats = obj["features"]
        if obj.get("key") != key or list(feats) != list(FEATURE_NAMES):
            return None
        out = {}
        for name in FEATURE_NAMES:
            v = feats[name]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                return None
            out[name] = float(v)
        return out
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        _log.warning("ignoring unreadable radiomics cache entry %s", path)
        return None


def _cache_store(cache_dir: Path, task: _Task, features: dict[str, float]) -> None:
    obj = {
        "format": _CACHE_FORMAT,
        "key": task.key,
        "case_id": task.case_id,  # informative only: not part of the key
        "lesion_index": task.lesion_index,
        "pyradiomics_version": pyradiomics_version(),
        "features": features,
    }
    try:
        atomic_write_json(_cache_file(cache_dir, task.key), obj)
    except (OSError, ValueError) as exc:
        warnings.warn(f"{cache_dir}: could not write radiomics cache entry: {exc}", RuntimeWarning, stacklevel=3)


def _worker_init() -> None:
    _quiet_radiomics()
    try:  # one ITK thread per worker process: the pool is the parallelism
        import SimpleITK as sitk

        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    except Exception:  # pragma: no cover - cosmetic
        pass


def _compute_task(task: _Task, params_file: str) -> tuple[str, object, object]:
    """Worker body: ``("ok", features, None)`` or ``("fail", source, reason)``; never raises."""
    try:
        _quiet_radiomics()
        img_bytes = _read_bytes(task.image_path, "image file")
        if hashlib.sha256(img_bytes).hexdigest() != task.image_sha256:
            raise MammoInputError(task.image_path, "image file changed during feature extraction")
        inst_bytes = _read_bytes(task.instances_path, "lesion instance map")
        if hashlib.sha256(inst_bytes).hexdigest() != task.instances_sha256:
            raise MammoInputError(task.instances_path, "lesion instance map changed during feature extraction")
        image = read_image_png(task.image_path, img_bytes)
        instances = read_instance_png(task.instances_path, inst_bytes)
        if image.shape != instances.shape:
            raise MammoInputError(
                task.instances_path,
                f"lesion instance map shape {instances.shape} does not match image shape {image.shape} "
                f"({task.image_path})",
            )
        feats = extract_lesion_features(
            image, instances == task.instance_id, params_file,
            source=f"{task.instances_path} (lesion instance {task.instance_id})",
        )
        return "ok", feats, None
    except MammoInputError as exc:
        return "fail", exc.source or task.image_path, exc.reason
    except Exception as exc:  # anything PyRadiomics / SimpleITK may throw
        return "fail", task.image_path, f"{type(exc).__name__}: {exc}"


def _failure(case_id: str, lesion_index: int | None, source, reason: str) -> dict:
    return {"case_id": case_id, "lesion_index": lesion_index, "source": str(source), "reason": reason}


def extract_features(
    jobs: Iterable[LesionJob],
    params_file: str | os.PathLike,
    cache_dir: str | os.PathLike | None = None,
    num_workers: int | None = None,
    progress: bool = True,
    *,
    mp_context: str | None = None,
) -> FeatureExtractionResult:
    """Extract the 67 features of every lesion instance of every job, in parallel, with an optional cache.

    Args:
        jobs: LesionJob items (unique case_id). Each image is a 16-bit PNG (H, W) in [0, 1] * 65535, each instance
            map an 8-bit PNG (H, W) with 0 = background, k = lesion k (lesion_index k - 1). A map with no instance
            yields no row.
        params_file: PyRadiomics parameter file (validated up front; a bad one raises MammoInputError).
        cache_dir: when given, each lesion's features are stored there as a small JSON file keyed by a SHA-256 of
            (image bytes, instance-map bytes, lesion index, params-file bytes, PyRadiomics version,
            INTENSITY_SCALE); only lesions with a new key are computed. Failures are not cached.
        num_workers: worker processes (default ``os.cpu_count()``); 1 (or a single pending lesion) runs in this
            process without a pool.
        progress: show a tqdm progress bar over lesions.
        mp_context: multiprocessing start method of the pool; None (default) uses the platform's default ("fork"
            on Linux up to Python 3.13: workers start in milliseconds). "spawn"/"forkserver" are safer in a
            process with many threads but each worker then needs one to a few seconds to import PyRadiomics.

    Returns:
        FeatureExtractionResult; a failing lesion (unreadable file, lesion PyRadiomics rejects, worker crash, ...)
        is recorded in ``failures`` and the others are still returned.

    Raises:
        MammoInputError: unusable params file or duplicate case_id (problems of the whole run, not of a lesion).
    """
    jobs = list(jobs)
    params_bytes = _read_bytes(params_file, "PyRadiomics parameter file")
    params_sha = hashlib.sha256(params_bytes).hexdigest()
    _get_extractor(params_file)  # validate before doing any work
    params_file = str(Path(params_file).resolve())
    seen: set[str] = set()
    for job in jobs:
        if job.case_id in seen:
            raise MammoInputError(str(job.case_id), "duplicate case_id in the extraction jobs")
        seen.add(job.case_id)
    cache = Path(cache_dir) if cache_dir is not None else None
    if cache is not None:
        cache.mkdir(parents=True, exist_ok=True)

    result = FeatureExtractionResult()
    tasks: list[_Task] = []
    n_lesions = 0
    # Planning (this process): enumerate lesions, hash files, look up the cache.
    for job in jobs:
        case_id = str(job.case_id)
        try:
            inst_bytes = _read_bytes(job.instances_path, "lesion instance map")
            instances = read_instance_png(job.instances_path, inst_bytes)
        except MammoInputError as exc:
            result.failures.append(_failure(case_id, None, exc.source, exc.reason))
            continue
        ids = [int(k) for k in np.unique(instances) if k != 0]
        n_lesions += len(ids)
        try:
            img_bytes = _read_bytes(job.image_path, "image file")
        except MammoInputError as exc:
            result.failures.extend(_failure(case_id, k - 1, exc.source, exc.reason) for k in ids)
            continue
        img_sha = hashlib.sha256(img_bytes).hexdigest()
        inst_sha = hashlib.sha256(inst_bytes).hexdigest()
        for k in ids:
            key = _cache_key(img_sha, inst_sha, k - 1, params_sha) if cache is not None else None
            cached = _cache_load(cache, key) if cache is not None else None
            if cached is not None:
                result.rows.append({"case_id": case_id, "lesion_index": k - 1, **cached})
                result.n_cached += 1
            else:
                tasks.append(_Task(case_id, k - 1, k, str(job.image_path), str(job.instances_path), img_sha,
                                   inst_sha, key))

    workers = (os.cpu_count() or 1) if num_workers is None else int(num_workers)
    workers = max(1, min(workers, len(tasks)))

    from tqdm.auto import tqdm

    bar = tqdm(total=n_lesions, desc="radiomics", unit="lesion", disable=not progress)
    bar.update(n_lesions - len(tasks))  # cached lesions and failures found while planning

    def record(task: _Task, outcome: tuple[str, object, object]) -> None:
        status, a, b = outcome
        if status == "ok":
            result.rows.append({"case_id": task.case_id, "lesion_index": task.lesion_index, **a})
            result.n_computed += 1
            if cache is not None:
                _cache_store(cache, task, a)
        else:
            result.failures.append(_failure(task.case_id, task.lesion_index, a, b))
        bar.update(1)

    try:
        if workers == 1:
            _quiet_radiomics()
            for task in tasks:
                record(task, _compute_task(task, params_file))
        else:
            ctx = multiprocessing.get_context(mp_context)
            with cf.ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_worker_init) as pool:
                futures = {pool.submit(_compute_task, t, params_file): t for t in tasks}
                try:
                    for fut in cf.as_completed(futures):
                        task = futures[fut]
                        try:
                            outcome = fut.result()
                        except Exception as exc:  # BrokenProcessPool, unpicklable result, ...
                            outcome = ("fail", task.image_path, f"worker process failed: {type(exc).__name__}: {exc}")
                        record(task, outcome)
                except BaseException:
                    pool.shutdown(wait=False, cancel_futures=True)
                    raise
    finally:
        bar.close()

    result.rows.sort(key=lambda r: (r["case_id"], r["lesion_index"]))
    result.failures.sort(key=lambda f: (f["case_id"], -1 if f["lesion_index"] is None else f["lesion_index"]))
    return result

