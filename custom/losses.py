"""Training losses: stage 1's KL regulariser and a perceptual loss whose feature network is read from a local file;
stage 2's per-sample weighted MSE (:class:`WeightedMSELoss`, for Min-SNR-gamma weighting).

MONAI's :class:`monai.losses.PerceptualLoss` downloads its feature networks from a model hub; nothing may be
downloaded here, so :class:`LocalPerceptualLoss` takes the network from a **local path** instead:

* a file written by :func:`save_feature_network` (a state dict of the small :class:`FeatureNet` defined here plus
  its constructor arguments, loaded with ``weights_only=True``), or
* a TorchScript archive (``torch.jit.save``) of any network mapping ``(B, C, H, W)`` to a feature map or a
  list/tuple of feature maps (e.g. a pretrained backbone exported on a machine with internet access).

The adversarial part of stage 1 uses MONAI's :class:`~monai.networks.nets.PatchDiscriminator` and
:class:`~monai.losses.PatchAdversarialLoss` directly (see :mod:`custom.engines.autoencoder`).
"""

from __future__ import annotations

import os
import warnings
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from custom.checkpoints import load_state_dict_checked, save_checkpoint
from custom.errors import MammoInputError

__all__ = ["FeatureNet", "LocalPerceptualLoss", "WeightedMSELoss", "kl_loss", "load_feature_network", "save_feature_network"]

_FORMAT = "mammo_gcdm.feature_network"


class WeightedMSELoss(nn.Module):
    """Mean squared error with a weight per sample: ``mean_b(w_b * mse_b)``, ``mse_b`` the mean of
    ``(pred - target)^2`` over sample ``b``'s elements (Min-SNR-gamma's definition; no renormalisation by the weights).

    Why not ``torch.nn.MSELoss``: MONAI's ``SupervisedTrainer`` calls ``loss_function(pred, targets)`` with whatever
    the prepare-batch returned as the target, and the per-sample weight depends on the timestep drawn there
    (:class:`custom.engines.diffusion.GCDMPrepareBatch` with ``snr_gamma``), so the target arrives as
    ``(target, weight)``. A plain tensor target gives exactly ``torch.nn.MSELoss()(pred, target)``.

    Shapes: ``pred``, ``target`` ``(B, C, H, W)`` (any trailing dims); ``weight`` ``(B,)``, or ``(B, 1, H, W)``
    per element (broadcast over the channels; the lesion-weighted loss, ``lesion_loss_weight``): then the loss is
    ``mean(w * (pred - target)^2)`` over every element, again without renormalisation.
    """

    def forward(self, pred: torch.Tensor, target: torch.Tensor | tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        if isinstance(target, torch.Tensor):
            return nn.functional.mse_loss(pred, target)
        target, weight = target
        sq = (pred.float() - target.float()).pow(2)
        if weight.ndim == pred.ndim and weight.shape[0] == pred.shape[0] and weight.shape[1] == 1 \
                and weight.shape[2:] == pred.shape[2:]:
            return (weight.to(sq) * sq).mean()
        if weight.ndim != 1 or weight.shape[0] != pred.shape[0]:
            raise ValueError(f"WeightedMSELoss: weight must be (B,) = ({pred.shape[0]},) or (B, 1, *spatial), got "
                             f"{tuple(weight.shape)}")
        per_sample = sq.flatten(1).mean(1)
        return (weight.to(per_sample) * per_sample).mean()


def kl_loss(z_mu: torch.Tensor, z_sigma: torch.Tensor) -> torch.Tensor:
    """KL divergence of ``N(z_mu, z_sigma^2)`` from ``N(0, 1)``: summed over the latent elements of each sample,
    averaged over the batch (the convention of MONAI's generative tutorials, used with a weight of about 1e-6)."""
    mu, sigma = z_mu.float(), z_sigma.float()
    dims = list(range(1, mu.ndim))
    kl = 0.5 * torch.sum(mu.pow(2) + sigma.pow(2) - torch.log(sigma.pow(2).clamp_min(1e-30)) - 1.0, dim=dims)
    return kl.mean()


class FeatureNet(nn.Module):
    """Small convolutional feature extractor for :class:`LocalPerceptualLoss`.

    ``len(channels)`` stages of ``conv3x3(stride 2) -> LeakyReLU -> conv3x3 -> LeakyReLU``; ``forward`` returns the
    output of every stage (a list of feature maps, coarsest last). Train it on anything you like (or keep it
    random: random conv features are a usable structural loss) and write it with :func:`save_feature_network`.
    """

    def __init__(self, in_channels: int = 1, channels: Sequence[int] = (16, 32, 64), spatial_dims: int = 2):
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        if not channels:
            raise ValueError("channels must name at least one stage")
        conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
        self.in_channels, self.channels, self.spatial_dims = int(in_channels), [int(c) for c in channels], spatial_dims
        stages, c_in = [], self.in_channels
        for c in self.channels:
            stages.append(nn.Sequential(conv(c_in, c, 3, stride=2, padding=1), nn.LeakyReLU(0.2),
                                        conv(c, c, 3, padding=1), nn.LeakyReLU(0.2)))
            c_in = c
        self.stages = nn.ModuleList(stages)

    def config(self) -> dict[str, Any]:
        return {"in_channels": self.in_channels, "channels": list(self.channels), "spatial_dims": self.spatial_dims}

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        return feats


def save_feature_network(path: str | os.PathLike, network: FeatureNet) -> Path:
    """Write ``network`` (a :class:`FeatureNet`) to ``path`` in the format :func:`load_feature_network` reads."""

    if not isinstance(network, FeatureNet):
        raise TypeError(f"save_feature_network writes FeatureNet instances; for other networks use torch.jit.save "
                        f"(got {type(network).__name__})")
    state = {k: v.detach().cpu() for k, v in network.state_dict().items()}
    return save_checkpoint(path, {"format": _FORMAT, "config": network.config(), "state_dict": state})


def _is_torchscript_archive(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except (zipfile.BadZipFile, OSError):
        return False
    return any("/code/" in n or n.endswith("constants.pkl") for n in names)


def load_feature_network(path: str | os.PathLike | None, map_location: str | torch.device = "cpu") -> nn.Module:
    """Load a perceptual-loss feature network from a local file (see the module docstring for the formats).

    Raises:
        MammoInputError: ``path`` is unset, missing, or neither a :func:`save_feature_network` file nor a TorchScript
        archive (the message names the path and what was found).
    """
    if path is None or str(path).strip() in ("", "None", "null"):
        raise MammoInputError("perceptual_network", "perceptual loss needs a local feature network file "
                                                     "(set perceptual_network, or perceptual_weight 0 to disable it)")
    path = Path(path).expanduser()
    if not path.is_file():
        raise MammoInputError(path, "perceptual loss feature network not found (config key perceptual_network: a "
                                    "file written by custom.losses.save_feature_network or a TorchScript archive)")
    if _is_torchscript_archive(path):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                return torch.jit.load(str(path), map_location=map_location)
        except Exception as err:
            raise MammoInputError(path, f"unreadable TorchScript feature network ({type(err).__name__}: "
                                        f"{str(err).splitlines()[0][:200]})") from err
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:
        raise MammoInputError(path, "not a perceptual feature network: expected a file written by "
                                    "custom.losses.save_feature_network or a TorchScript archive "
                                    f"({type(err).__name__}: {str(err).splitlines()[0][:200]})") from err
    if not isinstance(obj, dict) or obj.get("format") != _FORMAT or "state_dict" not in obj or "config" not in obj:
        found = sorted(obj)[:8] if isinstance(obj, dict) else type(obj).__name__
        raise MammoInputError(path, "not a perceptual feature network: expected a file written by "
                                    f"custom.losses.save_feature_network or a TorchScript archive (found {found})")
    try:
        net = FeatureNet(**obj["config"])
    except (TypeError, ValueError) as err:
        raise MammoInputError(path, f"invalid feature network configuration {obj['config']!r} ({err})") from err

    load_state_dict_checked(net, obj["state_dict"], path, "perceptual feature network")
    return net


def _unit_normalise(f: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    return f / torch.sqrt(torch.sum(f * f, dim=1, keepdim=True) + eps)


class LocalPerceptualLoss(nn.Module):
    """LPIPS-style perceptual distance with a frozen feature network loaded from a local file.

    For every feature map the features are unit-normalised along the channel axis, the squared difference is summed
    over channels and averaged over space and batch; layers are combined with ``layer_weights`` (default: equal).

    Args:
        network_path: local feature network file (:func:`load_feature_network`).
        in_channels: channels the network expects; a 1-channel image is repeated to this many (e.g. 3 for an RGB
            backbone). ``None``: a :class:`FeatureNet`'s own ``in_channels``, otherwise the image's.
        layer_weights: one weight per returned feature map.
        mean, std: optional per-channel normalisation applied to the ``[0, 1]`` images before the network.

    The network is frozen (``requires_grad=False``) and stays in eval mode; gradients still flow to the input.
    """

    def __init__(
        self,
        network_path: str | os.PathLike | None,
        in_channels: int | None = None,
        layer_weights: Sequence[float] | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        self.network_path = None if network_path is None else str(network_path)
        self.network = load_feature_network(network_path)
        for p in self.network.parameters():
            p.requires_grad_(False)
        self.network.eval()
        if in_channels is None and isinstance(self.network, FeatureNet):
            in_channels = self.network.in_channels
        self.in_channels = in_channels
        self.layer_weights = None if layer_weights is None else [float(w) for w in layer_weights]
        self.register_buffer("mean", None if mean is None else torch.tensor(mean, dtype=torch.float32), persistent=False)
        self.register_buffer("std", None if std is None else torch.tensor(std, dtype=torch.float32), persistent=False)

    def train(self, mode: bool = True) -> LocalPerceptualLoss:  # the feature network never leaves eval mode
        super().train(mode)
        self.network.eval()
        return self

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        if self.in_channels is not None and x.shape[1] != self.in_channels:
            if x.shape[1] != 1:
                raise ValueError(f"perceptual network {self.network_path} expects {self.in_channels} channels, "
                                 f"got images with {x.shape[1]}")
            x = x.repeat(1, self.in_channels, *([1] * (x.ndim - 2)))
        if self.mean is not None:
            shape = (1, -1) + (1,) * (x.ndim - 2)
            x = (x - self.mean.view(shape)) / (self.std.view(shape) if self.std is not None else 1.0)
        return x

    def _features(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = self.network(self._prepare(x))
        feats = list(out) if isinstance(out, (list, tuple)) else [out]
        if not feats or not all(isinstance(f, torch.Tensor) and f.ndim >= 3 for f in feats):
            raise ValueError(f"perceptual network {self.network_path} must return a feature map or a list of them")
        return feats

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        fi = self._features(input.float())
        with torch.no_grad():
            ft = self._features(target.float())
        weights = self.layer_weights or [1.0] * len(fi)
        if len(weights) != len(fi):
            raise ValueError(f"layer_weights has {len(weights)} entries but the network returns {len(fi)} feature maps")
        loss = input.new_zeros((), dtype=torch.float32)
        for w, a, b in zip(weights, fi, ft):
            d = (_unit_normalise(a.float()) - _unit_normalise(b.float())).pow(2).sum(dim=1)
            loss = loss + w * d.mean()
        return loss
