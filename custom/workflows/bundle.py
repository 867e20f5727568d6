"""The bundle as MONAI's own tools see it: where it is, which options a workflow accepts, and the one model definition.

- :func:`bundle_root` — the default of every config's ``bundle_root``: the folder holding the ``configs/`` folder the
  running ``ConfigWorkflow`` was built from (``python -m monai.bundle run``, ``monai.bundle.load``,
  ``ConfigWorkflow(...)``), so a bundle works from any working directory and from a zip extracted anywhere; an
  explicit ``--bundle_root`` wins.
- :func:`workflow_options` — every key a user passes is honoured or rejected: a top-level key that none of the
  workflow's own config files defines is an error (``ERROR: --key: ...``), except the model keys recorded with the
  checkpoint, which are returned as model overrides and checked against the record by :class:`BundleModel`.
- :func:`model_record` / :class:`BundleModel` — the model is defined once, in ``configs/common.json``. Training
  merges that file and writes the resolved values of its ``autoencoder_record`` / ``diffusion_record`` into the
  checkpoints (``model_config``); inference, evaluation and the MONAI Label app rebuild the network from
  ``common.json`` + that record, so a paper-scale model needs no scale file at inference, and the weights are loaded
  strictly (a checkpoint of another configuration is an error naming the first mismatch).

Why the stack is read: MONAI's ``ConfigWorkflow`` gives a config's expressions neither the folder of its config
files nor the set of command-line overrides, and ``monai.bundle.load`` passes no ``bundle_root``; both are attributes
of the ``ConfigWorkflow`` instance that is evaluating the expression, found on the call stack. Outside a
``ConfigWorkflow`` (a bare ``ConfigParser``) nothing is found: ``bundle_root`` falls back to ``"."`` and no option is
rejected.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from monai.bundle import ConfigParser, ConfigWorkflow
from monai.bundle.utils import DEFAULT_EXP_MGMT_SETTINGS

from custom.checkpoints import load_checkpoint, load_state_dict_checked
from custom.errors import MammoInputError

__all__ = ["COMMON_CONFIG", "current_workflow", "bundle_root", "workflow_options", "model_record", "check_record", "check_stage1",
           "BundleModel", "read_record"]

logger = logging.getLogger(__name__)

#: the file holding the one model definition, in ``<bundle_root>/configs/``
COMMON_CONFIG = "common.json"
#: keys a tracking settings file (``--tracking mlflow`` or ``configs/mlflow_tracking.json``) may add
_TRACKING_KEYS = set(DEFAULT_EXP_MGMT_SETTINGS["mlflow"]["configs"]) - set(DEFAULT_EXP_MGMT_SETTINGS["mlflow"]["handlers_id"])
_RESERVED = {"_meta_"}


def current_workflow() -> ConfigWorkflow | None:
    """The ``ConfigWorkflow`` whose config is being evaluated now (innermost on the call stack), else ``None``."""
    frame = inspect.currentframe()
    try:
        while frame is not None:
            obj = frame.f_locals.get("self")
            if isinstance(obj, ConfigWorkflow):
                return obj
            frame = frame.f_back
    finally:
        del frame
    return None


def bundle_root(default: str = ".") -> str:
    """Absolute path of the bundle whose configs are running (the parent of their ``configs/`` folder); ``default``
    outside a ``ConfigWorkflow``."""
    wf = current_workflow()
    if wf is None:
        return default
    root = Path(wf.config_root_path)
    return str((root.parent if root.name == "configs" else root).resolve())


def _file_keys(config_dir: Path, files: Sequence[str]) -> set[str]:
    keys: set[str] = set()
    for name in files:
        path = config_dir / name
        if path.is_file():
            keys |= {k.split("#")[0] for k in ConfigParser.load_config_file(str(path))}
    return keys


def workflow_options(files: Sequence[str], model_keys: bool = False, scale_files: Sequence[str] = ()) -> dict[str, Any]:
    """Check the running workflow's top-level keys against the keys its own config files define.

    Args:
        files: this workflow's config files (names in the bundle's ``configs/``), e.g. ``["common.json",
            "train_diffusion.json"]``.
        model_keys: accept the recorded model keys of ``common.json`` (inference/evaluation, which do not merge it):
            they are returned, resolved, for :class:`BundleModel` to check against the checkpoint.
        scale_files: override files that may be merged into this workflow (``paper.json``, multi-GPU files): their
            keys are accepted when their value is the file's own (the file was merged), rejected when a user sets
            one that this workflow does not use.

    Returns:
        ``{key: value}`` of the model keys given (empty outside a ``ConfigWorkflow``).

    Raises:
        MammoInputError: ``--<key>``: a key no file of this workflow defines (an option that would be ignored).
    """
    wf = current_workflow()
    if wf is None:
        return {}
    config_dir = Path(wf.config_root_path)
    known = _file_keys(config_dir, files) | _RESERVED | _TRACKING_KEYS
    recorded: set[str] = set()
    if model_keys and (config_dir / COMMON_CONFIG).is_file():
        common = ConfigParser.load_config_file(str(config_dir / COMMON_CONFIG))
        recorded = set(common.get("autoencoder_record", {})) | set(common.get("diffusion_record", {}))
    scale_values: dict[str, list[Any]] = {}
    for name in scale_files:
        path = config_dir / name
        if path.is_file():
            for k, v in ConfigParser.load_config_file(str(path)).items():
                scale_values.setdefault(k.split("#")[0], []).append(v)
    overrides: dict[str, Any] = {}
    for key in list(wf.parser.get()):
        if key in known:
            continue
        if key in recorded:
            overrides[key] = wf.parser.get_parsed_content(key)
            continue
        if key in scale_values and any(wf.parser.get(key) == v for v in scale_values[key]):
            continue
        raise MammoInputError(f"--{key}", f"not an option of {' + '.join(files)} (it would be ignored); "
                                          "the workflow's options are the keys of those files")
    return overrides


def model_record(*records: Mapping[str, Any]) -> str:
    """The model record written into a checkpoint: JSON of the resolved ``autoencoder_record`` (and
    ``diffusion_record``) of ``configs/common.json``."""
    merged: dict[str, Any] = {}
    for rec in records:
        merged.update(rec)
    return json.dumps(merged, sort_keys=True, default=str)


def read_record(checkpoint: Mapping[str, Any], source: str | os.PathLike) -> dict[str, Any] | None:
    """The ``model_config`` record of a loaded checkpoint dict (``None`` for a file written before records)."""
    raw = checkpoint.get("model_config")
    if raw is None:
        return None
    try:
        rec = json.loads(raw)
    except (TypeError, ValueError) as err:
        raise MammoInputError(source, f"unreadable model_config record ({err})") from None
    if not isinstance(rec, dict):
        raise MammoInputError(source, "model_config record must be a JSON object")
    return rec


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool) and not isinstance(b, bool):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-12)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return set(a) == set(b) and all(_same(a[k], b[k]) for k in a)
    return a == b


def check_record(record: Mapping[str, Any] | None, values: Mapping[str, Any], source: str | os.PathLike, what: str,
                 hint: str = "train it with the same model keys (configs/common.json and the same scale file)") -> None:
    """Raise when a checkpoint's record disagrees with the configuration now in use.

    Raises:
        MammoInputError: names the checkpoint, the first differing key and both values.
    """
    if record is None:
        return
    for key, value in values.items():
        if key in record and not _same(json.loads(json.dumps(value, default=str)), record[key]):
            raise MammoInputError(source, f"{what} was trained with {key}={record[key]!r} but this configuration has "
                                          f"{key}={value!r}: {hint}")


def check_stage1(path: str | os.PathLike, autoencoder_record: Mapping[str, Any]) -> None:
    """Before stage 2: the stage-1 file's record must match this configuration's autoencoder keys (a missing file is
    reported when the latent encoder loads it)."""
    path = Path(path)
    if path.is_file():
        check_record(read_record(load_checkpoint(path, "cpu", what="stage-1 checkpoint"), path), autoencoder_record, path,
                     "the stage-1 autoencoder", hint="stage 2 must use the model keys (and scale file) stage 1 was trained with")


#: model keys that name where weights live rather than what they are: they may differ from the record (a model moved to
#: another machine) and are then verified by content (SHA-256 against ``diffusion_info.json``) when loaded.
RELOCATABLE_KEYS = ("sd_path",)


class BundleModel:
    """The trained model of a bundle, rebuilt from its one definition (``configs/common.json``) and the record the
    training wrote into ``model.pt``: the network (weights loaded strictly), the frozen latent encoder (stage 1,
    checked against its own record), the DDIM scheduler and the resolved model values.

    Args:
        bundle_root: the bundle folder (``configs/common.json`` is read from it).
        model_path: the stage-2 file ``{"model": EMA state_dict, "model_config": record, ...}``.
        stage1_path: the stage-1 file (``autoencoder.pt``).
        device: where the networks go.
        overrides: model keys given to the inference/evaluation workflow (from :func:`workflow_options`); each must
            equal the recorded value, except those in ``may_differ`` (an evaluation ablation), which are applied
            with a warning.
        may_differ: keys that may differ from the record (the soft-mask ``sigma`` of an ablation).

    Attributes:
        config: ``{key: value}`` of every recorded model key, after overrides.
        record: the checkpoint's record (``None`` for a file written before records: ``common.json`` defaults used).
        network: the denoiser (``eval()`` mode, on ``device``).
        mismatches: ``{key: {"trained": a, "configured": b}}`` for applied ``may_differ`` overrides.

    Raises:
        MammoInputError: missing/corrupt file, a model key that differs from the record, weights of another
            configuration.
    """

    def __init__(self, bundle_root: str | os.PathLike, model_path: str | os.PathLike, stage1_path: str | os.PathLike,
                 device: str | torch.device = "cpu", overrides: Mapping[str, Any] | None = None,
                 may_differ: Sequence[str] = ("sigma",)) -> None:
        self.bundle_root = Path(bundle_root)
        self.model_path = Path(model_path)
        self.stage1_path = Path(stage1_path)
        self.device = torch.device(device)
        common = self.bundle_root / "configs" / COMMON_CONFIG
        if not common.is_file():
            raise MammoInputError(common, "the bundle's model definition is missing (is --bundle_root the bundle folder?)")
        if not self.model_path.is_file():
            raise MammoInputError(self.model_path, "stage-2 model checkpoint not found: train stage 2 first (python -m "
                                                   "monai.bundle run training --config_file \"['bundle/configs/common.json',"
                                                   "'bundle/configs/train_diffusion.json']\"), or point --ckpt_dir at a model folder")
        ckpt = load_checkpoint(self.model_path, "cpu", what="stage-2 model checkpoint")
        if "model" not in ckpt:
            raise MammoInputError(self.model_path, f"stage-2 model checkpoint has no 'model' entry (found {sorted(ckpt)[:8]})")
        self.record = read_record(ckpt, self.model_path)
        self.parser = ConfigParser()
        self.parser.read_config(str(common))
        keys = list(self.parser.get("autoencoder_record", {})) + list(self.parser.get("diffusion_record", {}))
        if self.record is None:
            logger.warning("%s has no model_config record (written before 0.5): using %s as it is", self.model_path, common)
        else:
            unknown = sorted(set(self.record) - set(keys))
            if unknown:
                raise MammoInputError(self.model_path, f"records model keys {unknown} that {common} does not define "
                                                       "(a checkpoint of another bundle version)")
            self.parser.update(dict(self.record))
        self.mismatches: dict[str, dict[str, Any]] = {}
        self.relocated: dict[str, dict[str, Any]] = {}
        for key, value in dict(overrides or {}).items():
            trained = self.parser.get_parsed_content(key)
            if _same(json.loads(json.dumps(value, default=str)), json.loads(json.dumps(trained, default=str))):
                continue
            if key in RELOCATABLE_KEYS:  # the same weights at another place: verified by content when loaded
                self.relocated[key] = {"trained": trained, "configured": value}
                self.parser[key] = value
                continue
            if key not in may_differ:
                raise MammoInputError(self.model_path, f"the model was trained with {key}={trained!r} but --{key} "
                                                       f"{value!r} was given: point --ckpt_dir at a model trained with "
                                                       f"{key}={value!r}")
            self.mismatches[key] = {"trained": trained, "configured": value}
            self.parser[key] = value
        self.parser.update({"bundle_root": str(self.bundle_root), "device": f"$torch.device('{self.device}')",
                            "model_path": str(self.model_path), "stage1_checkpoint": str(self.stage1_path),
                            "ckpt_dir": str(self.model_path.parent)})
        self.config = {k: self.parser.get_parsed_content(k) for k in keys}
        self.network = self.parser.get_parsed_content("network_def").to(self.device)
        load_state_dict_checked(self.network, ckpt["model"], self.model_path, "stage-2 model checkpoint")
        self.network.eval()
        self._latent_encoder = None

    @property
    def latent_encoder(self) -> torch.nn.Module:
        """The frozen stage-1 autoencoder (``FrozenLatentEncoder``), its record checked against the model's."""
        if self._latent_encoder is None:
            ckpt = load_checkpoint(self.stage1_path, "cpu", what="stage-1 checkpoint") if self.stage1_path.is_file() else {}
            ae_keys = list(self.parser.get("autoencoder_record", {}))
            check_record(read_record(ckpt, self.stage1_path), {k: self.config[k] for k in ae_keys}, self.stage1_path,
                         "the stage-1 autoencoder", hint="it is not the autoencoder this model was trained with")
            encoder = self.parser.get_parsed_content("latent_encoder").to(self.device)
            if self.relocated:
                self._check_relocated(encoder)
            self._latent_encoder = encoder
        return self._latent_encoder

    def _check_relocated(self, encoder: torch.nn.Module) -> None:
        """A stage 1 read from another place than in training (``--sd_path`` on another machine) must be the same
        weights: its SHA-256 must equal ``stage1_checkpoint_sha256`` of the model's ``diffusion_info.json``."""
        info_path = self.model_path.parent / "diffusion_info.json"
        try:
            recorded = json.loads(info_path.read_text()).get("stage1_checkpoint_sha256")
        except (OSError, ValueError) as err:
            raise MammoInputError(info_path, f"cannot verify the relocated {sorted(self.relocated)} without the model's "
                                             f"side file ({err})") from None
        used = getattr(encoder, "checkpoint_digest", None)
        key = min(self.relocated)  # the first relocated key, in name order
        moved = self.relocated[key]
        if not recorded or used != recorded:
            raise MammoInputError(moved["configured"],
                                  f"--{key}: not the weights this model was trained with (SHA-256 {str(used)[:12]}…, "
                                  f"{info_path.name} records {str(recorded)[:12]}…)")
        logger.info("stage 1 read from %s (trained with %s): same weights (SHA-256 %s…)",
                    moved["configured"], moved["trained"], str(used)[:12])

    @property
    def sampling_scheduler(self) -> Any:
        """A new ``DDIMScheduler`` with the recorded noise schedule."""
        return self.parser.get_parsed_content("sampling_scheduler", instantiate=True, lazy=False)

    def scheduler_for(self, sampler: str = "ddim") -> Any:
        """A new scheduler for ``sampler`` with the recorded noise schedule: ``ddim`` -> ``sampling_scheduler``
        (``DDIMScheduler``), ``pndm`` -> ``pndm_scheduler`` (``PNDMScheduler``)."""
        keys = {"ddim": "sampling_scheduler", "pndm": "pndm_scheduler"}
        key = keys.get(str(sampler).strip().lower())
        if key is None:
            raise MammoInputError("sampler", f"must be one of {', '.join(keys)}, got {str(sampler)[:40]!r}")
        return self.parser.get_parsed_content(key, instantiate=True, lazy=False)

    def __getitem__(self, key: str) -> Any:
        return self.config[key]
