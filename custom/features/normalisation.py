"""Min-max normalisation of the 67 lesion features into the [0, 1] condition space of GCDM.

The normaliser is fitted on the *training split only*; validation/test/inference vectors are mapped with the
training statistics and clipped to [0, 1] (the clipping is reported, never silent).

An image without a lesion is conditioned on :data:`NO_LESION_VECTOR` = zeros(67) in normalised space (GCDM's
convention).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from custom.errors import MammoInputError
from custom.features.feature_file import rows_to_matrix
from custom.features.radiomics import FEATURE_NAMES, INTENSITY_SCALE, pyradiomics_version
from custom.io import atomic_write_json

__all__ = ["NO_LESION_VECTOR", "FeatureNormaliser", "NormalisationReport", "normalised_condition"]

N_FEATURES = len(FEATURE_NAMES)

#: Condition vector (67,) float32 for an image without lesion: all zeros in normalised space (GCDM convention).
NO_LESION_VECTOR: np.ndarray = np.zeros(N_FEATURES, dtype=np.float32)
NO_LESION_VECTOR.setflags(write=False)

_FORMAT = "mammo_gcdm/feature-normaliser"
_FORMAT_VERSION = 1
_STATS = ("min", "max", "median", "q25", "q75", "mean", "std")
_NO_LESION_NOTE = (
    "An image without lesion is conditioned on NO_LESION_VECTOR = zeros(67) (float32) in normalised space, "
    "GCDM's convention (a lesion at the training minimum of every feature would map to the same vector)."
)
_TRANSFORM_NOTE = "value = clip((x - min) / (max - min), 0, 1); a constant feature (max == min) maps to 0."


@dataclass
class NormalisationReport:
    """What :meth:`FeatureNormaliser.transform` clipped.

    Attributes:
        n_vectors: number of feature vectors transformed.
        clipped_below: ``{feature name: count}`` of values below the fitted min (set to 0).
        clipped_above: ``{feature name: count}`` of values above the fitted max (set to 1; 0 for a constant feature).
    """

    n_vectors: int
    clipped_below: dict[str, int] = field(default_factory=dict)
    clipped_above: dict[str, int] = field(default_factory=dict)

    @property
    def n_clipped(self) -> int:
        """Total number of clipped values (below + above)."""
        return sum(self.clipped_below.values()) + sum(self.clipped_above.values())

    @property
    def clipped(self) -> bool:
        """True when any value was outside the fitted range."""
        return self.n_clipped > 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form."""
        return {
            "n_vectors": self.n_vectors,
            "n_clipped": self.n_clipped,
            "clipped_below": dict(self.clipped_below),
            "clipped_above": dict(self.clipped_above),
        }

    def summary(self) -> str:
        """One line for logs."""
        if not self.clipped:
            return f"{self.n_vectors} vector(s), no value outside the training range"
        parts = [f"{n} below min ({c})" for n, c in self.clipped_below.items()]
        parts += [f"{n} above max ({c})" for n, c in self.clipped_above.items()]
        return f"{self.n_vectors} vector(s), {self.n_clipped} value(s) clipped: " + "; ".join(parts)


def _as_matrix(data: Any, source: str) -> np.ndarray:
    """Rows (list of mappings) or an array (67,) / (N, 67) -> float64 (N, 67), checked finite."""
    if isinstance(data, Sequence) and not isinstance(data, (str, bytes)) and data and isinstance(data[0], Mapping):
        x = rows_to_matrix(data)
    else:
        try:
            x = np.asarray(data, dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise MammoInputError(source, f"feature values must be numeric: {exc}") from None
        if x.ndim == 1:
            x = x[None, :]
    if x.ndim != 2 or x.shape[1] != N_FEATURES:
        raise MammoInputError(source, f"expected feature vectors of shape (67,) or (N, 67), got {np.shape(data)}")
    bad = ~np.isfinite(x)
    if bad.any():
        i, j = map(int, np.argwhere(bad)[0])
        raise MammoInputError(source, f"vector {i}: feature {FEATURE_NAMES[j]} is {x[i, j]} (NaN/inf)")
    return x


class FeatureNormaliser:
    """Per-feature min-max normaliser fitted on the training split.

    Attributes (after :meth:`fit` or :meth:`load`), each a float64 array of shape (67,) in FEATURE_NAMES order:
    ``min``, ``max``, ``median``, ``q25``, ``q75`` (linear-interpolated quantiles), ``mean``, ``std`` (population,
    ddof=0); ``n_fit``: number of training vectors.
    """

    def __init__(self) -> None:
        self.min: np.ndarray | None = None
        self.max: np.ndarray | None = None
        self.median: np.ndarray | None = None
        self.q25: np.ndarray | None = None
        self.q75: np.ndarray | None = None
        self.mean: np.ndarray | None = None
        self.std: np.ndarray | None = None
        self.n_fit: int = 0
        self.pyradiomics_version: str | None = None

    @property
    def fitted(self) -> bool:
        """True once statistics are available."""
        return self.min is not None

    def fit(self, rows_or_matrix: Sequence[Mapping[str, Any]] | np.ndarray) -> "FeatureNormaliser":
        """Compute the statistics from training vectors: rows (with the 67 feature keys) or an array (N, 67), N >= 1.

        Returns self. Raises MammoInputError for no vectors, a wrong shape or NaN/inf values.
        """
        if isinstance(rows_or_matrix, Sequence) and not isinstance(rows_or_matrix, np.ndarray) and not rows_or_matrix:
            raise MammoInputError("fit", "no training feature vectors (need at least one lesion)")
        x = _as_matrix(rows_or_matrix, "fit")
        if x.shape[0] == 0:
            raise MammoInputError("fit", "no training feature vectors (need at least one lesion)")
        self.min = x.min(axis=0)
        self.max = x.max(axis=0)
        self.median = np.median(x, axis=0)
        self.q25 = np.quantile(x, 0.25, axis=0)
        self.q75 = np.quantile(x, 0.75, axis=0)
        self.mean = x.mean(axis=0)
        self.std = x.std(axis=0)
        self.n_fit = int(x.shape[0])
        self.pyradiomics_version = pyradiomics_version()
        return self

    def _require_fitted(self) -> None:
        if not self.fitted:
            raise RuntimeError("FeatureNormaliser is not fitted: call fit() or load() first")

    def transform(self, x: Any) -> tuple[np.ndarray, NormalisationReport]:
        """Map raw feature vectors into [0, 1].

        Args:
            x: array (67,) or (N, 67) in FEATURE_NAMES order (or a list of rows); finite values.

        Returns:
            (y, report): y float32 with the shape of x (a list of rows gives (N, 67)), values in [0, 1],
            ``y = clip((x - min) / (max - min), 0, 1)``, 0 for a constant feature; report counts per feature the
            values that were below min / above max.
        """
        self._require_fitted()
        is_rows = isinstance(x, Sequence) and not isinstance(x, (str, bytes)) and len(x) > 0 and isinstance(
            x[0], Mapping
        )
        single = not is_rows and np.ndim(x) == 1
        m = _as_matrix(x, "transform")
        span = self.max - self.min
        constant = span <= 0
        y = (m - self.min) / np.where(constant, 1.0, span)
        y[:, constant] = 0.0
        below = m < self.min
        above = m > self.max
        report = NormalisationReport(
            n_vectors=int(m.shape[0]),
            clipped_below={FEATURE_NAMES[j]: int(c) for j, c in enumerate(below.sum(axis=0)) if c},
            clipped_above={FEATURE_NAMES[j]: int(c) for j, c in enumerate(above.sum(axis=0)) if c},
        )
        y = np.clip(y, 0.0, 1.0).astype(np.float32)
        return (y[0] if single else y), report

    def inverse_transform(self, y: Any) -> np.ndarray:
        """Map normalised vectors (67,) or (N, 67) in [0, 1] back to raw feature values (float64, same shape)."""
        self._require_fitted()
        arr = np.asarray(y, dtype=np.float64)
        return self.min + arr * (self.max - self.min)

    def _payload(self) -> dict[str, Any]:
        return {
            "format": _FORMAT,
            "format_version": _FORMAT_VERSION,
            "pyradiomics_version": self.pyradiomics_version or pyradiomics_version(),
            "intensity_scale": INTENSITY_SCALE,
            "transform": _TRANSFORM_NOTE,
            "no_lesion_vector": _NO_LESION_NOTE,
            "n_fit": self.n_fit,
            "feature_names": list(FEATURE_NAMES),
            "statistics": {s: [float(v) for v in getattr(self, s)] for s in _STATS},
        }

    @staticmethod
    def _checksum(payload: Mapping[str, Any]) -> str:
        text = json.dumps(payload, sort_keys=True, separators=(",", ":"), allow_nan=False)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()

    def save(self, path: str | os.PathLike) -> Path:
        """Write the statistics as JSON (atomically), with feature names, PyRadiomics version, the no-lesion note
        and a SHA-256 of the content (``sha256``) that :meth:`load` verifies. Returns the path."""
        self._require_fitted()
        payload = self._payload()
        return atomic_write_json(path, {**payload, "sha256": self._checksum(payload)})

    @classmethod
    def load(cls, path: str | os.PathLike) -> "FeatureNormaliser":
        """Read a file written by :meth:`save`, validating it.

        Raises MammoInputError(path, reason) for a missing/garbled file, another format, feature names that differ
        from FEATURE_NAMES, statistics of the wrong length, non-finite or inconsistent values (e.g. min > max), or a
        checksum mismatch (the file was edited). A different PyRadiomics version only warns.
        """
        path = Path(path)
        try:
            obj = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise MammoInputError(path, "normaliser file not found") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise MammoInputError(path, f"garbled normaliser file: {exc}") from None
        if not isinstance(obj, dict) or obj.get("format") != _FORMAT:
            raise MammoInputError(path, f"not a feature normaliser file (format must be {_FORMAT!r})")
        if obj.get("format_version") != _FORMAT_VERSION:
            raise MammoInputError(path, f"unsupported format_version {obj.get('format_version')!r}")
        names = obj.get("feature_names")
        if not isinstance(names, list) or names != list(FEATURE_NAMES):
            names = names if isinstance(names, list) else []
            missing = [n for n in FEATURE_NAMES if n not in names]
            unknown = [n for n in names if n not in FEATURE_NAMES]
            detail = f"missing {missing}, unknown {unknown}" if missing or unknown else "wrong order"
            raise MammoInputError(path, f"feature_names do not match FEATURE_NAMES: {detail}")
        n_fit = obj.get("n_fit")
        if isinstance(n_fit, bool) or not isinstance(n_fit, int) or n_fit < 1:
            raise MammoInputError(path, f"n_fit must be a positive integer, got {n_fit!r}")
        stats = obj.get("statistics")
        if not isinstance(stats, dict):
            raise MammoInputError(path, "missing 'statistics'")
        arrays = {}
        for s in _STATS:
            values = stats.get(s)
            if not isinstance(values, list) or len(values) != N_FEATURES:
                raise MammoInputError(path, f"statistics.{s} must be a list of {N_FEATURES} numbers")
            for j, v in enumerate(values):
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                    raise MammoInputError(path, f"statistics.{s} of {FEATURE_NAMES[j]} is not a finite number: {v!r}")
            arrays[s] = np.asarray(values, dtype=np.float64)
        order = ("min", "q25", "median", "q75", "max")
        for a, b in zip(order, order[1:]):
            bad = np.flatnonzero(arrays[a] > arrays[b])
            if bad.size:
                raise MammoInputError(path, f"{FEATURE_NAMES[bad[0]]}: statistics.{a} > statistics.{b}")
        if (arrays["std"] < 0).any():
            raise MammoInputError(path, f"{FEATURE_NAMES[np.flatnonzero(arrays['std'] < 0)[0]]}: negative std")
        payload = {k: v for k, v in obj.items() if k != "sha256"}
        if obj.get("sha256") != cls._checksum(payload):
            raise MammoInputError(path, "checksum mismatch: the file was modified after it was written")
        norm = cls()
        for s in _STATS:
            setattr(norm, s, arrays[s])
        norm.n_fit = n_fit
        norm.pyradiomics_version = str(obj.get("pyradiomics_version"))
        if norm.pyradiomics_version != pyradiomics_version():
            warnings.warn(
                f"{path}: fitted with PyRadiomics {norm.pyradiomics_version}, running {pyradiomics_version()}",
                RuntimeWarning,
                stacklevel=2,
            )
        return norm


def normalised_condition(rows_for_case: Sequence[Mapping[str, Any]], normaliser: FeatureNormaliser) -> np.ndarray:
    """Condition vectors of one image: float32 (K, 67) in [0, 1], one per lesion sorted by lesion_index;
    an image without lesion (no rows) gives ``NO_LESION_VECTOR[None]`` (shape (1, 67), zeros)."""
    if not rows_for_case:
        return NO_LESION_VECTOR[None].copy()
    rows = sorted(rows_for_case, key=lambda r: r.get("lesion_index", 0))
    y, _ = normaliser.transform(rows_to_matrix(rows))
    return y
