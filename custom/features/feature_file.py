"""Lesion feature files: a CSV for a data set, a JSON for one case.

A *row* is ``{"case_id": str, "lesion_index": int, **{name: float for name in FEATURE_NAMES}}`` (67 features).

- CSV (``.csv``): header ``case_id,lesion_index,<FEATURE_NAMES...>``, one row per lesion, floats written with
  ``repr`` so that reading gives back the identical float64 values.
- JSON (``.json``), one case: ``{"case_id": ..., "lesions": [{"lesion_index": 0, "features": {name: value}}]}``.
  :func:`read_feature_file` also accepts a list of such objects.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from custom.errors import MammoInputError
from custom.features.radiomics import FEATURE_NAMES
from custom.io import atomic_write_json, atomic_write_text

__all__ = ["ID_COLUMNS", "read_feature_file", "rows_to_matrix", "write_feature_csv", "write_feature_json"]

#: The identifying columns that precede FEATURE_NAMES in a CSV.
ID_COLUMNS: tuple[str, str] = ("case_id", "lesion_index")
_FEATURE_SET = frozenset(FEATURE_NAMES)


#: lesion_index values beyond this cannot be a lesion of a mask (instance maps hold 0..255)
MAX_LESION_INDEX = 254


def _lesion_label(case_id: Any, lesion_index: Any) -> str:
    return f"case {case_id!r} lesion {lesion_index}"


def _parse_index(value: Any, where: str, source) -> int:
    if isinstance(value, bool):
        raise MammoInputError(source, f"{where}: lesion_index must be a non-negative integer, got {value!r}")
    if isinstance(value, str):
        text = value.strip()
        if not (text.isascii() and text.isdigit()) or len(text) > 3 or int(text) > MAX_LESION_INDEX:
            raise MammoInputError(source, f"{where}: lesion_index must be an integer 0..{MAX_LESION_INDEX}, "
                                          f"got {value[:40]!r}")
        return int(text)
    if isinstance(value, int) and 0 <= value <= MAX_LESION_INDEX:
        return int(value)
    shown = repr(value) if not isinstance(value, int) or abs(value) < 10**12 else "a huge number"
    raise MammoInputError(source, f"{where}: lesion_index must be an integer 0..{MAX_LESION_INDEX}, got {shown[:40]}")


def _parse_value(value: Any, name: str, label: str, source) -> float:
    if isinstance(value, bool) or value is None:
        raise MammoInputError(source, f"{label}: feature {name} is not a number ({value!r})")
    if isinstance(value, str):
        try:
            out = float(value)
        except ValueError:
            raise MammoInputError(source, f"{label}: feature {name} is not a number ({value!r})") from None
    elif isinstance(value, (int, float, np.integer, np.floating)):
        try:
            out = float(value)
        except OverflowError:
            raise MammoInputError(source, f"{label}: feature {name} is too large for a float") from None
    else:
        raise MammoInputError(source, f"{label}: feature {name} is not a number ({value!r})")
    if not math.isfinite(out):
        raise MammoInputError(source, f"{label}: feature {name} is {out} (NaN/inf are not allowed)")
    return out


def _check_names(names: Iterable[str], where: str, source) -> None:
    names = list(names)
    missing = [n for n in FEATURE_NAMES if n not in names]
    unknown = [n for n in names if n not in _FEATURE_SET]
    if missing:
        raise MammoInputError(source, f"{where}missing {len(missing)} feature(s): {', '.join(missing)}")
    if unknown:
        raise MammoInputError(source, f"{where}unknown feature name(s): {', '.join(map(str, unknown))}")


def _make_row(case_id: Any, lesion_index: Any, features: Mapping[str, Any], where: str, source) -> dict:
    if not isinstance(case_id, str) or not case_id.strip():
        raise MammoInputError(source, f"{where}: case_id must be a non-empty string, got {case_id!r}")
    index = _parse_index(lesion_index, where, source)
    label = f"{where} ({_lesion_label(case_id, index)})"
    row: dict[str, Any] = {"case_id": case_id, "lesion_index": index}
    for name in FEATURE_NAMES:
        row[name] = _parse_value(features[name], name, label, source)
    return row


def _check_duplicates(rows: Sequence[dict], source) -> None:
    seen: set[tuple[str, int]] = set()
    for row in rows:
        key = (row["case_id"], row["lesion_index"])
        if key in seen:
            raise MammoInputError(source, f"duplicate entry for {_lesion_label(*key)}")
        seen.add(key)


def _validated_rows(rows: Iterable[Mapping[str, Any]], source) -> list[dict]:
    out = []
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise MammoInputError(source, f"row {i}: expected a mapping, got {type(row).__name__}")
        for col in ID_COLUMNS:
            if col not in row:
                raise MammoInputError(source, f"row {i}: missing {col}")
        _check_names([k for k in row if k not in ID_COLUMNS], f"row {i}: ", source)
        out.append(_make_row(row["case_id"], row["lesion_index"], row, f"row {i}", source))
    _check_duplicates(out, source)
    return out


def write_feature_csv(path: str | os.PathLike, rows: Iterable[Mapping[str, Any]]) -> Path:
    """Write rows to a CSV (atomically): columns ``case_id, lesion_index, *FEATURE_NAMES``, rows in the given order.

    Args:
        path: target ``.csv`` file (parents created).
        rows: mappings with case_id (str), lesion_index (int >= 0) and the 67 finite feature values.

    Returns the path. Raises MammoInputError(path, ...) when a row is incomplete, non-finite or duplicated.
    """
    rows = _validated_rows(rows, path)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow([*ID_COLUMNS, *FEATURE_NAMES])
    for row in rows:
        writer.writerow([row["case_id"], str(row["lesion_index"]), *(repr(row[n]) for n in FEATURE_NAMES)])
    return atomic_write_text(path, buf.getvalue())


def write_feature_json(path: str | os.PathLike, case_id: str, lesions: Iterable[Mapping[str, Any]]) -> Path:
    """Write one case's lesions as JSON (atomically).

    Args:
        path: target ``.json`` file.
        case_id: the case identifier.
        lesions: either ``{"lesion_index": int, "features": {name: float}}`` items or flat rows
            (``{"lesion_index": int, name: float, ...}``, as in FeatureExtractionResult.rows).

    Output: ``{"case_id": case_id, "lesions": [{"lesion_index": i, "features": {name: value (FEATURE_NAMES order)}}]}``.
    Raises MammoInputError(path, ...) for incomplete, non-finite or duplicated lesions.
    """
    flat = []
    for i, lesion in enumerate(lesions):
        if not isinstance(lesion, Mapping) or "lesion_index" not in lesion:
            raise MammoInputError(path, f"lesion {i}: expected a mapping with lesion_index")
        feats = lesion["features"] if "features" in lesion else {
            k: v for k, v in lesion.items() if k not in ID_COLUMNS
        }
        if not isinstance(feats, Mapping):
            raise MammoInputError(path, f"lesion {i}: features must be a mapping")
        flat.append({"case_id": case_id, "lesion_index": lesion["lesion_index"], **feats})
    rows = _validated_rows(flat, path)
    obj = {
        "case_id": case_id,
        "lesions": [
            {"lesion_index": r["lesion_index"], "features": {n: r[n] for n in FEATURE_NAMES}} for r in rows
        ],
    }
    return atomic_write_json(path, obj)


def _read_csv(path: Path, text: str) -> list[dict]:
    try:
        records = list(csv.reader(io.StringIO(text, newline=""), strict=True))
    except csv.Error as exc:
        raise MammoInputError(path, f"garbled CSV: {exc}") from None
    records = [(i + 1, r) for i, r in enumerate(records) if any(cell.strip() for cell in r)]
    if not records:
        raise MammoInputError(path, "empty feature file (no header)")
    (_, header), body = records[0], records[1:]
    header = [h.strip() for h in header]
    for col in ID_COLUMNS:
        if col not in header:
            raise MammoInputError(path, f"missing column {col!r} in the CSV header")
    dups = sorted({h for h in header if header.count(h) > 1})
    if dups:
        raise MammoInputError(path, f"duplicate column(s) in the CSV header: {', '.join(dups)}")
    _check_names([h for h in header if h not in ID_COLUMNS], "", path)
    rows = []
    for line_no, record in body:
        if len(record) != len(header):
            raise MammoInputError(
                path, f"garbled CSV: line {line_no} has {len(record)} fields, the header has {len(header)}"
            )
        values = dict(zip(header, record))
        rows.append(_make_row(values["case_id"], values["lesion_index"], values, f"line {line_no}", path))
    _check_duplicates(rows, path)
    return rows


def _read_json(path: Path, text: str) -> list[dict]:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise MammoInputError(path, f"garbled JSON: {exc}") from None
    except (ValueError, RecursionError) as exc:  # a number too long to convert, nesting too deep
        raise MammoInputError(path, f"garbled JSON: {type(exc).__name__}: {str(exc)[:120]}") from None
    cases = obj if isinstance(obj, list) else [obj]
    rows = []
    for c, case in enumerate(cases):
        where = f"case entry {c}" if isinstance(obj, list) else "top level"
        if not isinstance(case, dict):
            raise MammoInputError(path, f"{where}: expected an object with case_id and lesions")
        for key in ("case_id", "lesions"):
            if key not in case:
                raise MammoInputError(path, f"{where}: missing {key!r}")
        if not isinstance(case["lesions"], list):
            raise MammoInputError(path, f"{where}: 'lesions' must be a list")
        for i, lesion in enumerate(case["lesions"]):
            lw = f"case {case['case_id']!r} lesions[{i}]"
            if not isinstance(lesion, dict) or "lesion_index" not in lesion or "features" not in lesion:
                raise MammoInputError(path, f"{lw}: expected an object with lesion_index and features")
            feats = lesion["features"]
            if not isinstance(feats, dict):
                raise MammoInputError(path, f"{lw}: features must be an object")
            _check_names(feats, f"{lw}: ", path)
            rows.append(_make_row(case["case_id"], lesion["lesion_index"], feats, lw, path))
    _check_duplicates(rows, path)
    return rows


def read_feature_file(path: str | os.PathLike) -> list[dict]:
    """Read and validate a feature file (format from the suffix: ``.csv`` or ``.json``).

    Returns rows ``{"case_id": str, "lesion_index": int, **{name: float}}`` in file order, the 67 features in
    FEATURE_NAMES order, all finite.

    Raises:
        MammoInputError(path, reason): missing/unreadable/garbled file, unsupported suffix, missing columns
            (the missing feature names are listed), unknown feature names, non-numeric or NaN/inf values (naming
            case, lesion and feature), duplicate (case_id, lesion_index).
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".json"):
        raise MammoInputError(path, f"unsupported feature file type {path.suffix!r} (expected .csv or .json)")
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise MammoInputError(path, "feature file not found") from None
    except OSError as exc:
        raise MammoInputError(path, f"cannot read feature file: {exc}") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        reason = f"garbled feature file: not UTF-8 text ({exc.reason} at byte {exc.start})"
        raise MammoInputError(path, reason) from None
    if "\x00" in text:
        raise MammoInputError(path, "garbled feature file: contains NUL bytes")
    return _read_csv(path, text) if suffix == ".csv" else _read_json(path, text)


def rows_to_matrix(rows: Sequence[Mapping[str, Any]]) -> np.ndarray:
    """Stack rows into a float64 matrix of shape (N, 67), columns in FEATURE_NAMES order (N may be 0).

    Raises MammoInputError when a row lacks a feature.
    """
    out = np.empty((len(rows), len(FEATURE_NAMES)), dtype=np.float64)
    for i, row in enumerate(rows):
        missing = [n for n in FEATURE_NAMES if n not in row]
        if missing:
            who = _lesion_label(row.get("case_id"), row.get("lesion_index"))
            raise MammoInputError(f"rows[{i}]", f"{who} lacks feature(s): {', '.join(missing)}")
        out[i] = [float(row[n]) for n in FEATURE_NAMES]
    return out
