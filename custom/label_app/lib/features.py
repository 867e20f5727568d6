"""Lesion features of a request -> one feature file for the product inference CLI.

Runs in the MONAI Label environment with the standard library only: feature files are plain CSV / JSON
(``case_id, lesion_index, <67 PyRadiomics names>``, the product's ``custom.features.feature_file`` format), and every
value is copied as text, so the product reads exactly the numbers of the preset / library row. The product validates
the names and values; its one-line error reaches the client unchanged.

Sources (one per request):

- ``preset``: a name of ``lesion_presets.json`` / ``lesion_presets.csv`` (``python -m custom.features.presets``),
  or a list of names (one per lesion, top-most lesion first); one name is used for every drawn lesion;
- ``features``:
  * a case id of the feature library (the prepared ``features.csv``): all lesions of that case, in order;
  * ``"<case id>:<lesion index>"``: that one lesion (used for every drawn lesion);
  * a dict ``{name: value}`` of the 67 features (used for every drawn lesion), or a list of such dicts;
  * the same as JSON text (what a clinician pastes into the 3D Slicer options table).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Sequence

__all__ = ["FeatureError", "PresetLibrary", "FeatureLibrary", "request_features"]

ID_COLUMNS = ("case_id", "lesion_index")
REQUEST_CASE_ID = "request"


class FeatureError(ValueError):
    """A problem with the requested features, in words for the clinician (HTTP 400)."""


def _read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        header = [h.strip() for h in (reader.fieldnames or [])]
        rows = [{k.strip(): (v or "").strip() for k, v in row.items() if k is not None} for row in reader]
    for col in ID_COLUMNS:
        if col not in header:
            raise FeatureError(f"{path.name}: missing column {col!r}")
    return header, rows


class PresetLibrary:
    """``lesion_presets.json`` (descriptions, member counts, order) + its ``lesion_presets.csv`` (feature rows)."""

    def __init__(self, json_path: str | Path):
        self.json_path = Path(json_path)
        meta = json.loads(self.json_path.read_text())
        presets = meta.get("presets", meta)
        if not isinstance(presets, dict) or not presets:
            raise FeatureError(f"{self.json_path.name}: no presets")
        self.meta = meta
        self.presets: dict[str, dict[str, Any]] = {str(k): dict(v) for k, v in presets.items()}
        self.csv_path = self.json_path.parent / str(meta.get("feature_file", self.json_path.stem + ".csv"))
        self.header, rows = _read_csv(self.csv_path)
        self.rows = {r["case_id"]: r for r in rows}
        missing = [n for n in self.presets if n not in self.rows]
        if missing:
            raise FeatureError(f"{self.csv_path.name}: no feature row for preset(s) {', '.join(missing[:5])}")

    @property
    def names(self) -> list[str]:
        return list(self.presets)

    def ordered(self, first: str | None = None) -> list[str]:
        names = self.names
        if first in self.presets:
            names.remove(first)
            names.insert(0, first)
        return names

    def summary(self) -> dict[str, dict[str, Any]]:
        return {k: {"description": v.get("description", ""), "count": v.get("count")} for k, v in self.presets.items()}

    def row(self, name: str) -> dict[str, str]:
        if name not in self.rows:
            shown = ", ".join(self.names[:30]) + (" ..." if len(self.names) > 30 else "")
            raise FeatureError(f"unknown preset {name!r}; choose one of: {shown}")
        return self.rows[name]


class FeatureLibrary:
    """The prepared ``features.csv`` (read lazily, re-read when the file changes)."""

    def __init__(self, csv_path: str | Path | None):
        self.path = Path(csv_path) if csv_path else None
        self._stamp: float | None = None
        self.header: list[str] = []
        self.by_case: dict[str, list[dict[str, str]]] = {}

    def _load(self) -> None:
        if self.path is None or not self.path.is_file():
            raise FeatureError(f"no feature library to copy lesion features from ({self.path or 'not configured'}: "
                               "run `prepare`, or set --conf feature_library)")
        stamp = self.path.stat().st_mtime
        if stamp != self._stamp:
            self.header, rows = _read_csv(self.path)
            by_case: dict[str, list[dict[str, str]]] = {}
            for r in rows:
                by_case.setdefault(r["case_id"], []).append(r)
            for v in by_case.values():
                v.sort(key=lambda r: int(float(r["lesion_index"])))
            self.by_case, self._stamp = by_case, stamp

    def case(self, case_id: str) -> list[dict[str, str]]:
        self._load()
        rows = self.by_case.get(case_id)
        if not rows:
            raise FeatureError(f"case {case_id!r} has no lesion in the feature library {self.path.name} "
                               f"({len(self.by_case)} cases with lesions)")
        return rows

    def lesion(self, case_id: str, index: int) -> dict[str, str]:
        rows = self.case(case_id)
        for r in rows:
            if int(float(r["lesion_index"])) == index:
                return r
        raise FeatureError(f"case {case_id!r} has no lesion {index} (lesion_index 0..{len(rows) - 1})")


def _write_rows(path: Path, header: Sequence[str], rows: Sequence[dict[str, Any]]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(list(header))
        for i, row in enumerate(rows):
            w.writerow([REQUEST_CASE_ID, str(i)] + [row[h] for h in header if h not in ID_COLUMNS])
    return path


def _write_json(path: Path, lesions: Sequence[dict[str, Any]]) -> Path:
    obj = {"case_id": REQUEST_CASE_ID,
           "lesions": [{"lesion_index": i, "features": {k: v for k, v in d.items() if k not in ID_COLUMNS}}
                       for i, d in enumerate(lesions)]}
    path.write_text(json.dumps(obj))
    return path


def _per_lesion(items: list[Any], n: int, what: str) -> list[Any]:
    if len(items) == 1:
        return items * n
    if len(items) != n:
        raise FeatureError(f"{len(items)} {what} given for {n} drawn lesion(s): give one, or one per lesion")
    return items


def request_features(preset: Any, features: Any, n_lesions: int, folder: Path, presets: PresetLibrary | None,
                     library: FeatureLibrary, default_preset: str | None) -> tuple[Path, dict[str, Any]]:
    """Write the feature file for ``n_lesions`` drawn lesions into ``folder``.

    Returns ``(file, description)`` where ``description`` says where the features came from (recorded with the
    synthetic image) and holds ``tag``, a short name for the output image name.
    """
    if isinstance(features, str):
        text = features.strip()
        if text.startswith("{") or text.startswith("["):
            try:
                features = json.loads(text)
            except ValueError as err:
                raise FeatureError(f"features: not valid JSON ({err})") from None
        else:
            features = text or None
    if isinstance(features, (list, tuple)) and not features:
        features = None
    if isinstance(preset, str) and not preset.strip():
        preset = None
    if features is not None:
        if isinstance(features, dict) and set(features) <= {"case_id", "lesion_index"} and "case_id" in features:
            features = f"{features['case_id']}:{features['lesion_index']}" if "lesion_index" in features \
                else str(features["case_id"])
        if isinstance(features, str):
            case_id, sep, index = features.rpartition(":")
            if sep and index.strip().lstrip("-").isdigit():
                row = library.lesion(case_id.strip(), int(index))
                rows = [row] * n_lesions
                src = {"source": "feature_library_lesion", "case_id": case_id.strip(), "lesion_index": int(index)}
            else:
                rows = _per_lesion(library.case(features), n_lesions, f"lesion(s) of case {features!r} are")
                src = {"source": "feature_library_case", "case_id": features}
            path = _write_rows(folder / "features.csv", library.header, rows)
            src["tag"] = "case-" + src["case_id"][:12]
            return path, src
        items = list(features) if isinstance(features, (list, tuple)) else [features]
        if not all(isinstance(d, dict) for d in items):
            raise FeatureError("features must be a case id, 'case_id:lesion_index', or {feature name: value} "
                               "(one dict, or one per lesion)")
        items = _per_lesion(items, n_lesions, "feature sets")
        return _write_json(folder / "features.json", items), {"source": "request_values", "tag": "custom"}
    if presets is None:
        raise FeatureError("no lesion presets on the server (run `python -m custom.features.presets`) and no "
                           "'features' given")
    if preset is None:
        preset = default_preset if default_preset in presets.presets else presets.names[0]
    names = [str(p).strip() for p in preset] if isinstance(preset, (list, tuple)) else [str(preset).strip()]
    rows = [presets.row(n) for n in names]
    rows = _per_lesion(rows, n_lesions, "presets")
    path = _write_rows(folder / "features.csv", presets.header, rows)
    unique = list(dict.fromkeys(names))
    return path, {"source": "preset", "preset": names[0] if len(names) == 1 else names,
                  "description": presets.presets[names[0]].get("description", ""), "tag": "+".join(unique)}
