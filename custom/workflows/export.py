"""Export of the trained denoiser with ``torch.export`` (``python -m monai.bundle run export --config_file
bundle/configs/inference.json``), checked for equal outputs before anything is written.

MONAI's ``ckpt_export`` scripts the network with TorchScript, which fails on the Hugging Face CLIP configuration the
lesion conditioner holds; ``torch.export`` traces the same forward pass into an ``ExportedProgram`` (``.pt2``,
loadable with ``torch.export.load`` and no ``custom`` import).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch

from custom.errors import MammoInputError
from custom.io import atomic_path

__all__ = ["example_inputs", "export_network"]

logger = logging.getLogger(__name__)


def example_inputs(model: Any, batch: int = 2, seed: int = 0) -> tuple[tuple[torch.Tensor, ...], dict[str, torch.Tensor]]:
    """Random inputs of the recorded shapes for the denoiser of ``model`` (a ``BundleModel``): ``(x, timesteps,
    mask_latent)`` and the lesion-condition keywords; masks binary, one lesion in the first slot."""
    cfg = model.config
    net = model.network
    g = torch.Generator().manual_seed(seed)
    size = int(cfg["image_size"])
    h = size // 2 ** (len(cfg["autoencoder_channels"]) - 1)
    dev = next(net.parameters()).device
    x = torch.randn(batch, int(cfg["latent_channels"]), h, h, generator=g)
    t = torch.randint(0, int(cfg["num_train_timesteps"]), (batch,), generator=g)
    mask_latent = torch.randn(batch, int(net.mask_latent_channels), h, h, generator=g)
    slots = int(cfg["max_lesions"])
    masks = torch.zeros(batch, slots, size, size)
    masks[:, 0, size // 4: size // 2, size // 4: size // 2] = 1.0
    present = torch.zeros(batch, slots)
    present[:, 0] = 1.0
    feats = torch.rand(batch, slots, int(cfg["radiomic_dim"]), generator=g) * present[..., None]
    args = tuple(a.to(dev) for a in (x, t, mask_latent))
    kwargs = {"features": feats.to(dev), "lesion_masks": masks.to(dev), "lesion_present": present.to(dev)}
    return args, kwargs


def export_network(model: Any, output: str | os.PathLike, atol: float = 1e-5) -> dict[str, Any]:
    """Export ``model.network`` with ``torch.export`` to ``output`` (``.pt2``) after checking that the exported
    program, and the file read back, give the network's outputs on inputs other than the tracing ones.

    Returns:
        ``{"path": output, "max_abs_diff": float}``.

    Raises:
        MammoInputError: the exported program's outputs differ by more than ``atol`` (nothing is written).
    """
    net = model.network.eval()
    args, kwargs = example_inputs(model, seed=0)
    with torch.no_grad():
        program = torch.export.export(net, args, kwargs)
        check_args, check_kwargs = example_inputs(model, seed=1)
        ref = net(*check_args, **check_kwargs)
        diff = float((program.module()(*check_args, **check_kwargs) - ref).abs().max())
    if not diff <= atol:
        raise MammoInputError(output, f"exported network differs from the trained one (max |diff| {diff:.3g} > {atol})")
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(output) as tmp:
        torch.export.save(program, tmp)
    with torch.no_grad():
        back = float((torch.export.load(str(output)).module()(*check_args, **check_kwargs) - ref).abs().max())
    if not back <= atol:
        output.unlink()
        raise MammoInputError(output, f"exported file read back differs from the trained network (max |diff| {back:.3g})")
    logger.info("exported the denoiser to %s (max |diff| %.3g on check inputs)", output, max(diff, back))
    return {"path": str(output), "max_abs_diff": max(diff, back)}
