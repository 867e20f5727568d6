"""The edit study of issue 11, as one rerunnable command: trained inpainting vs keep mode, lesion removal against the
phantom's lesion-free truth, attribute fidelity of attribute-conditioned generation, and the figures.

Run (``make edit-study`` runs it on the prepared phantom and ``bundle/models``)::

    python -m custom.engines.edit_study --prepared_dir data/prepared --phantom_dir data/phantom \\
        --ckpt_dir bundle/models --output runs/edit_study [--max_cases 8] [--ddim_steps 20]

``--ckpt_dir`` holds what training writes there: ``autoencoder.pt``, ``model.pt`` (the default-style model; for the
attribute table it must read ``view`` and ``density``: ``attribute_names`` in its training config),
``model_inpaint.pt`` (``train_inpaint.json``), ``segmenter.pt`` (``train_segmenter.json``) and
``feature_normalisation.json``. The phantom folder gives each test image's source DICOM, its annotated lesion box
(``finding_annotations.csv``) and its lesion-free truth (``lesion_free/``).

Steps (each through the bundle's own ``inference`` workflow, ``python -m monai.bundle run inference``):

1. Cases: the first ``--max_cases`` test images with a lesion; for each, its first annotated box and its own 67
   features.
2. Keep vs inpaint: the lesion is inserted into the box by ``--mode keep`` (default model, RePaint) and by
   ``--mode inpaint`` (inpainting model). Measured at model resolution in the prepared frame:
   *FD-radiomics67* (the Fréchet distance over the project's 67 radiomic features, z-scored with the real set,
   :func:`custom.metrics.radiomics_distance.frechet_radiomics_distance`; not the published FRD) between the inserted lesions and the
   real lesions of the same images; *Mass IoU* of the segmenter's lesion inside the edited region against the
   requested lesion, pooled over cases (ceiling: the segmenter on the real images against their lesion masks, same
   regions); *seam score* (:func:`custom.metrics.fidelity.seam_score`: mean intensity jump across the region
   boundary, minus the same ring's jump in the real image).
3. Removal: ``--mode remove`` with the box, by the keep mechanism (default model) and the inpainting mechanism.
   *Error* to the phantom's lesion-free truth in the lesion box against the lesion's own *contrast* (what the
   lesion added to the truth), :func:`custom.metrics.fidelity.removal_error`; the segmenter's lesion pixels in the
   box before and after, and how many boxes it still "finds" a lesion in (>= 25 % of the box predicted lesion); the
   seam excess of the removed region against the truth's jump over the same boundary. ``--remove_resample U``
   runs removal with RePaint resampling (inference's ``keep_resample``); ``--blend feather|poisson`` pastes every
   edit (insertion and removal) back that way (inference's ``keep_blend``; default: inference's, poisson). Two
   references for the error, since a generative fill can only give *a* plausible tissue, not the hidden one: the *ring-mean fill* (the region set
   to the mean of the source's 3-pixel ring around it, :func:`custom.metrics.fidelity.ring_fill`) and the
   *lesion-free texture sibling* (the phantom's lesion-free truth with an independent parenchymal texture, written
   as DICOM and read the same way, pasted into the region; texture seeds ``SIBLING_SEEDS``, averaged:
   :func:`custom.metrics.diversity_reference.write_lesion_free_sibling`).
4. Attribute fidelity (the GBCI reconstruction loop): whole mammograms from attributes alone (mask-free), every
   ``view`` x ``density`` combination, ``--samples_per_attribute`` seeds each; the attribute classifier
   (:mod:`custom.metrics.attribute_classifier`, trained on the prepared training split when ``--classifier`` is not
   given) predicts view and density; accuracy per attribute next to its accuracy on the real test images (ceiling).
   ``--shape_bank P``: these runs (and the healthy figure) take breast outlines from ``P``'s training split
   (inference's ``shape_bank``); ``--attribute_guidance s_a``: the attributes' own guidance scale. The dense-fraction
   reader also checks density with the breast given (``--density_masks`` test masks, each generated at A-D).
5. Figures: a healthy MLO high-density mammogram from the prompt "a mammogram in MLO view with high density"; a
   lesion inpainted and a lesion removed (source | result | difference [| lesion-free truth]).

Writes ``<output>/results.json``, ``<output>/results.md`` (the tables), ``<output>/edit_study.png`` (+ one PNG per
figure) and the generated samples under ``<output>/samples/``. Bad input (a missing folder or model file, a model
that cannot do a step) is one ``ERROR: <file or option>: <reason>`` line before any sampling, nothing written.
Phantom figures say the method works on phantom data; they are not comparable to published figures.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.bundle import ConfigParser, run
from PIL import Image

from custom.data.attributes import parse_prompt
from custom.data.prepare import load_display_image
from custom.engines.edit import build_edit_cases
from custom.engines.inference import check_blend
from custom.errors import MammoInputError
from custom.features import FEATURE_NAMES, extract_lesion_features
from custom.metrics.attribute_classifier import (
    HEADS,
    DensityReader,
    attribute_fidelity,
    dense_fraction,
    items_from_prepared,
    load_classifier,
    load_images,
    save_classifier,
    train_attribute_classifier,
)
from custom.errors import option_float, option_int
from custom.metrics.diversity_reference import write_lesion_free_sibling
from custom.metrics.fidelity import attribute_accuracy, removal_error, ring_fill, seam_score
from custom.metrics.radiomics_distance import DEFAULT_PARAMS_FILE, frechet_radiomics_distance
from custom.metrics.segmenter import load_segmenter, predict_lesion
from custom.transforms.geometry import MammoGeometry

__all__ = ["study_cases", "run_edit_study", "format_tables", "main"]

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "bundle" / "configs"
#: prompt of the healthy-mammogram figure
HEALTHY_PROMPT = "a mammogram in MLO view with high density"
#: a removed box where the segmenter still predicts at least this fraction of lesion pixels "finds" a lesion
FOUND_FRACTION = 0.25
#: texture seeds of the lesion-free siblings (the "plausible tissue" reference of removal)
SIBLING_SEEDS = (1000, 1001)
#: ring width (pixels, model frame) of the ring-mean fill reference
RING_WIDTH = 3
PHANTOM_NOTE = "phantom data, not comparable to published figures"


# ------------------------------------------------------------------------------------------------------------ inputs
def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise MammoInputError(path, f"unreadable ({err})") from None


def study_cases(prepared_dir: str | Path, phantom_dir: str | Path, max_cases: int, split: str = "test") -> list[dict[str, Any]]:
    """The test images with a lesion: ``[{"case_id", "study_id", "dicom", "truth", "box": "x0,y0,x1,y1",
    "features": [feature rows of its lesions], "entry"}]`` (first ``max_cases`` in datalist order).

    Raises:
        MammoInputError: a missing datalist / annotation file / source DICOM / lesion-free truth, or no case.
    """
    prepared, phantom = Path(prepared_dir), Path(phantom_dir)
    datalist = _read_json(prepared / "datalist.json")
    ann_path = phantom / "finding_annotations.csv"
    if not ann_path.is_file():
        raise MammoInputError(ann_path, "not found: --phantom_dir must be the phantom dataset the data was prepared from")
    boxes: dict[str, list[float]] = {}
    with open(ann_path, newline="") as f:
        for row in csv.DictReader(f):
            if row.get("xmin") and row["image_id"] not in boxes:
                boxes[row["image_id"]] = [float(row[k]) for k in ("xmin", "ymin", "xmax", "ymax")]
    feats: dict[str, list[dict[str, str]]] = {}
    with open(prepared / "features.csv", newline="") as f:
        for row in csv.DictReader(f):
            feats.setdefault(row["case_id"], []).append(row)
    out = []
    for e in datalist.get(split, []):
        cid = str(e["case_id"])
        if int(e.get("num_lesions", 0)) < 1 or cid not in boxes or cid not in feats:
            continue
        study = str(e.get("study_id"))
        dicom, truth = phantom / "images" / study / f"{cid}.dicom", phantom / "lesion_free" / study / f"{cid}.dicom"
        for p, what in ((dicom, "source DICOM"), (truth, "lesion-free truth")):
            if not p.is_file():
                raise MammoInputError(p, f"{what} of test case {cid} not found (phantom >= 1.1.0 writes lesion_free/)")
        out.append({"case_id": cid, "study_id": study, "dicom": str(dicom), "truth": str(truth),
                    "box": ",".join(f"{v:g}" for v in boxes[cid]), "features": feats[cid], "entry": e})
        if len(out) >= int(max_cases):
            break
    if not out:
        raise MammoInputError(prepared / "datalist.json", f"no {split} image with an annotated lesion")
    return out


def _check_models(ckpt_dir: Path, segmenter: Path) -> None:
    for name, how in (("autoencoder.pt", "train_autoencoder.json"), ("model.pt", "train_diffusion.json"),
                      ("model_inpaint.pt", "train_inpaint.json"), ("feature_normalisation.json", "prepare")):
        if not (ckpt_dir / name).is_file():
            raise MammoInputError(ckpt_dir / name, f"not found: the study needs it ({how})")
    if not segmenter.is_file():
        raise MammoInputError(segmenter, "lesion segmenter not found (train_segmenter.json, make train-segmenter)")


def _model_attribute_names(ckpt_dir: Path, extra_configs: Sequence[str]) -> list[str]:
    """Attribute names the default model reads (its checkpoint's record, as inference sees them)."""
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / "inference.json"), *extra_configs])
    parser["ckpt_dir"] = str(ckpt_dir)
    parser["bundle_root"] = str(REPO / "bundle")  # a bare parser: name the bundle (a workflow run does this itself)
    return list(parser.get_parsed_content("attribute_names") or [])


# ------------------------------------------------------------------------------------------------------------ helpers
def _infer(configs: Sequence[str], ckpt_dir: Path, out: Path, ddim_steps: int, **kw: Any) -> dict[str, Any]:
    """One run of the bundle's inference workflow; returns the single sample's sidecar (+ ``"png"``)."""
    run("inference", config_file=list(configs), meta_file=str(CONFIGS / "metadata.json"), logging_file=False,
        ckpt_dir=str(ckpt_dir), ddim_steps=int(ddim_steps), progress=False, map_to_source=False, formats=["png"],
        output_dir=str(out), **kw)
    name = f"{kw['case_id']}_seed{kw.get('seed', 0)}"
    side = _read_json(out / f"{name}.json")
    side["png"] = str(out / f"{name}.png")
    return side


def _png(path: str | Path) -> np.ndarray:
    with Image.open(path) as im:
        arr = np.asarray(im)
    return arr.astype(np.float64) / float(np.iinfo(arr.dtype).max)


def _model_frame(side: Mapping[str, Any], dicom: str) -> np.ndarray:
    """A source DICOM's display image in the model frame of a sample (its sidecar's geometry), [0, 1]."""
    display, _ = load_display_image(dicom)
    geometry = MammoGeometry.from_dict(side["conditions"]["geometry"])
    return geometry.apply_image(display[None], "image")[0].numpy().clip(0.0, 1.0).astype(np.float64)


def _rebuild(mode: str, side: Mapping[str, Any], case: Mapping[str, Any], feature_file: str | None, normaliser: str,
             names: Sequence[str]) -> Any:
    """The inference case again (the region, the requested lesion in the model frame), from the sample's sidecar."""
    params = side["parameters"]
    kw = dict(mode=mode, image_size=int(side["conditions"]["image_size"]), normaliser_file=normaliser,
              max_lesions=int(side["conditions"]["max_lesions"]), image_file=case["dicom"],
              keep_dilation=int(params["keep_dilation_px"]), attribute_names=list(names))
    if mode == "remove":
        kw["lesion_box"] = case["box"]
    else:
        kw.update(lesion_box=case["box"], feature_file=feature_file)
    return build_edit_cases(**kw).cases[0]


def _resize(arr: np.ndarray, size: int, nearest: bool = False) -> np.ndarray:
    if arr.shape == (size, size):
        return arr
    if nearest:
        return np.asarray(Image.fromarray(arr.astype(np.uint8)).resize((size, size), Image.NEAREST))
    return np.asarray(Image.fromarray(arr.astype(np.float32)).resize((size, size), Image.BOX), dtype=np.float64)


def _lesion_features(image: np.ndarray, mask: np.ndarray, params: str | None) -> list[float] | None:
    try:
        f = extract_lesion_features(np.clip(image, 0.0, 1.0), mask, params or DEFAULT_PARAMS_FILE)
    except Exception:  # noqa: BLE001 - PyRadiomics rejects some regions (flat, too small): counted as failed
        return None
    return [float(f[n]) for n in FEATURE_NAMES]


def _nan_mean(values: Sequence[float]) -> float | None:
    v = [x for x in values if x is not None and np.isfinite(x)]
    return float(np.mean(v)) if v else None


# ------------------------------------------------------------------------------------------------------------ study
def run_edit_study(prepared_dir: str, phantom_dir: str, ckpt_dir: str, output: str, max_cases: int = 8,
                   ddim_steps: int = 20, samples_per_attribute: int = 2, seed: int = 0,
                   segmenter: str | None = None, classifier: str | None = None, classifier_epochs: int = 30,
                   extra_configs: Sequence[str] = (), params_file: str | None = None,
                   remove_resample: int = 1, blend: str | None = None, density_masks: int = 8,
                   attribute_guidance: float | None = None, shape_bank: str | None = None) -> dict[str, Any]:
    """Run the study (see the module docstring) and write its files; returns the results dict."""
    start = time.time()
    remove_resample = option_int("remove_resample", remove_resample, 1, 100)
    blend_opt = {} if blend is None else {"keep_blend": check_blend(blend)}  # None: inference's default
    blend = check_blend(blend)
    density_masks = option_int("density_masks", density_masks, 0, 10**4)
    ag_opt = {} if attribute_guidance is None else {
        "attribute_guidance": option_float("attribute_guidance", attribute_guidance, 0.0, 100.0)}
    bank_opt = {} if shape_bank is None else {"shape_bank": str(shape_bank)}  # the mask-free runs take outlines
    prepared, ckpt, out = Path(prepared_dir), Path(ckpt_dir), Path(output)
    seg_path = Path(segmenter) if segmenter else ckpt / "segmenter.pt"
    if classifier is not None and not Path(classifier).is_file():
        raise MammoInputError(classifier, "attribute classifier not found (leave --classifier out to train one)")
    if int(max_cases) < 2:
        raise MammoInputError("max_cases", f"the Fréchet distance needs at least 2 lesions, got {max_cases}")
    for key, value in (("ddim_steps", ddim_steps), ("samples_per_attribute", samples_per_attribute)):
        if int(value) < 1:
            raise MammoInputError(key, f"must be >= 1, got {value}")
    _check_models(ckpt, seg_path)
    cases = study_cases(prepared, phantom_dir, max_cases)
    extra = [str(c) for c in extra_configs]
    names = _model_attribute_names(ckpt, extra)
    default_cfg = [str(CONFIGS / "inference.json"), *extra]
    inpaint_cfg = [str(CONFIGS / "inference.json"), str(CONFIGS / "inference_inpaint.json"), *extra]
    normaliser = str(ckpt / "feature_normalisation.json")
    seg = load_segmenter(seg_path)
    samples = out / "samples"
    samples.mkdir(parents=True, exist_ok=True)

    # 2. keep vs inpaint ------------------------------------------------------------------------------------
    per_mode: dict[str, dict[str, list]] = {m: {"gen_feats": [], "inter": [], "union": [], "seam": [], "real_jump": [],
                                                "jump": [], "failed": []} for m in ("keep", "inpaint")}
    real_feats: list[list[float]] = []
    real_iou = {"inter": 0, "union": 0}
    fig: dict[str, Any] = {}
    for i, case in enumerate(cases):
        feature_file = samples / f"{case['case_id']}_features.csv"
        with open(feature_file, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(case["features"][0]))
            w.writeheader()
            w.writerow(case["features"][0])  # the lesion of the first box: one slot
        for mode, configs in (("keep", default_cfg), ("inpaint", inpaint_cfg)):
            side = _infer(configs, ckpt, samples / mode, ddim_steps, mode=mode, image_file=case["dicom"],
                          lesion_box=case["box"], feature_file=str(feature_file), case_id=f"c{i}", seed=seed,
                          **blend_opt)
            rec = _rebuild("keep", side, case, str(feature_file), normaliser, [])
            region = np.asarray(rec.region, dtype=bool)
            lesion = np.asarray(rec.conditions.label) == 2
            known = _model_frame(side, case["dicom"])
            gen = _png(side["png"])
            s = seam_score(gen, region, known)
            r = per_mode[mode]
            r["jump"].append(s["jump"])
            r["real_jump"].append(s["real_jump"])
            r["seam"].append(s["seam_excess"])
            pred = predict_lesion(seg, torch.from_numpy(gen[None, None]).float())[0].numpy() & region
            r["inter"].append(int((pred & lesion).sum()))
            r["union"].append(int((pred | lesion).sum()))
            f_gen = _lesion_features(gen, lesion, params_file)
            (r["gen_feats"] if f_gen is not None else r["failed"]).append(f_gen)
            if i == 0:
                fig[mode] = (known, gen)
        # the real lesion of the same image, the ceiling of the segmenter (prepared image at model size)
        size = gen.shape[0]
        image = _resize(_png(prepared / case["entry"]["image"]), size)
        with Image.open(prepared / case["entry"]["lesions"]) as im:  # instance map: 1 = the first annotated lesion
            instances = np.asarray(im)
        les = _resize((instances == 1).astype(np.uint8), size, nearest=True) > 0
        f_real = _lesion_features(image, les, params_file)
        if f_real is not None:
            real_feats.append(f_real)
        pred = predict_lesion(seg, torch.from_numpy(image[None, None]).float())[0].numpy() & region
        real_iou["inter"] += int((pred & les & region).sum())
        real_iou["union"] += int((pred | (les & region)).sum())
    keep_inpaint = {}
    for mode, r in per_mode.items():
        fd = (frechet_radiomics_distance(real_feats, r["gen_feats"]) if len(real_feats) >= 2 and len(r["gen_feats"]) >= 2
              else None)
        keep_inpaint[mode] = {
            "fd_radiomics67": fd, "n_lesions": len(r["gen_feats"]), "n_failed_features": len(r["failed"]),
            "mass_iou": sum(r["inter"]) / sum(r["union"]) if sum(r["union"]) else None,
            "seam_jump": _nan_mean(r["jump"]), "real_jump": _nan_mean(r["real_jump"]), "seam_excess": _nan_mean(r["seam"]),
        }
    keep_inpaint["real"] = {"mass_iou": real_iou["inter"] / real_iou["union"] if real_iou["union"] else None,
                            "n_lesions": len(real_feats)}

    # 3. removal ------------------------------------------------------------------------------------------------
    removal: dict[str, Any] = {}
    refs: dict[str, list[dict[str, float]]] = {"ring_fill": [], "sibling": []}
    for mech, configs in (("keep", default_cfg), ("inpaint", inpaint_cfg)):
        rows = []
        for i, case in enumerate(cases):
            side = _infer(configs, ckpt, samples / f"remove_{mech}", ddim_steps, mode="remove", image_file=case["dicom"],
                          lesion_box=case["box"], case_id=f"r{i}", seed=seed, keep_resample=remove_resample,
                          **blend_opt)
            rec = _rebuild("remove", side, case, None, normaliser, [])
            box = np.asarray(rec.extra["removed_lesion_model"], dtype=bool)
            region = np.asarray(rec.region, dtype=bool)
            known = _model_frame(side, case["dicom"])
            truth = _model_frame(side, case["truth"])
            gen = _png(side["png"])
            err = removal_error(gen, truth, known, box)
            pred = predict_lesion(seg, torch.from_numpy(np.stack([known, gen])[:, None]).float()).numpy()
            before, after = float(pred[0][box].mean()), float(pred[1][box].mean())
            rows.append({**err, "lesion_fraction_before": before, "lesion_fraction_after": after,
                         "seam_excess": seam_score(gen, region, truth)["seam_excess"],
                         "mechanism": side["parameters"]["edit"]["mechanism"]})
            if mech == "keep":  # the references (mechanism-independent): once per case
                breast = np.asarray(rec.conditions.label) > 0
                flat = ring_fill(known, region, RING_WIDTH, breast)
                refs["ring_fill"].append({**removal_error(flat, truth, known, box),
                                          "seam_excess": seam_score(flat, region, truth)["seam_excess"]})
                sib_rows = []
                for k in SIBLING_SEEDS:
                    path = write_lesion_free_sibling(case["dicom"], k, samples / "siblings" / f"r{i}_texture{k}.dicom")
                    paste = np.where(region, _model_frame(side, str(path)), known)
                    sib_rows.append({**removal_error(paste, truth, known, box),
                                     "seam_excess": seam_score(paste, region, truth)["seam_excess"]})
                refs["sibling"].append({m: float(np.mean([r[m] for r in sib_rows])) for m in sib_rows[0]})
            if i == 0 and mech == "inpaint":
                fig["remove"] = (known, gen, truth)
        removal[mech] = {
            "error": _nan_mean([r["error"] for r in rows]), "contrast": _nan_mean([r["contrast"] for r in rows]),
            "ratio": _nan_mean([r["ratio"] for r in rows]),
            "lesion_fraction_before": _nan_mean([r["lesion_fraction_before"] for r in rows]),
            "lesion_fraction_after": _nan_mean([r["lesion_fraction_after"] for r in rows]),
            "found_before": sum(r["lesion_fraction_before"] >= FOUND_FRACTION for r in rows),
            "found_after": sum(r["lesion_fraction_after"] >= FOUND_FRACTION for r in rows),
            "seam_excess": _nan_mean([r["seam_excess"] for r in rows]), "resample": remove_resample,
            "n": len(rows), "mechanism": sorted({r["mechanism"] for r in rows}), "per_case": rows,
        }

    # 4. attribute fidelity ----------------------------------------------------------------------------------
    attribute: dict[str, Any]
    asked = [n for n in ("view", "density") if n in names]
    if classifier is not None:
        clf = load_classifier(classifier)
        clf_source = str(classifier)
    else:
        items = items_from_prepared(prepared, "training")
        size = 64
        clf = train_attribute_classifier(load_images([it["image"] for it in items], size),
                                         [it["attributes"] for it in items], epochs=classifier_epochs, seed=seed)
        save_classifier(clf, out / "attribute_classifier.pt")
        clf_source = f"trained here on the {len(items)} training images ({classifier_epochs} epochs)"
    if asked:
        gen_paths, requested = [], []
        for view in HEADS["view"]:
            for density in HEADS["density"]:
                attrs = {"view": view, "density": density}
                attrs = {k: v for k, v in attrs.items() if k in asked}
                text = ",".join(f"{k}={v}" for k, v in attrs.items())
                for k in range(int(samples_per_attribute)):
                    cid = f"a_{view}_{density}"
                    side = _infer(default_cfg, ckpt, samples / "attributes", ddim_steps, mode="generate",
                                  attributes=text, case_id=cid, seed=seed + k, **ag_opt, **bank_opt)
                    gen_paths.append(side["png"])
                    requested.append(attrs)
                if len(asked) == 1 and "view" in asked:
                    break
        real = items_from_prepared(prepared, "test")
        size = int(clf.config["image_size"])
        acc = attribute_fidelity(clf, load_images(gen_paths, size), requested,
                                 load_images([it["image"] for it in real], size), [it["attributes"] for it in real])
        attribute = {"accuracy": acc, "n_generated": len(gen_paths), "n_real": len(real), "attributes": list(asked),
                     "classifier": clf_source}
        reader = None
        if "density" in asked:  # the classical check beside the CNN: dense-tissue fraction, thresholds from training
            model_size = int(side["conditions"]["image_size"])
            try:
                reader, fit_on = DensityReader.fit_prepared(prepared, model_size)
            except ValueError as err:  # e.g. a density class missing from a small training split
                attribute["density_reader"] = {"skipped": str(err)}
        if "density" in asked and reader is not None:
            gen_read = reader.read_images(load_images(gen_paths, model_size))
            real_read = reader.read_images(load_images([it["image"] for it in real], model_size))
            key = "density_reader"
            acc["generated"].update(attribute_accuracy([{key: r["density"]} if "density" in r else {} for r in requested],
                                                       [{key: v} for v in gen_read]))
            acc["real"].update(attribute_accuracy([{key: it["attributes"]["density"]} if "density" in it["attributes"]
                                                   else {} for it in real], [{key: v} for v in real_read]))
            attribute["attributes"].append(key)
            attribute["density_reader"] = {"thresholds": reader.thresholds, "fit_on": fit_on,
                                           "image_size": model_size,
                                           "generated_read": {str(k): int(v) for k, v in zip(*np.unique(gen_read, return_counts=True))}}
            attribute["density_with_mask"] = _density_with_mask(
                prepared, density_masks, samples / "density_masks", default_cfg, ckpt, ddim_steps, seed, reader,
                model_size, with_view="view" in asked, **ag_opt)
    else:
        attribute = {"skipped": f"the default model reads no view/density attributes (it reads: {names or 'none'})",
                     "classifier": clf_source}

    # 5. figures -------------------------------------------------------------------------------------------------
    healthy = []
    if "view" in names or "density" in names:
        prompt_attrs = parse_prompt(HEALTHY_PROMPT)
        prompt = HEALTHY_PROMPT if set(prompt_attrs) <= set(names) else None
        attrs_text = None if prompt else ",".join(f"{k}={v}" for k, v in prompt_attrs.items() if k in names)
        for k in range(3):
            side = _infer(default_cfg, ckpt, samples / "healthy", ddim_steps, mode="generate", prompt=prompt,
                          attributes=attrs_text, case_id="healthy_mlo_high_density", seed=seed + k, **ag_opt,
                          **bank_opt)
            healthy.append(_png(side["png"]))
    how = ", ".join(([f"attribute guidance {ag_opt['attribute_guidance']:g}"] if ag_opt else [])
                    + (["breast outline from the shape bank"] if bank_opt else []))
    how = f"\n(top row: {how})" if how else ""
    figures = _figures(out, healthy, fig, how)

    results = {
        "note": PHANTOM_NOTE,
        "settings": {"prepared_dir": str(prepared), "phantom_dir": str(phantom_dir), "ckpt_dir": str(ckpt),
                     "max_cases": int(max_cases), "n_cases": len(cases), "ddim_steps": int(ddim_steps), "seed": int(seed),
                     "samples_per_attribute": int(samples_per_attribute), "attribute_names": names,
                     "remove_resample": remove_resample, "blend": blend, "density_masks": density_masks,
                     "attribute_guidance": ag_opt.get("attribute_guidance"), "shape_bank": shape_bank,
                     "sibling_texture_seeds": list(SIBLING_SEEDS),
                     "ring_width": RING_WIDTH,
                     "segmenter": str(seg_path), "found_fraction": FOUND_FRACTION, "healthy_prompt": HEALTHY_PROMPT},
        "keep_vs_inpaint": keep_inpaint,
        "removal": removal,
        "removal_reference": {name: {"error": _nan_mean([r["error"] for r in rows]),
                                     "contrast": _nan_mean([r["contrast"] for r in rows]),
                                     "ratio": _nan_mean([r["ratio"] for r in rows]),
                                     "seam_excess": _nan_mean([r["seam_excess"] for r in rows]), "n": len(rows),
                                     "per_case": rows} for name, rows in refs.items()},
        "attribute_fidelity": attribute,
        "figures": figures,
        "seconds": round(time.time() - start, 1),
    }
    (out / "results.json").write_text(json.dumps(results, indent=2, default=float) + "\n")
    (out / "results.md").write_text(format_tables(results))
    return results


def _density_with_mask(prepared: Path, n_masks: int, out: Path, configs: Sequence[str], ckpt: Path, ddim_steps: int,
                       seed: int, reader: DensityReader, model_size: int, with_view: bool,
                       **infer_options: Any) -> dict[str, Any]:
    """Density control with the breast given (the issue's healthy generation (a)): the breast masks of the first
    ``n_masks`` test images (label map > 0, lesions counted as breast), each generated healthy at every density A-D
    (same seed, and the image's own view when the model reads view), read by the dense-fraction ``reader`` at the
    model size. A paired design: per mask only the requested density changes. Returns the accuracy, the mean
    fraction per requested class, the Spearman correlation between requested class and fraction, and the real
    images' own reading for the same masks."""
    from scipy.stats import spearmanr

    from custom.data.attributes import attributes_from_entry

    entries = json.loads((prepared / "datalist.json").read_text()).get("test", [])[: int(n_masks)]
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for item in entries:
        attrs = attributes_from_entry({k: v for k, v in item.items() if k not in ("label", "source_image")})
        with Image.open(prepared / item["label"]) as im:
            breast = (np.asarray(im) > 0).astype(np.uint8) * 255
        mask_path = out / f"{item['case_id']}_breast.png"
        Image.fromarray(breast).save(mask_path)
        real_fr = dense_fraction(load_images([str(prepared / item["image"])], model_size)[0, 0].numpy())
        for density in HEADS["density"]:
            text = f"density={density}" + (f",view={attrs['view']}" if with_view and attrs.get("view") else "")
            cid = f"d_{item['case_id'][:12]}_{density}"
            side = _infer(configs, ckpt, out, ddim_steps, mode="generate", breast_mask_file=str(mask_path),
                          attributes=text, case_id=cid, seed=seed, **infer_options)
            fr = dense_fraction(_png(side["png"]))
            rows.append({"case_id": item["case_id"], "requested": density, "fraction": fr, "read": reader.read([fr])[0],
                         "real_density": attrs.get("density"), "real_fraction": real_fr,
                         "real_read": reader.read([real_fr])[0]})
    if not rows:
        return {"n": 0}
    order = {c: k for k, c in enumerate(HEADS["density"])}
    ok = [r for r in rows if np.isfinite(r["fraction"])]
    rho = spearmanr([order[r["requested"]] for r in ok], [r["fraction"] for r in ok])[0] if len(ok) > 2 else None
    return {
        "n": len(rows), "n_masks": len(entries),
        "accuracy": float(np.mean([r["read"] == r["requested"] for r in rows])),
        "mean_fraction": {c: _nan_mean([r["fraction"] for r in rows if r["requested"] == c]) for c in HEADS["density"]},
        "spearman_requested_vs_fraction": None if rho is None or not np.isfinite(rho) else float(rho),
        "real_accuracy_same_masks": float(np.mean([r["real_read"] == r["real_density"] for r in rows[:: len(HEADS["density"])]])),
        "per_case": rows,
    }


def _figures(out: Path, healthy: list[np.ndarray], fig: Mapping[str, Any], how: str = "") -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written: dict[str, str] = {}
    rows = []
    if healthy:
        rows.append(("healthy", [(h, f"from the prompt, seed {k}", "gray") for k, h in enumerate(healthy)]))
    if "inpaint" in fig:
        src, gen = fig["inpaint"]
        rows.append(("inpaint", [(src, "source", "gray"), (gen, "lesion inpainted", "gray"),
                                 (np.abs(gen - src), "|difference|", "magma")]))
    if "remove" in fig:
        src, gen, truth = fig["remove"]
        rows.append(("remove", [(src, "source (with lesion)", "gray"), (gen, "lesion removed", "gray"),
                                (np.abs(gen - src), "|difference|", "magma"), (truth, "lesion-free truth", "gray")]))
    if not rows:
        return written
    ncol = max(len(r[1]) for r in rows)
    full, axes = plt.subplots(len(rows), ncol, figsize=(2.4 * ncol, 2.6 * len(rows)), squeeze=False)
    for (name, panels), ax_row in zip(rows, axes):
        one, one_axes = plt.subplots(1, len(panels), figsize=(2.4 * len(panels), 2.6), squeeze=False)
        for targets in (ax_row, one_axes[0]):
            for ax, (img, title, cmap) in zip(targets, panels):
                ax.imshow(img, cmap=cmap, vmin=0.0, vmax=1.0 if cmap == "gray" else max(float(img.max()), 1e-6))
                ax.set_title(title, fontsize=7)
            for ax in targets:
                ax.axis("off")
        what = f"'{HEALTHY_PROMPT}'" if name == "healthy" else name
        one.suptitle(f"{what} ({PHANTOM_NOTE})", fontsize=8)
        one.tight_layout()
        path = out / f"figure_{name}.png"
        one.savefig(path, dpi=110)
        plt.close(one)
        written[name] = str(path)
    full.suptitle(f"{PHANTOM_NOTE}; top row: '{HEALTHY_PROMPT}'{how}", fontsize=9)
    full.tight_layout()
    full.savefig(out / "edit_study.png", dpi=110)
    plt.close(full)
    written["all"] = str(out / "edit_study.png")
    return written


def _f(v: Any, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "n/a"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def format_tables(results: Mapping[str, Any]) -> str:
    """The study's Markdown tables (keep vs inpaint, removal, attribute fidelity)."""
    s = results["settings"]
    lines = [f"Edit study ({results['note']}): {s['n_cases']} test images with a lesion, DDIM {s['ddim_steps']} steps, "
             f"seed {s['seed']}.", "",
             "| insertion | FD-radiomics67 ↓ | Mass IoU (segmenter) ↑ | seam jump | real jump (same ring) | seam excess ↓ |",
             "|---|---|---|---|---|---|"]
    ki = results["keep_vs_inpaint"]
    for mode in ("keep", "inpaint"):
        r = ki[mode]
        lines.append(f"| {mode} | {_f(r['fd_radiomics67'], 2)} (n={r['n_lesions']}) | {_f(r['mass_iou'], 3)} | "
                     f"{_f(r['seam_jump'])} | {_f(r['real_jump'])} | {_f(r['seam_excess'])} |")
    lines.append(f"| real images (ceiling) | 0 | {_f(ki['real']['mass_iou'], 3)} | | | 0 |")
    lines += ["", "| removal | error to lesion-free truth ↓ | lesion contrast | error / contrast ↓ | seam excess (vs truth) "
              "| segmenter lesion fraction before → after | boxes with a lesion found before → after |",
              "|---|---|---|---|---|---|---|"]
    for mech, r in results["removal"].items():
        lines.append(f"| {mech} (resample {r.get('resample', 1)}) | {_f(r['error'])} | {_f(r['contrast'])} | "
                     f"{_f(r['ratio'], 3)} | {_f(r.get('seam_excess'))} | "
                     f"{_f(r['lesion_fraction_before'], 3)} → {_f(r['lesion_fraction_after'], 3)} | "
                     f"{r['found_before']}/{r['n']} → {r['found_after']}/{r['n']} |")
    names = {"ring_fill": "reference: ring-mean fill", "sibling": "reference: lesion-free texture sibling"}
    for key, r in (results.get("removal_reference") or {}).items():
        lines.append(f"| {names.get(key, key)} | {_f(r['error'])} | {_f(r['contrast'])} | {_f(r['ratio'], 3)} | "
                     f"{_f(r['seam_excess'])} | | |")
    af = results["attribute_fidelity"]
    lines.append("")
    if "accuracy" in af:
        lines += ["| attribute | accuracy on generated (requested) | accuracy on real test images (ceiling) |",
                  "|---|---|---|"]
        for name in af["attributes"]:
            g, r = af["accuracy"]["generated"].get(name, {}), af["accuracy"]["real"].get(name, {})
            label = "density (dense-tissue fraction reader)" if name == "density_reader" else name
            lines.append(f"| {label} | {_f(g.get('accuracy'), 3)} (n={g.get('n', 0)}) | "
                         f"{_f(r.get('accuracy'), 3)} (n={r.get('n', 0)}) |")
        lines.append(f"\nAttribute classifier: {af['classifier']}.")
        dm = af.get("density_with_mask") or {}
        if dm.get("n"):
            means = ", ".join(f"{c} {_f(v, 3)}" for c, v in dm["mean_fraction"].items())
            lines.append(f"\nDensity with the breast mask given ({dm['n_masks']} test masks x A-D, paired): reader accuracy "
                         f"{_f(dm['accuracy'], 3)} (n={dm['n']}; the real images of the same masks: "
                         f"{_f(dm['real_accuracy_same_masks'], 3)}); mean dense fraction per requested class {means}; "
                         f"Spearman(requested, fraction) {_f(dm['spearman_requested_vs_fraction'], 3)}.")
        if "skipped" in af.get("density_reader", {}):
            lines.append(f"Density reader: not fitted ({af['density_reader']['skipped']}).")
        elif "density_reader" in af:
            t = ", ".join(f"{v:.3f}" for v in af["density_reader"]["thresholds"])
            lines.append(f"Density reader: dense-tissue fraction of the breast (Otsu inside the breast mask), cut into "
                         f"A-D at {t} (midpoints of the class medians of the {af['density_reader']['fit_on']} training "
                         f"images at {af['density_reader']['image_size']} px).")
    else:
        lines.append(f"Attribute fidelity: {af['skipped']}.")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m custom.engines.edit_study", description=__doc__.split("\n")[0])
    ap.add_argument("--prepared_dir", required=True)
    ap.add_argument("--phantom_dir", required=True, help="the phantom dataset (source DICOMs, boxes, lesion_free/)")
    ap.add_argument("--ckpt_dir", required=True, help="autoencoder.pt, model.pt, model_inpaint.pt, segmenter.pt")
    ap.add_argument("--output", required=True)
    ap.add_argument("--max_cases", type=int, default=8)
    ap.add_argument("--ddim_steps", type=int, default=20)
    ap.add_argument("--samples_per_attribute", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--segmenter", default=None, help="default: <ckpt_dir>/segmenter.pt")
    ap.add_argument("--classifier", default=None, help="attribute classifier; default: train one on the training split")
    ap.add_argument("--classifier_epochs", type=int, default=30)
    ap.add_argument("--blend", default=None,
                    help="how the keep/inpaint/remove edits are pasted back (inference's keep_blend: poisson, the "
                         "default, or feather)")
    ap.add_argument("--attribute_guidance", default=None,
                    help="inference's attribute_guidance for the attribute runs (mask-free, density with a mask, healthy)")
    ap.add_argument("--shape_bank", default=None,
                    help="inference's shape_bank for the mask-free runs (a prepared folder: breast outlines of its "
                         "training split instead of the network drawing them)")
    ap.add_argument("--density_masks", default=8,
                    help="test breast masks for the density-with-a-mask check (each generated healthy at A, B, C, D)")
    ap.add_argument("--remove_resample", default=1,
                    help="RePaint resampling of the removal runs (inference's keep_resample; 1 = plain DDIM)")
    ap.add_argument("--extra_config", default="", help="comma-separated configs merged after inference.json")
    args = ap.parse_args(argv)
    try:
        res = run_edit_study(args.prepared_dir, args.phantom_dir, args.ckpt_dir, args.output, args.max_cases,
                             args.ddim_steps, args.samples_per_attribute, args.seed, args.segmenter, args.classifier,
                             args.classifier_epochs, [c for c in args.extra_config.split(",") if c],
                             remove_resample=args.remove_resample, blend=args.blend,
                             density_masks=args.density_masks, attribute_guidance=args.attribute_guidance,
                             shape_bank=args.shape_bank)
    except MammoInputError as err:
        sys.stderr.write(f"ERROR: {' '.join(str(err).split())}\n")
        return 1
    sys.stdout.write(format_tables(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
