"""VinDr-Mammo adapter: reads the dataset's own layout unchanged.

Expected under ``dataset_dir`` (as in the PhysioNet release of VinDr-Mammo, and as written by the phantom):

- ``finding_annotations.csv``: image_id, study_id, series_id, laterality, view_position, height, width,
  breast_birads, breast_density, finding_categories (e.g. ``['Mass']``, ``['No Finding']``), finding_birads,
  xmin, ymin, xmax, ymax, split (``training``/``test``) — one row per finding;
- ``breast-level_annotations.csv`` (optional but read when present): one row per image with the breast-level
  labels; images listed only there are images without findings;
- ``images/<study_id>/<image_id>.dicom``.
"""

from __future__ import annotations

import ast
import csv
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from custom.data.cases import Finding, MammoCase, Skipped
from custom.errors import MammoInputError

__all__ = ["FINDING_REQUIRED_COLUMNS", "BREAST_REQUIRED_COLUMNS", "load_vindr_cases", "parse_categories"]

FINDING_REQUIRED_COLUMNS = (
    "image_id", "study_id", "laterality", "view_position", "finding_categories", "xmin", "ymin", "xmax", "ymax", "split",
)
BREAST_REQUIRED_COLUMNS = ("image_id", "study_id", "laterality", "view_position", "split")


def _read_csv(path: Path, required: Sequence[str]) -> list[dict[str, str]]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            header = reader.fieldnames or []
            missing = [c for c in required if c not in header]
            if missing:
                raise MammoInputError(path, f"missing CSV columns: {', '.join(missing)} (found: {', '.join(header) or 'none'})")
            return [dict(row) for row in reader]
    except MammoInputError:
        raise
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise MammoInputError(path, f"unreadable CSV ({type(err).__name__}: {err})") from err


def parse_categories(text: str) -> list[str]:
    """``"['Mass', 'Suspicious Calcification']"`` -> ``['Mass', 'Suspicious Calcification']`` (plain text too)."""
    text = (text or "").strip()
    if not text:
        return []
    if text.startswith("["):
        try:
            value = ast.literal_eval(text)
            return [str(v).strip() for v in value]
        except (ValueError, SyntaxError):
            text = text.strip("[]")
    return [t.strip().strip("'\"") for t in text.split(",") if t.strip()]


def _float(value: str | None) -> float | None:
    try:
        f = float(value) if value not in (None, "") else None
    except ValueError:
        return None
    return None if f is None or not math.isfinite(f) else f


def _shape(row: dict[str, str]) -> list[int] | None:
    h, w = _float(row.get("height")), _float(row.get("width"))
    if h is None or w is None or h < 1 or w < 1 or h != int(h) or w != int(w):
        return None
    return [int(h), int(w)]


def _clean(value: str | None) -> str | None:
    value = (value or "").strip()
    return value or None


def load_vindr_cases(
    dataset_dir: str | os.PathLike,
    lesion_categories: Iterable[str] = ("Mass",),
    views: Iterable[str] | None = None,
    image_subdir: str = "images",
    image_suffix: str = ".dicom",
    other_findings: str = "exclude",
) -> tuple[list[MammoCase], list[Skipped], dict[str, int]]:
    """Cases of a VinDr-Mammo-layout folder.

    Args:
        dataset_dir: the dataset root.
        lesion_categories: finding categories that count as lesions (others, e.g. calcifications, are ignored).
        views: keep only these view positions (e.g. ``["CC"]`` as in GCDM); ``None`` keeps all.
        other_findings: what to do with an image whose only findings are of other categories (calcifications,
            asymmetries, ...): ``"exclude"`` (default) leaves it out - it is not a lesion-free breast and would teach
            the "no lesion" condition otherwise; ``"healthy"`` keeps it as an image without lesion. An image with a
            lesion keeps it whatever its other findings.

    Returns:
        ``(cases, skipped, counts)``: ``skipped`` lists rows/images left out with reasons (missing image file,
        unusable box, …); ``counts`` has ``"excluded_view"``, ``"ignored_findings"`` (finding rows of other
        categories), ``"excluded_other_findings"`` / ``"kept_other_findings_as_healthy"`` (images whose only
        findings are of other categories, by the ``other_findings`` policy).

    Raises:
        MammoInputError: the CSV is missing, unreadable or lacks required columns.
    """
    policy = str(other_findings).strip().lower()
    if policy not in ("exclude", "healthy"):
        raise MammoInputError("other_findings", f"must be 'exclude' or 'healthy', got {other_findings!r}")
    root = Path(dataset_dir)
    finding_csv = root / "finding_annotations.csv"
    if not finding_csv.is_file():
        raise MammoInputError(finding_csv, "VinDr-Mammo finding_annotations.csv not found")
    rows = _read_csv(finding_csv, FINDING_REQUIRED_COLUMNS)
    breast_csv = root / "breast-level_annotations.csv"
    breast_rows = _read_csv(breast_csv, BREAST_REQUIRED_COLUMNS) if breast_csv.is_file() else []
    wanted = {c.strip().lower() for c in lesion_categories}
    keep_views = None if views is None else {v.strip().upper() for v in views}

    cases: dict[str, MammoCase] = {}
    skipped: list[Skipped] = []
    counts = {"excluded_view": 0, "ignored_findings": 0, "excluded_other_findings": 0, "kept_other_findings_as_healthy": 0}
    other: set[str] = set()  # images with a finding of another category

    def case_for(row: dict[str, str]) -> MammoCase | None:
        image_id, study_id = _clean(row.get("image_id")), _clean(row.get("study_id"))
        if not image_id or not study_id:
            skipped.append(Skipped(image_id or "?", str(finding_csv), "row without image_id or study_id"))
            return None
        if image_id not in cases:
            cases[image_id] = MammoCase(
                case_id=image_id,
                image_path=str(root / image_subdir / study_id / f"{image_id}{image_suffix}"),
                study_id=study_id,
                laterality=(_clean(row.get("laterality")) or "").upper() or None,
                view=(_clean(row.get("view_position")) or "").upper() or None,
                split=_clean(row.get("split")),
                density=_clean(row.get("breast_density")),
                breast_birads=_clean(row.get("breast_birads")),
                annotated_shape=_shape(row),
            )
        return cases[image_id]

    for row in breast_rows:
        case_for(row)
    for line, row in enumerate(rows, start=2):
        case = case_for(row)
        if case is None:
            continue
        categories = parse_categories(row.get("finding_categories", ""))
        if not any(c.lower() in wanted for c in categories):
            is_other = any(c.strip().lower() not in ("no finding", "") for c in categories)
            counts["ignored_findings"] += int(is_other)
            if is_other:
                other.add(case.case_id)
            continue
        box = [_float(row.get(k)) for k in ("xmin", "ymin", "xmax", "ymax")]
        if any(v is None for v in box) or box[2] <= box[0] or box[3] <= box[1]:
            skipped.append(Skipped(case.case_id, f"{finding_csv}:{line}", f"lesion row with an unusable box {box}"))
            case.findings = None  # type: ignore[assignment]  # marks the whole image unusable (a lesion would be lost)
            continue
        if case.findings is not None:
            label = next(c for c in categories if c.lower() in wanted)
            case.findings.append(Finding(category=label, birads=_clean(row.get("finding_birads")), box=box))

    out: list[MammoCase] = []
    for case in cases.values():
        if case.findings is None:
            continue
        if keep_views is not None and (case.view or "") not in keep_views:
            counts["excluded_view"] += 1
            continue
        if case.case_id in other and not case.findings:
            if policy == "exclude":
                counts["excluded_other_findings"] += 1
                continue
            counts["kept_other_findings_as_healthy"] += 1
        if not Path(case.image_path).is_file():
            skipped.append(Skipped(case.case_id, case.image_path, "image file missing"))
            continue
        out.append(case)
    return out, skipped, counts
