"""Array coercion shared by the metrics: tensors (and MONAI ``MetaTensor``) or array-likes to numpy, and batches of
2-D maps to ``(B, H, W)``."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

__all__ = ["as_numpy", "batch_2d"]


def as_numpy(x: Any) -> np.ndarray:
    """A tensor (detached, on the CPU, metadata dropped) or an array-like as a numpy array."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        x = x.as_tensor() if hasattr(x, "as_tensor") else x
        return x.numpy()
    return np.asarray(x)


def batch_2d(x: Any, name: str) -> np.ndarray:
    """``(H, W)``, ``(B, H, W)`` or ``(B, 1, H, W)`` -> ``(B, H, W)`` (dtype kept); any other shape is a
    ``ValueError`` naming ``name``."""
    arr = as_numpy(x)
    if arr.ndim == 4 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3:
        raise ValueError(f"{name}: expected (H, W), (B, H, W) or (B, 1, H, W), got shape {arr.shape}")
    return arr
