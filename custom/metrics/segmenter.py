"""The lesion segmenter used by the evaluation to find the lesion in generated images (MedSAM is not available here).

A 2D MONAI ``UNet`` with 1 input channel (the image in [0, 1]) and **2 output classes**: 0 = not lesion (air and
breast), 1 = lesion. The breast does not need the network: the protocol takes it from
:func:`custom.transforms.masks.breast_mask`, so the network spends its capacity on the lesion. It is trained by
``bundle/configs/train_segmenter.json`` (``python -m monai.bundle run training --config_file
bundle/configs/train_segmenter.json``) on the prepared training split, and written to ``<ckpt_dir>/segmenter.pt``:

``{"model": UNet state_dict, "meta": {"format", "network_args", "image_size", "num_classes"},
"optimizer": ..., "trainer": ...}``

(``meta`` lets :func:`load_segmenter` rebuild the network without the training config; ``optimizer``/``trainer``
let a run resume). The file is written when training ends (``CheckpointSaver(save_final=True)``), i.e. it holds the
final weights, not the best-validation ones.

Config keys of ``train_segmenter.json`` (override any with ``--key value``):

* paths: ``bundle_root`` ("bundle"), ``prepared_dir`` ("data/prepared"), ``ckpt_dir`` (``bundle_root/models``),
  ``ckpt_file`` (``ckpt_dir/segmenter.pt``), ``log_dir`` ("runs/segmenter", TensorBoard);
* run: ``device``, ``seed``, ``progress`` (ignite ProgressBar), ``log_every`` (iterations between loss logs),
  ``num_threads`` (torch CPU threads: 1 on CPU, torch's default with CUDA; ``null`` = torch's default of one per
  core. On the project's 2-core machines shared with other jobs, 2 threads made epochs 5-10x *slower* than 1 -
  OpenMP threads wait for each other at every operation when the cores are oversubscribed),
  ``resume`` (continue from ``ckpt_file``: weights, optimiser, LR schedule and iteration count; raise
  ``max_epochs`` to train further);
* data: ``image_size`` (64), ``max_lesions``, ``train_limit`` / ``val_limit`` (first N items), ``train_require_lesion``
  (false: images without lesions teach the network to stay silent);
* network: ``segmenter_channels`` ([32, 64, 128, 256]), ``segmenter_strides`` (2 between levels), ``num_res_units``
  (1) -> ``network_args`` (the ``UNet`` keyword arguments, stored in the checkpoint's meta);
* optimisation: ``lr`` (Adam, 3e-3), cosine decay to ``lr * lr_min_fraction``, ``batch_size`` (16), ``max_epochs``
  (60: about 2.5 min on 2 shared CPU cores for the 40-study phantom's 116 training images),
  ``val_interval`` (epochs between validations), ``amp``; loss ``DiceCELoss`` (softmax, lesion-only Dice over
  the batch, so images without a lesion do not produce a degenerate per-image Dice);
* augmentation (training only): random up-down / left-right flips, intensity scaling (±10 %), gamma (0.8-1.25),
  weak Gaussian noise, clipped back to [0, 1];
* validation (every 5 epochs): ``val_mean_dice`` = ``MeanDice`` of the lesion class on the validation split (images without a
  lesion are left out of the mean, MONAI's ``ignore_empty``); an empty validation split just skips validation.

Functions here:

* :func:`build_segmenter` / :func:`load_segmenter` - the network (from ``network_args``) and its weights;
* :func:`lesion_probability` / :func:`predict_lesion` - ``(B, 1, S, S)`` images -> ``(B, S, S)`` lesion
  probability / bool mask;
* :func:`segmenter_score_on_real` - the segmenter's own Mass IoU / Breast IoU / pixel accuracy / Dice on real
  images with their true label maps: the ceiling the controllability metric can reach with this segmenter.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from custom.checkpoints import load_checkpoint, load_state_dict_checked
from custom.data.training import load_prepared_datalist, prepared_transforms
from custom.errors import MammoInputError
from custom.metrics.controllability import controllability_metrics, lesion_box_roi

__all__ = [
    "META_FORMAT",
    "SegmenterMeta",
    "build_segmenter",
    "lesion_probability",
    "load_segmenter",
    "predict_lesion",
    "segmenter_score_on_prepared",
    "segmenter_score_on_real",
]

logger = logging.getLogger(__name__)
META_FORMAT = "mammo_gcdm.lesion_segmenter/1"
NUM_CLASSES = 2


class SegmenterMeta:
    """What :func:`load_segmenter` needs to rebuild the network, saved beside the weights (key ``"meta"``).

    It has ``state_dict`` / ``load_state_dict`` so MONAI's ``CheckpointSaver`` / ``CheckpointLoader`` handle it like
    a module; the state is plain Python data (ints, strings, lists), readable with ``weights_only=True``.

    Args:
        network_args: keyword arguments of :class:`monai.networks.nets.UNet` (JSON-like values).
        image_size: side length the network was trained at.
    """

    def __init__(self, network_args: Mapping[str, Any], image_size: int):
        self.network_args = _plain(dict(network_args))
        self.image_size = int(image_size)

    def state_dict(self) -> dict[str, Any]:
        return {"format": META_FORMAT, "network_args": self.network_args, "image_size": self.image_size,
                "num_classes": NUM_CLASSES}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.network_args = dict(state["network_args"])
        self.image_size = int(state["image_size"])


def _plain(x: Any) -> Any:
    """Config values (tuples, numpy scalars) -> lists/ints/floats/strings that ``weights_only`` loading accepts."""
    if isinstance(x, Mapping):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, np.generic):
        return x.item()
    return x


def build_segmenter(network_args: Mapping[str, Any]) -> nn.Module:
    """``monai.networks.nets.UNet(**network_args)``; checks the 1-in / 2-out-channel contract."""
    from monai.networks.nets import UNet

    args = dict(network_args)
    if int(args.get("in_channels", 1)) != 1 or int(args.get("out_channels", NUM_CLASSES)) != NUM_CLASSES:
        raise ValueError(f"the lesion segmenter takes 1 channel and predicts {NUM_CLASSES} classes, got "
                         f"in_channels={args.get('in_channels')}, out_channels={args.get('out_channels')}")
    return UNet(**args)


def load_segmenter(
    ckpt_path: str | os.PathLike, network: nn.Module | None = None, map_location: str | torch.device = "cpu"
) -> nn.Module:
    """Load a trained segmenter.

    Args:
        ckpt_path: ``segmenter.pt`` written by the training bundle (a dict with the ``"model"`` state dict).
        network: the architecture to load into (strictly); ``None`` builds it from the checkpoint's ``"meta"``.
        map_location: device for the weights.

    Returns:
        the network in eval mode, with ``network.segmenter_image_size`` set to the training image size when the
        checkpoint records it (``None`` otherwise).

    Raises:
        MammoInputError: naming ``ckpt_path`` - missing/corrupt file, no ``"model"`` entry, no ``network`` and no
        ``"meta"``, or weights of another configuration.
    """

    ckpt = load_checkpoint(ckpt_path, map_location, what="lesion segmenter checkpoint")
    if "model" not in ckpt:
        raise MammoInputError(ckpt_path, f"not a lesion segmenter checkpoint: no 'model' entry (found {sorted(ckpt)[:8]})")
    meta = ckpt.get("meta")
    if isinstance(meta, Mapping) and meta.get("format") != META_FORMAT:
        raise MammoInputError(ckpt_path, f"unknown segmenter meta format {meta.get('format')!r}")
    if network is None:
        if not isinstance(meta, Mapping):
            raise MammoInputError(ckpt_path, "checkpoint has no 'meta' entry: pass the network architecture")
        try:
            network = build_segmenter(meta["network_args"])
        except (TypeError, ValueError, KeyError) as err:
            raise MammoInputError(ckpt_path, f"cannot build the segmenter from its meta ({err})") from err
    load_state_dict_checked(network, ckpt["model"], ckpt_path, "lesion segmenter checkpoint")
    network.segmenter_image_size = int(meta["image_size"]) if isinstance(meta, Mapping) else None
    return network.to(map_location).eval()


def _image_batch(images: Any) -> torch.Tensor:
    x = images if isinstance(images, torch.Tensor) else torch.as_tensor(np.asarray(images))
    x = x.as_tensor() if hasattr(x, "as_tensor") else x
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4 or x.shape[1] != 1:
        raise ValueError(f"images must be (B, 1, H, W) (or (B, H, W)), got {tuple(x.shape)}")
    return x.detach().float()


@torch.no_grad()
def lesion_probability(
    network: nn.Module,
    images: Any,
    batch_size: int = 16,
    device: str | torch.device | None = None,
    image_size: int | None = None,
) -> torch.Tensor:
    """Softmax probability of the lesion class.

    Args:
        network: the segmenter (set to eval mode here).
        images: ``(B, 1, H, W)`` or ``(B, H, W)`` float images in [0, 1] (tensor or array).
        batch_size: images per forward pass.
        device: where to run (default: the network's device).
        image_size: run the network at this side length (area-resized input, probabilities resized back
            bilinearly); default ``network.segmenter_image_size`` when set by :func:`load_segmenter`, else the
            input size. H and W must suit the UNet's strides at the size it runs at.

    Returns:
        float32 ``(B, H, W)`` in [0, 1] on the CPU.
    """
    x = _image_batch(images)
    if device is None:
        device = next(network.parameters()).device
    size = image_size if image_size is not None else getattr(network, "segmenter_image_size", None)
    network = network.to(device).eval()
    out = []
    h, w = x.shape[2:]
    for i in range(0, x.shape[0], int(batch_size)):
        b = x[i : i + int(batch_size)].to(device)
        resize = size is not None and (h, w) != (int(size), int(size))
        if resize:
            b = torch.nn.functional.interpolate(b, size=(int(size), int(size)), mode="area")
        p = torch.softmax(network(b).float(), dim=1)[:, 1:2]
        if resize:
            p = torch.nn.functional.interpolate(p, size=(h, w), mode="bilinear", align_corners=False)
        out.append(p[:, 0].clamp(0.0, 1.0).cpu())
    return torch.cat(out) if out else torch.zeros((0, h, w))


def predict_lesion(network: nn.Module, images: Any, threshold: float = 0.5, **kwargs: Any) -> torch.Tensor:
    """Lesion mask ``(B, H, W)`` bool: :func:`lesion_probability` ``> threshold`` (0.5 = the argmax of the two
    classes). ``images``: ``(B, 1, H, W)`` in [0, 1]; ``kwargs`` go to :func:`lesion_probability`."""
    return lesion_probability(network, images, **kwargs) > float(threshold)


def segmenter_score_on_real(
    network: nn.Module,
    images: Any,
    labels: Any,
    threshold: float = 0.5,
    batch_size: int = 16,
    device: str | torch.device | None = None,
    box_margin: int | None = None,
) -> dict[str, Any]:
    """The segmenter's own controllability scores on real images with their true label maps.

    The prediction is built exactly as for generated images (:func:`custom.metrics.controllability.segment_generated`:
    breast by threshold, lesion by the network inside it), so the Mass IoU here is the ceiling of the Mass IoU a
    perfect generator could reach with this segmenter (and the Breast IoU that of the breast threshold).

    Args:
        network: the segmenter.
        images: ``(B, 1, H, W)`` real images in [0, 1].
        labels: ``(B, 1, H, W)`` or ``(B, H, W)`` true label maps in {0, 1, 2}.
        threshold: lesion probability threshold.
        box_margin: when set, lesion calls are kept only inside the true lesions' bounding boxes grown by this many
            pixels (:func:`custom.metrics.controllability.lesion_box_roi`, the analogue of MedSAM's box prompt).

    Returns:
        :func:`custom.metrics.controllability.controllability_metrics` (``mass_iou``, ``breast_iou``,
        ``pixel_accuracy``, ``mass_dice_mean`` ...).
    """

    x = _image_batch(images)
    prob = lesion_probability(network, x, batch_size=batch_size, device=device)
    rois = None
    if box_margin is not None:
        lab = labels if isinstance(labels, torch.Tensor) else torch.as_tensor(np.asarray(labels))
        lab = lab.reshape(lab.shape[0], *lab.shape[-2:])
        rois = [lesion_box_roi((lab[i] == 2).cpu().numpy(), int(box_margin)) for i in range(lab.shape[0])]
    res = controllability_metrics(x, prob, labels, threshold=threshold, rois=rois)
    return {**res, "box_margin": None if box_margin is None else int(box_margin)}


def segmenter_score_on_prepared(
    network: nn.Module,
    prepared_dir: str | os.PathLike,
    split: str = "test",
    image_size: int | None = None,
    limit: int | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """:func:`segmenter_score_on_real` on a split of a prepared data set, plus ``"split"`` and ``"image_size"``.

    Images and label maps are resized to ``image_size`` (default: the segmenter's training size recorded by
    :func:`load_segmenter`, else the prepared size) - the resolution the scores are computed at."""

    items = load_prepared_datalist(prepared_dir, split, limit=limit)
    if not items:
        raise MammoInputError(prepared_dir, f"the {split!r} split is empty")
    if image_size is None:
        image_size = getattr(network, "segmenter_image_size", None)
    xform = prepared_transforms(image_size, 0.0)
    data = [xform(item) for item in items]
    images = torch.stack([d["image"].as_tensor() if hasattr(d["image"], "as_tensor") else d["image"] for d in data])
    labels = torch.stack([d["label"] for d in data])
    return {"split": split, "image_size": int(images.shape[-1]), **segmenter_score_on_real(network, images, labels, **kwargs)}
