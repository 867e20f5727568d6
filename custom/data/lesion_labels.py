"""Per-lesion labels (GBCI's "lesion category and BI-RADS per lesion"): vocabulary, parsing and slot codes.

The image-level attributes of :mod:`custom.data.attributes` describe the whole mammogram and, for the lesions, only
the most suspicious one. A *lesion label* belongs to one lesion slot, next to that slot's radiomics and mask::

    lesion_category   mass, calcification, asymmetry, distortion, other
    lesion_birads     2, 3, 4, 5              (4A/4B/4C -> 4)

A slot holding a lesion cannot be labelled ``none`` (that is remove mode's job); an empty slot has no label (the
network sees each label's null there).

Where the labels come from (the same ``list[dict]``, one dict per lesion in lesion-index order; an empty dict = that
lesion's labels not given):

* :func:`labels_from_finding`: a prepared datalist entry's ``findings`` (training; VinDr's ``finding_categories`` /
  ``finding_birads``, kept per lesion by ``prepare``);
* :func:`parse_lesion_labels`: ``--lesion_labels "birads=4,category=mass; birads=2"`` (``;`` between lesions) or a
  list of mappings (config, MONAI Label request params, JSON).

:func:`encode_lesion_labels` turns them into the ``(L, K)`` int64 slot codes the network's
:class:`~custom.networks.attributes.SlotLabelEmbedding` reads (``-1`` = not given); :func:`attach_lesion_labels` adds
them to training items. Every bad name, value or count raises :class:`~custom.errors.MammoInputError` with one line
naming the option.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from custom.data.attributes import ATTRIBUTES, NOT_GIVEN, datalist_entries, distinct_names, normalise_value
from custom.errors import MammoInputError

__all__ = ["LESION_LABELS", "check_lesion_label_names", "check_lesion_labels_allowed", "labels_from_finding", "parse_lesion_labels",
           "encode_lesion_labels", "decode_lesion_labels", "attach_lesion_labels"]

#: name -> values of a lesion slot's label (the image-level vocabulary without ``none``), order = code.
LESION_LABELS: dict[str, tuple[str, ...]] = {
    name: tuple(v for v in ATTRIBUTES[name] if v != "none") for name in ("lesion_category", "lesion_birads")
}
_ALIASES = {"category": "lesion_category", "lesion_category": "lesion_category", "finding_categories": "lesion_category",
            "birads": "lesion_birads", "bi_rads": "lesion_birads", "lesion_birads": "lesion_birads",
            "finding_birads": "lesion_birads"}


def _name(name: Any, source: str) -> str:
    key = str(name).strip().lower().replace("-", "_").replace(" ", "_")
    if key not in _ALIASES:
        raise MammoInputError(source, f"unknown lesion label {name!r} (known: category, birads)")
    return _ALIASES[key]


def _value(name: str, value: Any, source: str) -> str:
    try:
        out = normalise_value(name, value, source)
    except MammoInputError:
        raise MammoInputError(source, f"unknown value {str(value).strip()!r} for {name} (known: "
                                      f"{', '.join(LESION_LABELS[name])})") from None
    if out == "none" or out not in LESION_LABELS[name]:
        raise MammoInputError(source, f"{name}={value!r} is not a label of a lesion (known: "
                                      f"{', '.join(LESION_LABELS[name])}; to take a lesion out use --mode remove)")
    return out


def check_lesion_label_names(names: Sequence[str] | None, source: str = "lesion_label_names") -> list[str]:
    """Canonical, distinct lesion-label names (the network's list, code order); ``None`` / empty -> ``[]``."""
    return distinct_names(names, _name, source, "lesion label")


def check_lesion_labels_allowed(given: bool, names: Sequence[str]) -> None:
    """One error when lesion labels are ``given`` to a model that reads none (``names`` empty).

    Raises:
        MammoInputError: ``lesion_labels``: the model was trained without lesion labels.
    """
    if given and not names:
        raise MammoInputError("lesion_labels", "the model was trained without lesion labels (lesion_label_names is "
                                               "empty in its record): leave --lesion_labels out")


def labels_from_finding(finding: Mapping[str, Any], source: str = "datalist") -> dict[str, str]:
    """The labels of one prepared finding ``{"category": "Mass", "birads": "BI-RADS 4", ...}``. A category or
    BI-RADS the vocabulary does not know (``prepare``'s ``"lesion"`` of a mask-file dataset, VinDr's
    ``"BI-RADS 1"`` on a finding, an empty value) is left out: not given, never guessed."""
    out: dict[str, str] = {}
    for name, key in (("lesion_category", "category"), ("lesion_birads", "birads")):
        value = finding.get(key)
        if value in (None, ""):
            continue
        try:
            out[name] = _value(name, value, source)
        except MammoInputError:
            pass
    return out


def parse_lesion_labels(spec: Any, source: str = "lesion_labels") -> list[dict[str, str]]:
    """Per-lesion labels from ``"birads=4,category=mass; birads=2"`` (lesions separated by ``;``, a group may be
    empty), a JSON string of a list, or a list of mappings. ``None`` -> ``[]``.

    Raises:
        MammoInputError: ``lesion_labels``: an item without ``=``, an unknown name or value, ``none``, a name given
        twice for one lesion, a list element that is not a mapping.
    """
    if spec is None:
        return []
    groups: list[Mapping[str, Any]]
    if isinstance(spec, str) and spec.strip().startswith("["):
        try:
            spec = json.loads(spec)
        except ValueError as err:
            raise MammoInputError(source, f"not valid JSON ({err.msg})") from None
    if isinstance(spec, str):
        groups = []
        for g, text in enumerate(spec.split(";")):
            items: dict[str, Any] = {}
            for part in text.split(","):
                if not part.strip():
                    continue
                if "=" not in part:
                    raise MammoInputError(source, f"lesion {g}: expected name=value, got {part.strip()!r} "
                                                  "(e.g. \"birads=4,category=mass; birads=2\")")
                k, v = part.split("=", 1)
                if _name(k, source) in {_name(x, source) for x in items}:
                    raise MammoInputError(source, f"lesion {g}: {_name(k, source)} given twice")
                items[k] = v
            groups.append(items)
    elif isinstance(spec, Sequence):
        groups = list(spec)
    else:
        raise MammoInputError(source, f"expected a string or a list of per-lesion mappings, got {type(spec).__name__}")
    out: list[dict[str, str]] = []
    for g, group in enumerate(groups):
        if group is None:
            out.append({})
            continue
        if not isinstance(group, Mapping):
            raise MammoInputError(source, f"lesion {g}: expected a mapping of labels, got {type(group).__name__}")
        labels: dict[str, str] = {}
        for k, v in group.items():
            name = _name(k, source)
            if name in labels:
                raise MammoInputError(source, f"lesion {g}: {name} given twice")
            labels[name] = _value(name, v, f"{source} (lesion {g})")
        out.append(labels)
    return out


def encode_lesion_labels(labels: Sequence[Mapping[str, str]], names: Sequence[str], max_lesions: int,
                         num_lesions: int | None = None, source: str = "lesion_labels") -> np.ndarray:
    """``(max_lesions, K)`` int64 slot codes: lesion ``i``'s label value index in :data:`LESION_LABELS`,
    ``NOT_GIVEN`` (-1) where not given and in slots without a lesion.

    Args:
        labels: one mapping per lesion (lesion-index order), as :func:`parse_lesion_labels` returns.
        names: the labels the model reads.
        max_lesions: slots ``L``.
        num_lesions: lesions of the case (when known): labels for more lesions than that are an error.

    Raises:
        MammoInputError: labels for more lesions than the case or the model has, or a label the model does not
        read (an option is honoured or rejected, never ignored).
    """
    names = check_lesion_label_names(names)
    labels = list(labels)
    limit = int(max_lesions) if num_lesions is None else min(int(num_lesions), int(max_lesions))
    if len(labels) > limit and any(labels[limit:]):
        what = f"the case has {num_lesions} lesion(s)" if num_lesions is not None and num_lesions < max_lesions \
            else f"the model has {max_lesions} lesion slot(s)"
        raise MammoInputError(source, f"labels given for {len(labels)} lesions but {what}")
    codes = np.full((int(max_lesions), len(names)), NOT_GIVEN, dtype=np.int64)
    for i, lab in enumerate(labels[:limit]):
        unused = [k for k in lab if k not in names]
        if unused:
            raise MammoInputError(source, f"the model was not trained with lesion label(s) {', '.join(unused)} "
                                          f"(it reads: {', '.join(names) or 'no lesion labels'})")
        for j, n in enumerate(names):
            if n in lab:
                codes[i, j] = LESION_LABELS[n].index(_value(n, lab[n], source))
    return codes


def decode_lesion_labels(codes: Any, names: Sequence[str]) -> list[dict[str, str]]:
    """Inverse of :func:`encode_lesion_labels`: one dict per slot (``NOT_GIVEN`` entries left out)."""
    arr = np.asarray(codes)
    return [{n: LESION_LABELS[n][int(c)] for n, c in zip(names, row) if int(c) != NOT_GIVEN} for row in arr]


def attach_lesion_labels(items: Sequence[Mapping[str, Any]], prepared_dir: str | os.PathLike,
                         names: Sequence[str] | None, max_lesions: int,
                         key: str = "lesion_labels") -> list[dict[str, Any]]:
    """Training items (from :func:`custom.data.training.load_prepared_datalist`) with ``item[key]`` = ``(L, K)``
    int64 slot codes of their lesions' labels, read from the ``findings`` (ordered by ``lesion_index``) of
    ``<prepared_dir>/datalist.json`` by case id. With no ``names`` the items are returned unchanged (labels off)."""
    names = check_lesion_label_names(names)
    if not names:
        return list(items)
    entries = datalist_entries(Path(prepared_dir) / "datalist.json")
    out = []
    for item in items:
        cid = str(item["case_id"])
        findings = sorted(entries.get(cid, {}).get("findings") or [], key=lambda f: int(f.get("lesion_index", 0)))
        labels = [{k: v for k, v in labels_from_finding(f, cid).items() if k in names} for f in findings]
        labels = labels[: int(max_lesions)]
        out.append({**item, key: encode_lesion_labels(labels, names, max_lesions, source=cid)})
    return out
