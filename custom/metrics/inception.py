"""FID with the standard FID-Inception weights from a local file, without torchvision or pytorch-fid.

The file is pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` (the TensorFlow FID Inception, ported): a plain
state dict of torchvision's ``Inception3(num_classes=1008, aux_logits=False)`` in which pytorch-fid replaces
``Mixed_5b/5c/5d`` (``FIDInceptionA``: average pool without the padded zeros), ``Mixed_6b..6e`` (``FIDInceptionC``,
the same), ``Mixed_7b`` (``FIDInceptionE_1``, the same) and ``Mixed_7c`` (``FIDInceptionE_2``: max pool in the pool
branch). :class:`FIDInceptionV3` is that network written in plain torch with the same module names, so the file
loads strictly (every tensor used, every parameter filled; BatchNorm's ``num_batches_tracked`` counters may be
absent, as in files written by old torch versions). Why not pytorch-fid: its wheel requires torchvision, which
pulls a CUDA torch into this environment.

Preprocessing (:func:`clean_resize`), as clean-fid's ``"clean"`` mode: the image is quantised to 8 bits (what the
reference evaluates: 8-bit PNG folders), each channel resized to 299×299 by PIL's bicubic filter on float32 data
(``mode "F"``), clipped to [0, 255]; then, as pytorch-fid's ``normalize_input``, scaled to [-1, 1]. The 2048-d
features are the global average pool after ``Mixed_7c`` (pytorch-fid's block 3), and FID is
:func:`custom.metrics.frechet.frechet_distance_from_features` of the two feature sets.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from custom.checkpoints import state_dict_mismatches
from custom.errors import MammoInputError

__all__ = ["FID_INCEPTION_FILE", "FIDInceptionV3", "clean_resize", "inception_features", "is_fid_inception_state",
           "load_fid_inception"]

#: the standard file name (pytorch-fid's release asset)
FID_INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"


class BasicConv2d(nn.Module):
    """Conv (no bias) + BatchNorm (eps 0.001) + ReLU; keys ``conv.weight``, ``bn.*``."""

    def __init__(self, cin: int, cout: int, kernel_size: Any, stride: Any = 1, padding: Any = 0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg3(x: torch.Tensor) -> torch.Tensor:
    """The FID blocks' pool branch: 3×3 average, stride 1, padding 1, padded zeros not counted."""
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    def __init__(self, cin: int, pool_features: int) -> None:
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, 1)
        self.branch5x5_1 = BasicConv2d(cin, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)),
                          self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          self.branch_pool(_avg3(x))], 1)


class InceptionB(nn.Module):
    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.branch3x3(x), self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionC(nn.Module):
    def __init__(self, cin: int, c7: int) -> None:
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 192, 1)
        self.branch7x7_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = self.branch7x7dbl_1(x)
        for m in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            d = m(d)
        return torch.cat([self.branch1x1(x), b7, d, self.branch_pool(_avg3(x))], 1)


class InceptionD(nn.Module):
    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.branch7x7x3_1(x)
        for m in (self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            b = m(b)
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionE(nn.Module):
    """``max_pool=False``: pytorch-fid's ``FIDInceptionE_1`` (average pool); ``True``: ``FIDInceptionE_2``."""

    def __init__(self, cin: int, max_pool: bool) -> None:
        super().__init__()
        self.max_pool = bool(max_pool)
        self.branch1x1 = BasicConv2d(cin, 320, 1)
        self.branch3x3_1 = BasicConv2d(cin, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        d = torch.cat([self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d)], 1)
        pool = F.max_pool2d(x, kernel_size=3, stride=1, padding=1) if self.max_pool else _avg3(x)
        return torch.cat([self.branch1x1(x), b3, d, self.branch_pool(pool)], 1)


class FIDInceptionV3(nn.Module):
    """The FID Inception (module names of torchvision's ``Inception3`` with pytorch-fid's FID blocks; see the module
    docstring). ``forward(x)``: ``(B, 3, 299, 299)`` in [-1, 1] -> ``(B, 2048)`` pool features. ``fc`` (1008 classes)
    is kept only so the standard file loads strictly; it is not used."""

    def __init__(self) -> None:
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = InceptionA(192, 32)
        self.Mixed_5c = InceptionA(256, 64)
        self.Mixed_5d = InceptionA(288, 64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, 128)
        self.Mixed_6c = InceptionC(768, 160)
        self.Mixed_6d = InceptionC(768, 160)
        self.Mixed_6e = InceptionC(768, 192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, max_pool=False)
        self.Mixed_7c = InceptionE(2048, max_pool=True)
        self.fc = nn.Linear(2048, 1008)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        for name in ("Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e",
                     "Mixed_7a", "Mixed_7b", "Mixed_7c"):
            x = getattr(self, name)(x)
        return F.adaptive_avg_pool2d(x, 1).flatten(1)


def is_fid_inception_state(state: Any) -> bool:
    """Whether a loaded object looks like the FID-Inception state dict (holds ``Mixed_7c``'s pool-branch conv)."""
    return isinstance(state, dict) and "Mixed_7c.branch_pool.conv.weight" in state


def load_fid_inception(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> FIDInceptionV3:
    """Build :class:`FIDInceptionV3` and load the local weights file strictly (``weights_only=True``).

    Raises:
        MammoInputError: naming ``path``: missing/unreadable file, not a plain state dict, missing / left-over
            keys (listed) or shape mismatches. Only BatchNorm ``num_batches_tracked`` counters may be absent.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise MammoInputError(path, f"FID Inception weights not found (pytorch-fid's {FID_INCEPTION_FILE}; nothing is "
                                    "downloaded)")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file is one input error
        raise MammoInputError(path, f"unreadable FID Inception weights ({type(err).__name__}: "
                                    f"{(str(err).splitlines() or [''])[0][:200]})") from err
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise MammoInputError(path, "FID Inception weights must be a plain state dict (pytorch-fid's file)")
    net = FIDInceptionV3()
    own = net.state_dict()
    diff = state_dict_mismatches(own, state, ignore=("num_batches_tracked",))
    if diff:
        parts = []
        if diff.missing:
            parts.append(f"{len(diff.missing)} missing key(s): {diff.missing[:6]}")
        if diff.unexpected:
            parts.append(f"{len(diff.unexpected)} unexpected key(s): {diff.unexpected[:6]}")
        if diff.shapes:
            k, theirs, ours = diff.shapes[0]
            parts.append(f"{len(diff.shapes)} shape mismatch(es), e.g. {k}: file {theirs} vs network {ours}")
        raise MammoInputError(path, "not the FID Inception state dict: " + "; ".join(parts))
    full = {k: state.get(k, own[k]) for k in own}
    net.load_state_dict(full, strict=True)
    return net.to(map_location).eval()


def clean_resize(images: Any, size: int = 299) -> torch.Tensor:
    """clean-fid's ``"clean"`` resize: ``(N, 1|3, H, W)`` (or ``(N, H, W)``) float in [0, 1] -> 8-bit quantised ->
    per channel PIL bicubic on float32 -> clip [0, 255]; returns float32 ``(N, 3, size, size)`` in [0, 255]
    (a 1-channel image replicated to 3)."""
    from PIL import Image

    x = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"clean_resize: images must be (N, 1|3, H, W), got {x.shape}")
    x8 = (np.clip(x.astype(np.float64), 0.0, 1.0) * 255.0).round().astype(np.uint8).astype(np.float32)
    out = np.empty((x.shape[0], x.shape[1], size, size), dtype=np.float32)
    for i in range(x.shape[0]):
        for c in range(x.shape[1]):
            img = Image.fromarray(x8[i, c]).resize((size, size), resample=Image.BICUBIC)
            out[i, c] = np.clip(np.asarray(img, dtype=np.float32), 0.0, 255.0)
    if out.shape[1] == 1:
        out = np.repeat(out, 3, axis=1)
    return torch.from_numpy(out)


@torch.no_grad()
def inception_features(network: nn.Module, images: Any, batch_size: int = 32,
                       device: str | torch.device = "cpu") -> np.ndarray:
    """2048-d FID features: :func:`clean_resize`, scale to [-1, 1], the network's pool output. float64 ``(N, 2048)``."""
    x = images if isinstance(images, torch.Tensor) else torch.as_tensor(np.asarray(images))
    x = x.as_tensor() if hasattr(x, "as_tensor") else x
    network = network.to(device).eval()
    out = []
    for i in range(0, x.shape[0], int(batch_size)):
        b = clean_resize(x[i : i + int(batch_size)]).to(device) / 255.0
        out.append(network(2.0 * b - 1.0).double().cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, 2048))
