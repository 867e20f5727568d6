"""Fréchet distances of network embeddings: FID with a user-supplied feature network, FSD without one.

* **FID** - the feature network is read from a **local file** (nothing is ever downloaded):
  a TorchScript archive (``torch.jit.save``; e.g. an Inception-v3 exported on a machine with internet access), or a
  state-dict checkpoint (``{"model": state_dict}`` or a bare state dict, loaded with ``weights_only=True``) for a
  ``network`` whose architecture the caller builds. The score is called ``"fid"``; with an Inception-v3 and its
  preprocessing (``in_channels=3``, ``input_size=299``, the matching ``input_range``) it is the usual FID.
  The standard FID-Inception weights file (pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth``, a plain state
  dict) is recognised by its keys and run by :mod:`custom.metrics.inception` (the project's own FID-Inception network,
  clean-fid's resize, 2048-d pool features): that is the FID comparable with published values (the paper's).
  The file's SHA-256 is part of the result (``fid_feature_network_sha256``).
* **FSD** (Fréchet Segmenter Distance) - without a feature network file, the embedding is the encoder of the
  bundle's own lesion segmenter (:class:`SegmenterEncoder`: the globally average-pooled output of every encoder stage
  of the MONAI ``UNet``, concatenated). It is trained on mammograms, not ImageNet, and is **not comparable with
  published FID values**, hence the different name.

Embeddings of the output of a feature network: a ``(B, D)`` tensor is used as is, a ``(B, C, *spatial)`` map is
globally average-pooled to ``(B, C)``, and of a list/tuple of outputs the last one is used.

Both end in :func:`custom.metrics.frechet.frechet_distance_from_features` (float64, see that module).
"""

from __future__ import annotations

import os
import warnings
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from custom.errors import MammoInputError
from custom.metrics.frechet import frechet_distance_from_features

__all__ = [
    "INPUT_RANGES",
    "FeatureDistance",
    "SegmenterEncoder",
    "embed_images",
    "load_feature_network",
]

#: How images in [0, 1] are mapped before the feature network: ``unit`` keeps [0, 1], ``symmetric`` -> [-1, 1],
#: ``byte`` -> [0, 255], ``imagenet`` -> (x - ImageNet mean) / ImageNet std per channel (3 channels).
INPUT_RANGES = ("unit", "symmetric", "byte", "imagenet")
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


def _is_torchscript_archive(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except (zipfile.BadZipFile, OSError):
        return False
    return any("/code/" in n or n.endswith("constants.pkl") for n in names)


def _is_fid_inception_file(path: str | os.PathLike) -> bool:
    """Whether a local file is the FID-Inception state dict (not a TorchScript archive; holds its keys)."""
    path = Path(path).expanduser()
    if not path.is_file() or _is_torchscript_archive(path):
        return False
    from custom.metrics.inception import is_fid_inception_state

    try:
        return is_fid_inception_state(torch.load(path, map_location="cpu", weights_only=True))
    except Exception:  # noqa: BLE001 - unreadable: load_feature_network reports it
        return False


def load_feature_network(
    path: str | os.PathLike, network: nn.Module | None = None, map_location: str | torch.device = "cpu"
) -> nn.Module:
    """Load the FID feature network from a local file (see the module docstring for the formats).

    Args:
        path: a TorchScript archive, or a state-dict checkpoint (then ``network`` is required).
        network: the architecture a state-dict checkpoint is loaded into (strictly, in place).
        map_location: device for the weights.

    Returns:
        the network in eval mode.

    Raises:
        MammoInputError: naming ``path`` - missing file, unreadable archive/checkpoint, a state dict without a
        ``network`` to load it into, or weights that do not match ``network``.
    """
    if path is None or str(path).strip() in ("", "None", "null"):
        raise MammoInputError("feature_network", "FID needs a local feature network file (none given)")
    path = Path(path).expanduser()
    if not path.is_file():
        raise MammoInputError(path, "FID feature network not found (expected a TorchScript archive or a state-dict "
                                    "checkpoint on this machine; nothing is downloaded)")
    if _is_torchscript_archive(path):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                net = torch.jit.load(str(path), map_location=map_location)
        except Exception as err:
            raise MammoInputError(path, f"unreadable TorchScript feature network ({type(err).__name__}: "
                                        f"{str(err).splitlines()[0][:200]})") from err
        return net.eval()
    from custom.checkpoints import load_checkpoint, load_state_dict_checked

    ckpt = load_checkpoint(path, map_location, what="FID feature network", verify=False)  # a user's file: no .sha256
    if network is None:
        raise MammoInputError(path, "FID feature network is a state-dict checkpoint, not a TorchScript archive: it "
                                    "needs the network architecture (pass `network`), or export it with torch.jit.save")
    state = ckpt.get("model", ckpt)
    load_state_dict_checked(network, state, path, "FID feature network")
    return network.to(map_location).eval()


def _pool(out: Any) -> torch.Tensor:
    if isinstance(out, (list, tuple)):
        out = out[-1]
    if isinstance(out, dict):
        raise TypeError("feature network returned a dict; wrap it to return a tensor")
    out = torch.as_tensor(out)
    if out.ndim > 2:
        out = out.flatten(2).mean(dim=2)
    if out.ndim != 2:
        raise ValueError(f"feature network output must be (B, D) or (B, C, *spatial), got {tuple(out.shape)}")
    return out


def _prepare(x: torch.Tensor, in_channels: int, input_size: int | Sequence[int] | None, input_range: str) -> torch.Tensor:
    if input_size is not None:
        size = (int(input_size),) * 2 if isinstance(input_size, int) else tuple(int(s) for s in input_size)
        if tuple(x.shape[2:]) != size:
            x = torch.nn.functional.interpolate(x, size=size, mode="bilinear", align_corners=False)
    if x.shape[1] != in_channels:
        if x.shape[1] != 1:
            raise ValueError(f"images have {x.shape[1]} channels; the feature network takes {in_channels}")
        x = x.repeat(1, in_channels, *([1] * (x.ndim - 2)))
    if input_range == "symmetric":
        x = x * 2.0 - 1.0
    elif input_range == "byte":
        x = x * 255.0
    elif input_range == "imagenet":
        if x.shape[1] != 3:
            raise ValueError("input_range='imagenet' needs in_channels=3")
        mean = torch.tensor(_IMAGENET_MEAN, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(_IMAGENET_STD, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        x = (x - mean) / std
    return x


@torch.no_grad()
def embed_images(
    network: nn.Module,
    images: Any,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
    in_channels: int = 1,
    input_size: int | Sequence[int] | None = None,
    input_range: str = "unit",
) -> np.ndarray:
    """Embeddings of images.

    Args:
        network: feature network (put in eval mode here).
        images: ``(N, 1, H, W)`` (or ``(N, H, W)``) float images in [0, 1], tensor or array.
        batch_size, device: inference batching.
        in_channels: channels the network takes (a 1-channel image is repeated, e.g. 3 for Inception).
        input_size: resize (bilinear) to this side/shape first; ``None`` keeps the size.
        input_range: one of :data:`INPUT_RANGES`.

    Returns:
        float64 ``(N, D)``.
    """
    if input_range not in INPUT_RANGES:
        raise ValueError(f"input_range must be one of {INPUT_RANGES}, got {input_range!r}")
    x = torch.as_tensor(np.asarray(images) if not isinstance(images, torch.Tensor) else images)
    x = x.as_tensor() if hasattr(x, "as_tensor") else x
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4:
        raise ValueError(f"images must be (N, C, H, W) or (N, H, W), got {tuple(x.shape)}")
    network = network.to(device).eval()
    out = []
    for i in range(0, x.shape[0], int(batch_size)):
        b = _prepare(x[i : i + int(batch_size)].float().to(device), in_channels, input_size, input_range)
        out.append(_pool(network(b)).double().cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, 0))


class SegmenterEncoder(nn.Module):
    """Embedding from the encoder of a MONAI ``UNet``: globally average-pooled outputs of every down block and the
    bottom block, concatenated (``D = sum(channels)``). The UNet is run once per batch (its decoder output is
    discarded); forward hooks collect the encoder outputs.

    Args:
        unet: a :class:`monai.networks.nets.UNet` (e.g. the lesion segmenter of :mod:`custom.metrics.segmenter`).
    """

    def __init__(self, unet: nn.Module):
        super().__init__()
        from monai.networks.layers.simplelayers import SkipConnection

        self.unet = unet
        stages, m = [], getattr(unet, "model", None)
        while isinstance(m, nn.Sequential) and len(m) == 3 and isinstance(m[1], SkipConnection):
            stages.append(m[0])
            m = m[1].submodule
        if m is None or not stages:
            raise TypeError(f"SegmenterEncoder needs a monai.networks.nets.UNet, got {type(unet).__name__}")
        stages.append(m)  # the bottom block
        self.stages = stages
        self._outputs: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._outputs = []
        hooks = [s.register_forward_hook(lambda _m, _i, o: self._outputs.append(o)) for s in self.stages]
        try:
            self.unet(x)
        finally:
            for h in hooks:
                h.remove()
        feats = [o.flatten(2).mean(dim=2) for o in self._outputs]
        self._outputs = []
        return torch.cat(feats, dim=1)


class FeatureDistance:
    """FID (with a local feature network file) or FSD (with the lesion segmenter's encoder) between two image sets.

    Args:
        feature_network: path of the FID feature network (see :func:`load_feature_network`); ``None`` -> FSD.
        network: architecture for a state-dict ``feature_network`` file.
        segmenter: the lesion segmenter ``UNet`` used when ``feature_network`` is ``None``.
        in_channels, input_size, input_range: preprocessing for the FID network (see :func:`embed_images`);
            FSD always feeds the segmenter its own input (1 channel, [0, 1]), resized to its training size when
            the network came from :func:`custom.metrics.segmenter.load_segmenter` (else unresized).
        batch_size, device: inference batching.

    Attributes:
        name: ``"fid"`` or ``"fsd"`` - the key of the score in :meth:`__call__`'s result.
        source: the feature network path, or ``"segmenter encoder"``.
    """

    def __init__(
        self,
        feature_network: str | os.PathLike | None = None,
        network: nn.Module | None = None,
        segmenter: nn.Module | None = None,
        in_channels: int = 1,
        input_size: int | Sequence[int] | None = None,
        input_range: str = "unit",
        batch_size: int = 32,
        device: str | torch.device = "cpu",
    ):
        self.batch_size, self.device = int(batch_size), device
        self.inception = False
        self.sha256: str | None = None
        if feature_network is not None and str(feature_network).strip() not in ("", "None", "null"):
            from custom.checkpoints import file_sha256

            self.name, self.source = "fid", str(feature_network)
            if network is None and _is_fid_inception_file(feature_network):
                from custom.metrics.inception import load_fid_inception

                self.network, self.inception = load_fid_inception(feature_network, map_location=device), True
                self.source = f"{feature_network} (FID Inception, pytorch-fid weights; clean-fid resize to 299)"
            else:
                self.network = load_feature_network(feature_network, network, map_location=device)
            self.sha256 = file_sha256(feature_network)
            self.prep = {"in_channels": int(in_channels), "input_size": input_size, "input_range": input_range}
        elif segmenter is not None:
            self.name, self.source = "fsd", "segmenter encoder"
            self.network = SegmenterEncoder(segmenter)
            size = getattr(segmenter, "segmenter_image_size", None)  # set by load_segmenter
            self.prep = {"in_channels": 1, "input_size": size, "input_range": "unit"}
        else:
            raise ValueError("FeatureDistance needs a feature_network file (FID) or a segmenter (FSD)")
        if self.prep["input_range"] not in INPUT_RANGES:
            raise ValueError(f"input_range must be one of {INPUT_RANGES}, got {input_range!r}")

    def embed(self, images: Any) -> np.ndarray:
        """``(N, 1, H, W)`` images in [0, 1] -> float64 ``(N, D)`` embeddings."""
        if self.inception:
            from custom.metrics.inception import inception_features

            return inception_features(self.network, images, self.batch_size, self.device)
        return embed_images(self.network, images, self.batch_size, self.device, **self.prep)

    def __call__(self, real_images: Any, generated_images: Any) -> dict[str, Any]:
        """``{name: float >= 0, f"{name}_feature_network": source, f"{name}_feature_dim": D, f"{name}_n_real",
        f"{name}_n_generated"}`` (each set needs at least 2 images)."""
        real, gen = self.embed(real_images), self.embed(generated_images)
        return self.distance(real, gen)

    def distance(self, real: np.ndarray, gen: np.ndarray) -> dict[str, Any]:
        """The result dict of :meth:`__call__` from two embedding sets (e.g. a real-vs-real floor)."""
        out = {
            self.name: frechet_distance_from_features(real, gen),
            f"{self.name}_feature_network": self.source,
            f"{self.name}_feature_dim": int(real.shape[1]),
            f"{self.name}_n_real": int(real.shape[0]),
            f"{self.name}_n_generated": int(gen.shape[0]),
        }
        if self.sha256:
            out[f"{self.name}_feature_network_sha256"] = self.sha256
        return out
