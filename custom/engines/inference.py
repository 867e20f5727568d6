"""The ``inference`` workflow: conditions in, synthetic mammograms (16-bit DICOM + PNG + NIfTI + JSON sidecar) out.

Wired by ``bundle/configs/inference.json`` around the stock ``monai.engines.SupervisedEvaluator``::

    cases (one per condition)  ->  DataLoader(batch 1, collate_cases)
        -> GCDMInferencePrepareBatch    one row per requested sample (seeds seed, seed+1, ...)
        -> GCDMSamplingInferer          label map -> soft mask -> mask latent -> DDIM + CFG (ddim_sample) -> decode
                                        [keep mode: RePaint inside the dilated lesion region, then paste back]
        -> handlers: GCDMCheckpointLoader (EMA weights, weights_only), SampleWriter (export_sample per sample),
                     CaseProgressBar, InferenceSummary (what was written / skipped and why)

Inputs (``build_inference_cases``):

* **one condition**: a mask (``mask_file`` label map, or ``breast_mask_file`` + ``lesion_mask_file`` / ``lesion_box``)
  and lesion features (``feature_file`` [+ ``feature_case_id``], or ``reference_image`` + ``reference_lesion_mask``),
  validated by :func:`custom.data.conditions.build_conditions`;
* **a prepared datalist** (``datalist`` + ``split``): every case of the split with its own label map and features,
  processed exactly like the training data (:func:`custom.data.training.prepared_transforms`); a case that cannot be
  used is skipped with its reason;
* **keep-the-rest** (``image_file`` + ``mode="keep"``): the source mammogram is preprocessed with the conditions'
  geometry, encoded, and new content is generated only inside the lesion region dilated by ``keep_dilation`` pixels
  (RePaint blending in latent space, :func:`custom.engines.sampling.ddim_sample`); the decoded result is then
  pasted back so that every pixel outside that region is *exactly* the preprocessed source (a ``keep_feather``-pixel
  ramp inside the region hides the seam).

Seeds: sample ``j`` of every condition uses seed ``seed + j`` and its own generator, so an image depends only on its
condition and seed (not on the batch, the case order or ``max_cases``): the same request gives the same image, and
the same seed in another batch gives it within float rounding (all rows of a batch are sampled in one call, whose
batched arithmetic may round differently in the last bit: measured 1/65535 on a 16-bit output).

Errors: bad inputs raise :class:`custom.errors.MammoInputError`; :func:`install_error_handler` (the first step of the
run) turns an uncaught one into a single ``ERROR: <file>: <reason>`` line and exit status 1 instead of a traceback
(set ``MAMMO_GCDM_DEBUG=1`` to see the traceback).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.handlers import CheckpointLoader
from monai.inferers import Inferer
from torch import nn

from custom.data.lesion_labels import check_lesion_labels_allowed
from custom.errors import MammoInputError, check_path_option, option_float, option_int

__all__ = [
    "InferenceCase",
    "CaseSet",
    "build_inference_cases",
    "datalist_cases",
    "collate_cases",
    "require_cases",
    "keep_region",
    "paste_weights",
    "GCDMInferencePrepareBatch",
    "GCDMSamplingInferer",
    "GCDMCheckpointLoader",
    "SampleWriter",
    "CaseProgressBar",
    "InferenceSummary",
    "check_output_dir",
    "check_model_info",
    "check_sampling_options",
    "model_normaliser",
    "option_int",
    "option_float",
    "check_path_option",
    "first_existing",
    "as_bool",
    "describe_error",
    "install_error_handler",
    "sampling_parameters",
    "bundle_version",
]

logger = logging.getLogger(__name__)

MODES = ("generate", "keep")


# ---------------------------------------------------------------------------------------------------- errors
def _chain(err: BaseException | None) -> list[BaseException]:
    out, seen = [], set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        out.append(err)
        err = err.__cause__ or err.__context__
    return out


def describe_error(err: BaseException) -> str | None:
    """The one-line message of the first :class:`MammoInputError` in ``err``'s cause chain (MONAI wraps errors of
    config components in ``RuntimeError``), or ``None`` when the error is not a known input problem (a bug)."""
    for e in _chain(err):
        if isinstance(e, MammoInputError):
            return " ".join(str(e).split())
    return None


_HOOK_INSTALLED = False


def install_error_handler(debug: bool = False) -> bool:
    """Make an uncaught input error end the process with one ``ERROR: ...`` line on stderr (exit status 1) instead
    of a traceback; other exceptions (bugs) keep their traceback. ``debug`` or ``MAMMO_GCDM_DEBUG=1`` disables it.
    Returns whether the handler is active."""
    global _HOOK_INSTALLED
    if as_bool(debug) or as_bool(os.environ.get("MAMMO_GCDM_DEBUG", "")):
        return False
    if _HOOK_INSTALLED:
        return True
    previous = sys.excepthook

    def hook(kind, value, tb):  # pragma: no cover - runs at interpreter exit of a CLI process
        message = describe_error(value) if value is not None else None
        if message is None:
            return previous(kind, value, tb)
        sys.stderr.write(f"ERROR: {message}\n")
        sys.stderr.flush()

    sys.excepthook = hook
    _HOOK_INSTALLED = True
    return True


# ---------------------------------------------------------------------------------------------------- small helpers
def as_bool(value: Any) -> bool:
    """A config/CLI flag as a bool: ``"false"``, ``"0"``, ``"no"``, ``"off"``, ``"none"`` and ``""`` are False (the
    command line hands ``--progress false`` over as the string ``"false"``)."""
    if isinstance(value, str):
        return value.strip().lower() not in ("", "0", "false", "no", "off", "none", "null")
    return bool(value)


def first_existing(paths: Sequence[str | os.PathLike]) -> str:
    """The first of ``paths`` that is a file, else the first one (its absence is reported where it is read)."""
    paths = [p for p in paths if p]
    for p in paths:
        if Path(p).is_file():
            return str(p)
    return str(paths[0]) if paths else ""


def check_output_dir(output_dir: str | os.PathLike) -> Path:
    """Check *before any work* that ``output_dir`` can be written, without creating anything: the folder (or its
    nearest existing ancestor) must be a folder in which a file can be created (probed with a temporary file that is
    removed at once). Raises :class:`MammoInputError` naming the folder."""
    check_path_option("output_dir", output_dir)
    out = Path(output_dir)
    probe_dir = out
    while not probe_dir.exists():
        if probe_dir.parent == probe_dir:
            break
        probe_dir = probe_dir.parent
    if not probe_dir.is_dir():
        what = "the output folder" if probe_dir == out else f"{probe_dir} (a parent of the output folder)"
        raise MammoInputError(out, f"cannot write here: {what} exists and is not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".write_test.", dir=probe_dir)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise MammoInputError(out, f"the output folder is not writable ({err.strerror or err})") from None
    return out


def _file_sha256(path: str | os.PathLike | None) -> str | None:
    if path is None or not Path(path).is_file():
        return None
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def bundle_version(bundle_root: str | os.PathLike) -> str | None:
    """``version`` of ``<bundle_root>/configs/metadata.json`` (``None`` when unreadable)."""
    try:
        return str(json.loads((Path(bundle_root) / "configs" / "metadata.json").read_text())["version"])
    except (OSError, ValueError, KeyError):
        return None


#: diffusion_info.json fields that must equal the configuration (else the weights are used wrongly)
_INFO_MUST_MATCH = ("conditioning_mode", "max_lesions", "num_train_timesteps", "prediction_type", "noise_schedule", "beta_start",
                    "beta_end")
#: fields whose mismatch is allowed but reported (an evaluation ablation may do it on purpose)
_INFO_SHOULD_MATCH = ("sigma", "image_size")


def model_normaliser(ckpt_dir: str | os.PathLike) -> str | None:
    """The feature normaliser written with the model (``<ckpt_dir>/feature_normalisation.json``), or ``None`` when the
    model folder has none (a model trained before 0.5: the prepared folder's own is used then)."""
    path = Path(ckpt_dir) / "feature_normalisation.json"
    return str(path) if path.is_file() else None


def check_model_info(info_path: str | os.PathLike | None, expected: Mapping[str, Any], model_path: str | os.PathLike | None = None,
                     stage1_checkpoint: str | os.PathLike | None = None,
                     normaliser_file: str | os.PathLike | None = None) -> dict[str, Any]:
    """Compare the stage-2 side file ``diffusion_info.json`` (written with ``model.pt`` by training) with the
    configuration used now.

    Raises:
        MammoInputError: a field of :data:`_INFO_MUST_MATCH` differs (``conditioning_mode``, ``max_lesions``, the
        noise schedule): the message names the file, the field and both values; ``normaliser_file`` is not the
        feature normaliser the model was trained with (SHA-256 recorded as ``feature_normalisation_sha256``).

    Returns:
        ``{"info": the side file (``{}`` when absent), "mismatches": {field: {"trained": a, "configured": b}} for
        ``sigma`` / ``image_size`` (logged as warnings), "stage1_matches": bool | None}``.
    """
    path = Path(info_path) if info_path else None
    if path is None or not path.is_file():
        if model_path is not None and Path(model_path).is_file():
            logger.warning("%s not found: cannot check that %s matches the configuration", path, Path(model_path).name)
        return {"info": {}, "mismatches": {}, "stage1_matches": None}
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise MammoInputError(path, f"unreadable model side file ({err})") from None

    def same(a: Any, b: Any) -> bool:
        if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
            return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-12)
        return a == b

    for key in _INFO_MUST_MATCH:
        if key in info and key in expected and expected[key] is not None and not same(info[key], expected[key]):
            raise MammoInputError(
                path, f"the model was trained with {key}={info[key]!r} but the configuration says {expected[key]!r}: "
                      f"override --{key} {info[key]} or point --ckpt_dir at a model trained with {key}={expected[key]!r}"
            )
    mismatches = {}
    for key in _INFO_SHOULD_MATCH:
        if key in info and key in expected and expected[key] is not None and not same(info[key], expected[key]):
            mismatches[key] = {"trained": info[key], "configured": expected[key]}
            logger.warning("%s: the model was trained with %s=%s but %s=%s is used now%s", path.name, key, info[key], key,
                           expected[key], " (the soft mask then differs from training: a sigma sweep needs a model trained "
                           "per sigma)" if key == "sigma" else "")
    norm_digest = info.get("feature_normalisation_sha256")
    if norm_digest and normaliser_file is not None:
        used = Path(normaliser_file)
        if not used.is_file():
            raise MammoInputError(used, "feature normaliser not found (the model's is "
                                        f"{path.parent / info.get('feature_normalisation_file', 'feature_normalisation.json')})")
        if _file_sha256(used) != norm_digest:
            raise MammoInputError(used, f"not the feature normaliser this model was trained with (its SHA-256 differs "
                                        f"from {path.name}'s feature_normalisation_sha256): the conditions would be "
                                        f"scaled differently from training; use {path.parent / 'feature_normalisation.json'}")
    stage1_matches = None
    digest = info.get("stage1_checkpoint_sha256")
    if digest and stage1_checkpoint is not None and Path(stage1_checkpoint).is_file():
        stage1_matches = _file_sha256(stage1_checkpoint) == digest
        if not stage1_matches:
            logger.warning("%s is not the stage-1 autoencoder this model was trained with (sha256 differs from %s)",
                           stage1_checkpoint, path.name)
    return {"info": info, "mismatches": mismatches, "stage1_matches": stage1_matches}


# ---------------------------------------------------------------------------------------------------- regions
def keep_region(label: np.ndarray | torch.Tensor, dilation: int) -> np.ndarray:
    """Where keep-the-rest generates new content: the lesion pixels (label 2) dilated by a disk of radius
    ``dilation`` pixels. ``(H, W)`` bool; all False without a lesion."""
    from scipy import ndimage

    lab = label.detach().cpu().numpy() if isinstance(label, torch.Tensor) else np.asarray(label)
    lab = np.squeeze(lab)
    lesion = lab == 2
    r = int(dilation)
    if r <= 0 or not lesion.any():
        return lesion
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    return ndimage.binary_dilation(lesion, structure=(yy * yy + xx * xx) <= r * r)


def paste_weights(region: np.ndarray | torch.Tensor, feather: float) -> torch.Tensor:
    """Weight of the generated image when pasting back: 0 outside ``region`` (exactly the source there), rising
    linearly over ``feather`` pixels inside it (distance to the nearest outside pixel), 1 in its core."""
    from scipy import ndimage

    reg = region.detach().cpu().numpy() if isinstance(region, torch.Tensor) else np.asarray(region)
    reg = np.squeeze(reg) > 0
    if feather <= 0 or not reg.any():
        return torch.from_numpy(reg.astype(np.float32))
    dist = ndimage.distance_transform_edt(reg)
    return torch.from_numpy(np.clip(dist / float(feather), 0.0, 1.0).astype(np.float32) * reg)


# ---------------------------------------------------------------------------------------------------- cases
@dataclass
class InferenceCase:
    """One condition to sample for.

    Attributes:
        name: output file stem prefix (``<name>_seed<k>``).
        conditions: the validated :class:`~custom.data.conditions.Conditions` (model frame).
        seeds: one seed per sample.
        mode: ``"generate"`` or ``"keep"``.
        known_image: keep mode: ``(S, S)`` float32 preprocessed source image in [0, 1].
        region: keep mode: ``(S, S)`` bool region where new content is generated.
        source_dicom: DICOM source for the output's laterality/view tags (never its patient, unless asked).
        extra: anything else a consumer needs (the evaluation stores the real image here).
    """

    name: str
    conditions: Any
    seeds: list[int]
    mode: str = "generate"
    known_image: np.ndarray | None = None
    region: np.ndarray | None = None
    source_dicom: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class CaseSet:
    """The cases to run and those skipped (``{"case": name, "reason": text}``)."""

    cases: list[InferenceCase]
    skipped: list[dict[str, str]] = field(default_factory=list)
    source: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.cases)

    def __getitem__(self, i: int) -> InferenceCase:
        return self.cases[i]


#: bounds of the numeric options (a larger value is a typo, or would take days)
MAX_SAMPLES = 10_000
MAX_SEED = 2**63 - 1
MAX_STEPS = 10_000
MAX_GUIDANCE = 100.0
#: most RePaint resampling passes per step (``keep_resample``)
MAX_RESAMPLE = 100


def check_sampling_options(ddim_steps: Any, guidance_scale: Any, ddim_eta: Any = 0.0, sigma: Any = 1.5,
                           keep_feather: Any = 2.0, num_train_timesteps: Any = None, *, num_samples: Any = None,
                           seed: Any = None, keep_dilation: Any = None, case_id: Any = None,
                           keep_resample: Any = None, mode: Any = None, keep_blend: Any = None,
                           attribute_guidance: Any = None) -> dict[str, Any]:
    """The sampling options, checked before anything is built or loaded (the first step of the ``inference`` run,
    then again with the model's ``sigma`` and ``num_train_timesteps`` once it is loaded): ``ddim_steps`` an integer
    1..``num_train_timesteps``, ``guidance_scale`` a finite number 0..100, ``ddim_eta`` 0..1, ``sigma`` 0..100,
    ``keep_feather`` 0..10000, and when given ``num_samples`` / ``seed`` (as :func:`_seeds`), ``keep_dilation`` an
    integer >= 0 (its upper bound, the image size, is checked with the model), ``case_id`` (an output name) and
    ``keep_resample`` an integer 1..``MAX_RESAMPLE`` (above 1 only for an edit of a source image: ``mode`` keep,
    inpaint or remove), ``keep_blend`` one of :data:`custom.transforms.blend.BLEND_MODES` (given only for an edit of
    a source image; ``None``: the default, ``poisson``), ``attribute_guidance`` a finite number 0..100.
    ``None`` skips a check. Raises one :class:`MammoInputError` naming the option."""
    t_max = MAX_STEPS
    if num_train_timesteps not in (None, ""):
        t_max = min(MAX_STEPS, option_int("num_train_timesteps", num_train_timesteps, 1, 10**6))
    checked = {
        "ddim_steps": option_int("ddim_steps", ddim_steps, 1, t_max),
        "guidance_scale": option_float("guidance_scale", guidance_scale, 0.0, MAX_GUIDANCE),
        "ddim_eta": option_float("ddim_eta", ddim_eta, 0.0, 1.0),
        "keep_feather": option_float("keep_feather", keep_feather, 0.0, 1e4),
    }
    if sigma is not None:
        checked["sigma"] = option_float("sigma", sigma, 0.0, 100.0)
    if num_samples is not None or seed is not None:
        checked["seeds"] = _seeds(0 if seed is None else seed, 1 if num_samples is None else num_samples)
    if keep_dilation is not None:
        checked["keep_dilation"] = option_int("keep_dilation", keep_dilation, 0, 10**6)
    if keep_resample is not None:
        checked["keep_resample"] = option_int("keep_resample", keep_resample, 1, MAX_RESAMPLE)
        if checked["keep_resample"] > 1 and mode is not None and str(mode).lower() not in ("keep", "inpaint", "remove"):
            raise MammoInputError("keep_resample", f"resampling harmonises an edited region with the kept image; mode "
                                                   f"{str(mode)[:20]!r} has none (use 1, or mode keep/inpaint/remove)")
    if attribute_guidance is not None:
        checked["attribute_guidance"] = option_float("attribute_guidance", attribute_guidance, 0.0, MAX_GUIDANCE)
    if keep_blend is not None:
        checked["keep_blend"] = check_blend(keep_blend)
        if mode is not None and str(mode).lower() not in ("keep", "inpaint", "remove"):
            raise MammoInputError("keep_blend", f"blends an edited region into a source image; mode {str(mode)[:20]!r} "
                                                "has none (leave keep_blend out, or use mode keep/inpaint/remove)")
    if case_id is not None:
        from custom.data.export import check_output_name  # (inner import as at its other use in this module)

        check_output_name("case_id", case_id)
    return checked


def check_blend(blend: Any = None) -> str:
    """``keep_blend``: how a regenerated region is pasted back, one of :data:`custom.transforms.blend.BLEND_MODES`
    (``feather``: the ``keep_feather`` ramp only; ``poisson``: Poisson blending first, :mod:`custom.transforms.blend`);
    ``None`` = ``poisson``, the default since 0.8.0 (chosen by the edit study: bundle/docs/README.md)."""
    from custom.transforms.blend import BLEND_MODES

    if blend is None:
        return "poisson"
    value = str(blend).strip().lower() if isinstance(blend, str) else blend
    if value not in BLEND_MODES:
        raise MammoInputError("keep_blend", f"must be one of {', '.join(BLEND_MODES)}, got {str(blend)[:40]!r}")
    return value


def check_sampler(sampler: Any = "ddim", ddim_eta: Any = None, mode: Any = "generate", *,
                  default_eta: Any = None) -> str:
    """The ``sampler`` option (one of :data:`custom.engines.sampling.SAMPLERS`), checked before anything is built.

    With ``pndm`` (deterministic, whole images only): ``ddim_eta`` must be ``None`` or the config's ``default_eta``
    (PNDM has no eta; the unchanged default is not a request) and ``mode`` must be ``generate`` (the keep / inpaint /
    remove modes run DDIM). Raises one :class:`MammoInputError` naming the option; returns the sampler name."""
    from custom.engines.sampling import SAMPLERS

    name = str(sampler).strip().lower() if isinstance(sampler, str) else sampler
    if name not in SAMPLERS:
        raise MammoInputError("sampler", f"must be one of {', '.join(SAMPLERS)}, got {str(sampler)[:40]!r}")
    if name == "pndm":
        if ddim_eta is not None and (default_eta is None or option_float("ddim_eta", ddim_eta, 0.0, 1.0)
                                     != float(default_eta)):
            raise MammoInputError("ddim_eta", f"PNDM has no eta (got {str(ddim_eta)[:40]}): leave ddim_eta unset "
                                              "with --sampler pndm, or use --sampler ddim")
        if str(mode).strip().lower() != "generate":
            raise MammoInputError("mode", f"--sampler pndm generates whole images only (got mode {str(mode)[:40]!r}); "
                                          "use --sampler ddim for keep/inpaint/remove")
    return name


def keep_dilation_pixels(keep_dilation: Any, image_size: int) -> int:
    """``keep_dilation`` in pixels of the model frame: ``None`` (the default) is ``max(2, image_size // 16)``;
    a given value must lie in 0..``image_size``."""
    if keep_dilation is None:
        return max(2, int(image_size) // 16)
    return option_int("keep_dilation", keep_dilation, 0, int(image_size))


def _seeds(seed: int, num_samples: int) -> list[int]:
    n = option_int("num_samples", num_samples, 1, MAX_SAMPLES)
    s = option_int("seed", seed, 0, MAX_SEED - n)
    return [s + j for j in range(n)]


def _is_dicom(path: str | os.PathLike) -> bool:
    p = Path(path)
    if p.suffix.lower() in (".dcm", ".dicom"):
        return True
    if p.suffix:
        return False
    try:
        with open(p, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def _known_image(image_file: str | os.PathLike, conditions: Any) -> np.ndarray:
    """The source mammogram through the conditions' geometry (the ``prepare`` preprocessing): ``(S, S)`` in [0, 1]."""
    from custom.data.prepare import load_display_image

    path = Path(image_file)
    if not path.exists():
        raise MammoInputError(path, "image_file not found")
    image, _ = load_display_image(path)
    geom, size = conditions.geometry, conditions.image_size
    if geom is not None:
        if tuple(image.shape) != tuple(geom.source_shape):
            raise MammoInputError(path, f"image size {image.shape[0]}x{image.shape[1]} differs from the mask size "
                                        f"{geom.source_shape[0]}x{geom.source_shape[1]}")
        out = geom.apply_image(image[None].astype(np.float32), "image")[0].numpy()
    else:
        if tuple(image.shape) != (size, size):
            raise MammoInputError(path, f"the mask is in the model frame ({size}x{size}) but the image is "
                                        f"{image.shape[0]}x{image.shape[1]}: give the mask at the image's size")
        out = image
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def _auto_breast_mask(image_file: str | os.PathLike, folder: str) -> str:
    """Keep mode without a breast mask: the breast of the source image (threshold + largest component, as
    ``prepare``), written as a 0/255 PNG for :func:`build_conditions`."""
    from PIL import Image

    from custom.data.prepare import load_display_image
    from custom.transforms.masks import breast_mask

    path = Path(image_file)
    if not path.exists():
        raise MammoInputError(path, "image_file not found")
    image, _ = load_display_image(path)
    breast = breast_mask(image)
    if not breast.any():
        raise MammoInputError(path, "no breast found in the image (give breast_mask_file)")
    out = Path(folder) / f"{path.stem}_breast.png"
    Image.fromarray((breast * 255).astype(np.uint8)).save(out)
    return str(out)


def build_inference_cases(
    *,
    image_size: int,
    normaliser_file: str | os.PathLike,
    max_lesions: int,
    num_samples: int = 1,
    seed: int = 0,
    mode: str = "generate",
    mask_file: str | None = None,
    breast_mask_file: str | None = None,
    lesion_mask_file: str | None = None,
    lesion_box: Any = None,
    feature_file: str | None = None,
    feature_case_id: Any = None,
    reference_image: str | None = None,
    reference_lesion_mask: str | None = None,
    params_file: str | None = None,
    source_image: str | None = None,
    laterality: str | None = None,
    case_id: str = "synthetic",
    image_file: str | None = None,
    keep_dilation: int = 4,
    datalist: str | None = None,
    split: str = "test",
    max_cases: int | None = None,
    sigma: float | None = None,
    datalist_normaliser: str | None = None,
) -> CaseSet:
    """The cases of one inference run (see the module docstring for the three input forms).

    Raises:
        MammoInputError: the single condition is invalid (message from :func:`build_conditions`), conflicting
        arguments (a datalist *and* a mask, keep mode without ``image_file``, ...), an unknown ``mode``.
    """
    mode = str(mode).strip().lower()
    if mode not in MODES:
        raise MammoInputError("mode", f"unknown mode {mode[:40]!r} (use 'generate', or 'keep' with image_file)")
    seeds = _seeds(seed, num_samples)
    keep_dilation = option_int("keep_dilation", keep_dilation, 0, max(int(image_size), 1))
    for key, value in dict(mask_file=mask_file, breast_mask_file=breast_mask_file, lesion_mask_file=lesion_mask_file,
                           feature_file=feature_file, reference_image=reference_image,
                           reference_lesion_mask=reference_lesion_mask, params_file=params_file,
                           source_image=source_image, image_file=image_file, datalist=datalist,
                           normaliser_file=normaliser_file, datalist_normaliser=datalist_normaliser).items():
        check_path_option(key, value)
    from custom.data.export import check_output_name

    check_output_name("case_id", case_id)  # the output files are named after it: refused now, not after sampling
    if max_cases not in (None, "", 0):
        max_cases = option_int("max_cases", max_cases, 1, 10**9)
    single_inputs = {k: v for k, v in dict(mask_file=mask_file, breast_mask_file=breast_mask_file,
                                           lesion_mask_file=lesion_mask_file, lesion_box=lesion_box,
                                           feature_file=feature_file, reference_image=reference_image,
                                           reference_lesion_mask=reference_lesion_mask).items() if v is not None}
    if datalist is not None:
        if single_inputs:
            raise MammoInputError(datalist, f"give either a datalist or one condition, not both (also given: "
                                            f"{', '.join(single_inputs)})")
        if mode == "keep":
            raise MammoInputError(datalist, "keep mode works on one image (image_file + its mask), not on a datalist")
        return datalist_cases(datalist, split, image_size=image_size, sigma=1.5 if sigma is None else sigma,
                              max_lesions=max_lesions, seeds=seeds,
                              normaliser_file=datalist_normaliser if datalist_normaliser is not None else normaliser_file,
                              max_cases=max_cases)
    if mode == "keep" and image_file is None:
        raise MammoInputError("image_file", "keep mode needs the source mammogram (--image_file, DICOM or PNG)")
    if mode != "keep" and image_file is not None:
        raise MammoInputError(image_file, "image_file is only used by keep mode: add --mode keep")
    from custom.data.conditions import build_conditions

    with tempfile.TemporaryDirectory(prefix="mammo_gcdm_inference_") as tmp:
        if mode == "keep" and mask_file is None and breast_mask_file is None:
            breast_mask_file = _auto_breast_mask(image_file, tmp)
        conditions = build_conditions(
            image_size=int(image_size), normaliser_file=normaliser_file, max_lesions=int(max_lesions),
            mask_file=mask_file, breast_mask_file=breast_mask_file, lesion_mask_file=lesion_mask_file,
            lesion_box=lesion_box, feature_file=feature_file,
            feature_case_id=None if feature_case_id is None else str(feature_case_id),
            reference_image=reference_image, reference_lesion_mask=reference_lesion_mask, params_file=params_file,
            source_image=source_image if source_image is not None else image_file, laterality=laterality,
            case_id=str(case_id),
        )
    known = region = None
    dicom = None
    if mode == "keep":
        known = _known_image(image_file, conditions)
        region = keep_region(conditions.label, keep_dilation)
        if not region.any():
            raise MammoInputError(mask_file or lesion_mask_file or "lesion_box",
                                  "keep mode regenerates the lesion region, but the mask has no lesion")
        dicom = image_file if _is_dicom(image_file) else None
    elif source_image is not None and _is_dicom(source_image):
        dicom = source_image
    case = InferenceCase(name=str(case_id), conditions=conditions, seeds=seeds, mode=mode, known_image=known,
                         region=region, source_dicom=dicom)
    if mode == "keep":
        case.extra["image_file"] = {"name": Path(image_file).name, "sha256": _file_sha256(image_file)}
    return CaseSet([case], [], {"mode": mode, "input": "condition"})


def datalist_cases(
    datalist: str | os.PathLike,
    split: str,
    image_size: int,
    sigma: float,
    max_lesions: int,
    normaliser_file: str | os.PathLike | None,
    seeds: Sequence[int],
    max_cases: int | None = None,
    keep_real: bool = False,
    seeds_for: Any = None,
    require_lesion: bool = False,
) -> CaseSet:
    """Every case of a prepared split as an :class:`InferenceCase` (model frame, conditions built exactly like the
    training batches by :func:`custom.data.training.prepared_transforms`).

    Args:
        datalist: ``<prepared_dir>/datalist.json`` (or the prepared folder itself).
        split: ``training`` / ``validation`` / ``test``.
        normaliser_file: feature normaliser; ``None`` (default): the prepared folder's own
            ``feature_normalisation.json``, i.e. exactly what the training batches of that folder used.
        seeds: seeds of every case (``seeds_for(index, item)`` overrides per case when given).
        max_cases: the first N cases of the split.
        keep_real: also keep the real image and the lesion instance map in ``case.extra`` (evaluation).
        require_lesion: only the images with a lesion (``num_lesions`` > 0), selected before ``max_cases``: then
            ``max_cases`` counts images with a lesion.

    A case whose files cannot be read or whose conditions are invalid is skipped with its reason.
    """
    from custom.data.conditions import Conditions
    from custom.data.training import load_prepared_datalist, prepared_transforms
    from custom.features.feature_file import read_feature_file

    path = Path(datalist)
    prepared = path if path.is_dir() else path.parent
    if not path.is_dir() and path.name != "datalist.json":
        raise MammoInputError(path, "expected the datalist.json of a prepared folder (the output of `prepare`)")
    items = load_prepared_datalist(prepared, split, normalisation_file=normaliser_file, max_lesions=int(max_lesions),
                                   require_lesion=bool(require_lesion),
                                   limit=None if max_cases in (None, "", 0) else int(max_cases))
    if not items:
        raise MammoInputError(prepared / "datalist.json", f"the {split!r} split is empty")
    raw = {}
    try:
        for row in read_feature_file(prepared / "features.csv"):
            raw.setdefault(str(row["case_id"]), []).append(row)
    except MammoInputError as err:  # the datalist loader already read it; keep going without raw values
        logger.warning("%s", err)
    xform = prepared_transforms(image_size=int(image_size), sigma=float(sigma), max_lesions=int(max_lesions))
    cases, skipped = [], []
    for i, item in enumerate(items):
        cid = str(item["case_id"])
        try:
            d = xform(dict(item))
            label = np.asarray(d["label"][0]).astype(np.uint8)
            if not (label == 1).any():
                raise MammoInputError(item["label"], "no breast pixel at the model resolution")
            present = np.asarray(d["lesion_present"], dtype=np.float32)
            n = int(present.sum())
            cond = Conditions(
                case_id=cid,
                label=label,
                lesion_masks=np.asarray(d["lesion_masks"], dtype=np.float32),
                features=np.asarray(d["features"], dtype=np.float32),
                lesion_present=present,
                geometry=None,
                raw_features=sorted(raw.get(cid, []), key=lambda r: r["lesion_index"])[:n],
                clipping={},
                source={"mask": {"mode": "prepared_datalist", "frame": "model", "label_file": Path(item["label"]).name,
                                 "split": split},
                        "features": {"mode": "prepared_feature_file", "feature_file": "features.csv",
                                     "feature_case_id": cid},
                        "normaliser_file": {"name": Path(normaliser_file or prepared / "feature_normalisation.json").name},
                        "image_size": int(image_size), "max_lesions": int(max_lesions), "num_lesions": n},
            )
            case_seeds = list(seeds_for(i, item)) if seeds_for is not None else list(seeds)
            case = InferenceCase(name=cid, conditions=cond, seeds=case_seeds)
            if keep_real:
                masks = np.asarray(d["lesion_masks"], dtype=np.float32)
                inst = np.zeros(label.shape, dtype=np.uint8)
                for k in range(masks.shape[0]):
                    inst[masks[k] > 0] = k + 1
                case.extra.update(real_image=np.asarray(d["image"][0], dtype=np.float32),
                                  soft_mask=np.asarray(d["soft_mask"], dtype=np.float32), instances=inst,
                                  view=item.get("view"), laterality=item.get("laterality"))
            cases.append(case)
        except (MammoInputError, OSError, ValueError, RuntimeError) as err:
            reason = describe_error(err) or f"{type(err).__name__}: {' '.join(str(err).split())[:300]}"
            logger.warning("skipping %s: %s", cid, reason)
            skipped.append({"case": cid, "reason": reason})
    return CaseSet(cases, skipped, {"mode": "generate", "input": "datalist", "datalist": str(prepared / "datalist.json"),
                                    "split": split, "n_split": len(items)})


def require_cases(cases: CaseSet) -> list[InferenceCase]:
    """The cases to run; :class:`MammoInputError` listing the reasons when every case was skipped."""
    if not cases.cases:
        reasons = "; ".join(f"{s['case']}: {s['reason']}" for s in cases.skipped[:3])
        source = cases.source.get("datalist") or "inputs"
        raise MammoInputError(source, f"no usable case ({len(cases.skipped)} skipped{': ' + reasons if reasons else ''})")
    return list(cases.cases)


def collate_cases(cases: Sequence[InferenceCase]) -> dict[str, Any]:
    """DataLoader ``collate_fn``: tensors of the conditions stacked (``label`` ``(B, 1, S, S)``, ``lesion_masks``,
    ``features``, ``lesion_present``; ``known_image`` / ``region`` ``(B, 1, S, S)`` when every case has them), the
    seeds and the case objects as lists."""
    def stack(arrs):
        return torch.stack([torch.as_tensor(np.ascontiguousarray(a), dtype=torch.float32) for a in arrs])

    batch: dict[str, Any] = {
        "label": stack([c.conditions.label[None].astype(np.float32) for c in cases]),
        "lesion_masks": stack([c.conditions.lesion_masks for c in cases]),
        "features": stack([c.conditions.features for c in cases]),
        "lesion_present": stack([c.conditions.lesion_present for c in cases]),
        "seeds": [list(c.seeds) for c in cases],
        "case": list(cases),
    }
    if cases and all(c.known_image is not None for c in cases):
        batch["known_image"] = stack([c.known_image[None] for c in cases])
        batch["region"] = stack([c.region[None].astype(np.float32) for c in cases])
    elif any(c.known_image is not None for c in cases):
        raise ValueError("collate_cases: keep-mode and plain cases cannot share a batch")
    return batch


# ---------------------------------------------------------------------------------------------------- engine parts
class GCDMInferencePrepareBatch:
    """Collated cases -> ``(label rows, None, (), inferer kwargs)`` with one row per requested sample: a case with
    seeds ``[s0, s1]`` becomes two rows with the same conditions and ``seeds=[s0, s1]``."""

    KEYS = ("features", "lesion_masks", "lesion_present", "known_image", "region")

    def __call__(self, batchdata: Mapping[str, Any], device: str | torch.device | None = None, non_blocking: bool = False,
                 **kwargs: Any) -> tuple[torch.Tensor, None, tuple, dict[str, Any]]:
        rows = [b for b, seeds in enumerate(batchdata["seeds"]) for _ in seeds]
        idx = torch.as_tensor(rows, dtype=torch.long)

        def take(x: torch.Tensor) -> torch.Tensor:
            return x.index_select(0, idx).to(device=device, non_blocking=non_blocking)

        out = {k: take(batchdata[k]) for k in self.KEYS if k in batchdata}
        out["seeds"] = [int(s) for seeds in batchdata["seeds"] for s in seeds]
        cases = batchdata.get("case") or []
        given = [c.extra["lesion_label_codes"] for c in cases if "lesion_label_codes" in c.extra]
        if given:  # per-slot lesion labels (custom.data.lesion_labels); a case without any: every label "not given"
            blank = np.full(np.shape(given[0]), -1, dtype=np.int64)
            out["lesion_labels"] = torch.stack([torch.as_tensor(c.extra.get("lesion_label_codes", blank), dtype=torch.long)
                                                for c, seeds in zip(cases, batchdata["seeds"]) for _ in seeds]).to(device)
        return take(batchdata["label"]), None, (), out


class GCDMSamplingInferer(Inferer):
    """Label map (+ lesion features) -> synthetic image, the inference half of GCDM.

    ``inferer(label, network, features=..., lesion_masks=..., lesion_present=..., seeds=..., [known_image, region])``:

    1. soft mask of the label map with ``sigma`` (:func:`custom.transforms.masks.soft_mask`, as in training), encoded
       channel by channel by the frozen stage-1 encoder (``encoder.encode_mask``);
    2. all rows in one :func:`custom.engines.sampling.ddim_sample` call, each row with its own seed's generator
       (``num_inference_steps`` DDIM steps, CFG ``guidance_scale``, ``eta``; the lesion context computed once),
       decoded by the stage-1 decoder; ``compile=True`` samples through ``torch.compile`` (:class:`CompiledDenoiser`);
    3. keep mode (``known_image`` + ``region``, ``(R, 1, S, S)``): the known image is encoded, the latent region is
       every latent cell touching ``region`` (so generated content covers all of it), RePaint keeps the rest of the
       latent, and the decoded image is pasted back: ``known`` outside ``region`` exactly, a ``feather``-pixel ramp
       inside it.

    Called as MONAI Label does, ``inferer(label, network)``, a lesion-free label map needs nothing else; a label map
    with lesions needs their ``features`` (``lesion_masks`` / ``lesion_present`` default to its 8-connected lesion
    components, first-pixel order).

    Returns ``(R, 1, S, S)`` float32 in [0, 1].
    """

    def __init__(self, scheduler: Any, encoder: nn.Module, num_inference_steps: int = 50, guidance_scale: float = 3.0,
                 sigma: float = 1.5, eta: float | None = 0.0, feather: float = 2.0, progress: bool = True,
                 compile: bool = False, sampler: str = "ddim", resample: int = 1, blend: str | None = None,
                 attribute_guidance: float | None = None) -> None:
        super().__init__()
        self.sampler = check_sampler(sampler)
        if self.sampler == "pndm":
            from monai.networks.schedulers import PNDMScheduler

            if eta is not None:
                raise MammoInputError("ddim_eta", f"PNDM has no eta (got {eta!r}): pass eta=None with sampler='pndm'")
            if not isinstance(scheduler, PNDMScheduler):
                raise ValueError(f"GCDMSamplingInferer: sampler 'pndm' needs a PNDMScheduler, got {type(scheduler).__name__}")
        self.compile = as_bool(compile)
        self._compiled: tuple[nn.Module, nn.Module] | None = None
        self.scheduler = scheduler
        self.encoder = encoder
        t_max = int(getattr(scheduler, "num_train_timesteps", MAX_STEPS) or MAX_STEPS)
        self.num_inference_steps = option_int("ddim_steps", num_inference_steps, 1, min(MAX_STEPS, t_max))
        self.guidance_scale = option_float("guidance_scale", guidance_scale, 0.0, MAX_GUIDANCE)
        self.sigma = option_float("sigma", sigma, 0.0, 100.0)
        self.eta = None if self.sampler == "pndm" else option_float("ddim_eta", eta, 0.0, 1.0)
        self.feather = option_float("keep_feather", feather, 0.0, 1e4)
        self.resample = option_int("keep_resample", resample, 1, MAX_RESAMPLE)
        self.blend = check_blend(blend)
        self.attribute_guidance = (None if attribute_guidance is None else
                                   option_float("attribute_guidance", attribute_guidance, 0.0, MAX_GUIDANCE))
        self.progress = as_bool(progress)
        if self.num_inference_steps < 1:
            raise MammoInputError("ddim_steps", f"must be at least 1, got {num_inference_steps!r}")
        if self.sigma < 0:
            raise MammoInputError("sigma", f"must be >= 0, got {sigma!r}")

    @staticmethod
    def default_lesions(label: torch.Tensor, max_lesions: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Lesion slots of label maps ``(B, 1, S, S)``: 8-connected components of label 2 in first-pixel order."""
        from scipy import ndimage

        b, _, h, w = label.shape
        masks = torch.zeros(b, max_lesions, h, w)
        present = torch.zeros(b, max_lesions)
        for i in range(b):
            lesion = label[i, 0].detach().cpu().numpy() == 2
            comp, n = ndimage.label(lesion, structure=np.ones((3, 3)))
            if n > max_lesions:
                raise ValueError(f"label map {i} has {n} lesions; the model has {max_lesions} slots")
            firsts = sorted((int(np.flatnonzero(comp.ravel() == k)[0]), k) for k in range(1, n + 1))
            for slot, (_, k) in enumerate(firsts):
                masks[i, slot] = torch.from_numpy(comp == k)
                present[i, slot] = 1.0
        return masks.to(label.device), present.to(label.device)

    @torch.no_grad()
    def __call__(  # type: ignore[override]
        self,
        inputs: torch.Tensor,
        network: nn.Module,
        features: torch.Tensor | None = None,
        lesion_masks: torch.Tensor | None = None,
        lesion_present: torch.Tensor | None = None,
        seeds: Sequence[int] | None = None,
        known_image: torch.Tensor | None = None,
        region: torch.Tensor | None = None,
        resample: int | None = None,
        **extra_cond: Any,
    ) -> torch.Tensor:
        from custom.engines.sampling import ddim_sample, pndm_sample
        from custom.transforms.masks import soft_mask

        label = torch.as_tensor(inputs).float()
        label = label.as_tensor() if hasattr(label, "as_tensor") else label
        if label.ndim == 3:
            label = label[None]
        if label.ndim != 4 or label.shape[1] != 1:
            raise ValueError(f"GCDMSamplingInferer: label maps (B, 1, S, S) expected, got {tuple(label.shape)}")
        r = label.shape[0]
        slots = int(getattr(network, "max_lesions", 2))
        if lesion_masks is None or lesion_present is None:
            lesion_masks, lesion_present = self.default_lesions(label, slots)
        if features is None:
            if bool((lesion_present > 0).any()):
                raise MammoInputError("features", "the label map has lesions: their lesion features are required")
            features = torch.zeros(r, slots, int(getattr(getattr(network, "conditioner", None), "radiomic_dim", 67)),
                                   device=label.device)
        label_names = tuple(getattr(network, "lesion_label_names", ()) or ())
        if label_names:  # per-slot lesion labels (custom.data.lesion_labels): "not given" unless the rows carry codes
            codes = extra_cond.get("lesion_labels")
            if codes is None:
                codes = torch.full((r, slots, len(label_names)), -1, dtype=torch.long)
            extra_cond["lesion_labels"] = torch.as_tensor(codes).long().to(label.device)
        else:
            check_lesion_labels_allowed(extra_cond.get("lesion_labels") is not None, label_names)
        seeds = list(range(r)) if seeds is None else [int(s) for s in seeds]
        if len(seeds) != r:
            raise ValueError(f"GCDMSamplingInferer: {len(seeds)} seeds for {r} rows")
        enc_device = next(self.encoder.parameters()).device
        soft = soft_mask(label.cpu(), sigma=self.sigma).to(enc_device)
        mask_latent = self.encoder.encode_mask(soft).to(label.device)
        known_latent = region_latent = weights = None
        if (known_image is None) != (region is None):
            raise ValueError("GCDMSamplingInferer: known_image and region go together")
        if known_image is not None:
            known_image = known_image.float().to(label.device)
            known_latent = self.encoder.encode(known_image.to(enc_device)).to(label.device)
            region_latent = (torch.nn.functional.adaptive_max_pool2d(region.float(), known_latent.shape[-2:]) > 0).float()
            weights = torch.stack([paste_weights(region[i, 0], self.feather) for i in range(r)])[:, None].to(label.device)
        if resample is None:  # RePaint's resampling: only where a known image is kept
            resample = self.resample if known_image is not None else 1
            if self.resample > 1 and known_image is None:
                raise MammoInputError("keep_resample", "resampling needs a source image to keep (mode keep/inpaint/remove)")
        if r == 0:
            return torch.zeros_like(label)
        # all rows in one sampler call; each row keeps its own seed's generator, so a row's image does not depend
        # on the other rows of the request
        if self.sampler == "pndm":
            if known_latent is not None:
                raise MammoInputError("sampler", "pndm generates whole images only: keep mode needs --sampler ddim")
            res = pndm_sample(
                self._network(network), self.scheduler, mask_latent, features.float(), lesion_masks.float(),
                lesion_present.float(), num_inference_steps=self.num_inference_steps,
                guidance_scale=self.guidance_scale, seed=seeds, decoder=self.encoder, progress=self.progress,
                attribute_guidance=self.attribute_guidance, **extra_cond,
            )
            return res.images.float().to(label.device).clamp(0.0, 1.0)
        res = ddim_sample(
            self._network(network), self.scheduler, mask_latent, features.float(), lesion_masks.float(),
            lesion_present.float(), num_inference_steps=self.num_inference_steps,
            guidance_scale=self.guidance_scale, seed=seeds, eta=self.eta, decoder=self.encoder,
            known_latent=known_latent, region=region_latent, progress=self.progress, resample=int(resample),
            attribute_guidance=self.attribute_guidance, **extra_cond,
        )
        img = res.images.float().to(label.device).clamp(0.0, 1.0)
        if weights is not None:
            img = self.paste(img, known_image, region, weights)
        return img

    def paste(self, img: torch.Tensor, known: torch.Tensor, region: torch.Tensor,
              weights: torch.Tensor | None = None) -> torch.Tensor:
        """The decoded ``img`` ``(R, 1, S, S)`` pasted into ``known`` over ``region``: Poisson-blended first when
        ``blend`` is ``poisson``, then ``known`` outside ``region`` exactly and the ``feather`` ramp inside it."""
        if weights is None:
            weights = torch.stack([paste_weights(region[i, 0], self.feather) for i in range(img.shape[0])])[:, None]
        weights = weights.to(img.device)
        if self.blend == "poisson":
            from custom.transforms.blend import poisson_blend

            img = poisson_blend(img, known, region > 0).clamp(0.0, 1.0)
        return torch.where(weights > 0, weights * img + (1.0 - weights) * known, known)

    def _network(self, network: nn.Module) -> nn.Module:
        """``network``, or its ``torch.compile`` wrapper (built once per network) when ``compile`` is on."""
        if not self.compile:
            return network
        if self._compiled is None or self._compiled[0] is not network:
            self._compiled = (network, CompiledDenoiser(network))
        return self._compiled[1]


class CompiledDenoiser(nn.Module):
    """``torch.compile`` of a GCDM network's UNet call, for sampling (the optional ``compile`` switch of
    :class:`GCDMSamplingInferer`; see ``bundle/docs/benchmarks.md`` for its measured effect).

    Forwards ``context`` / ``latent_channels`` / ``max_lesions`` / ``conditioner`` to the wrapped network and
    compiles only ``network.forward`` (``dynamic=False``: one graph per batch shape); the weights stay the
    network's own, so checkpoints are unaffected."""

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network
        self._forward = torch.compile(network.forward, dynamic=False)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["_modules"]["network"], name)

    def context(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.network.context(*args, **kwargs)

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self._forward(*args, **kwargs)


class GCDMCheckpointLoader(CheckpointLoader):
    """MONAI ``CheckpointLoader`` (``torch.load(weights_only=True)``) for the stage-2 model file, whose problems read
    as one sentence: a missing file says to train stage 2, a corrupt file says so, weights of another configuration
    list the first shape mismatch (:func:`custom.checkpoints.load_state_dict_checked`).

    ``load_dict={"model": network}`` loads ``model.pt["model"]``: the EMA weights written by training."""

    def __init__(self, load_path: str, load_dict: dict, name: str | None = None, map_location: Any = None,
                 strict: bool = True, strict_shape: bool = True, what: str = "stage-2 model checkpoint") -> None:
        super().__init__(str(load_path), load_dict, name=name, map_location=map_location, strict=strict,
                         strict_shape=strict_shape)
        self.what = what

    def __call__(self, engine: Engine) -> None:
        from custom.checkpoints import load_checkpoint, load_state_dict_checked, verify_checkpoint

        path = Path(self.load_path)
        if not path.is_file():
            raise MammoInputError(path, f"{self.what} not found: train stage 2 first (python -m monai.bundle run "
                                        "training --config_file \"['bundle/configs/common.json',"
                                        "'bundle/configs/train_diffusion.json']\"), or point --ckpt_dir at a model folder")
        verify_checkpoint(path, self.what)  # against its .sha256, before anything is unpickled
        try:
            super().__call__(engine)
        except Exception as err:
            ckpt = load_checkpoint(path, "cpu", what=self.what)  # a corrupt file raises a clear error here
            for key, obj in self.load_dict.items():
                if isinstance(obj, nn.Module):
                    if key not in ckpt:
                        raise MammoInputError(path, f"{self.what} has no {key!r} entry (found {sorted(ckpt)[:8]})") from err
                    load_state_dict_checked(obj, ckpt[key], path, self.what)
            raise MammoInputError(path, f"{self.what} could not be loaded ({type(err).__name__}: "
                                        f"{(str(err).splitlines() or [''])[0][:200]})") from None


class CaseProgressBar:
    """An ignite ``ProgressBar`` over the cases (one iteration = one case); DDIM shows its own bar over steps."""

    def __init__(self, enabled: bool = True, desc: str = "cases") -> None:
        self.enabled, self.desc = as_bool(enabled), desc

    def attach(self, engine: Engine) -> None:
        if not self.enabled:
            return
        from ignite.handlers import ProgressBar

        ProgressBar(persist=True, desc=self.desc).attach(engine)


def _rows(engine: Engine) -> list[tuple[InferenceCase, int, int, torch.Tensor]]:
    """(case, sample index, seed, image (S, S)) for every row of the current iteration."""
    batch, pred = engine.state.batch, engine.state.output["pred"]
    out, r = [], 0
    for case in batch["case"]:
        for j, seed in enumerate(case.seeds):
            out.append((case, j, int(seed), pred[r, 0].detach().float().cpu()))
            r += 1
    return out


def sampling_parameters(inferer: GCDMSamplingInferer, *, model_path: str | None = None, stage1_path: str | None = None,
                        conditioning_mode: str | None = None, image_size: int | None = None,
                        model_version: str | None = None, keep_dilation: int | None = None,
                        extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The parameters recorded with every output (sidecar + DICOM description)."""
    params = {
        "model": "GCDM (mammo_gcdm)",
        "model_version": model_version,
        "model_file": Path(model_path).name if model_path else None,
        "model_sha256": _file_sha256(model_path),
        "weights": "EMA",
        "stage1_file": Path(stage1_path).name if stage1_path else None,
        "stage1_sha256": getattr(inferer.encoder, "checkpoint_digest", None) or _file_sha256(stage1_path),
        "conditioning_mode": conditioning_mode,
        "image_size": image_size,
        "sigma": inferer.sigma,
        "ddim_steps": inferer.num_inference_steps,
        "guidance_scale": inferer.guidance_scale,
        "ddim_eta": inferer.eta,
    }
    if getattr(inferer, "attribute_guidance", None) is not None:
        params["attribute_guidance"] = inferer.attribute_guidance
    if inferer.sampler != "ddim":  # (DDIM outputs keep their parameters as before)
        params["sampler"] = inferer.sampler
    if keep_dilation is not None:
        params["keep_dilation_px"] = int(keep_dilation)
        params["keep_feather_px"] = inferer.feather
        params["keep_resample"] = int(getattr(inferer, "resample", 1))
        params["keep_blend"] = getattr(inferer, "blend", "feather")
    params.update(dict(extra or {}))
    return params


class SampleWriter:
    """Write every generated sample with :func:`custom.data.export.export_sample` (all formats + sidecar, all or
    nothing) as ``<output_dir>/<case name>_seed<seed>.*``.

    Args:
        output_dir: output folder (created when the first sample is written).
        parameters: recorded with every sample (see :func:`sampling_parameters`); ``seed``, ``sample_index`` and
            ``mode`` are added per sample.
        formats: any of ``dcm``, ``png``, ``nii``.
        map_to_source: write on the source grid when the conditions carry a geometry.
        copy_patient: copy the source DICOM's patient module (default: a SYNTHETIC patient).
        skip_existing: leave a sample whose sidecar already exists (a re-run of an interrupted batch).
        record_file_names: record the input files' base names (default: their content hashes only).

    Attributes:
        written: ``[{"case", "seed", "files": {fmt: name}}]``; skipped: ``[{"case", "seed", "reason"}]``.
    """

    def __init__(self, output_dir: str | os.PathLike, parameters: Mapping[str, Any] | None = None,
                 formats: Sequence[str] | str = ("dcm", "png", "nii"), map_to_source: bool = True,
                 copy_patient: bool = False, skip_existing: bool = False, enabled: bool = True,
                 record_file_names: bool = False) -> None:
        self.output_dir = Path(output_dir)
        self.parameters = dict(parameters or {})
        self.formats = formats
        self.map_to_source = as_bool(map_to_source)
        self.copy_patient = as_bool(copy_patient)
        self.record_file_names = as_bool(record_file_names)
        self.skip_existing = as_bool(skip_existing)
        self.enabled = as_bool(enabled)
        self.written: list[dict[str, Any]] = []
        self.skipped: list[dict[str, Any]] = []

    def attach(self, engine: Engine) -> None:
        if self.enabled:
            engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    @staticmethod
    def name(case: InferenceCase, seed: int) -> str:
        return f"{case.name}_seed{int(seed)}"

    def case_parameters(self, engine: Engine, case: InferenceCase) -> dict[str, Any]:
        """Sidecar parameters of one case beside the run's ``parameters`` (none here; a subclass's hook)."""
        return {}

    def __call__(self, engine: Engine) -> None:
        from custom.data.export import export_sample

        for case, j, seed, image in _rows(engine):
            name = self.name(case, seed)
            if self.skip_existing and (self.output_dir / f"{name}.json").is_file():
                self.skipped.append({"case": case.name, "seed": seed, "reason": "output exists (skip_existing)"})
                continue
            params = {**self.parameters, **self.case_parameters(engine, case), "seed": seed, "sample_index": j,
                      "mode": case.mode}
            if case.mode == "keep":
                params["keep_region_pixels"] = int(np.asarray(case.region).sum())
                params["keep_image"] = case.extra.get("image_file")
            paths = export_sample(self.output_dir, name, image.numpy(), case.conditions, params, formats=self.formats,
                                  source_dicom=case.source_dicom, map_to_source=self.map_to_source,
                                  copy_patient=self.copy_patient, file_names=self.record_file_names)
            self.written.append({"case": case.name, "seed": seed, "files": {k: Path(v).name for k, v in paths.items()}})


class InferenceSummary:
    """At the end of the run: print what was written and what was skipped (and why) and write
    ``<output_dir>/inference_summary.json`` (atomically; only when something was written)."""

    def __init__(self, writer: SampleWriter, cases: CaseSet, parameters: Mapping[str, Any] | None = None,
                 filename: str = "inference_summary.json") -> None:
        self.writer = writer
        self.cases = cases
        self.parameters = dict(parameters or {})
        self.filename = filename
        self.start = time.time()
        self.summary: dict[str, Any] = {}

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, lambda _: setattr(self, "start", time.time()))
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine | None = None) -> dict[str, Any]:
        from custom.io import atomic_write_json

        skipped = list(self.cases.skipped) + list(self.writer.skipped)
        seconds = time.time() - self.start
        n_samples = len(self.writer.written)
        self.summary = {
            "output_dir": str(self.writer.output_dir),
            "input": self.cases.source,
            "n_cases": len(self.cases.cases),
            "n_written": n_samples,
            "n_skipped": len(skipped),
            "seconds": round(seconds, 2),
            "seconds_per_sample": round(seconds / n_samples, 3) if n_samples else None,
            "parameters": self.parameters,
            "written": self.writer.written,
            "skipped": skipped,
        }
        if n_samples:
            atomic_write_json(self.writer.output_dir / self.filename, json.loads(json.dumps(self.summary, default=str)))
        lines = [f"inference: {n_samples} sample(s) of {len(self.cases.cases)} case(s) written to {self.writer.output_dir} "
                 f"in {seconds:.1f} s"]
        for w in self.writer.written[:20]:
            lines.append(f"  wrote   {w['case']} seed {w['seed']}: {', '.join(sorted(w['files'].values()))}")
        if len(self.writer.written) > 20:
            lines.append(f"  ... {len(self.writer.written) - 20} more (see {self.filename})")
        for s in skipped:
            lines.append(f"  skipped {s['case']}{' seed ' + str(s['seed']) if 'seed' in s else ''}: {s['reason']}")
        if n_samples:
            lines.append(f"  summary: {self.writer.output_dir / self.filename}")
        print("\n".join(lines), flush=True)
        return self.summary
