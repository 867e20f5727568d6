"""CLIP vision encoder for binary lesion masks: the geometric input of GCDM's gated fusion.

Pretrained weights are only ever read from a local folder (``clip_path``) with ``local_files_only=True``; nothing is
fetched from a model hub. Without ``clip_path`` a small :class:`transformers.CLIPVisionConfig` is built from the
constructor arguments and trained from scratch.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MaskCLIPEncoder", "CLIP_MEAN", "CLIP_STD"]

#: Per-channel RGB mean / std that CLIP image processors normalise with.
CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

_CLIP_MODEL_TYPES = ("clip", "clip_vision_model")
_OUTPUTS = ("pooled", "projected")


class MaskCLIPEncoder(nn.Module):
    """Encode a lesion mask ``(B, 1, H, W)`` in ``[0, 1]`` into one CLIP vector ``(B, output_dim)``.

    Preprocessing (inside ``forward``): bilinear resize to ``image_size`` x ``image_size`` (antialiased when
    shrinking), replicate to 3 channels, normalise with :data:`CLIP_MEAN` / :data:`CLIP_STD`.

    Args:
        clip_path: an image-conditioned SD single file (its CLIP image encoder), or a
            local folder written by ``save_pretrained`` of a ``CLIPVisionModel``,
            ``CLIPVisionModelWithProjection`` or a full ``CLIPModel`` (only its vision tower is loaded). ``None``
            builds a randomly initialised encoder from the arguments below.
        freeze: with ``clip_path``, set ``requires_grad=False`` on every CLIP parameter and keep the CLIP model in
            eval mode even when ``.train()`` is called. Ignored (always trainable) without ``clip_path``.
        image_size: side the mask is resized to. ``None``: the checkpoint's ``image_size`` with ``clip_path``,
            224 otherwise. A size other than the checkpoint's uses CLIP's position-embedding interpolation.
        hidden_size, num_hidden_layers, num_attention_heads, intermediate_size, patch_size, projection_dim:
            the from-scratch ``CLIPVisionConfig`` (ignored with ``clip_path``). ``intermediate_size=None`` means
            ``4 * hidden_size``.
        output: ``"pooled"`` (default): ``pooler_output``, the post-layernormed CLS token, ``output_dim =
            hidden_size``; ``"projected"``: CLIP's ``image_embeds`` (pooled output through ``visual_projection``),
            ``output_dim = projection_dim``. The reference implementation used OpenAI ViT-L/14's ``encode_image``,
            which is the *projected* 768-d embedding.

    Attributes:
        output_dim: length of the returned vector.
        image_size: side the input mask is resized to.
        model: the underlying ``CLIPVisionModel`` / ``CLIPVisionModelWithProjection``.

    Raises:
        FileNotFoundError: ``clip_path`` does not exist or holds no ``config.json`` / weight file (message names it).
        ValueError: ``clip_path`` holds a non-CLIP model or weights missing from it, or an unknown ``output``.
    """

    def __init__(
        self,
        clip_path: str | os.PathLike | None = None,
        freeze: bool = True,
        image_size: int | None = None,
        hidden_size: int = 768,
        num_hidden_layers: int = 4,
        num_attention_heads: int = 12,
        intermediate_size: int | None = None,
        patch_size: int = 16,
        projection_dim: int = 768,
        output: str = "pooled",
    ) -> None:
        super().__init__()
        from transformers import CLIPVisionConfig, CLIPVisionModel, CLIPVisionModelWithProjection

        if output not in _OUTPUTS:
            raise ValueError(f"MaskCLIPEncoder: output must be one of {_OUTPUTS}, got {output!r}")
        self.output = output
        model_cls = CLIPVisionModelWithProjection if output == "projected" else CLIPVisionModel
        self.clip_path = None if clip_path is None else str(clip_path)

        if clip_path is not None:
            self.model = _load_clip_vision(Path(clip_path), model_cls)
            self.freeze = bool(freeze)
        else:
            config = CLIPVisionConfig(
                hidden_size=hidden_size,
                num_hidden_layers=num_hidden_layers,
                num_attention_heads=num_attention_heads,
                intermediate_size=4 * hidden_size if intermediate_size is None else intermediate_size,
                patch_size=patch_size,
                image_size=224 if image_size is None else image_size,
                projection_dim=projection_dim,
                num_channels=3,
            )
            self.model = model_cls(config)
            self.freeze = False

        cfg = self.model.config
        self.native_image_size = int(cfg.image_size)
        self.image_size = self.native_image_size if image_size is None else int(image_size)
        if self.image_size % int(cfg.patch_size) != 0:
            raise ValueError(
                f"MaskCLIPEncoder: image_size={self.image_size} is not a multiple of patch_size={cfg.patch_size}"
            )
        self.output_dim = int(cfg.projection_dim if output == "projected" else cfg.hidden_size)
        self.register_buffer("pixel_mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(CLIP_STD).view(1, 3, 1, 1), persistent=False)

        if self.freeze:
            self.model.requires_grad_(False)
            self.model.eval()

    def train(self, mode: bool = True) -> "MaskCLIPEncoder":
        """Set train/eval mode; a frozen CLIP model stays in eval mode."""
        super().train(mode)
        if self.freeze:
            self.model.eval()
        return self

    def preprocess(self, mask: torch.Tensor) -> torch.Tensor:
        """Turn a mask ``(B, 1, H, W)`` in ``[0, 1]`` into CLIP pixel values ``(B, 3, image_size, image_size)``.

        The values after normalisation lie in about ``[-1.8, 2.2]``.
        """
        if mask.ndim != 4 or mask.shape[1] != 1:
            raise ValueError(f"MaskCLIPEncoder: mask must have shape (B, 1, H, W), got {tuple(mask.shape)}")
        x = mask.to(self.pixel_mean.dtype)
        size = (self.image_size, self.image_size)
        if tuple(x.shape[-2:]) != size:
            shrinking = x.shape[-2] > size[0] or x.shape[-1] > size[1]
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=shrinking)
        x = x.expand(-1, 3, -1, -1)
        return (x - self.pixel_mean) / self.pixel_std

    def forward(self, mask: torch.Tensor) -> torch.Tensor:
        """Encode masks.

        Args:
            mask: ``(B, 1, H, W)`` float, binary or soft lesion mask with values in ``[0, 1]`` (any ``H``, ``W``).

        Returns:
            ``(B, output_dim)`` float CLIP vector (unbounded reals; the pooled output is layer-normed).
        """
        pixels = self.preprocess(mask).to(dtype=next(self.model.parameters()).dtype)
        kwargs: dict[str, Any] = {}
        if self.image_size != self.native_image_size:
            kwargs["interpolate_pos_encoding"] = True
        out = self.model(pixel_values=pixels, **kwargs)
        return out.image_embeds if self.output == "projected" else out.pooler_output

    def extra_repr(self) -> str:
        src = f"clip_path={self.clip_path!r}" if self.clip_path else "from_scratch"
        return f"{src}, freeze={self.freeze}, image_size={self.image_size}, output={self.output!r}"


def _load_clip_vision(path: Path, model_cls: type) -> nn.Module:
    """Load a CLIP vision tower from a local ``save_pretrained`` folder, strictly and offline, or from an
    image-conditioned Stable Diffusion single file (``cond_stage_model.model.visual.*``, e.g.
    ``sd-image-conditioned-v2.ckpt``; see :func:`custom.networks.sd_weights.load_clip_vision_ldm`)."""
    if path.is_file():
        from .sd_weights import load_clip_vision_ldm

        projected = load_clip_vision_ldm(path)
        if model_cls is type(projected):
            return projected
        model = model_cls(projected.config)
        getattr(model, "vision_model", model).load_state_dict(projected.vision_model.state_dict(), strict=True)
        return model
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: CLIP checkpoint folder does not exist (clip_path)")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{path}: no config.json; not a save_pretrained CLIP checkpoint folder (clip_path)")
    try:
        model_type = json.loads(config_file.read_text()).get("model_type")
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: unreadable config.json ({err})") from err
    if model_type not in _CLIP_MODEL_TYPES:
        raise ValueError(f"{path}: config.json has model_type={model_type!r}, expected one of {_CLIP_MODEL_TYPES}")
    try:
        model, info = model_cls.from_pretrained(str(path), local_files_only=True, output_loading_info=True)
    except OSError as err:
        raise FileNotFoundError(f"{path}: no loadable CLIP weights ({err})") from err
    missing = sorted(info.get("missing_keys", ()))
    mismatched = sorted(str(k) for k in info.get("mismatched_keys", ()))
    if missing or mismatched:
        shown = (missing + mismatched)[:5]
        raise ValueError(
            f"{path}: CLIP weights incomplete for {model_cls.__name__}: "
            f"{len(missing)} missing / {len(mismatched)} mismatched tensors, e.g. {shown}"
        )
    return model
