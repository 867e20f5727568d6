"""Checkpoint files: loaded with ``weights_only=True``, written atomically, verified, with errors that name the cause.

Every checkpoint the bundle writes (:func:`save_checkpoint`, and the training-state files of
:class:`custom.engines.autoencoder.AtomicCheckpointSaver`) gets a checksum file beside it, ``<name>.sha256``
(``"<hex digest>  <name>"``, the ``sha256sum`` format), written atomically with it. :func:`verify_checkpoint` checks
it before anything is unpickled; :func:`load_checkpoint` (resume, inference, evaluation, the stage-1 and latent-cache
loaders) calls it, and the MONAI Label app can call it on its own. Any damage - flipped bytes, truncation, an empty
file, a folder in its place, a missing or malformed checksum file - ends in one :class:`MammoInputError` naming the
checkpoint. A file written elsewhere can be vouched for with ``python -m custom.checkpoints --write FILE``.

The stage-1 file (``models/autoencoder.pt``) is a dict ``{"autoencoder": AutoencoderKL state_dict,
"scale_factor": 0-d float tensor}``: the latent scale factor (1 / std of training latents) travels with the weights.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch

from custom.errors import MammoInputError
from custom.io import atomic_path, atomic_write_text

__all__ = ["checksum_path", "file_sha256", "write_checksum", "verify_checkpoint", "load_checkpoint",
           "load_state_dict_checked", "StateDictMismatches", "state_dict_mismatches", "save_checkpoint", "load_stage1", "save_stage1"]

_CHECKSUM_LINE = re.compile(r"^([0-9a-f]{64})  (.+)$")


def checksum_path(path: str | os.PathLike) -> Path:
    """The checksum file of a checkpoint: ``<path>.sha256`` beside it."""
    path = Path(path)
    return path.with_name(path.name + ".sha256")


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_checksum(path: str | os.PathLike, digest: str | None = None) -> Path:
    """Write ``<path>.sha256`` (atomically) for the checkpoint ``path``; ``digest`` when already known."""
    path = Path(path)
    digest = digest or file_sha256(path)
    return atomic_write_text(checksum_path(path), f"{digest}  {path.name}\n")


def verify_checkpoint(path: str | os.PathLike, what: str = "checkpoint") -> str:
    """Check a checkpoint against its ``.sha256`` file before it is loaded; returns the digest.

    Raises:
        MammoInputError: naming ``path``: not found, not a file, empty, no checksum file, an unreadable or
        malformed checksum file, or content that does not match it (a damaged file).
    """
    path = Path(path)
    if not path.exists():
        raise MammoInputError(path, f"{what} not found")
    if not path.is_file():
        raise MammoInputError(path, f"{what} is not a file")
    try:
        size = path.stat().st_size
        digest = file_sha256(path)
    except OSError as err:
        raise MammoInputError(path, f"unreadable {what} ({err.strerror or err})") from None
    if size == 0:
        raise MammoInputError(path, f"{what} is empty (0 bytes): an interrupted copy? Restore the file")
    side = checksum_path(path)
    if not side.is_file():
        raise MammoInputError(path, f"{what} has no checksum file {side.name} beside it, so its integrity cannot be "
                                    "verified (every checkpoint the bundle writes has one; for a file you trust: "
                                    f"python -m custom.checkpoints --write {path})")
    try:
        text = side.read_text(encoding="utf-8", errors="strict")
    except (OSError, UnicodeDecodeError) as err:
        raise MammoInputError(path, f"unreadable checksum file {side.name} ({err})") from None
    match = _CHECKSUM_LINE.match(text.strip())
    if match is None:
        raise MammoInputError(path, f"malformed checksum file {side.name} (expected '<64 hex digits>  {path.name}')")
    if match.group(1) != digest:
        raise MammoInputError(path, f"{what} is damaged: its SHA-256 does not match {side.name} (changed or corrupted "
                                    "after it was written); restore the file or train again")
    return digest


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu", what: str = "checkpoint",
                    verify: bool = True) -> dict[str, Any]:
    """:func:`verify_checkpoint` (unless ``verify`` is False), then ``torch.load(path, weights_only=True)``, with one
    clear error naming the file for whatever goes wrong."""
    path = Path(path)
    if verify:
        verify_checkpoint(path, what)
    elif not path.is_file():
        raise MammoInputError(path, f"{what} not found")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:
        text = (str(err).splitlines() or [""])[0][:200]
        raise MammoInputError(path, f"corrupt or unreadable {what} ({type(err).__name__}: {text})") from None
    if not isinstance(obj, Mapping):
        raise MammoInputError(path, f"{what} must hold a dict, got {type(obj).__name__}")
    return dict(obj)


class StateDictMismatches(NamedTuple):
    """How a state dict differs from a network's own (:func:`state_dict_mismatches`); true when anything differs.

    ``missing``: the network's keys absent from the state dict (network order); ``unexpected``: the state dict's keys
    the network does not have (state dict order); ``shapes``: ``(key, state dict shape, network shape)`` of the common
    keys whose shapes differ (network order)."""

    missing: list[str]
    unexpected: list[str]
    shapes: list[tuple[str, tuple[int, ...], tuple[int, ...]]]

    def __bool__(self) -> bool:
        return bool(self.missing or self.unexpected or self.shapes)


def state_dict_mismatches(own: Mapping[str, Any], state: Mapping[str, Any],
                          ignore: Sequence[str] = ()) -> StateDictMismatches:
    """The key/shape diff of ``state`` (a loaded checkpoint) against ``own`` (``network.state_dict()``), the one
    check behind every strict loader (here, :func:`custom.metrics.inception.load_fid_inception`, the CLIP image
    encoder of :mod:`custom.networks.sd_weights`): each caller words its own error from it.

    Args:
        own: the network's state dict (key -> tensor; only ``.shape`` is read).
        state: the state dict to load (key -> tensor).
        ignore: key suffixes of ``own`` that may be absent from ``state`` (e.g. ``"num_batches_tracked"``): not
            reported missing; still compared by shape when present.
    """
    suffixes = tuple(ignore)
    missing = [k for k in own if k not in state and not (suffixes and k.endswith(suffixes))]
    unexpected = [k for k in state if k not in own]
    shapes = [(k, tuple(state[k].shape), tuple(own[k].shape)) for k in own
              if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    return StateDictMismatches(missing, unexpected, shapes)


def load_state_dict_checked(module: torch.nn.Module, state: Mapping[str, torch.Tensor], source: str | os.PathLike, what: str) -> None:
    """``module.load_state_dict(state, strict=True)``, turning key/shape mismatches (:func:`state_dict_mismatches`)
    into one readable error (a checkpoint from another configuration)."""
    diff = state_dict_mismatches(module.state_dict(), state)
    if diff:
        parts = []
        if diff.shapes:
            k, theirs, ours = diff.shapes[0]
            parts.append(f"{len(diff.shapes)} shape mismatch(es), e.g. {k}: checkpoint {theirs} vs model {ours}")
        if diff.missing:
            parts.append(f"{len(diff.missing)} missing key(s), e.g. {diff.missing[0]}")
        if diff.unexpected:
            parts.append(f"{len(diff.unexpected)} unexpected key(s), e.g. {diff.unexpected[0]}")
        raise MammoInputError(source, f"{what} does not match the configured network (another configuration?): " + "; ".join(parts))
    module.load_state_dict(state, strict=True)


def save_checkpoint(path: str | os.PathLike, obj: Mapping[str, Any]) -> Path:
    """``torch.save`` to a temporary file and rename, then its checksum file (:func:`write_checksum`): an interrupted
    save never leaves a corrupt file, and a file damaged later is refused at load."""
    with atomic_path(path) as tmp:
        torch.save(dict(obj), tmp)
        digest = file_sha256(tmp)
    write_checksum(path, digest)
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


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m custom.checkpoints [--write] FILE ...``: verify checkpoints (or write their checksum)."""
    parser = argparse.ArgumentParser(description="verify checkpoint files against their .sha256 files")
    parser.add_argument("files", nargs="+")
    parser.add_argument("--write", action="store_true", help="write the .sha256 file of each (a file you trust)")
    args = parser.parse_args(argv)
    status = 0
    for f in args.files:
        try:
            if args.write:
                if not Path(f).is_file():
                    raise MammoInputError(f, "not found")
                print(f"wrote {write_checksum(f)}")
            else:
                print(f"{f}: OK ({verify_checkpoint(f)[:16]}...)")
        except MammoInputError as err:
            print(f"ERROR: {err}", file=sys.stderr)
            status = 1
    return status


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
