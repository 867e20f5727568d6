"""Clinical attributes of a mammogram (MAM-E / GBCI style): vocabulary, parsing and integer codes.

An *attribute set* is a ``dict`` name -> canonical value; an attribute that is not given is simply absent (the
network then sees that attribute's learned null token). The vocabulary (:data:`ATTRIBUTES`)::

    view             CC, MLO
    laterality       L, R
    density          A, B, C, D                      (BI-RADS breast composition; MAM-E words: very low .. very high)
    breast_birads    1, 2, 3, 4, 5                   (breast-level BI-RADS; 4A/4B/4C -> 4)
    lesion_category  none, mass, calcification, asymmetry, distortion, other
    lesion_birads    none, 2, 3, 4, 5                (BI-RADS of the most suspicious lesion of the image)
    area             small, medium, large            (MAM-E's rule on the breast/image ratio: < 0.4, 0.4-0.6, > 0.6)
    manufacturer     siemens, hologic, ge, fujifilm, planmed, philips, other

``lesion_category`` / ``lesion_birads`` are per *image* (the most suspicious lesion: highest BI-RADS, then the first),
not per lesion slot: the lesion slots already carry each lesion's radiomics and mask.

Where attributes come from (all return the same kind of dict; every bad name, value or word raises
:class:`~custom.errors.MammoInputError` with one line naming the option):

* :func:`attributes_from_entry`: a prepared datalist entry (training), the area measured on its label map;
* :func:`parse_attribute_string`: ``--attributes "view=MLO,density=D,area=small"``;
* :func:`parse_prompt`: a MAM-E-style prompt, ``"a siemens mammogram in MLO view with high density and small area"``;
* :func:`attributes_from_dicom`: a reference DICOM's tags (ViewPosition, ImageLaterality, Manufacturer);
* :func:`merge_attributes`: several of these together (a contradiction between two sources is an error).

:func:`encode_attributes` turns a set into the ``(K,)`` int64 code vector the network's
:class:`~custom.networks.attributes.AttributeTokens` reads (``-1`` = not given).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from custom.errors import MammoInputError

__all__ = [
    "ATTRIBUTES",
    "ATTRIBUTE_NAMES",
    "NOT_GIVEN",
    "AREA_BINS",
    "area_bin",
    "normalise_value",
    "check_attribute_names",
    "parse_attribute_string",
    "parse_prompt",
    "attributes_from_dicom",
    "attributes_from_entry",
    "merge_attributes",
    "encode_attributes",
    "decode_attributes",
    "attach_attribute_codes",
    "datalist_entries",
    "distinct_names",
    "describe_attributes",
    "VIEW_SHAPE_THRESHOLD",
    "breast_shape_view",
    "view_mask_note",
]

#: name -> allowed canonical values (order = code).
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "view": ("CC", "MLO"),
    "laterality": ("L", "R"),
    "density": ("A", "B", "C", "D"),
    "breast_birads": ("1", "2", "3", "4", "5"),
    "lesion_category": ("none", "mass", "calcification", "asymmetry", "distortion", "other"),
    "lesion_birads": ("none", "2", "3", "4", "5"),
    "area": ("small", "medium", "large"),
    "manufacturer": ("siemens", "hologic", "ge", "fujifilm", "planmed", "philips", "other"),
}
ATTRIBUTE_NAMES: tuple[str, ...] = tuple(ATTRIBUTES)
#: Code of an attribute that is not given.
NOT_GIVEN = -1
#: MAM-E's breast-area bins on the breast/image pixel ratio: upper bounds of small and medium.
AREA_BINS = (0.4, 0.6)

_NAME_ALIASES = {"vendor": "manufacturer", "side": "laterality", "breast_area": "area", "birads": "breast_birads",
                 "category": "lesion_category", "lesion": "lesion_category", "view_position": "view",
                 "breast_density": "density", "finding_birads": "lesion_birads"}
_DENSITY_WORDS = {"very low": "A", "low": "B", "high": "C", "very high": "D"}
_MANUFACTURER_WORDS = {
    "siemens": "siemens", "hologic": "hologic", "lorad": "hologic", "ge": "ge", "ge healthcare": "ge",
    "general electric": "ge", "fujifilm": "fujifilm", "fuji": "fujifilm", "planmed": "planmed", "philips": "philips",
    "sectra": "philips", "other": "other",
}
_CATEGORY_WORDS = {
    "none": "none", "no finding": "none", "healthy": "none", "normal": "none", "mass": "mass",
    "calcification": "calcification", "suspicious calcification": "calcification", "calcifications": "calcification",
    "asymmetry": "asymmetry", "focal asymmetry": "asymmetry", "global asymmetry": "asymmetry",
    "architectural distortion": "distortion", "distortion": "distortion", "other": "other",
}


def _known(name: str) -> str:
    return ", ".join(ATTRIBUTES[name])


def _canonical_name(name: str, source: str) -> str:
    key = str(name).strip().lower().replace("-", "_").replace(" ", "_")
    key = _NAME_ALIASES.get(key, key)
    if key not in ATTRIBUTES:
        raise MammoInputError(source, f"unknown attribute {name!r} (known: {', '.join(ATTRIBUTE_NAMES)})")
    return key


def area_bin(ratio: float) -> str:
    """MAM-E's breast-area bin of a breast/image pixel ratio: ``< 0.4`` small, ``0.4 .. 0.6`` medium, ``> 0.6`` large."""
    r = float(ratio)
    if not np.isfinite(r) or r < 0 or r > 1:
        raise ValueError(f"area_bin: breast/image ratio must lie in [0, 1], got {ratio!r}")
    if r < AREA_BINS[0]:
        return "small"
    if r <= AREA_BINS[1]:
        return "medium"
    return "large"


def normalise_value(name: str, value: Any, source: str = "attributes") -> str:
    """Canonical value of attribute ``name`` from the many ways it is written (``"DENSITY C"``, ``"c"``, ``"high"``,
    ``"BI-RADS 4A"``, ``"SIEMENS Healthineers"``, ``"['Mass']"``, a breast ratio ``0.55`` for area, ...).

    Raises:
        MammoInputError: ``source``: the value is not one of the attribute's values (they are listed).
    """
    name = _canonical_name(name, source)
    if isinstance(value, (float, np.floating)) and name == "area":
        return area_bin(float(value))
    raw = str(value).strip()
    text = " ".join(raw.lower().replace("_", " ").split())
    allowed = ATTRIBUTES[name]
    out: str | None = None
    if name == "view":
        out = {"cc": "CC", "mlo": "MLO", "craniocaudal": "CC", "mediolateral oblique": "MLO"}.get(text)
    elif name == "laterality":
        out = {"l": "L", "left": "L", "r": "R", "right": "R"}.get(text)
    elif name == "density":
        t = re.sub(r"^(density|breast density|composition)\s*", "", text)
        out = t.upper() if t.upper() in allowed else _DENSITY_WORDS.get(t)
    elif name in ("breast_birads", "lesion_birads"):
        t = re.sub(r"^(bi-?rads|birads)\s*", "", text)
        if name == "lesion_birads" and t in ("", "none", "no finding"):
            out = "none"
        elif re.fullmatch(r"[1-5][abc]?", t):
            out = t[0]
    elif name == "lesion_category":
        t = text.strip("[]'\" ")
        out = _CATEGORY_WORDS.get(t)
    elif name == "area":
        t = {"big": "large"}.get(text, text)
        out = t if t in allowed else None
        if out is None:
            try:
                return area_bin(float(text))
            except ValueError:
                out = None
    elif name == "manufacturer":
        out = _MANUFACTURER_WORDS.get(text)
        if out is None:  # DICOM Manufacturer strings: "SIEMENS", "HOLOGIC, Inc.", "GE MEDICAL SYSTEMS", ...
            for word, canon in _MANUFACTURER_WORDS.items():
                if re.search(rf"\b{re.escape(word)}\b", text):
                    out = canon
                    break
    if out is None or out not in allowed:
        raise MammoInputError(source, f"unknown value {raw!r} for attribute {name!r} (known: {_known(name)})")
    return out


def distinct_names(names: Sequence[str] | None, canonical: Callable[[Any, str], str], source: str,
                   what: str) -> list[str]:
    """``names`` through ``canonical(name, source)`` (which raises on an unknown one), in order; a name listed twice
    (after canonicalisation) is one error naming ``what``; ``None`` / empty -> ``[]``."""
    out: list[str] = []
    for n in names or []:
        c = canonical(n, source)
        if c in out:
            raise MammoInputError(source, f"{what} {c!r} listed twice")
        out.append(c)
    return out


def check_attribute_names(names: Sequence[str] | None, source: str = "attributes") -> list[str]:
    """Canonical, distinct attribute names (the network's attribute list); ``None`` / empty -> ``[]``."""
    return distinct_names(names, _canonical_name, source, "attribute")


def parse_attribute_string(text: str | Mapping[str, Any] | None, source: str = "attributes") -> dict[str, str]:
    """``"view=MLO,density=D,area=small"`` (or a mapping) -> ``{"view": "MLO", "density": "D", "area": "small"}``.

    Raises:
        MammoInputError: ``attributes``: an item without ``=``, an unknown name or value, a name given twice.
    """
    if text is None:
        return {}
    items: list[tuple[str, Any]]
    if isinstance(text, Mapping):
        items = list(text.items())
    else:
        items = []
        for part in str(text).split(","):
            if not part.strip():
                continue
            if "=" not in part:
                raise MammoInputError(source, f"expected name=value, got {part.strip()!r} (e.g. \"view=MLO,density=D\")")
            k, v = part.split("=", 1)
            items.append((k, v))
    out: dict[str, str] = {}
    for k, v in items:
        name = _canonical_name(k, source)
        if name in out:
            raise MammoInputError(source, f"attribute {name!r} given twice")
        out[name] = normalise_value(name, v, source)
    return out


# ---------------------------------------------------------------------------------------------------- prompt
_FILLER = {"a", "an", "the", "mammogram", "mammograms", "mammography", "image", "in", "with", "and", "of", "on",
           "synthetic", "breast", "showing", "view", "side", "at", "from", "acquired", "by", "scanner", "photo",
           "x-ray", "xray", "digital", "full-field", "ffdm"}


def parse_prompt(prompt: str | None, source: str = "prompt") -> dict[str, str]:
    """Attributes of a MAM-E-style prompt.

    Understood phrases (case-insensitive, any order, filler words such as "a", "mammogram", "in", "with", "and",
    "view", "breast" allowed): a manufacturer name (``siemens``, ``hologic``, ``ge``, ...); ``CC`` / ``MLO``
    (``craniocaudal``, ``mediolateral oblique``); ``left`` / ``right``; ``[very] low|high density`` or
    ``density A..D``; ``small|medium|large|big area``; ``BI-RADS n``; ``healthy`` / ``normal`` / ``no lesion``
    (lesion_category none) and ``mass`` / ``calcification`` / ``asymmetry`` / ``distortion``.

    Raises:
        MammoInputError: ``prompt``: a word it does not understand (named, with its position), or two phrases
        that contradict each other ("CC ... MLO").
    """
    if prompt is None:
        return {}
    words = re.findall(r"[a-z0-9][a-z0-9\-]*", str(prompt).lower())
    out: dict[str, str] = {}
    i = 0

    def put(name: str, value: str, phrase: str) -> None:
        if name in out and out[name] != value:
            raise MammoInputError(source, f"{phrase!r} contradicts an earlier {name}={out[name]} in {prompt!r}")
        out[name] = value

    while i < len(words):
        w = words[i]
        nxt = words[i + 1] if i + 1 < len(words) else ""
        two = f"{w} {nxt}"
        if w in ("cc", "craniocaudal"):
            put("view", "CC", w)
            i += 1
        elif w in ("mlo",) or two == "mediolateral oblique":
            put("view", "MLO", w)
            i += 1 if w == "mlo" else 2
        elif w in ("left", "right"):
            put("laterality", "L" if w == "left" else "R", w)
            i += 1
        elif w == "very" and nxt in ("low", "high") and i + 2 < len(words) and words[i + 2] == "density":
            put("density", _DENSITY_WORDS[two], f"{two} density")
            i += 3
        elif w in ("low", "high") and nxt == "density":
            put("density", _DENSITY_WORDS[w], two)
            i += 2
        elif w == "density" and nxt in ("a", "b", "c", "d"):
            put("density", nxt.upper(), two)
            i += 2
        elif w in ("small", "medium", "large", "big") and nxt == "area":
            put("area", "large" if w == "big" else w, two)
            i += 2
        elif w in ("bi-rads", "birads") and re.fullmatch(r"[1-5][abc]?", nxt):
            put("breast_birads", nxt[0], two)
            i += 2
        elif w in ("healthy", "normal"):
            put("lesion_category", "none", w)
            i += 1
        elif w in ("no", "without") and nxt in ("lesion", "lesions", "finding", "findings", "mass", "masses"):
            put("lesion_category", "none", two)
            i += 2
        elif w in ("mass", "calcification", "calcifications", "asymmetry", "distortion"):
            put("lesion_category", _CATEGORY_WORDS[w], w)
            i += 1
        elif two == "architectural distortion":
            put("lesion_category", "distortion", two)
            i += 2
        elif two in ("ge healthcare", "general electric"):
            put("manufacturer", "ge", two)
            i += 2
        elif w in _MANUFACTURER_WORDS and w != "other":
            put("manufacturer", _MANUFACTURER_WORDS[w], w)
            i += 1
        elif w in _FILLER:
            i += 1
        elif w in ("density", "area", "low", "high", "very", "small", "medium", "large", "big"):
            hint = ("'[very] low|high density' or 'density A-D'" if w in ("density", "low", "high", "very")
                    else "'small|medium|large area'")
            raise MammoInputError(source, f"word {w!r} (word {i + 1}) is not part of a known phrase: use {hint}")
        else:
            raise MammoInputError(
                source, f"unknown word {w!r} (word {i + 1} of {prompt!r}); the prompt understands views (CC, MLO), "
                        "left/right, '[very] low|high density', 'small|medium|large area', manufacturers "
                        f"({', '.join(ATTRIBUTES['manufacturer'][:-1])}), 'BI-RADS n', healthy / mass / calcification")
    return out


# ---------------------------------------------------------------------------------------------------- DICOM / datalist
def attributes_from_dicom(path: str | os.PathLike, source: str | None = None) -> dict[str, str]:
    """View, laterality and manufacturer of a reference DICOM (header only: ``ViewPosition``, ``ImageLaterality``
    or ``Laterality``, ``Manufacturer``). A tag that is absent or holds a value outside the vocabulary (e.g. view
    ``ML``) gives no attribute, except the manufacturer, which becomes ``other``.

    Raises:
        MammoInputError: the file is missing or not a DICOM file.
    """
    import pydicom

    p = Path(path)
    src = source or str(p)
    if not p.is_file():
        raise MammoInputError(src, "reference DICOM not found")
    try:
        ds = pydicom.dcmread(str(p), stop_before_pixels=True)
    except Exception as err:  # noqa: BLE001 - pydicom raises several kinds
        raise MammoInputError(src, f"not a readable DICOM file ({type(err).__name__})") from None
    out: dict[str, str] = {}
    for name, tags in (("view", ("ViewPosition",)), ("laterality", ("ImageLaterality", "Laterality"))):
        for tag in tags:
            value = str(ds.get(tag, "") or "").strip()
            if value:
                try:
                    out[name] = normalise_value(name, value, src)
                except MammoInputError:
                    pass
                break
    manufacturer = str(ds.get("Manufacturer", "") or "").strip()
    if manufacturer:
        try:
            out["manufacturer"] = normalise_value("manufacturer", manufacturer, src)
        except MammoInputError:
            out["manufacturer"] = "other"
    return out


def _breast_ratio(label_path: str | os.PathLike) -> float:
    from PIL import Image

    with Image.open(label_path) as im:
        lab = np.asarray(im)
    return float((lab > 0).mean())


def _manufacturer_of(entry: Mapping[str, Any], root: Path | None) -> str | None:
    value = entry.get("manufacturer")
    if value:
        return normalise_value("manufacturer", value, str(entry.get("case_id", "datalist")))
    src = entry.get("source_image")
    if not src or str(src).lower().endswith(".png"):
        return None
    p = Path(src)
    if not p.is_absolute() and root is not None and not p.exists():
        p = root / p
    if not p.is_file():
        return None
    try:
        return attributes_from_dicom(p).get("manufacturer")
    except MammoInputError:
        return None


def attributes_from_entry(entry: Mapping[str, Any], root: str | os.PathLike | None = None,
                          label_path: str | os.PathLike | None = None) -> dict[str, str]:
    """Attributes of a prepared datalist entry (``view``, ``laterality``, ``density``, ``breast_birads``,
    ``findings``, ``manufacturer`` or its ``source_image``'s tag) plus the area bin of its label map (breast + lesion
    pixels over all pixels, in the prepared frame the model sees). Values outside the vocabulary are left out."""
    cid = str(entry.get("case_id", "datalist"))
    out: dict[str, str] = {}
    for name, key in (("view", "view"), ("laterality", "laterality"), ("density", "density"),
                      ("breast_birads", "breast_birads")):
        value = entry.get(key)
        if value not in (None, ""):
            try:
                out[name] = normalise_value(name, value, cid)
            except MammoInputError:
                pass
    findings = entry.get("findings")
    if findings is not None or "num_lesions" in entry:
        findings = list(findings or [])
        if not findings or int(entry.get("num_lesions", len(findings))) == 0:
            out["lesion_category"], out["lesion_birads"] = "none", "none"
        else:
            def rank(f: Mapping[str, Any]) -> int:
                try:
                    return int(normalise_value("lesion_birads", f.get("birads") or "none", cid).replace("none", "0"))
                except MammoInputError:
                    return 0

            worst = max(findings, key=rank)  # max keeps the first of equals
            try:
                out["lesion_category"] = normalise_value("lesion_category", worst.get("category") or "other", cid)
            except MammoInputError:
                out["lesion_category"] = "other"
            if rank(worst) > 0:
                out["lesion_birads"] = str(rank(worst))
    root_path = Path(root) if root is not None else None
    lab = label_path or entry.get("label")
    if lab:
        lp = Path(lab)
        if not lp.is_absolute() and root_path is not None:
            lp = root_path / lp
        if lp.is_file():
            out["area"] = area_bin(_breast_ratio(lp))
    manufacturer = _manufacturer_of(entry, root_path)
    if manufacturer:
        out["manufacturer"] = manufacturer
    return out


def merge_attributes(*sources: tuple[str, Mapping[str, str]]) -> dict[str, str]:
    """Merge ``(source name, attributes)`` pairs; the same attribute with two different values is an error naming
    both sources."""
    out: dict[str, str] = {}
    origin: dict[str, str] = {}
    for name, attrs in sources:
        for k, v in (attrs or {}).items():
            if k in out and out[k] != v:
                raise MammoInputError(name, f"{k}={v} contradicts {k}={out[k]} from {origin[k]}")
            out[k], origin[k] = v, name
    return out


def encode_attributes(attrs: Mapping[str, str], names: Sequence[str]) -> np.ndarray:
    """``(K,)`` int64 codes of ``attrs`` for the attribute list ``names``: the value's index in
    :data:`ATTRIBUTES`, ``NOT_GIVEN`` (-1) where absent.

    Raises:
        MammoInputError: an attribute of ``attrs`` that the model does not read (not in ``names``): a user option
        is honoured or rejected, never ignored.
    """
    names = list(names)
    unused = [k for k in attrs if k not in names]
    if unused:
        raise MammoInputError("attributes", f"the model was not trained with attribute(s) {', '.join(unused)} "
                                            f"(it reads: {', '.join(names) or 'no attributes'})")
    codes = np.full((len(names),), NOT_GIVEN, dtype=np.int64)
    for i, n in enumerate(names):
        if n in attrs:
            codes[i] = ATTRIBUTES[n].index(normalise_value(n, attrs[n]))
    return codes


def decode_attributes(codes: Iterable[int], names: Sequence[str]) -> dict[str, str]:
    """Inverse of :func:`encode_attributes` (``NOT_GIVEN`` entries are left out)."""
    return {n: ATTRIBUTES[n][int(c)] for n, c in zip(names, codes) if int(c) != NOT_GIVEN}


def datalist_entries(datalist: str | os.PathLike) -> dict[str, Mapping[str, Any]]:
    """Every split's entries of a prepared ``datalist.json`` (or of the one in a prepared folder) by ``case_id``.

    Raises:
        MammoInputError: the datalist cannot be read or is not JSON.
    """
    path = Path(datalist)
    path = path / "datalist.json" if path.is_dir() else path
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise MammoInputError(path, f"unreadable datalist ({err})") from None
    return {str(e["case_id"]): e for split in data.values() if isinstance(split, list) for e in split}


def attach_attribute_codes(items: Sequence[Mapping[str, Any]], prepared_dir: str | os.PathLike,
                           names: Sequence[str] | None, key: str = "attributes") -> list[dict[str, Any]]:
    """Training items (from :func:`custom.data.training.load_prepared_datalist`) with ``item[key]`` = ``(K,)``
    int64 codes of their attributes, read from ``<prepared_dir>/datalist.json`` (every split) by case id. With no
    ``names`` the items are returned unchanged (attributes off)."""
    names = check_attribute_names(names)
    if not names:
        return list(items)
    root = Path(prepared_dir)
    entries = datalist_entries(root / "datalist.json")
    out = []
    for item in items:
        entry = {**entries.get(str(item["case_id"]), {}), **{k: v for k, v in item.items() if k in ("view", "laterality", "density")}}
        attrs = {k: v for k, v in attributes_from_entry(entry, root, label_path=item.get("label")).items() if k in names}
        out.append({**item, key: encode_attributes(attrs, names)})
    return out


def describe_attributes(attrs: Mapping[str, str]) -> str:
    """A MAM-E-style sentence for an attribute set (sidecars, figure titles)."""
    parts = []
    if "manufacturer" in attrs:
        parts.append(attrs["manufacturer"])
    parts.append("mammogram")
    if "laterality" in attrs:
        parts.append(f"of the {'left' if attrs['laterality'] == 'L' else 'right'} breast")
    if "view" in attrs:
        parts.append(f"in {attrs['view']} view")
    extra = []
    if "density" in attrs:
        words = {v: k for k, v in _DENSITY_WORDS.items()}
        extra.append(f"{words[attrs['density']]} density")
    if "area" in attrs:
        extra.append(f"{attrs['area']} area")
    if attrs.get("lesion_category") == "none":
        extra.append("no lesion")
    elif "lesion_category" in attrs:
        extra.append(f"a {attrs['lesion_category']}")
    if "breast_birads" in attrs:
        extra.append(f"BI-RADS {attrs['breast_birads']}")
    text = "a " + " ".join(parts)
    if extra:
        text += " with " + (", ".join(extra[:-1]) + " and " + extra[-1] if len(extra) > 1 else extra[0])
    return text


# ---------------------------------------------------------------------------------------------------- view vs mask
#: Top-width ratio above which a breast outline is MLO-shaped (see :func:`breast_shape_view`).
VIEW_SHAPE_THRESHOLD = 0.45
#: Fraction of the breast's rows (from its top) whose mean width is compared with the widest row.
_TOP_FRACTION = 0.05


def breast_shape_view(label: np.ndarray) -> tuple[str | None, float]:
    """Which view a breast outline looks like, and the measure behind it.

    The rule (the phantom's own geometry, :func:`custom.data.phantom._breast_outline`, and what a real mammogram shows):
    a CC breast is a half-ellipse whose top rows narrow to a point, an MLO breast runs up into the axilla, so its
    top rows are cut off wide (the pectoral corner). ``ratio`` = mean breast width over the top 5 % of the breast's
    rows / the widest row's width; ``> VIEW_SHAPE_THRESHOLD`` (0.45) is MLO-shaped, else CC-shaped. Widths are pixel
    counts per row, so the chest-wall side (laterality, flip) does not matter.

    Args:
        label: ``(H, W)`` label map or breast mask (breast = ``> 0``).

    Returns:
        ``("CC" | "MLO", ratio)``, or ``(None, nan)`` for an outline too small to judge (< 20 breast rows).
    """
    breast = np.asarray(label) > 0
    if breast.ndim != 2:
        raise ValueError(f"breast_shape_view: expected a (H, W) mask, got shape {breast.shape}")
    widths = breast.sum(axis=1).astype(np.float64)
    rows = np.flatnonzero(widths)
    if rows.size < 20:
        return None, float("nan")
    widths = widths[rows[0]:rows[-1] + 1]
    k = max(1, int(round(_TOP_FRACTION * widths.size)))
    ratio = float(widths[:k].mean() / widths.max())
    return ("MLO" if ratio > VIEW_SHAPE_THRESHOLD else "CC"), ratio


def view_mask_note(attrs: Mapping[str, str], label: np.ndarray | None) -> str | None:
    """A sidecar note when the requested ``view`` contradicts the breast mask's shape (allowed, but worth saying), else
    ``None`` (no view requested, no breast in the mask, or they agree)."""
    view = attrs.get("view")
    if view is None or label is None:
        return None
    shape, ratio = breast_shape_view(label)
    if shape is None or shape == view:
        return None
    return (f"view={view} was requested but the breast mask is {shape}-shaped (top-width ratio {ratio:.2f}; "
            f"MLO-shaped above {VIEW_SHAPE_THRESHOLD}): generated as requested")
