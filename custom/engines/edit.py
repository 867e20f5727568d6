"""Inference extensions: clinical attributes, trained inpainting (``--mode inpaint``) and lesion removal
(``--mode remove``), around the ``inference`` workflow of :mod:`custom.engines.inference`.

``bundle/configs/inference.json`` uses the classes here in place of the plain ones; with no attribute and the modes
``generate`` / ``keep`` they behave exactly like them.

Modes (every pixel outside the dilated region is the preprocessed source, bit for bit, in keep, inpaint and remove):

1. ``keep`` (training-free, RePaint): the known latent is re-noised and blended in at every DDIM step.
2. ``inpaint`` (MAM-E's trained inpainting; needs a model trained with ``train_inpaint.json``): the UNet gets the
   region at latent resolution and the latent of the region-blanked source (:func:`custom.engines.inpaint.inpaint_concat`)
   as extra channels; no blending during sampling.
3. ``remove`` (counterfactual healthy image): ``--image_file`` + ``--lesion_mask_file`` (or ``--lesion_box``); the
   lesion region, dilated by ``keep_dilation``, is regenerated with the *no lesion* condition (empty lesion slots, the
   lesion pixels become breast in the label map, ``lesion_category=none`` when the model reads it), by the inpainting
   mechanism when the model has its channels and by keep (RePaint) otherwise.

The decoded result is pasted back by :meth:`custom.engines.inference.GCDMSamplingInferer.paste` (the
``keep_feather`` ramp, 0 outside the region; with ``keep_blend: "poisson"`` Poisson-blended first,
:mod:`custom.transforms.blend`).

A requested ``view`` that contradicts the breast mask's shape (:func:`custom.data.attributes.breast_shape_view`: an
MLO prompt with a CC-shaped mask, or the reverse) is generated as asked and written as a note in the sidecar
(``notes``).

Attributes (:mod:`custom.data.attributes`): ``--attributes "view=MLO,density=D"``, ``--prompt "a siemens mammogram
in MLO view with high density"``, ``--attribute_dicom ref.dcm`` (its tags), merged (a contradiction is an error);
every attribute must be one the model reads (``attribute_names`` of the training config), else an error. Cases of a
prepared datalist take their own attributes from the datalist, overridden by the given ones.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from custom.data.attributes import (
    attributes_from_dicom,
    attributes_from_entry,
    check_attribute_names,
    datalist_entries,
    encode_attributes,
    merge_attributes,
    parse_attribute_string,
    parse_prompt,
    view_mask_note,
)
from custom.data.lesion_labels import (
    check_lesion_label_names,
    check_lesion_labels_allowed,
    decode_lesion_labels,
    encode_lesion_labels,
    labels_from_finding,
    parse_lesion_labels,
)
from custom.engines.inference import (
    CaseSet,
    GCDMInferencePrepareBatch,
    GCDMSamplingInferer,
    InferenceCase,
    SampleWriter,
    _is_dicom,
    _seeds,
    build_inference_cases,
    keep_region,
)
from custom.engines.inpaint import has_inpaint_channels, inpaint_channels, inpaint_concat
from custom.errors import MammoInputError, check_path_option

__all__ = ["EDIT_MODES", "gather_attributes", "attach_case_lesion_labels", "build_edit_cases", "check_edit_inputs", "EditPrepareBatch",
           "EditSamplingInferer", "EditSampleWriter"]

logger = logging.getLogger(__name__)

EDIT_MODES = ("generate", "keep", "inpaint", "remove")


def _sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def gather_attributes(attributes: Any = None, prompt: str | None = None, attribute_dicom: str | None = None,
                      attribute_names: Sequence[str] | None = ()) -> dict[str, str]:
    """The user's attributes from the three sources, merged and checked against the model's attribute list.

    Raises:
        MammoInputError: a bad name/value/word (see :mod:`custom.data.attributes`), two sources contradicting each
        other, or an attribute the model does not read.
    """
    attrs = merge_attributes(("attributes", parse_attribute_string(attributes)), ("prompt", parse_prompt(prompt)),
                             ("attribute_dicom", attributes_from_dicom(attribute_dicom) if attribute_dicom else {}))
    names = check_attribute_names(attribute_names, "attribute_names")
    encode_attributes(attrs, names)  # raises for an attribute the model does not read
    return attrs


def _remove_case(*, image_file: str | None, lesion_mask_file: str | None, lesion_box: Any, breast_mask_file: str | None,
                 image_size: int, normaliser_file: str, max_lesions: int, seeds: list[int], case_id: str,
                 keep_dilation: int, laterality: str | None, extra_inputs: Mapping[str, Any]) -> InferenceCase:
    """The case of ``--mode remove`` (see the module docstring)."""
    from PIL import Image

    from custom.data.conditions import build_conditions
    from custom.data.mask_io import load_mask_file
    from custom.data.prepare import load_display_image
    from custom.transforms.masks import breast_mask

    given = [k for k, v in extra_inputs.items() if v is not None]
    if given:
        raise MammoInputError(given[0], "remove mode takes image_file, lesion_mask_file (or lesion_box) and optionally "
                                        f"breast_mask_file; {', '.join(given)} cannot be used with it")
    if image_file is None:
        raise MammoInputError("image_file", "remove mode needs the source mammogram (--image_file, DICOM or PNG)")
    if (lesion_mask_file is None) == (lesion_box is None):
        raise MammoInputError("lesion_mask_file", "remove mode needs the lesion to remove: give lesion_mask_file or "
                                                  "lesion_box (one of them)")
    path = Path(image_file)
    if not path.is_file():
        raise MammoInputError(path, "image_file not found")
    image, _ = load_display_image(path)
    h, w = image.shape
    if lesion_mask_file is not None:
        lesion = load_mask_file(lesion_mask_file, expected_shape=(h, w)) > 0
        lesion_src = str(lesion_mask_file)
    else:
        from custom.data.conditions import _parse_boxes  # the one box parser of the project

        lesion = np.zeros((h, w), dtype=bool)
        for x0, y0, x1, y1 in _parse_boxes(lesion_box):
            lesion[max(0, int(np.floor(y0))):max(0, int(np.ceil(y1))), max(0, int(np.floor(x0))):max(0, int(np.ceil(x1)))] = True
        lesion_src = "lesion_box"
    if not lesion.any():
        raise MammoInputError(lesion_src, "remove mode needs a lesion in the region, but the lesion mask is empty")
    if breast_mask_file is not None:
        breast = load_mask_file(breast_mask_file, expected_shape=(h, w)) > 0
    else:
        breast = breast_mask(image)
    if not (breast & lesion).any():
        raise MammoInputError(lesion_src, "remove mode needs a lesion in the region, but the lesion lies outside the breast")
    with tempfile.TemporaryDirectory(prefix="mammo_gcdm_remove_") as tmp:
        union = Path(tmp) / "breast.png"
        Image.fromarray(((breast | lesion) * 255).astype(np.uint8)).save(union)
        conditions = build_conditions(image_size=int(image_size), normaliser_file=normaliser_file,
                                      max_lesions=int(max_lesions), breast_mask_file=str(union),
                                      source_image=str(path), laterality=laterality, case_id=str(case_id))
    geom = conditions.geometry
    if geom is not None:
        lesion_model = geom.apply_image(lesion.astype(np.float32)[None], "mask")[0].numpy() > 0
        known = geom.apply_image(image[None].astype(np.float32), "image")[0].numpy()
    else:
        lesion_model, known = lesion, image
    if not lesion_model.any():
        raise MammoInputError(lesion_src, "remove mode needs a lesion in the region, but the lesion vanishes at the "
                                          f"model resolution ({image_size} px)")
    region = keep_region(np.where(lesion_model, 2, 1).astype(np.uint8), keep_dilation)
    conditions.source["mask"]["removed_lesion"] = {"source": Path(lesion_src).name if lesion_mask_file else "lesion_box",
                                                   "pixels_model": int(lesion_model.sum())}
    case = InferenceCase(name=str(case_id), conditions=conditions, seeds=list(seeds), mode="remove",
                         known_image=np.clip(known, 0.0, 1.0).astype(np.float32), region=region,
                         source_dicom=str(path) if _is_dicom(path) else None)
    case.extra["image_file"] = {"name": path.name, "sha256": _sha256(path)}
    case.extra["removed_lesion_model"] = lesion_model
    return case


_MASK_INPUTS = ("mask_file", "breast_mask_file", "lesion_mask_file", "lesion_box")


def _mask_free_case(kwargs: Mapping[str, Any]) -> InferenceCase:
    """A whole mammogram from attributes alone (MAM-E): no breast mask, no lesion; sampled with the mask dropped
    (``case.extra["mask_free"]``), so the network draws the breast shape itself."""
    from custom.data.conditions import Conditions
    size, slots = int(kwargs["image_size"]), int(kwargs["max_lesions"])
    cond = Conditions(case_id=str(kwargs.get("case_id", "synthetic")), label=np.zeros((size, size), dtype=np.uint8),
                      lesion_masks=np.zeros((slots, size, size), dtype=np.float32),
                      features=np.zeros((slots, 67), dtype=np.float32), lesion_present=np.zeros((slots,), dtype=np.float32),
                      geometry=None, source={"mask": {"mode": "none (mask-free: attributes only, mask dropped)"},
                                             "features": {"mode": "none"}, "image_size": size, "max_lesions": slots,
                                             "num_lesions": 0})
    case = InferenceCase(name=cond.case_id, conditions=cond, seeds=_seeds(kwargs.get("seed", 0), kwargs.get("num_samples", 1)))
    case.extra["mask_free"] = True
    return case


#: attributes a shape-bank mask is matched on (the ones a breast outline shows)
SHAPE_ATTRIBUTES = ("view", "laterality", "area")


def shape_bank_mask(bank: str | os.PathLike, attrs: Mapping[str, str], seed: int) -> tuple[np.ndarray, dict[str, Any]]:
    """A breast outline for mask-free generation, drawn from a prepared folder's training masks (``shape_bank``).

    The training entries of ``<bank>/datalist.json`` whose ``view`` / ``laterality`` / breast-area bin equal the
    requested ones (those of :data:`SHAPE_ATTRIBUTES` that ``attrs`` gives; the others are free) are sorted by their
    mask's SHA-256, and ``seed`` picks one. Its label map > 0 is the breast (lesions become breast: a healthy outline).

    Returns:
        ``(breast, record)``: the ``(H, W)`` uint8 breast mask (0/1, the prepared size) and what the sidecar keeps
        (the bank's datalist name, the matched attributes, how many masks matched, the chosen mask's SHA-256; no case
        id, so no source identifier).

    Raises:
        MammoInputError: no datalist in ``bank``, or no training mask with the requested shape attributes.
    """
    from PIL import Image

    check_path_option("shape_bank", bank)
    root = Path(bank)
    path = root / "datalist.json" if root.is_dir() else root
    root = path.parent
    try:
        entries = json.loads(path.read_text()).get("training", [])
    except (OSError, ValueError, AttributeError) as err:
        raise MammoInputError(bank, f"shape_bank: not a prepared folder with a datalist.json ({err})") from None
    wanted = {k: attrs[k] for k in SHAPE_ATTRIBUTES if k in attrs}
    matches = []
    for e in entries:
        if not e.get("label"):
            continue
        own = attributes_from_entry({k: v for k, v in e.items() if k != "source_image"}, root)
        if all(own.get(k) == v for k, v in wanted.items()):
            label_path = root / e["label"]
            digest = hashlib.sha256(label_path.read_bytes()).hexdigest()
            matches.append((digest, label_path))
    if not matches:
        said = ", ".join(f"{k}={v}" for k, v in wanted.items()) or "any shape"
        raise MammoInputError(bank, f"shape_bank: no training mask with {said} in {path.name}")
    matches.sort()
    digest, label_path = matches[int(np.random.default_rng(int(seed)).integers(len(matches)))]
    with Image.open(label_path) as im:
        breast = (np.asarray(im) > 0).astype(np.uint8)
    return breast, {"datalist": path.name, "matched_on": wanted, "candidates": len(matches), "mask_sha256": digest}


def _datalist_entries(datalist: str | os.PathLike | None) -> tuple[dict[str, Mapping[str, Any]], Path | None]:
    """A prepared datalist's entries of every split by ``case_id`` and its folder; ``({}, None)`` when there is no
    datalist and ``({}, folder)`` when it cannot be read (the cases then get only what the user gave)."""
    if datalist is None:
        return {}, None
    path = Path(datalist)
    path = path / "datalist.json" if path.is_dir() else path
    try:
        return datalist_entries(path), path.parent
    except MammoInputError:
        return {}, path.parent


def attach_case_attributes(cases: CaseSet, datalist: str | os.PathLike | None, names: Sequence[str],
                           user: Mapping[str, str] | None = None) -> CaseSet:
    """Give every case its attributes: ``case.extra["attributes"]`` (a datalist case's own attributes among
    ``names`` (:func:`custom.data.attributes.attributes_from_entry`), overridden by ``user``), a sidecar note when a
    requested view contradicts the mask's shape, and, when ``names`` is not empty, ``case.extra["attribute_codes"]``
    ``(K,)`` for the network. Returns ``cases`` (changed in place)."""
    entries, root = _datalist_entries(datalist) if names else ({}, None)
    for case in cases.cases:
        attrs = dict(user or {})
        if case.name in entries:
            own = {k: v for k, v in attributes_from_entry(entries[case.name], root).items() if k in names}
            attrs = {**own, **dict(user or {})}
        case.extra["attributes"] = attrs
        note = None if case.extra.get("mask_free") else view_mask_note(attrs, case.conditions.label)
        if note is not None:  # allowed (the user asked for it), but said in the sidecar
            logger.warning("%s: %s", case.name, note)
            case.extra["notes"] = [note]
        if names:
            case.extra["attribute_codes"] = encode_attributes(attrs, names)
    return cases


def attach_case_lesion_labels(cases: CaseSet, datalist: str | os.PathLike | None, names: Sequence[str],
                              user: Sequence[Mapping[str, str]] | None = None) -> CaseSet:
    """Give every case its per-lesion labels (:mod:`custom.data.lesion_labels`): a datalist case's own findings'
    labels, lesion by lesion overridden by ``user``'s (``--lesion_labels``); ``case.extra["lesion_labels"]`` (one
    dict per lesion, for the sidecar) and, when the model reads lesion labels (``names``),
    ``case.extra["lesion_label_codes"]`` ``(L, K)``. Returns ``cases`` (changed in place).

    Raises:
        MammoInputError: ``lesion_labels``: labels given to a model without lesion labels, for more lesions than a
        case has, or a label the model does not read.
    """
    names = check_lesion_label_names(names)
    user = list(user or [])
    check_lesion_labels_allowed(bool(user), names)
    if not names:
        return cases
    entries, _ = _datalist_entries(datalist)
    for case in cases.cases:
        n = int(case.conditions.num_lesions)
        own: list[dict[str, str]] = []
        if case.name in entries:
            findings = sorted(entries[case.name].get("findings") or [], key=lambda f: int(f.get("lesion_index", 0)))
            own = [{k: v for k, v in labels_from_finding(f, case.name).items() if k in names} for f in findings]
            own = own[: case.conditions.max_lesions]  # lesions beyond the slots get no condition (as training)
        merged = [{**(own[i] if i < len(own) else {}), **(user[i] if i < len(user) else {})}
                  for i in range(max(len(own), len(user)))]
        codes = encode_lesion_labels(merged, names, case.conditions.max_lesions, num_lesions=n)
        case.extra["lesion_label_codes"] = codes
        case.extra["lesion_labels"] = decode_lesion_labels(codes[:n], names)
    return cases


def build_edit_cases(*, mode: str = "generate", attributes: Any = None, prompt: str | None = None,
                     attribute_dicom: str | None = None, attribute_names: Sequence[str] | None = (),
                     shape_bank: str | None = None, lesion_labels: Any = None,
                     lesion_label_names: Sequence[str] | None = (), **kwargs: Any) -> CaseSet:
    """:func:`custom.engines.inference.build_inference_cases` plus attributes and the ``inpaint`` / ``remove`` modes.

    ``kwargs`` are those of ``build_inference_cases``. Each case gets ``case.extra["attributes"]`` (dict) and, when
    the model reads attributes, ``case.extra["attribute_codes"]`` (``(K,)`` int64). ``shape_bank`` (a prepared
    folder; mask-free generation only): instead of letting the network draw the breast with the mask dropped, take a
    breast outline of that folder's training split matching the requested view / laterality / area
    (:func:`shape_bank_mask`) and generate a healthy breast inside it (``case.extra["shape_bank"]``).
    ``lesion_labels`` (``--lesion_labels "birads=5,category=mass; birads=3"``) and the model's ``lesion_label_names``:
    per-lesion labels (:func:`attach_case_lesion_labels`).

    Raises:
        MammoInputError: an unknown mode, bad attributes (see :func:`gather_attributes`), remove mode without a
        lesion, and everything ``build_inference_cases`` rejects.
    """
    mode = str(mode).strip().lower()
    if mode not in EDIT_MODES:
        raise MammoInputError("mode", f"unknown mode {mode!r} (use {', '.join(EDIT_MODES)})")
    names = check_attribute_names(attribute_names, "attribute_names")
    user = gather_attributes(attributes, prompt, attribute_dicom, names)
    user_labels = parse_lesion_labels(lesion_labels)
    label_names = check_lesion_label_names(lesion_label_names)
    check_lesion_labels_allowed(bool(user_labels), label_names)
    if user_labels and mode == "remove":
        raise MammoInputError("lesion_labels", "remove mode generates the no-lesion condition: leave --lesion_labels out")
    if shape_bank is not None and (mode != "generate" or kwargs.get("datalist") is not None
                                   or any(kwargs.get(k) is not None for k in _MASK_INPUTS)):
        raise MammoInputError("shape_bank", "only for a whole mammogram from attributes alone (mode generate, no mask "
                                            "or datalist, --attributes / --prompt); leave it out here")
    if mode == "remove":
        if kwargs.get("datalist") is not None:
            raise MammoInputError(kwargs["datalist"], "remove mode works on one image (image_file + lesion_mask_file), "
                                                      "not on a datalist")
        extra_inputs = {k: kwargs.get(k) for k in ("mask_file", "feature_file", "reference_image", "reference_lesion_mask")}
        case = _remove_case(image_file=kwargs.get("image_file"), lesion_mask_file=kwargs.get("lesion_mask_file"),
                            lesion_box=kwargs.get("lesion_box"), breast_mask_file=kwargs.get("breast_mask_file"),
                            image_size=kwargs["image_size"], normaliser_file=kwargs["normaliser_file"],
                            max_lesions=kwargs["max_lesions"], seeds=_seeds(kwargs.get("seed", 0), kwargs.get("num_samples", 1)),
                            case_id=str(kwargs.get("case_id", "synthetic")), keep_dilation=int(kwargs.get("keep_dilation", 4)),
                            laterality=kwargs.get("laterality"), extra_inputs=extra_inputs)
        for name in ("lesion_category", "lesion_birads"):
            if name in names and name not in user:
                user = {**user, name: "none"}
            elif user.get(name, "none") != "none":
                raise MammoInputError("attributes", f"remove mode generates the no-lesion condition; {name}="
                                                    f"{user[name]} contradicts it")
        cases = CaseSet([case], [], {"mode": "remove", "input": "condition"})
    elif mode == "generate" and kwargs.get("datalist") is None and not any(
            kwargs.get(k) is not None for k in _MASK_INPUTS):
        if not user:
            raise MammoInputError("mask", "no mask given: use mask_file (3-class label map) or breast_mask_file, or "
                                          "generate a whole mammogram from attributes alone with --attributes / --prompt")
        given = [k for k in ("feature_file", "reference_image", "reference_lesion_mask", "image_file")
                 if kwargs.get(k) is not None]
        if given:
            raise MammoInputError(given[0], "mask-free generation (attributes only) takes no lesion features or image")
        if shape_bank is None:
            cases = CaseSet([_mask_free_case(kwargs)], [], {"mode": "generate", "input": "attributes"})
        else:
            from PIL import Image

            breast, record = shape_bank_mask(shape_bank, user, int(_seeds(kwargs.get("seed", 0), 1)[0]))
            with tempfile.TemporaryDirectory(prefix="mammo_gcdm_shape_") as tmp:
                mask_path = Path(tmp) / "breast.png"
                Image.fromarray(breast * 255).save(mask_path)
                cases = build_inference_cases(mode="generate", **{**kwargs, "breast_mask_file": str(mask_path)})
            for case in cases.cases:
                case.extra["shape_bank"] = record
            cases.source["input"] = "attributes + shape bank"
    else:
        cases = build_inference_cases(mode="keep" if mode == "inpaint" else mode, **kwargs)
        if mode == "inpaint":
            for case in cases.cases:
                case.mode = "inpaint"
            cases.source["mode"] = "inpaint"
    attach_case_attributes(cases, kwargs.get("datalist"), names, user)
    if mode != "remove":
        attach_case_lesion_labels(cases, kwargs.get("datalist"), label_names, user_labels)
    return cases


def check_edit_inputs(mode: str, network: nn.Module, attribute_names: Sequence[str] | None = (),
                      info_path: str | os.PathLike | None = None) -> None:
    """Checks needing the network or the model's side file, run before sampling.

    Raises:
        MammoInputError: ``mode``: inpaint mode and a network without the inpainting channels;
        ``attribute_names`` / ``extra_concat_channels``: the side file (``diffusion_info.json`` / ``inpaint_info.json``)
        says the model was trained with other values (the message says which option to pass).
    """
    mode = str(mode).strip().lower()
    if mode == "inpaint" and not has_inpaint_channels(network):
        lc = int(getattr(network, "latent_channels", 0))
        raise MammoInputError("mode", f"inpaint mode needs a model trained with the inpainting channels "
                                      f"(extra_concat_channels={inpaint_channels(lc)}, bundle/configs/train_inpaint.json, "
                                      "used at inference with bundle/configs/inference_inpaint.json); this model has "
                                      f"extra_concat_channels={getattr(network, 'extra_concat_channels', 0)}: use --mode keep")
    names = check_attribute_names(attribute_names, "attribute_names")
    info: dict[str, Any] = {}
    if info_path is not None and Path(info_path).is_file():
        try:
            info = json.loads(Path(info_path).read_text())
        except (OSError, ValueError):
            info = {}
    if "attribute_names" in info and list(info["attribute_names"] or []) != names:
        raise MammoInputError(info_path, f"the model was trained with attribute_names={info['attribute_names']} but the "
                                         f"configuration says {names}: pass --attribute_names \"{info['attribute_names']}\"")
    got = int(getattr(network, "extra_concat_channels", 0))
    if "extra_concat_channels" in info and int(info["extra_concat_channels"]) != got:
        raise MammoInputError(info_path, f"the model was trained with extra_concat_channels={info['extra_concat_channels']} "
                                         f"but the configuration builds {got}: an inpainting model needs "
                                         "bundle/configs/inference_inpaint.json")


class EditPrepareBatch(GCDMInferencePrepareBatch):
    """:class:`~custom.engines.inference.GCDMInferencePrepareBatch` plus ``attributes`` ``(R, K)`` (when the cases
    carry attribute codes) and ``edit_mode`` (the cases' mode)."""

    def __call__(self, batchdata: Mapping[str, Any], device: str | torch.device | None = None, non_blocking: bool = False,
                 **kwargs: Any) -> tuple[torch.Tensor, None, tuple, dict[str, Any]]:
        label, target, args, out = super().__call__(batchdata, device, non_blocking, **kwargs)
        cases = batchdata["case"]
        modes = {c.mode for c in cases}
        if len(modes) > 1:
            raise ValueError(f"EditPrepareBatch: cases of different modes in one batch: {sorted(modes)}")
        out["edit_mode"] = modes.pop() if modes else "generate"
        if any(c.extra.get("mask_free") for c in cases):
            if not all(c.extra.get("mask_free") for c in cases):
                raise ValueError("EditPrepareBatch: mask-free and masked cases in one batch")
            out["mask_free"] = True
        if any("attribute_codes" in c.extra for c in cases):
            rows = [torch.as_tensor(c.extra["attribute_codes"], dtype=torch.long) for c in cases for _ in c.seeds]
            out["attributes"] = torch.stack(rows).to(device=device)
        return label, target, args, out


class EditSamplingInferer(GCDMSamplingInferer):
    """:class:`~custom.engines.inference.GCDMSamplingInferer` with the ``inpaint`` and ``remove`` modes and the
    attribute tokens (arguments as the parent).

    ``inferer(label, network, ..., edit_mode=..., attributes=(R, K) codes)``:

    * a network with attribute tokens and no ``attributes`` gets all attributes "not given" (null tokens);
    * a network with the inpainting channels generating a whole image gets region = everything, blank image;
    * ``inpaint``, and ``remove`` with an inpainting network: the channels of :func:`inpaint_concat`, plain DDIM
      (with ``keep_resample`` > 1: each step redone that many times, re-noised in between), then paste-back;
      ``keep``, and ``remove`` without: the parent's RePaint path.
    """

    @torch.no_grad()
    def __call__(self, inputs: torch.Tensor, network: nn.Module, *args: Any, edit_mode: str | None = None,
                 attributes: torch.Tensor | None = None, known_image: torch.Tensor | None = None,
                 region: torch.Tensor | None = None, mask_free: bool = False, **kwargs: Any) -> torch.Tensor:
        label = torch.as_tensor(inputs).float()
        label = label.as_tensor() if hasattr(label, "as_tensor") else label
        if label.ndim == 3:
            label = label[None]
        r = label.shape[0]
        names = tuple(getattr(network, "attribute_names", ()) or ())
        if names:
            k = len(names)
            if attributes is None:
                attributes = torch.full((r, k), -1, dtype=torch.long)
            kwargs["attributes"] = attributes.to(label.device)
        elif attributes is not None:
            raise MammoInputError("attributes", "the model was trained without attributes")
        elif self.attribute_guidance is not None:
            raise MammoInputError("attribute_guidance", "the model was trained without attributes: nothing to guide")
        if mask_free:
            network = MaskDropped(network)
        mode = (edit_mode or ("keep" if known_image is not None else "generate")).lower()
        inpaint_net = has_inpaint_channels(network)
        if mode == "inpaint" and not inpaint_net:
            raise MammoInputError("mode", "inpaint mode needs a model trained with the inpainting channels "
                                          "(train_inpaint.json); use --mode keep")
        if not inpaint_net or mode == "keep":
            if inpaint_net:  # keep (RePaint) with an inpainting model: its channels say "generate everything"
                kwargs["extra_concat"] = inpaint_concat(self.encoder, torch.zeros_like(label), torch.ones_like(label))
            return super().__call__(label, network, *args, known_image=known_image, region=region, **kwargs)
        if known_image is None:  # whole-image generation with an inpainting model
            full = torch.ones_like(label)
            kwargs["extra_concat"] = inpaint_concat(self.encoder, torch.zeros_like(label), full)
            return super().__call__(label, network, *args, **kwargs)
        known = known_image.float().to(label.device)
        reg = region.float().to(label.device)
        kwargs["extra_concat"] = inpaint_concat(self.encoder, known, reg)
        img = super().__call__(label, network, *args, resample=self.resample, **kwargs)
        return self.paste(img, known, reg)


class MaskDropped(nn.Module):
    """Wrap a GCDM network so that every call drops the mask (``drop_mask = True``; the features' drop flag is
    kept): the conditional branch of CFG then sees "no mask" + the given attributes, the unconditional branch drops
    everything as usual. Used for mask-free generation."""

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network
        for name in ("latent_channels", "max_lesions", "extra_concat_channels", "token_sources", "conditioner",
                     "attribute_names", "time_attributes", "lesion_label_names"):
            if hasattr(network, name):
                object.__setattr__(self, name, getattr(network, name))
        if callable(getattr(network, "context", None)):  # so a sampler computes the context once per run
            object.__setattr__(self, "context", self._context)

    def _context(self, features: torch.Tensor, *args: Any, drop_mask: torch.Tensor | None = None,
                 **kwargs: Any) -> torch.Tensor:
        """The wrapped network's ``context`` with the mask dropped for every row (as :meth:`forward` does)."""
        drop = torch.ones(features.shape[0], dtype=torch.bool, device=features.device)
        return self.network.context(features, *args, drop_mask=drop, **kwargs)

    def forward(self, *args: Any, drop_mask: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
        x = args[0]
        return self.network(*args, drop_mask=torch.ones(x.shape[0], dtype=torch.bool, device=x.device), **kwargs)

    def train(self, mode: bool = True) -> "MaskDropped":
        self.network.train(mode)
        return super().train(mode)


class EditSampleWriter(SampleWriter):
    """:class:`~custom.engines.inference.SampleWriter` that also records, per case, the attributes, the per-lesion
    labels, the edit mode's region and mechanism in the sidecar parameters (arguments as the parent; every case of a
    batch its own)."""

    def case_parameters(self, engine: Any, case: Any) -> dict[str, Any]:
        extra: dict[str, Any] = {}
        if case.extra.get("attributes"):
            extra["attributes"] = dict(case.extra["attributes"])
        if case.extra.get("lesion_labels"):
            extra["lesion_labels"] = [dict(d) for d in case.extra["lesion_labels"]]
        if case.extra.get("notes"):
            extra["notes"] = list(case.extra["notes"])
        if case.extra.get("shape_bank"):
            extra["shape_bank"] = dict(case.extra["shape_bank"])
        if case.mode in ("inpaint", "remove"):
            net = getattr(engine, "network", None)
            extra["edit"] = {"mode": case.mode, "region_pixels": int(np.asarray(case.region).sum()),
                             "mechanism": "inpaint" if net is not None and has_inpaint_channels(net) else "keep",
                             "image_file": case.extra.get("image_file")}
        return extra
