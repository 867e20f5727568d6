"""The ``evaluate`` workflow: generate for every test condition, then measure (``bundle/configs/evaluate.json``).

Generation reuses the inference engine (``SupervisedEvaluator`` + :class:`~custom.engines.inference.GCDMSamplingInferer`)
on the prepared test split: one sample per test mask (seed ``seed``) and ``diversity_samples`` samples (seeds
``seed .. seed + diversity_samples - 1``) for the first ``diversity_cases`` conditions with a lesion. Then
:class:`EvaluationReport` computes, with :mod:`custom.metrics`:

* **controllability** (the GCDM protocol): each generated image is segmented - breast by threshold + largest
  component, lesion by the trained segmenter ``models/segmenter.pt`` (inside the dilated ground-truth lesion box with
  ``lesion_roi="box"``, the analogue of MedSAM's box prompt) - and ONE 3-class confusion matrix is pooled over the set
  -> Mass IoU, Breast IoU, pixel accuracy; plus the per-image lesion Dice (mean / std);
* the same protocol on the **real** test images: the ceiling this segmenter allows;
* **FD-radiomics67** (the project's Fréchet distance of the 67 lesion radiomic features, real vs generated at the
  conditioned lesion masks; renamed from ``frd``) and, with ``--published_frd`` (default under ``--protocol gcdm``),
  the **published FRD** (the ``frd-score`` package on 8-bit PNG folders);
* for every distance a **real-vs-real floor**: the same distance between two disjoint halves of the real test set;
* a **feature distance**: FID only with a local feature network file (``fid_network``), otherwise FSD, the Fréchet
  distance of the segmenter's encoder features (a different number: never called FID);
* **diversity**: mean pairwise MS-SSIM among the samples of one condition (lower = more diverse);
* **stage-1 reconstruction** SSIM / PSNR of the test images.

Outputs (every file written atomically) in ``output_dir`` (``<results_dir>/<run_label>``): ``metrics.json``,
``report.md`` (metric table, figure grid, ablation table, the σ trade-off plot when several σ rows exist),
``figure_grid.png`` (mask | generated | real), ``generated/`` PNGs; and one row per run in
``<results_dir>/ablations.json`` (rows keyed by run label, so ``--sigma`` / ``--conditioning_mode`` / ``--ckpt_dir``
runs collect side by side). On phantom data every report carries :data:`PHANTOM_CAVEAT`.

**σ honesty.** The soft-mask σ at evaluation must be the σ the model was trained with. A σ row of the sweep is only
a real sweep point when its model was trained with that σ (``--ckpt_dir`` pointing at it); evaluating one model
with another σ measures robustness to a σ mismatch, and such rows are flagged (``sigma_matches_training: false``)
and drawn hollow in the plot.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import math
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events

from custom.engines.inference import CaseSet, _file_sha256, _rows, as_bool, datalist_cases
from custom.errors import MammoInputError
from custom.io import atomic_path, atomic_write_json, atomic_write_text

__all__ = [
    "PHANTOM_CAVEAT",
    "PROTOCOL_NOTE",
    "is_phantom",
    "run_label",
    "evaluation_cases",
    "lesion_rois",
    "SampleCollector",
    "EvaluationReport",
    "update_ablations",
    "format_metric_table",
    "PROTOCOLS",
    "protocol_settings",
    "lesion_segmenter",
    "published_frd_setting",
]

logger = logging.getLogger(__name__)

PHANTOM_CAVEAT = ("phantom (synthetic) data: these numbers say the pipeline works, not how GCDM performs on real "
                  "mammograms; not comparable to the paper's VinDr-Mammo figures")
PROTOCOL_NOTE = ("Protocol differences from the paper: the lesion of a generated image is found by this bundle's "
                 "segmenter (trained on the prepared training split) instead of MedSAM; the feature distance is FID "
                 "only with a local Inception-type network file, otherwise FSD (segmenter-encoder features), which is "
                 "not comparable with FID values; fractions are in [0, 1], the paper prints percentages.")
RENAME_NOTE = ("'fd_radiomics67' is the project's Fréchet distance of the 67 GCDM lesion radiomic features (called "
               "'frd' before 0.x); 'frd' is now only the published FRD of the frd-score package.")
SIGMA_NOTE = ("The soft-mask sigma must be the sigma the model was trained with: a sigma sweep needs one model "
              "trained per sigma (--ckpt_dir). Rows whose sigma differs from the model's training sigma measure "
              "robustness to a sigma mismatch, not the sweep, and are flagged.")
ABLATIONS_FORMAT = "mammo_gcdm/evaluation-ablations"
#: ``--protocol``: ``project`` (this bundle's defaults) or ``gcdm`` (the reference's ``evaluation.py``)
PROTOCOLS = ("project", "gcdm")
#: the project protocol's sampling defaults (the steps study: 20 DDIM steps reproduce the 50-step image)
PROJECT_SAMPLING: dict[str, Any] = {"ddim_steps": 20, "ddim_eta": 1.0, "guidance_scale": 3.0, "diversity_cases": 3}
GCDM_PROTOCOL_NOTE = ("GCDM protocol (the reference evaluation.py): mass test images only, one sample per mask, "
                      "50 DDIM steps, eta 1.0, guidance 3.0; breast by the reference's threshold rule on the 8-bit image "
                      "(>= 15, erode, largest region, dilate, erode); lesion by the box-prompted segmenter named in "
                      "'lesion_segmenter'; one confusion matrix pooled over the test set. IoU / pixel accuracy are "
                      "fractions here (x100 for the paper's percentages).")


# ---------------------------------------------------------------------------------------------------- setup
def is_phantom(prepared_dir: str | os.PathLike, setting: Any = "auto") -> bool:
    """Whether the prepared data come from the embedded phantom: ``setting`` true/false, or ``"auto"``: the
    ``dataset_dir`` of ``summary.json`` holds ``PHANTOM_README.txt``, or the first source DICOMs were written by the
    phantom generator (Manufacturer)."""
    if not (isinstance(setting, str) and setting.strip().lower() == "auto"):
        return as_bool(setting)
    from custom.data.phantom import PHANTOM_MANUFACTURER, PHANTOM_README_NAME

    root = Path(prepared_dir)
    try:
        summary = json.loads((root / "summary.json").read_text())
        dataset_dir = Path(summary.get("dataset_dir", ""))
        if not dataset_dir.is_absolute() and not dataset_dir.exists():
            dataset_dir = root.parent / dataset_dir.name
        if (dataset_dir / PHANTOM_README_NAME).is_file():
            return True
    except (OSError, ValueError):
        pass
    try:
        import pydicom

        for record in sorted((root / "records").glob("*.json"))[:3]:
            src = json.loads(record.read_text()).get("source_image")
            if src and Path(src).is_file() and not str(src).lower().endswith(".png"):
                ds = pydicom.dcmread(src, stop_before_pixels=True)
                if PHANTOM_MANUFACTURER in str(ds.get("Manufacturer", "")):
                    return True
    except Exception:  # noqa: BLE001 - unreadable headers just mean "not recognisably phantom"
        pass
    return False


def run_label(conditioning_mode: str, sigma: float, label: str | None = None, ckpt_dir: str | os.PathLike | None = None,
              default_ckpt_dir: str | os.PathLike | None = None) -> str:
    """Row label of a run: ``label`` when given, else ``<conditioning_mode>_sigma<σ>`` (e.g. ``gated_sigma1.5``),
    plus ``_<model folder name>`` when ``ckpt_dir`` is not the bundle's default model folder (so a model trained
    with another σ, ``--ckpt_dir runs/models_sigma2.0``, gets its own row instead of replacing the default one)."""
    if label not in (None, "", "None", "null"):
        return str(label)
    out = f"{conditioning_mode}_sigma{float(sigma):g}"
    if ckpt_dir and default_ckpt_dir and Path(ckpt_dir).resolve() != Path(default_ckpt_dir).resolve():
        safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in Path(ckpt_dir).resolve().name)
        out += f"_{safe}"
    return out


def protocol_settings(protocol: str, ddim_steps: Any = None, ddim_eta: Any = None, guidance_scale: Any = None,
                      diversity_cases: Any = None, sam_path: Any = None, sampler: Any = "ddim") -> dict[str, Any]:
    """The sampling settings of an evaluation protocol, checked before anything is built.

    ``None`` takes the protocol's value (``project``: :data:`PROJECT_SAMPLING`; ``gcdm``:
    :data:`custom.metrics.protocol.GCDM_SAMPLING` and no extra diversity samples). A value given explicitly is
    honoured; under ``gcdm`` one that differs from the reference's is listed in ``protocol_deviations`` (metrics.json
    and the report) with a warning; so is a ``sampler`` other than the reference's DDIM.

    Returns:
        ``{"protocol", "ddim_steps", "ddim_eta", "guidance_scale", "diversity_cases", "protocol_deviations"}``.

    Raises:
        MammoInputError: ``--protocol`` not in :data:`PROTOCOLS`; ``--sam_path`` with the project protocol (it
            would be ignored).
    """
    from custom.metrics.protocol import GCDM_SAMPLING

    name = str(protocol).strip().lower()
    if name not in PROTOCOLS:
        raise MammoInputError("--protocol", f"use one of {list(PROTOCOLS)}, got {protocol!r}")
    if name == "project" and sam_path not in (None, "", "None", "null"):
        raise MammoInputError("--sam_path", "a box-prompted SAM/MedSAM is used by --protocol gcdm only (it would be "
                                            "ignored by the project protocol)")
    ref = dict(PROJECT_SAMPLING) if name == "project" else {
        "ddim_steps": GCDM_SAMPLING["ddim_steps"], "ddim_eta": GCDM_SAMPLING["ddim_eta"],
        "guidance_scale": GCDM_SAMPLING["guidance_scale"], "diversity_cases": 0}
    given = {"ddim_steps": ddim_steps, "ddim_eta": ddim_eta, "guidance_scale": guidance_scale,
             "diversity_cases": diversity_cases}
    out: dict[str, Any] = {"protocol": name}
    deviations = {}
    for key, value in given.items():
        if value in (None, "", "None", "null"):
            out[key] = ref[key]
            continue
        try:
            out[key] = type(ref[key])(value)
            ok = math.isfinite(float(out[key])) and float(out[key]) >= (1 if key == "ddim_steps" else 0)
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise MammoInputError(f"--{key}", f"must be a {'positive ' if key == 'ddim_steps' else 'non-negative '}"
                                              f"{type(ref[key]).__name__}, got {value!r}")
        if name == "gcdm" and not math.isclose(float(out[key]), float(ref[key])):
            deviations[key] = {"reference": ref[key], "used": out[key]}
    if name == "gcdm" and str(sampler).strip().lower() != "ddim":
        deviations["sampler"] = {"reference": "ddim", "used": str(sampler).strip().lower()}
    if deviations:
        logger.warning("--protocol gcdm with deviations from the reference: %s", deviations)
    out["protocol_deviations"] = deviations
    return out


def evaluation_cases(
    prepared_dir: str | os.PathLike,
    split: str,
    image_size: int,
    sigma: float,
    max_lesions: int,
    seed: int = 0,
    max_cases: int | None = None,
    diversity_cases: int = 3,
    diversity_samples: int = 4,
    normaliser_file: str | os.PathLike | None = None,
    mass_only: bool = False,
    attribute_names: Sequence[str] | None = (),
    lesion_label_names: Sequence[str] | None = (),
) -> CaseSet:
    """The test cases with their real image (``extra``): one seed each, ``diversity_samples`` seeds for the first
    ``diversity_cases`` cases with a lesion (their first sample is the one the controllability metrics use).

    ``mass_only`` (the GCDM protocol): only the cases with a lesion
    (:func:`custom.metrics.protocol.gcdm_test_entries`), chosen before ``max_cases`` (so ``max_cases`` counts the
    mass cases evaluated); the images without one (with ``max_cases``: those before the last case evaluated) are
    listed in ``skipped`` with that reason.

    ``attribute_names`` (a model that reads clinical attributes): every case is generated with its own attributes
    from the datalist (:func:`custom.engines.edit.attach_case_attributes`), which the report's attribute fidelity
    then checks. ``lesion_label_names`` (a model that reads per-lesion labels): each lesion gets its own finding's
    labels (:func:`custom.engines.edit.attach_case_lesion_labels`)."""
    n_div = [0]
    extra = max(1, int(diversity_samples)) if int(diversity_cases) > 0 else 1

    def seeds_for(_i: int, item: Mapping[str, Any]) -> list[int]:
        if item.get("num_lesions", 0) > 0 and n_div[0] < int(diversity_cases) and extra > 1:
            n_div[0] += 1
            return [int(seed) + j for j in range(extra)]
        return [int(seed)]

    mass = as_bool(mass_only)
    no_mass: list[str] = []
    if mass:
        from custom.metrics.protocol import gcdm_test_entries

        datalist = Path(prepared_dir) / "datalist.json"
        try:
            entries = [e for e in json.loads(datalist.read_text()).get(split, []) if isinstance(e, Mapping)]
        except (OSError, ValueError, AttributeError):
            entries = []  # datalist_cases below names what is wrong with the file
        kept = gcdm_test_entries(entries)
        if entries and not kept:
            raise MammoInputError(datalist, f"the {split!r} split has no image with a mass (--protocol gcdm evaluates "
                                            "mass images only)")
        end = len(entries)  # all of them; with max_cases, those up to the last mass case evaluated
        if kept and max_cases not in (None, "", 0) and int(max_cases) < len(kept):
            end = next(i for i, e in enumerate(entries) if e is kept[int(max_cases) - 1]) + 1
        ids = {id(e) for e in kept}
        no_mass = [str(e.get("case_id")) for e in entries[:end] if id(e) not in ids]
    cases = datalist_cases(prepared_dir, split, image_size=image_size, sigma=sigma, max_lesions=max_lesions,
                           normaliser_file=normaliser_file, seeds=[int(seed)], max_cases=max_cases, keep_real=True,
                           seeds_for=seeds_for, require_lesion=mass)
    cases.skipped += [{"case": c, "reason": "no mass (GCDM protocol: mass test images only)"} for c in no_mass]
    names = list(attribute_names or [])
    if names:
        from custom.engines.edit import attach_case_attributes

        attach_case_attributes(cases, Path(prepared_dir) / "datalist.json", names)
    if lesion_label_names:
        from custom.engines.edit import attach_case_lesion_labels

        attach_case_lesion_labels(cases, Path(prepared_dir) / "datalist.json", list(lesion_label_names))
    return cases


def published_frd_setting(value: Any, protocol: str) -> bool:
    """``--published_frd``: ``None`` -> on under ``--protocol gcdm``, off under the project protocol; when on, the
    ``frd-score`` package must be installed (checked here, before generation)."""
    on = (str(protocol).strip().lower() == "gcdm") if value in (None, "", "None", "null", "auto") else as_bool(value)
    if on:
        from custom.metrics.frd_published import require_frd_score

        require_frd_score("--published_frd")
    return on


class _BundleSegmenterInBoxes:
    """The bundle's own lesion segmenter used as a box-prompted one: its lesion prediction inside the ground-truth
    boxes, each grown by ``margin`` (:func:`lesion_rois`)."""

    def __init__(self, segmenter: torch.nn.Module, threshold: float = 0.5, margin: float = 0.25, device: Any = "cpu"):
        self.segmenter, self.threshold, self.margin, self.device = segmenter, float(threshold), float(margin), device
        self.name = (f"the bundle's own lesion segmenter (not MedSAM), inside the ground-truth boxes grown by "
                     f"{self.margin:g}")
        self._prob: np.ndarray | None = None
        self._roi: np.ndarray | None = None

    def prepare(self, images: np.ndarray, instances: np.ndarray) -> _BundleSegmenterInBoxes:
        from custom.metrics.segmenter import lesion_probability

        self._prob = lesion_probability(self.segmenter, torch.as_tensor(images), device=self.device).numpy()
        self._roi = lesion_rois(instances, self.margin)
        return self

    def __call__(self, i: int, _image: np.ndarray, _boxes: Sequence[Any]) -> np.ndarray:
        return (self._prob[i] > self.threshold) & self._roi[i]


def lesion_segmenter(protocol: str, sam_path: Any = None, device: Any = "cpu") -> Any:
    """The box-prompted segmenter of ``--protocol gcdm``: MedSAM/SAM from the local folder ``sam_path``
    (:class:`custom.metrics.protocol.SamBoxSegmenter`, checked here, before generation), or ``None`` (the bundle's own
    segmenter, used inside the boxes). Always ``None`` for the project protocol."""
    if str(protocol).strip().lower() != "gcdm" or sam_path in (None, "", "None", "null"):
        return None
    from custom.metrics.protocol import SamBoxSegmenter

    if not Path(sam_path).is_dir():
        raise MammoInputError(sam_path, "--sam_path: not a folder (a transformers SAM/MedSAM save_pretrained folder)")
    seg = SamBoxSegmenter(sam_path, device=device)
    seg.name = f"MedSAM/SAM (box-prompted, transformers SamModel from {sam_path})"
    return seg


def lesion_rois(instances: np.ndarray, margin: float = 0.25, min_margin: int = 2) -> np.ndarray:
    """Per image, the union of the ground-truth lesion boxes, each grown by ``margin`` x its side (at least
    ``min_margin`` pixels): ``(N, H, W)`` bool, all False without a lesion (no box, no lesion - like a box prompt)."""
    inst = np.asarray(instances)
    out = np.zeros(inst.shape, dtype=bool)
    h, w = inst.shape[1:]
    for i in range(inst.shape[0]):
        for k in np.unique(inst[i]):
            if k == 0:
                continue
            rows, cols = np.nonzero(inst[i] == k)
            y0, y1, x0, x1 = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
            my = max(int(min_margin), int(round(margin * (y1 - y0))))
            mx = max(int(min_margin), int(round(margin * (x1 - x0))))
            out[i, max(0, y0 - my) : min(h, y1 + my), max(0, x0 - mx) : min(w, x1 + mx)] = True
    return out


class SampleCollector:
    """Keep every generated image in memory: ``images[(case name, seed)] = (S, S) float32``."""

    def __init__(self) -> None:
        self.images: dict[tuple[str, int], np.ndarray] = {}

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        for case, _j, seed, image in _rows(engine):
            self.images[(case.name, int(seed))] = image.numpy().astype(np.float32)


# ---------------------------------------------------------------------------------------------------- ablations
def update_ablations(path: str | os.PathLike, row: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Insert (or replace, by ``label``) ``row`` in ``ablations.json`` (written atomically). Returns all rows."""
    path = Path(path)
    rows: list[dict[str, Any]] = []
    if path.is_file():
        try:
            data = json.loads(path.read_text())
            rows = [r for r in data.get("rows", []) if isinstance(r, dict)]
        except (OSError, ValueError) as err:
            logger.warning("%s unreadable (%s): starting a new ablation table", path, err)
    rows = [r for r in rows if r.get("label") != row.get("label")] + [_finite(json.loads(json.dumps(dict(row), default=_json_default)))]
    atomic_write_json(path, {"format": ABLATIONS_FORMAT, "format_version": 1, "rows": rows})
    return rows


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        return "n/a" if not math.isfinite(float(v)) else f"{float(v):.{digits}g}"
    return str(v)


def _floors(s: Mapping[str, Any], key: str) -> str:
    """The two reference values of a distance: real vs real, and real vs its own stage-1 reconstruction."""
    text = f"{_fmt(s.get('floor_' + key))} (real vs real floor)"
    if s.get("stage1_" + key) is not None:
        text += f"; {_fmt(s.get('stage1_' + key))} (real vs its stage-1 reconstruction)"
    return text


def _metric_rows(m: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    """(metric, generated, real-image ceiling / note) rows of the headline table."""
    s = m["metrics"]
    fd_name = s.get("feature_distance_name") or "fsd"
    fd_label = "FID (local feature network)" if fd_name == "fid" else "FSD (segmenter-encoder Fréchet distance; not FID)"
    dice = f"{_fmt(s.get('mass_dice_mean'))} ± {_fmt(s.get('mass_dice_std'))}"
    cdice = f"{_fmt(s.get('ceiling_mass_dice_mean'))} ± {_fmt(s.get('ceiling_mass_dice_std'))}"
    return [
        ("Mass IoU (pooled)", _fmt(s.get("mass_iou")), _fmt(s.get("ceiling_mass_iou"))),
        ("Breast IoU (pooled)", _fmt(s.get("breast_iou")), _fmt(s.get("ceiling_breast_iou"))),
        ("Pixel accuracy (pooled)", _fmt(s.get("pixel_accuracy")), _fmt(s.get("ceiling_pixel_accuracy"))),
        ("Mass Dice per image (mean ± std)", dice, cdice),
        ("FD-radiomics67 (67 lesion radiomic features; not the published FRD)", _fmt(s.get("fd_radiomics67")),
         _floors(s, "fd_radiomics67")),
        ("FRD (published, frd-score v1)", _fmt(s.get("frd")), _floors(s, "frd")),
        ("Radiomics fidelity (mean Spearman, requested vs measured per lesion)", _fmt(s.get("radiomics_fidelity")),
         f"{_fmt(s.get('ceiling_radiomics_fidelity'))} (real vs its stage-1 reconstruction)"),
        ("Attribute fidelity: density read back (dense-fraction reader; models with attributes)",
         _fmt(s.get("density_accuracy")), f"{_fmt(s.get('ceiling_density_accuracy'))} (the reader on the real images)"),
        (fd_label, _fmt(s.get("feature_distance")), _floors(s, "feature_distance")),
        ("MS-SSIM diversity (lower = more diverse)", _fmt(s.get("ms_ssim")), ""),
        ("Lesion pixels clipped at white (>= 0.995)", _fmt(s.get("lesion_saturation")),
         f"{_fmt(s.get('real_lesion_saturation'))} (real); {_fmt(s.get('stage1_lesion_saturation'))} "
         "(real's stage-1 reconstruction)"),
        ("Stage-1 reconstruction SSIM / PSNR (dB)", f"{_fmt(s.get('recon_ssim'))} / {_fmt(s.get('recon_psnr'))}", ""),
    ]


def format_metric_table(metrics: Mapping[str, Any]) -> str:
    """Plain-text metric table (what the run prints at the end)."""
    rows = [("metric", "generated", "segmenter on real (ceiling)")] + _metric_rows(metrics)
    widths = [max(len(r[c]) for r in rows) for c in range(3)]
    lines = ["  ".join(r[c].ljust(widths[c]) for c in range(3)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- the report
class EvaluationReport:
    """Compute the metrics of the generated set and write ``metrics.json``, ``report.md``, the figures and the
    ablation row (see the module docstring). Call :meth:`run` after the generation engine has run.

    Args:
        collector: the :class:`SampleCollector` filled by the generation engine.
        cases: the :class:`~custom.engines.inference.CaseSet` of :func:`evaluation_cases`.
        encoder: the frozen stage-1 autoencoder (reconstruction metrics).
        segmenter: the lesion segmenter (:func:`custom.metrics.load_segmenter`).
        output_dir, results_dir: this run's folder and the folder of ``ablations.json``.
        label: the run label (ablation row key).
        settings: recorded in ``metrics.json`` (sigma, conditioning_mode, ddim_steps, ...).
        model_check: :func:`custom.engines.inference.check_model_info` result (training sigma etc.).
        phantom: print the phantom caveat.
        lesion_roi: ``"box"`` (lesion predictions only inside the grown ground-truth boxes) or ``"none"``.
        roi_margin, lesion_threshold: see :func:`lesion_rois` / :func:`custom.metrics.segment_generated`.
        fid_network, fid_in_channels, fid_input_size, fid_input_range: the FID feature network file and its
            preprocessing; ``None``: FSD with the segmenter encoder.
        fd_radiomics67_region: ``"lesion"`` or ``"breast"`` (renamed from ``frd_region``).
        published_frd: also compute the published FRD (``frd-score``) and its floor.
        params_file: PyRadiomics parameters.
        figure_cases: rows of the figure grid.
        device: where the networks run.
        protocol: ``"project"`` or ``"gcdm"``: the headline Mass IoU / Breast IoU / pixel accuracy (and their
            ceiling on the real images) by :func:`custom.metrics.protocol.gcdm_confusion` - breast by the reference's
            threshold rule, lesion by ``box_segmenter`` (or the bundle's segmenter inside the boxes).
        box_segmenter: a :class:`custom.metrics.protocol.SamBoxSegmenter` (``--sam_path``) or ``None``.
        prepared_dir: the prepared folder; with cases that carry a requested ``density`` (a model with attributes),
            its training images fit the dense-fraction reader of the attribute fidelity (:meth:`_attribute_fidelity`).
    """

    def __init__(
        self,
        collector: SampleCollector,
        cases: CaseSet,
        encoder: torch.nn.Module,
        segmenter: torch.nn.Module,
        output_dir: str | os.PathLike,
        results_dir: str | os.PathLike,
        label: str,
        settings: Mapping[str, Any] | None = None,
        model_check: Mapping[str, Any] | None = None,
        phantom: bool = True,
        lesion_roi: str = "box",
        roi_margin: float = 0.25,
        lesion_threshold: float = 0.5,
        fid_network: str | None = None,
        fid_in_channels: int = 3,
        fid_input_size: int | None = 299,
        fid_input_range: str = "imagenet",
        fd_radiomics67_region: str = "lesion",
        params_file: str | os.PathLike | None = None,
        figure_cases: int = 6,
        device: str | torch.device = "cpu",
        protocol: str = "project",
        box_segmenter: Any = None,
        published_frd: bool = False,
        prepared_dir: str | os.PathLike | None = None,
    ) -> None:
        if str(protocol).strip().lower() not in PROTOCOLS:
            raise MammoInputError("--protocol", f"use one of {list(PROTOCOLS)}, got {protocol!r}")
        self.protocol = str(protocol).strip().lower()
        self.box_segmenter = box_segmenter
        if str(lesion_roi).lower() not in ("box", "none"):
            raise MammoInputError("lesion_roi", f"use 'box' or 'none', got {lesion_roi!r}")
        self.collector, self.cases, self.encoder, self.segmenter = collector, cases, encoder, segmenter
        self.output_dir, self.results_dir = Path(output_dir), Path(results_dir)
        self.label = str(label)
        self.settings = dict(settings or {})
        self.model_check = dict(model_check or {})
        self.phantom = as_bool(phantom)
        self.lesion_roi = str(lesion_roi).lower()
        self.roi_margin, self.lesion_threshold = float(roi_margin), float(lesion_threshold)
        self.fid = None if fid_network in (None, "", "None", "null") else str(fid_network)
        self.fid_prep = {"in_channels": int(fid_in_channels), "input_size": fid_input_size, "input_range": fid_input_range}
        self.fd_radiomics67_region = fd_radiomics67_region
        self.published_frd = as_bool(published_frd)
        self.params_file = params_file
        self.figure_cases = int(figure_cases)
        self.device = device
        self.prepared_dir = None if prepared_dir in (None, "") else Path(prepared_dir)
        self.metrics: dict[str, Any] = {}

    # ------------------------------------------------------------------ data
    def _arrays(self) -> dict[str, Any]:
        cases = self.cases.cases
        missing = [c.name for c in cases if (c.name, c.seeds[0]) not in self.collector.images]
        if missing:
            raise RuntimeError(f"no generated image for {len(missing)} case(s), e.g. {missing[0]}: did generation run?")
        gen = np.stack([self.collector.images[(c.name, c.seeds[0])] for c in cases])[:, None]
        real = np.stack([c.extra["real_image"] for c in cases])[:, None]
        labels = np.stack([c.conditions.label for c in cases]).astype(np.int64)
        inst = np.stack([c.extra["instances"] for c in cases])
        return {"gen": gen, "real": real, "labels": labels, "instances": inst}

    # ------------------------------------------------------------------ metrics
    def compute(self) -> dict[str, Any]:
        from custom.metrics import (
            FeatureDistance,
            controllability_metrics,
            fd_radiomics67_metrics,
            ms_ssim_diversity,
            reconstruction_metrics,
            saturated_fraction,
        )
        from custom.metrics.segmenter import lesion_probability

        seconds: dict[str, float] = {}
        a = self._arrays()
        gen_t, real_t = torch.from_numpy(a["gen"]), torch.from_numpy(a["real"])
        rois = lesion_rois(a["instances"], self.roi_margin) if self.lesion_roi == "box" else None

        t0 = time.time()
        prob_gen = lesion_probability(self.segmenter, gen_t, device=self.device)
        prob_real = lesion_probability(self.segmenter, real_t, device=self.device)
        roi_list = None if rois is None else list(rois)
        control = controllability_metrics(gen_t, prob_gen, a["labels"], threshold=self.lesion_threshold, rois=roi_list)
        ceiling = controllability_metrics(real_t, prob_real, a["labels"], threshold=self.lesion_threshold, rois=roi_list)
        gcdm = None
        if self.protocol == "gcdm":
            gcdm = self._gcdm_protocol(a)
            control = {**control, "project_rule": {k: control[k] for k in ("mass_iou", "breast_iou", "pixel_accuracy")}}
        seconds["controllability"] = time.time() - t0

        # real-vs-real floors: two disjoint halves of the real test set (even / odd positions)
        half_a, half_b = slice(0, None, 2), slice(1, None, 2)
        n_real = a["real"].shape[0]
        floor_note = f"real test images at even vs odd positions ({(n_real + 1) // 2} vs {n_real // 2})"

        t0 = time.time()
        with torch.no_grad():
            dev = next(self.encoder.parameters()).device
            recon = torch.cat([self.encoder.decode(self.encoder.encode(real_t[i : i + 16].to(dev))).cpu()
                               for i in range(0, real_t.shape[0], 16)])
        reconstruction = reconstruction_metrics(recon, real_t)
        # the same distances for the real images' stage-1 round trip: what stage 1 alone costs, with the real
        # latents (a sampler's images pass the same decoder, so a distance far above this one is stage 2's)
        recon_np = recon.clamp(0, 1).numpy().astype(a["real"].dtype)
        seconds["reconstruction"] = time.time() - t0
        # lesion pixels clipped at white: generated lesions pushed past the top of the range (0.9.2)
        lesion_saturation = {key: saturated_fraction(images, a["instances"])
                             for key, images in (("generated", a["gen"]), ("real", a["real"]),
                                                 ("stage1_reconstruction", recon_np))}

        t0 = time.time()
        fdr_kwargs = {"region": self.fd_radiomics67_region}
        if self.params_file:
            fdr_kwargs["params_file"] = self.params_file
        masks = a["instances"] if self.fd_radiomics67_region == "lesion" else None
        fd_rad = fd_radiomics67_metrics(a["real"], masks, a["gen"], masks, **fdr_kwargs)
        fd_rad_floor = fd_radiomics67_metrics(a["real"][half_a], None if masks is None else masks[half_a],
                                              a["real"][half_b], None if masks is None else masks[half_b], **fdr_kwargs)
        fd_rad["floor_real_vs_real"] = fd_rad_floor["fd_radiomics67"]
        fd_rad["stage1_reconstruction"] = fd_radiomics67_metrics(a["real"], masks, recon_np, masks,
                                                                 **fdr_kwargs)["fd_radiomics67"]
        fd_rad["floor_note"] = floor_note
        seconds["fd_radiomics67"] = time.time() - t0

        t0 = time.time()
        if len(self.cases.cases) >= 2:
            fd = FeatureDistance(feature_network=self.fid, segmenter=self.segmenter, device=self.device,
                                 **(self.fid_prep if self.fid else {}))
            emb_real, emb_gen = fd.embed(real_t), fd.embed(gen_t)
            feature = fd.distance(emb_real, emb_gen)
            feature["name"] = fd.name
            feature["value"] = feature[fd.name]
            feature["floor_real_vs_real"] = (fd.distance(emb_real[half_a], emb_real[half_b])[fd.name]
                                             if n_real >= 4 else None)
            feature["floor_note"] = floor_note if n_real >= 4 else "needs at least 4 real images (2 per half)"
            feature["stage1_reconstruction"] = fd.distance(emb_real, fd.embed(torch.from_numpy(recon_np)))[fd.name]
        else:
            feature = {"name": "fid" if self.fid else "fsd", "value": None, "note": "needs at least 2 images per set",
                       "floor_real_vs_real": None}
        seconds["feature_distance"] = time.time() - t0

        t0 = time.time()
        published = None
        if self.published_frd:
            from custom.metrics.frd_published import published_frd

            published = published_frd(a["real"], a["gen"])
            floor = published_frd(a["real"][half_a], a["real"][half_b]) if n_real >= 4 else {"frd": None}
            published["floor_real_vs_real"] = floor["frd"]
            published["floor_note"] = floor_note if n_real >= 4 else "needs at least 4 real images (2 per half)"
            published["stage1_reconstruction"] = published_frd(a["real"], recon_np)["frd"]
            seconds["published_frd"] = time.time() - t0

        t0 = time.time()
        per_condition = []
        for c in self.cases.cases:
            if len(c.seeds) >= 2:
                samples = np.stack([self.collector.images[(c.name, s)] for s in c.seeds])[:, None]
                per_condition.append({"case": c.name, "n_samples": len(c.seeds), **ms_ssim_diversity(samples)})
        diversity = {
            "ms_ssim_mean": float(np.mean([d["ms_ssim_mean"] for d in per_condition])) if per_condition else None,
            "n_conditions": len(per_condition),
            "n_samples_per_condition": per_condition[0]["n_samples"] if per_condition else 0,
            "per_condition": per_condition,
        }
        seconds["diversity"] = time.time() - t0

        t0 = time.time()
        from custom.metrics.fidelity import lesion_radiomics_fidelity

        radiomics_fidelity = lesion_radiomics_fidelity(a["real"], a["gen"], recon, a["instances"], self.params_file)
        seconds["radiomics_fidelity"] = time.time() - t0
        t0 = time.time()
        attribute_fidelity = self._attribute_fidelity(a)
        seconds["attribute_fidelity"] = time.time() - t0

        info = self.model_check.get("info", {}) or {}
        sigma_trained = info.get("sigma")
        sigma = self.settings.get("sigma")
        sigma_match = None if sigma_trained is None or sigma is None else math.isclose(float(sigma), float(sigma_trained))
        if gcdm is not None:  # the headline numbers by the reference's rules
            for pre, key in (("", "generated"), ("ceiling_", "real_ceiling")):
                for k in ("mass_iou", "breast_iou", "pixel_accuracy"):
                    (control if not pre else ceiling)[k] = gcdm[key][k] / 100.0
        summary = {
            "mass_iou": control["mass_iou"],
            "breast_iou": control["breast_iou"],
            "pixel_accuracy": control["pixel_accuracy"],
            "mass_dice_mean": control["mass_dice_mean"],
            "mass_dice_std": control["mass_dice_std"],
            "ceiling_mass_iou": ceiling["mass_iou"],
            "ceiling_breast_iou": ceiling["breast_iou"],
            "ceiling_pixel_accuracy": ceiling["pixel_accuracy"],
            "ceiling_mass_dice_mean": ceiling["mass_dice_mean"],
            "ceiling_mass_dice_std": ceiling["mass_dice_std"],
            "fd_radiomics67": fd_rad["fd_radiomics67"],
            "floor_fd_radiomics67": fd_rad["floor_real_vs_real"],
            "frd": published["frd"] if published else None,
            "floor_frd": published["floor_real_vs_real"] if published else None,
            "feature_distance": feature["value"],
            "feature_distance_name": feature["name"],
            "stage1_feature_distance": feature.get("stage1_reconstruction"),
            "stage1_fd_radiomics67": fd_rad.get("stage1_reconstruction"),
            "stage1_frd": published.get("stage1_reconstruction") if published else None,
            "floor_feature_distance": feature.get("floor_real_vs_real"),
            "ms_ssim": diversity["ms_ssim_mean"],
            "recon_ssim": reconstruction["ssim_mean"],
            "recon_psnr": reconstruction["psnr_mean"],
            "radiomics_fidelity": radiomics_fidelity["generated"]["mean"],
            "ceiling_radiomics_fidelity": radiomics_fidelity["retest"]["mean"],
            "lesion_saturation": lesion_saturation["generated"]["fraction"],
            "real_lesion_saturation": lesion_saturation["real"]["fraction"],
            "stage1_lesion_saturation": lesion_saturation["stage1_reconstruction"]["fraction"],
            "density_accuracy": attribute_fidelity.get("generated_accuracy"),
            "ceiling_density_accuracy": attribute_fidelity.get("real_accuracy"),
        }
        self.metrics = {
            "format": "mammo_gcdm/evaluation",
            "format_version": 1,
            "label": self.label,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "phantom": self.phantom,
            "caveat": PHANTOM_CAVEAT if self.phantom else None,
            "protocol": self.protocol,
            "protocol_note": GCDM_PROTOCOL_NOTE if gcdm is not None else PROTOCOL_NOTE,
            "lesion_segmenter": gcdm["lesion_segmenter"] if gcdm is not None else "the bundle's own lesion segmenter",
            "gcdm_protocol": gcdm,
            "sigma_note": SIGMA_NOTE,
            "metrics": summary,
            "settings": {
                **self.settings,
                "sigma_trained": sigma_trained,
                "sigma_matches_training": sigma_match,
                "conditioning_mode_trained": info.get("conditioning_mode"),
                "stage1_matches_model": self.model_check.get("stage1_matches"),
                "n_cases": len(self.cases.cases),
                "n_skipped": len(self.cases.skipped),
                "n_generated": len(self.collector.images),
                "lesion_roi": self.lesion_roi,
                "roi_margin": self.roi_margin,
                "lesion_threshold": self.lesion_threshold,
            },
            "controllability": control,
            "segmenter_ceiling": ceiling,
            "fd_radiomics67": fd_rad,
            "frd_published": published if published else {"frd": None, "note": "not computed (--published_frd false)"},
            "rename_note": RENAME_NOTE,
            "feature_distance": feature,
            "diversity": diversity,
            "reconstruction": reconstruction,
            "lesion_saturation": lesion_saturation,
            "radiomics_fidelity": radiomics_fidelity,
            "attribute_fidelity": attribute_fidelity,
            "skipped": self.cases.skipped,
            "seconds": {k: round(v, 2) for k, v in seconds.items()},
        }
        return self.metrics

    def _attribute_fidelity(self, a: Mapping[str, Any]) -> dict[str, Any]:
        """The reconstruction loop on the evaluation set (a model with attributes): each case was generated with its
        own ``density``; the dense-fraction reader (:class:`custom.metrics.attribute_classifier.DensityReader`, fitted
        on the prepared training images at the model size) reads it back from the generated image and from the real
        one (the ceiling). ``{"skipped": why}`` for a model without attributes or cases without a density."""
        from custom.metrics.attribute_classifier import DensityReader, dense_fraction

        requested = [c.extra.get("attributes", {}).get("density") for c in self.cases.cases]
        if not any(c.extra.get("attribute_codes") is not None for c in self.cases.cases):
            return {"skipped": "the model reads no attributes"}
        if not any(requested):
            return {"skipped": "the model reads no density, or no case has one"}
        if self.prepared_dir is None:
            return {"skipped": "no prepared_dir to fit the density reader on"}
        size = int(a["gen"].shape[-1])
        try:
            reader, fit_on = DensityReader.fit_prepared(self.prepared_dir, size)
        except ValueError as err:
            return {"skipped": f"density reader not fitted: {err}"}
        gen_fr = [dense_fraction(img[0]) for img in a["gen"]]
        real_fr = [dense_fraction(img[0]) for img in a["real"]]
        gen_read, real_read = reader.read(gen_fr), reader.read(real_fr)
        rows = [(r, g, rr, gf) for r, g, rr, gf in zip(requested, gen_read, real_read, gen_fr) if r]
        order = {c: k for k, c in enumerate(DensityReader.classes)}
        finite = [(order[r], gf) for r, _, _, gf in rows if np.isfinite(gf)]
        rho = None
        if len(finite) > 2 and len({k for k, _ in finite}) > 1:
            from scipy.stats import spearmanr

            rho = float(spearmanr([k for k, _ in finite], [f for _, f in finite])[0])
        return {
            "attribute": "density", "reader": "dense-tissue fraction (custom.metrics.attribute_classifier.DensityReader)",
            "thresholds": reader.thresholds, "fit_on": fit_on, "image_size": size, "n": len(rows),
            "generated_accuracy": float(np.mean([g == r for r, g, _, _ in rows])),
            "real_accuracy": float(np.mean([rr == r for r, _, rr, _ in rows])),
            "spearman_requested_vs_generated_fraction": rho if rho is None or np.isfinite(rho) else None,
        }

    def _gcdm_protocol(self, a: Mapping[str, Any]) -> dict[str, Any]:
        """Pooled 3-class confusion of the generated and of the real images by the reference's rules."""
        from custom.metrics.protocol import gcdm_confusion

        out: dict[str, Any] = {}
        for key, images in (("generated", a["gen"]), ("real_ceiling", a["real"])):
            if self.box_segmenter is not None:
                seg, name = (lambda _i, img, boxes: self.box_segmenter(img, boxes)), self.box_segmenter.name
            else:
                seg = _BundleSegmenterInBoxes(self.segmenter, self.lesion_threshold, self.roi_margin, self.device)
                seg = seg.prepare(images, a["instances"])
                name = seg.name
            conf = gcdm_confusion(images, a["labels"], a["instances"], seg)
            out[key] = {**conf.scores(), "confusion_matrix": conf.matrix.tolist(), "n_images": int(images.shape[0])}
            out["lesion_segmenter"] = name
        out["units"] = "percent"
        return out

    # ------------------------------------------------------------------ figures
    def _figure_grid(self, path: Path) -> Path:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        from custom.engines.handlers import soft_mask_rgb

        cases = sorted(self.cases.cases, key=lambda c: c.conditions.num_lesions == 0)[: max(1, self.figure_cases)]
        n = len(cases)
        fig, axes = plt.subplots(n, 3, figsize=(6.6, 2.2 * n + 0.9), squeeze=False)
        for r, c in enumerate(cases):
            tiles = [soft_mask_rgb(torch.from_numpy(c.extra["soft_mask"])).permute(1, 2, 0).numpy(),
                     self.collector.images[(c.name, c.seeds[0])], c.extra["real_image"]]
            for col, tile in enumerate(tiles):
                ax = axes[r, col]
                ax.imshow(np.clip(tile, 0, 1), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
                ax.set_xticks([])
                ax.set_yticks([])
                if r == 0:
                    ax.set_title(("mask (breast grey, lesion red)", f"generated (seed {c.seeds[0]})", "real")[col],
                                 fontsize=8)
            axes[r, 0].set_ylabel(c.name[:12], fontsize=7)
        foot = PHANTOM_CAVEAT if self.phantom else "GCDM evaluation"
        fig.text(0.5, 0.005, "\n".join(_wrap(foot, 95)), ha="center", va="bottom", fontsize=6.5, color="darkred")
        fig.tight_layout(rect=(0, min(0.3, 0.45 / fig.get_figheight()), 1, 1))
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=110)
        plt.close(fig)
        return path

    def _sigma_plot(self, rows: Sequence[Mapping[str, Any]], path: Path) -> Path | None:
        mode = self.settings.get("conditioning_mode")
        pts = [r for r in rows if r.get("conditioning_mode") == mode and r.get("sigma") is not None]
        if len({float(r["sigma"]) for r in pts}) < 2:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        pts = sorted(pts, key=lambda r: float(r["sigma"]))
        fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(5.5, 5.2), sharex=True)
        for ax, key, color, name in ((ax1, "mass_iou", "tab:blue", "Mass IoU (higher better)"),
                                     (ax2, "fd_radiomics67", "tab:red", "FD-radiomics67 (lower better)")):
            for matched in (True, False):
                sel = [r for r in pts if bool(r.get("sigma_matches_training")) == matched and r.get(key) is not None]
                if not sel:
                    continue
                xs, ys = [float(r["sigma"]) for r in sel], [float(r[key]) for r in sel]
                ax.plot(xs, ys, "-o" if matched else "o", color=color, mfc=color if matched else "white",
                        label="model trained with this σ" if matched else "σ ≠ the model's training σ")
            ax.set_ylabel(name, color=color, fontsize=8)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, loc="best")
        ax2.set_xlabel("soft-mask σ (model pixels)")
        ax1.set_title(f"σ trade-off ({mode} conditioning)", fontsize=9)
        foot = ("hollow: evaluated with a σ other than the model's training σ. "
                + (PHANTOM_CAVEAT if self.phantom else ""))
        fig.text(0.5, 0.005, "\n".join(_wrap(foot, 100)), ha="center", va="bottom", fontsize=6, color="darkred")
        fig.tight_layout(rect=(0, 0.11, 1, 1))
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=110)
        plt.close(fig)
        return path

    # ------------------------------------------------------------------ writing
    def ablation_row(self) -> dict[str, Any]:
        m, s = self.metrics["metrics"], self.metrics["settings"]
        return {
            "label": self.label,
            "sigma": s.get("sigma"),
            "sigma_trained": s.get("sigma_trained"),
            "sigma_matches_training": s.get("sigma_matches_training"),
            "conditioning_mode": s.get("conditioning_mode"),
            "ckpt_dir": s.get("ckpt_dir"),
            "model_sha256": s.get("model_sha256"),
            "ddim_steps": s.get("ddim_steps"),
            "n_cases": s.get("n_cases"),
            "mass_iou": m["mass_iou"],
            "breast_iou": m["breast_iou"],
            "pixel_accuracy": m["pixel_accuracy"],
            "mass_dice_mean": m["mass_dice_mean"],
            "fd_radiomics67": m["fd_radiomics67"],
            "frd": m.get("frd"),
            "feature_distance": m["feature_distance"],
            "feature_distance_name": m["feature_distance_name"],
            "ms_ssim": m["ms_ssim"],
            "phantom": self.phantom,
            "created": self.metrics["created"],
        }

    def _report(self, rows: Sequence[Mapping[str, Any]], figure: str, sigma_plot: str | None) -> str:
        m, s = self.metrics, self.metrics["settings"]
        lines = [f"# GCDM evaluation: {self.label}", ""]
        if self.phantom:
            lines += [f"> **Caveat — {PHANTOM_CAVEAT}.**", ""]
        lines += ["## Setup", "", "| setting | value |", "| --- | --- |"]
        lines.insert(2, f"Protocol: **{m.get('protocol', 'project')}**; lesion segmenter: {m.get('lesion_segmenter')}.")
        lines.insert(3, "")
        for key in ("protocol", "split", "n_cases", "n_skipped", "n_generated", "conditioning_mode", "sigma", "sigma_trained",
                    "sigma_matches_training", "image_size", "sampler", "ddim_steps", "ddim_eta", "guidance_scale", "seed", "diversity_samples",
                    "lesion_roi", "model_file", "model_sha256", "ckpt_dir", "segmenter_file"):
            if key in s:
                lines.append(f"| {key} | {_fmt(s[key]) if not isinstance(s[key], str) else s[key]} |")
        if s.get("ddim_steps_note"):
            lines += ["", f"_{s['ddim_steps_note']}_"]
        lines += ["", "## Metrics", "", "| metric | generated | segmenter on real images (ceiling) |", "| --- | --- | --- |"]
        lines += [f"| {a} | {b} | {c} |" for a, b, c in _metric_rows(m)]
        g = m.get("gcdm_protocol")
        if g:
            lines += ["", f"GCDM protocol (percent, as the paper): Mass IoU {g['generated']['mass_iou']:.2f}, Breast IoU "
                          f"{g['generated']['breast_iou']:.2f}, PA {g['generated']['pixel_accuracy']:.2f}; the same "
                          f"segmenter on the real test images (ceiling): {g['real_ceiling']['mass_iou']:.2f} / "
                          f"{g['real_ceiling']['breast_iou']:.2f} / {g['real_ceiling']['pixel_accuracy']:.2f}. "
                          f"Lesion segmenter: {g['lesion_segmenter']}."]
            dev = s.get("protocol_deviations") or {}
            if dev:
                lines += ["", "**Deviations from the reference protocol:** " + ", ".join(
                    f"{k} {v['used']} (reference {v['reference']})" for k, v in dev.items())]
            lines += ["", "GCDM pooled confusion matrix of the generated set (rows truth, columns prediction):", "", "```"]
            lines += [" ".join(f"{v:>8d}" for v in r) for r in g["generated"]["confusion_matrix"]] + ["```"]
        cm = m["controllability"].get("confusion_matrix")
        if cm:
            lines += ["", "Pooled confusion matrix of the generated set (rows = condition label, columns = segmented "
                          "class; background, breast, lesion):", "", "```"] + [" ".join(f"{v:>8d}" for v in r) for r in cm] + ["```"]
        lines += ["", "## Figure", "", f"![mask, generated, real]({figure})", "",
                  "Columns: the conditioning mask (breast grey, blurred lesion red) | the generated image | the real "
                  "image the mask was drawn from.", ""]
        if len(rows) > 1 or sigma_plot:
            lines += ["## Ablations", "", "| run | conditioning | σ | σ trained | cases | DDIM steps | Mass IoU | Breast IoU | "
                      "pixel acc. | FD-radiomics67 | feature dist. | MS-SSIM |",
                      "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
            for r in rows:
                flag = "" if r.get("sigma_matches_training") in (True, None) else " ⚠"
                lines.append(f"| {r.get('label')} | {r.get('conditioning_mode')} | {_fmt(r.get('sigma'))}{flag} | "
                             f"{_fmt(r.get('sigma_trained'))} | {_fmt(r.get('n_cases'))} | {_fmt(r.get('ddim_steps'))} | "
                             f"{_fmt(r.get('mass_iou'))} | {_fmt(r.get('breast_iou'))} | "
                             f"{_fmt(r.get('pixel_accuracy'))} | {_fmt(r.get('fd_radiomics67'))} | "
                             f"{_fmt(r.get('feature_distance'))} ({r.get('feature_distance_name')}) | {_fmt(r.get('ms_ssim'))} |")
            lines += ["", f"⚠ = {SIGMA_NOTE}", ""]
            if sigma_plot:
                lines += [f"![Mass IoU and FD-radiomics67 vs sigma]({sigma_plot})", ""]
        lines += ["## Notes", "", f"- {m.get('protocol_note', PROTOCOL_NOTE)}", f"- {SIGMA_NOTE}",
                  f"- Timings (s): {', '.join(f'{k} {v}' for k, v in m['seconds'].items())}."]
        if self.phantom:
            lines += ["", f"**{PHANTOM_CAVEAT}.**"]
        return "\n".join(lines) + "\n"

    def write(self) -> dict[str, Path]:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        paths = {"figure": self._figure_grid(self.output_dir / "figure_grid.png")}
        rows = update_ablations(self.results_dir / "ablations.json", self.ablation_row())
        paths["ablations"] = self.results_dir / "ablations.json"
        sigma_plot = self._sigma_plot(rows, self.output_dir / "sigma_tradeoff.png")
        if sigma_plot is not None:
            paths["sigma_plot"] = sigma_plot
        self.metrics["outputs"] = {k: str(v) for k, v in paths.items()}
        self.metrics["outputs"]["report"] = str(self.output_dir / "report.md")
        self.metrics["outputs"]["metrics"] = str(self.output_dir / "metrics.json")
        paths["metrics"] = atomic_write_json(self.output_dir / "metrics.json",
                                             _finite(json.loads(json.dumps(self.metrics, default=_json_default))))
        paths["report"] = atomic_write_text(self.output_dir / "report.md",
                                            self._report(rows, "figure_grid.png", sigma_plot.name if sigma_plot else None))
        return paths

    def run(self) -> dict[str, Any]:
        """Compute, write, and print the metric table and the output paths."""
        self.compute()
        paths = self.write()
        text = [f"evaluation {self.label}: {self.metrics['settings']['n_cases']} test case(s), "
                f"{self.metrics['settings']['n_generated']} generated image(s)", "", format_metric_table(self.metrics), ""]
        if self.phantom:
            text += [f"NOTE: {PHANTOM_CAVEAT}", ""]
        if self.metrics["settings"].get("sigma_matches_training") is False:
            text += [f"WARNING: sigma {self.metrics['settings'].get('sigma')} differs from the model's training sigma "
                     f"{self.metrics['settings'].get('sigma_trained')}: {SIGMA_NOTE}", ""]
        text += [f"{k}: {v}" for k, v in paths.items()]
        print("\n".join(text), flush=True)
        return self.metrics


def _wrap(text: str, width: int) -> list[str]:
    import textwrap

    return textwrap.wrap(text, width) or [""]


def _finite(obj: Any) -> Any:
    """JSON-safe copy: non-finite floats become ``None`` (``metrics.json`` is strict JSON)."""
    if isinstance(obj, dict):
        return {str(k): _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    return str(o)


def segmenter_info(path: str | os.PathLike) -> dict[str, Any]:
    """Name and sha256 of the segmenter file (recorded with the metrics: every row must use the same segmenter)."""
    return {"segmenter_file": Path(path).name, "segmenter_sha256": _file_sha256(path)}
