"""Checkpoint files: loaded with ``weights_only=True``, written atomically, with errors that name the cause.

The stage-1 file (``models/autoencoder.pt``) is a dict ``{"autoencoder": AutoencoderKL state_dict,
"scale_factor": 0-d float tensor}``: the latent scale factor (1 / std of training latents) travels with the weights.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from custom.errors import MammoInputError
from custom.io import atomic_path

__all__ = ["load_checkpoint", "load_state_dict_checked", "save_checkpoint", "load_stage1", "save_stage1"]


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu", what: str = "checkpoint") -> dict[str, Any]:
    """``torch.load(path, weights_only=True)`` with clear errors for a missing or corrupt file."""
    path = Path(path)
    if not path.is_file():
        raise MammoInputError(path, f"{what} not found")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:
        raise MammoInputError(path, f"corrupt or unreadable {what} ({type(err).__name__}: {str(err).splitlines()[0][:200]})") from err
    if not isinstance(obj, Mapping):
        raise MammoInputError(path, f"{what} must hold a dict, got {type(obj).__name__}")
    return dict(obj)


def load_state_dict_checked(module: torch.nn.Module, state: Mapping[str, torch.Tensor], source: str | os.PathLike, what: str) -> None:
    """``module.load_state_dict(state, strict=True)``, turning key/shape mismatches into one readable error
    (a checkpoint from another configuration)."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        if shapes:
            parts.append(f"{len(shapes)} shape mismatch(es), e.g. {shapes[0]}")
        if missing:
            parts.append(f"{len(missing)} missing key(s), e.g. {missing[0]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s), e.g. {unexpected[0]}")
        raise MammoInputError(source, f"{what} does not match the configured network (another configuration?): " + "; ".join(parts))
    module.load_state_dict(state, strict=True)


def save_checkpoint(path: str | os.PathLike, obj: Mapping[str, Any]) -> Path:
    """``torch.save`` to a temporary file and rename: an interrupted save never leaves a corrupt file."""
    with atomic_path(path) as tmp:
        torch.save(dict(obj), tmp)
    return Path(path)


def save_stage1(path: str | os.PathLike, autoencoder: torch.nn.Module, scale_factor: float, model_config: str | None = None) -> Path:
    """Write the stage-1 file: autoencoder weights + latent scale factor (+ ``model_config``, the JSON record of the
    model keys it was built with, see ``custom.workflows.bundle``)."""
    state = {k: v.detach().cpu() for k, v in autoencoder.state_dict().items()}
    obj: dict[str, Any] = {"autoencoder": state, "scale_factor": torch.tensor(float(scale_factor))}
    if model_config is not None:
        obj["model_config"] = model_config
    return save_checkpoint(path, obj)


def load_stage1(path: str | os.PathLike, autoencoder: torch.nn.Module, map_location: str | torch.device = "cpu") -> float:
    """Load the stage-1 file into ``autoencoder`` (in place) and return the latent scale factor.

    Raises:
        MammoInputError: missing stage-1 checkpoint (train stage 1 first), corrupt file, or a network of another
        configuration.
    """
    path = Path(path)
    if not path.is_file():
        raise MammoInputError(path, "stage-1 autoencoder checkpoint not found: train stage 1 first "
                                    "(python -m monai.bundle run training --config_file \"['bundle/configs/common.json',"
                                    "'bundle/configs/train_autoencoder.json']\")")
    ckpt = load_checkpoint(path, map_location, what="stage-1 checkpoint")
    if "autoencoder" not in ckpt or "scale_factor" not in ckpt:
        raise MammoInputError(path, f"not a stage-1 checkpoint: expected keys 'autoencoder' and 'scale_factor', found {sorted(ckpt)}")
    load_state_dict_checked(autoencoder, ckpt["autoencoder"], path, "stage-1 checkpoint")
    scale = float(ckpt["scale_factor"])
    if not (scale > 0 and scale < float("inf")):
        raise MammoInputError(path, f"invalid latent scale factor {scale}")
    return scale
