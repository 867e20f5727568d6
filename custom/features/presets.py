"""Lesion presets: named, ready-made lesion feature vectors derived from the prepared training feature library.

A clinician who draws a lesion region rarely has 67 radiomic numbers at hand; a preset such as
``small_round_benign`` or ``large_irregular_malignant`` stands for "a lesion like the typical training lesions of
that kind". :func:`build_presets` groups the **training-split** lesions of a prepared folder (``features.csv`` +
``datalist.json``, the output of ``prepare``) by

- **size**: terciles of ``original_shape2D_MaximumDiameter`` -> ``small`` / ``medium`` / ``large``
  (``<= q1``, ``<= q2``, ``> q2``);
- **shape**: the lowest tercile of ``original_shape2D_Sphericity`` (ragged or spiculated outline: a long perimeter
  for the area) -> ``irregular``; the other lesions split at the median ``original_shape2D_Elongation`` of those
  lesions -> ``round`` (``>=``, close to a circle) / ``oval``;
- **malignancy**: the finding's BI-RADS from the datalist, 2-3 -> ``benign``, 4-6 -> ``malignant`` (other or missing
  BI-RADS: the lesion only counts for the size/shape-only preset level below).

Preset levels (a preset is written only when it has at least ``min_members`` lesions):

1. ``<size>_<shape>_<malignancy>`` (e.g. ``small_round_benign``),
2. ``<shape>_<malignancy>`` (e.g. ``irregular_malignant``),
3. ``typical_benign`` / ``typical_malignant``,
4. ``typical`` (every training lesion).

Each preset's feature vector is the per-feature **median of the raw values** of its member lesions. Outputs:

- ``lesion_presets.csv``: a feature file (:func:`custom.features.write_feature_csv`) with one row per preset,
  ``case_id`` = preset name and ``lesion_index`` 0, so the inference workflow uses a preset unchanged:
  ``--feature_file bundle/models/lesion_presets.csv --feature_case_id small_round_benign``;
- ``lesion_presets.json``: ``{"format", "presets": {name: {"description", "count", "size", "shape", "malignancy",
  "level", "members"}}, "thresholds", ...}`` (members are ``"<case_id>:<lesion_index>"``).

CLI::

    python -m custom.features.presets --prepared_dir data/prepared --output_dir bundle/models
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from custom.errors import MammoInputError

__all__ = [
    "SIZE_FEATURE",
    "SPHERICITY_FEATURE",
    "ELONGATION_FEATURE",
    "PRESET_FORMAT",
    "LesionRecord",
    "Preset",
    "PresetThresholds",
    "malignancy_from_birads",
    "load_training_lesions",
    "fit_thresholds",
    "build_presets",
    "write_presets",
    "make_presets",
    "main",
]

SIZE_FEATURE = "original_shape2D_MaximumDiameter"
SPHERICITY_FEATURE = "original_shape2D_Sphericity"
ELONGATION_FEATURE = "original_shape2D_Elongation"
PRESET_FORMAT = "mammo_gcdm/lesion-presets"
SIZES = ("small", "medium", "large")
SHAPES = ("round", "oval", "irregular")
MALIGNANCIES = ("benign", "malignant")
_SHAPE_WORDS = {"round": "round", "oval": "oval", "irregular": "irregular (spiculated / ill-defined outline)"}
_MALIGNANCY_WORDS = {"benign": "benign (BI-RADS 2-3)", "malignant": "malignant-looking (BI-RADS 4-5)"}


def malignancy_from_birads(birads: Any) -> str | None:
    """``"BI-RADS 4"``, ``"4A"``, ``4`` ... -> ``"benign"`` (2-3), ``"malignant"`` (4-6) or ``None`` (0, 1, missing,
    unparseable)."""
    if birads is None:
        return None
    match = re.search(r"(\d)", str(birads))
    if not match:
        return None
    value = int(match.group(1))
    if value in (2, 3):
        return "benign"
    if value in (4, 5, 6):
        return "malignant"
    return None


@dataclass
class LesionRecord:
    """One training lesion: its raw features and its BI-RADS (from the datalist finding)."""

    case_id: str
    lesion_index: int
    features: dict[str, float]
    birads: str | None = None

    @property
    def malignancy(self) -> str | None:
        return malignancy_from_birads(self.birads)

    @property
    def key(self) -> str:
        return f"{self.case_id}:{self.lesion_index}"


@dataclass
class PresetThresholds:
    """Cut points fitted on the training lesions (raw feature units; pixels at the prepared image size)."""

    size_q1: float
    size_q2: float
    sphericity_q1: float
    elongation_median: float

    def size(self, rec: LesionRecord) -> str:
        d = float(rec.features[SIZE_FEATURE])
        return "small" if d <= self.size_q1 else "medium" if d <= self.size_q2 else "large"

    def shape(self, rec: LesionRecord) -> str:
        if float(rec.features[SPHERICITY_FEATURE]) <= self.sphericity_q1:
            return "irregular"
        return "round" if float(rec.features[ELONGATION_FEATURE]) >= self.elongation_median else "oval"

    def to_dict(self) -> dict[str, float]:
        return {"size_feature": SIZE_FEATURE, "size_q1": self.size_q1, "size_q2": self.size_q2,
                "sphericity_feature": SPHERICITY_FEATURE, "sphericity_q1": self.sphericity_q1,
                "elongation_feature": ELONGATION_FEATURE, "elongation_median": self.elongation_median}


@dataclass
class Preset:
    name: str
    description: str
    level: int
    size: str | None
    shape: str | None
    malignancy: str | None
    members: list[str]
    features: dict[str, float] = field(default_factory=dict)

    @property
    def count(self) -> int:
        return len(self.members)


# ---------------------------------------------------------------------------------------------------- loading
def load_training_lesions(prepared_dir: str | Path, split: str = "training") -> tuple[list[LesionRecord], dict[str, Any]]:
    """The lesions of ``split`` in a prepared folder: raw feature rows of ``features.csv`` whose case is in that
    split of ``datalist.json``, each with the BI-RADS of its finding (matched by ``lesion_index``).

    Returns ``(records, info)`` where ``info`` holds ``image_size`` (the prepared resolution, or None).

    Raises:
        MammoInputError: missing / unreadable files, a missing split.
    """
    from custom.features.feature_file import read_feature_file
    from custom.features.radiomics import FEATURE_NAMES

    root = Path(prepared_dir)
    datalist_path = root / "datalist.json"
    if not datalist_path.is_file():
        raise MammoInputError(datalist_path, "datalist.json not found: run `prepare` first")
    try:
        datalist = json.loads(datalist_path.read_text())
    except (OSError, ValueError) as err:
        raise MammoInputError(datalist_path, f"unreadable datalist ({err})") from None
    if not isinstance(datalist, Mapping) or split not in datalist:
        raise MammoInputError(datalist_path, f"no {split!r} split in the datalist")
    birads: dict[tuple[str, int], Any] = {}
    cases: set[str] = set()
    image_size = None
    for item in datalist[split]:
        cid = str(item["case_id"])
        cases.add(cid)
        for i, finding in enumerate(item.get("findings") or []):
            birads[(cid, int(finding.get("lesion_index", i)))] = finding.get("birads")
        shape = (item.get("geometry") or {}).get("output_shape")
        if image_size is None and shape:
            image_size = int(shape[0])
    rows = read_feature_file(root / "features.csv")
    records = [
        LesionRecord(case_id=str(r["case_id"]), lesion_index=int(r["lesion_index"]),
                     features={n: float(r[n]) for n in FEATURE_NAMES},
                     birads=birads.get((str(r["case_id"]), int(r["lesion_index"]))))
        for r in rows if str(r["case_id"]) in cases
    ]
    return records, {"image_size": image_size, "split": split, "n_cases": len(cases)}


# ---------------------------------------------------------------------------------------------------- grouping
def fit_thresholds(records: Sequence[LesionRecord]) -> PresetThresholds:
    """Size terciles, the sphericity lower tercile, and the median elongation of the non-irregular lesions."""
    if not records:
        raise MammoInputError("features", "no training lesion to derive presets from")
    size = np.array([r.features[SIZE_FEATURE] for r in records], dtype=np.float64)
    sph = np.array([r.features[SPHERICITY_FEATURE] for r in records], dtype=np.float64)
    elo = np.array([r.features[ELONGATION_FEATURE] for r in records], dtype=np.float64)
    q1, q2 = (float(v) for v in np.quantile(size, [1 / 3, 2 / 3]))
    s1 = float(np.quantile(sph, 1 / 3))
    regular = elo[sph > s1]
    elo_med = float(np.median(regular)) if regular.size else float(np.median(elo))
    return PresetThresholds(size_q1=q1, size_q2=q2, sphericity_q1=s1, elongation_median=elo_med)


def _fmt(x: float) -> str:
    return f"{x:.3g}"


def _describe(size: str | None, shape: str | None, malignancy: str | None, n: int, th: PresetThresholds,
              image_size: int | None) -> str:
    at = f" at {image_size} px" if image_size else ""
    parts = []
    if size is not None:
        rng = {"small": f"max diameter <= {_fmt(th.size_q1)} px",
               "medium": f"max diameter {_fmt(th.size_q1)}-{_fmt(th.size_q2)} px",
               "large": f"max diameter > {_fmt(th.size_q2)} px"}[size]
        parts.append(f"{size.capitalize()} ({rng}{at})")
    if shape is not None:
        parts.append(_SHAPE_WORDS[shape] if parts else _SHAPE_WORDS[shape].capitalize())
    what = (_MALIGNANCY_WORDS[malignancy] + " mass") if malignancy else "mass of any kind"
    head = (", ".join(parts) + " " + what) if parts else ("Typical " + what)
    return f"{head}: median features of {n} training lesion{'s' if n != 1 else ''}"


def build_presets(records: Sequence[LesionRecord], min_members: int = 3, image_size: int | None = None,
                  thresholds: PresetThresholds | None = None) -> tuple[list[Preset], PresetThresholds]:
    """Group ``records`` (see the module docstring) and return the presets with at least ``min_members`` lesions,
    in a fixed order (level 1 by size, shape, malignancy; level 2; ``typical_benign``, ``typical_malignant``,
    ``typical``), and the thresholds used."""
    from custom.features.radiomics import FEATURE_NAMES

    th = thresholds or fit_thresholds(records)
    min_members = max(1, int(min_members))
    labels = [(th.size(r), th.shape(r), r.malignancy) for r in records]
    candidates: list[tuple[str, int, str | None, str | None, str | None, list[int]]] = []
    for sz in SIZES:
        for sh in SHAPES:
            for mg in MALIGNANCIES:
                idx = [i for i, lab in enumerate(labels) if lab == (sz, sh, mg)]
                candidates.append((f"{sz}_{sh}_{mg}", 1, sz, sh, mg, idx))
    for sh in SHAPES:
        for mg in MALIGNANCIES:
            idx = [i for i, lab in enumerate(labels) if lab[1] == sh and lab[2] == mg]
            candidates.append((f"{sh}_{mg}", 2, None, sh, mg, idx))
    for mg in MALIGNANCIES:
        idx = [i for i, lab in enumerate(labels) if lab[2] == mg]
        candidates.append((f"typical_{mg}", 3, None, None, mg, idx))
    candidates.append(("typical", 4, None, None, None, list(range(len(records)))))
    presets = []
    for name, level, sz, sh, mg, idx in candidates:
        if len(idx) < min_members:
            continue
        mat = np.array([[records[i].features[n] for n in FEATURE_NAMES] for i in idx], dtype=np.float64)
        med = np.median(mat, axis=0)
        presets.append(Preset(name=name, description=_describe(sz, sh, mg, len(idx), th, image_size), level=level,
                              size=sz, shape=sh, malignancy=mg, members=[records[i].key for i in idx],
                              features={n: float(v) for n, v in zip(FEATURE_NAMES, med)}))
    return presets, th


# ---------------------------------------------------------------------------------------------------- writing
def write_presets(output_dir: str | Path, presets: Sequence[Preset], thresholds: PresetThresholds,
                  info: Mapping[str, Any] | None = None, stem: str = "lesion_presets") -> dict[str, Path]:
    """Write ``<stem>.csv`` (feature file, case_id = preset name) and ``<stem>.json`` (descriptions); atomically."""
    from custom.features.feature_file import write_feature_csv
    from custom.io import atomic_write_json

    if not presets:
        raise MammoInputError(output_dir, "no preset has enough member lesions (lower --min_members?)")
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    csv_path = write_feature_csv(out / f"{stem}.csv",
                                 [{"case_id": p.name, "lesion_index": 0, **p.features} for p in presets])
    payload = {
        "format": PRESET_FORMAT,
        "format_version": 1,
        "feature_file": csv_path.name,
        "usage": f"--feature_file {csv_path.name} --feature_case_id <preset name>",
        "source": dict(info or {}),
        "thresholds": thresholds.to_dict(),
        "presets": {p.name: {"description": p.description, "count": p.count, "level": p.level, "size": p.size,
                             "shape": p.shape, "malignancy": p.malignancy, "members": list(p.members)}
                    for p in presets},
    }
    json_path = atomic_write_json(out / f"{stem}.json", payload)
    return {"csv": csv_path, "json": json_path}


def make_presets(prepared_dir: str | Path, output_dir: str | Path, min_members: int = 3,
                 split: str = "training") -> dict[str, Path]:
    """Load the training lesions of ``prepared_dir``, build the presets and write them to ``output_dir``."""
    records, info = load_training_lesions(prepared_dir, split)
    presets, th = build_presets(records, min_members=min_members, image_size=info.get("image_size"))
    info = {**info, "prepared_dir": Path(prepared_dir).name, "n_lesions": len(records), "min_members": int(min_members)}
    return write_presets(output_dir, presets, th, info)


def main(argv: Iterable[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Derive named lesion presets (median feature vectors) from the "
                                             "training lesions of a prepared folder.")
    ap.add_argument("--prepared_dir", required=True, help="output folder of `prepare` (datalist.json, features.csv)")
    ap.add_argument("--output_dir", required=True, help="where lesion_presets.csv / .json are written")
    ap.add_argument("--min_members", type=int, default=3, help="smallest group that becomes a preset (default 3)")
    ap.add_argument("--split", default="training", help="datalist split to use (default: training)")
    args = ap.parse_args(None if argv is None else list(argv))
    try:
        paths = make_presets(args.prepared_dir, args.output_dir, args.min_members, args.split)
    except MammoInputError as err:
        print(f"ERROR: {' '.join(str(err).split())}", file=sys.stderr)
        return 1
    presets = json.loads(Path(paths["json"]).read_text())["presets"]
    print(f"presets: {len(presets)} written to {paths['csv']} and {paths['json']}")
    for name, p in presets.items():
        print(f"  {name:28s} {p['count']:4d}  {p['description']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
