"""Lesion conditioning for the diffusion UNet: radiomics + CLIP(mask) -> gated fusion -> cross-attention tokens.

Pieces:

* :class:`LesionConditioner` = :class:`~custom.networks.mask_encoder.MaskCLIPEncoder` +
  :class:`~custom.networks.gated_fusion.GatedFusion`, with null conditions for classifier-free guidance (CFG) and
  the ablation modes (``"concat"``, ``"radiomics"``, ``"geometry"``, ``"off"``).
* :func:`cfg_dropout_masks`: per-sample CFG drop events (features only / mask only / both).
* :func:`zero_dropped`: zero the per-sample rows of a tensor, e.g. the soft-mask concat channels, where dropped.
* :func:`concat_token_sources` / :class:`TokenSources`: concatenate named token tensors along the token axis, so
  more sources (text prompt, clinical metadata such as view / density / laterality / BI-RADS) can be added later
  next to the lesion tokens: each source is its own module producing ``(B, T_i, token_dim)`` and the UNet gets
  ``(B, sum_i T_i, token_dim)``.

CFG contract (training): draw ``drop_features, drop_mask = cfg_dropout_masks(B)``; pass both to
:meth:`LesionConditioner.forward` (the radiomic vector becomes the radiomic null where ``drop_features``, the CLIP
geometric vector becomes the geometric null where ``drop_mask``); the caller also zeroes the soft-mask channels it
concatenates to the UNet input where ``drop_mask`` (``zero_dropped(soft_mask, drop_mask)``). At sampling, the
unconditional branch uses ``drop_features = drop_mask = True`` (:meth:`LesionConditioner.unconditional`) and a
zero soft mask; the guidance scale is a sampling parameter, not part of this module.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .gated_fusion import GatedFusion
from .mask_encoder import MaskCLIPEncoder

__all__ = [
    "LesionConditioner",
    "CONDITIONER_MODES",
    "cfg_dropout_masks",
    "zero_dropped",
    "concat_token_sources",
    "TokenSources",
]

#: Modes of :class:`LesionConditioner`: the fusion modes plus ``"off"`` (conditioning branch off).
CONDITIONER_MODES: tuple[str, ...] = ("gated", "concat", "radiomics", "geometry", "off")
_NULLS = ("learned", "zero")
_NULL_INIT_STD = 0.02


def cfg_dropout_masks(
    batch_size: int,
    p_features: float = 0.05,
    p_mask: float = 0.05,
    p_both: float = 0.05,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw classifier-free-guidance drop events, mutually exclusive per sample.

    One uniform ``u`` per sample: ``u < p_features`` drops the features only, ``p_features <= u < p_features +
    p_mask`` the mask only, the next ``p_both`` both, anything else nothing. So ``P(drop_features) = p_features +
    p_both`` and ``P(drop_mask) = p_mask + p_both``.

    Dropping the *mask* means two things: the caller zeroes the soft-mask channels it concatenates to the UNet
    input (:func:`zero_dropped`), and :class:`LesionConditioner` replaces the CLIP geometric vector by its null.
    Dropping the *features* replaces the radiomic vector by its null.

    Args:
        batch_size: ``B >= 0``.
        p_features, p_mask, p_both: probabilities in ``[0, 1]`` with a sum ``<= 1``.
        generator: optional ``torch.Generator`` for reproducible draws (its device is used when ``device`` is None).
        device: device of the returned tensors.

    Returns:
        ``(drop_features, drop_mask)``, two ``(B,)`` bool tensors.

    Raises:
        ValueError: a probability outside ``[0, 1]``, their sum above 1, or a negative ``batch_size``.
    """
    probs = {"p_features": p_features, "p_mask": p_mask, "p_both": p_both}
    for name, p in probs.items():
        if not 0.0 <= float(p) <= 1.0:
            raise ValueError(f"cfg_dropout_masks: {name} must be in [0, 1], got {p}")
    if p_features + p_mask + p_both > 1.0 + 1e-9:
        raise ValueError(f"cfg_dropout_masks: p_features + p_mask + p_both must be <= 1, got {probs}")
    if batch_size < 0:
        raise ValueError(f"cfg_dropout_masks: batch_size must be >= 0, got {batch_size}")
    if device is None and generator is not None:
        device = generator.device
    u = torch.rand(int(batch_size), generator=generator, device=device)
    features_only = u < p_features
    mask_only = (u >= p_features) & (u < p_features + p_mask)
    both = (u >= p_features + p_mask) & (u < p_features + p_mask + p_both)
    return features_only | both, mask_only | both


def zero_dropped(x: torch.Tensor, drop: torch.Tensor | None) -> torch.Tensor:
    """Return ``x`` with the samples where ``drop`` is True set to zero (out of place).

    Args:
        x: ``(B, ...)`` tensor, e.g. the soft-mask concat channels ``(B, C, H, W)``.
        drop: ``(B,)`` bool, or ``None`` (nothing dropped).

    Returns:
        A tensor of ``x``'s shape and dtype.
    """
    if drop is None:
        return x
    if drop.shape != (x.shape[0],):
        raise ValueError(f"zero_dropped: drop must have shape ({x.shape[0]},), got {tuple(drop.shape)}")
    keep = (~drop.to(device=x.device, dtype=torch.bool)).view(-1, *([1] * (x.ndim - 1)))
    return x * keep.to(x.dtype)


def concat_token_sources(
    tokens: Mapping[str, torch.Tensor], order: Sequence[str] | None = None
) -> torch.Tensor:
    """Concatenate named token tensors along the token axis.

    Args:
        tokens: name -> ``(B, T_name, D)`` tensors with one ``B`` and one ``D`` (e.g. ``{"lesion": ...,
            "clinical": ...}``).
        order: names in output order; ``None`` uses the mapping's insertion order. Every name must be present;
            extra names in ``tokens`` are an error too (so nothing is silently left out).

    Returns:
        ``(B, sum T_name, D)`` tensor.

    Raises:
        KeyError: a name of ``order`` is missing from ``tokens`` or ``tokens`` has names not in ``order``.
        ValueError: no sources, or a tensor that is not 3-D or disagrees on ``B`` / ``D``.
    """
    names = list(tokens) if order is None else list(order)
    if not names:
        raise ValueError("concat_token_sources: no token sources given")
    missing = [k for k in names if k not in tokens]
    extra = [k for k in tokens if k not in names]
    if missing or extra:
        raise KeyError(f"concat_token_sources: missing sources {missing}, unexpected sources {extra}")
    ref = tokens[names[0]]
    for k in names:
        t = tokens[k]
        if t.ndim != 3 or t.shape[0] != ref.shape[0] or t.shape[2] != ref.shape[2]:
            raise ValueError(
                f"concat_token_sources: source {k!r} has shape {tuple(t.shape)}, expected (B={ref.shape[0]}, T, "
                f"D={ref.shape[2]})"
            )
    return torch.cat([tokens[k] for k in names], dim=1)


class TokenSources(nn.Module):
    """Fixed-order concatenation of named token tensors (a config-friendly :func:`concat_token_sources`).

    Args:
        order: source names in output order, e.g. ``["lesion"]`` now, ``["lesion", "clinical", "text"]`` later.
        token_dim: expected token width ``D`` (checked when given).

    ``forward(tokens)`` takes name -> ``(B, T_name, D)`` and returns ``(B, sum T_name, D)``.
    """

    def __init__(self, order: Sequence[str], token_dim: int | None = None) -> None:
        super().__init__()
        if not order or len(set(order)) != len(order):
            raise ValueError(f"TokenSources: order must be non-empty with unique names, got {list(order)}")
        self.order = list(order)
        self.token_dim = token_dim

    def forward(self, tokens: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Concatenate ``tokens`` (name -> ``(B, T_name, D)``) in ``self.order`` -> ``(B, sum T_name, D)``."""
        out = concat_token_sources(tokens, self.order)
        if self.token_dim is not None and out.shape[-1] != self.token_dim:
            raise ValueError(f"TokenSources: token width {out.shape[-1]} != token_dim {self.token_dim}")
        return out

    def extra_repr(self) -> str:
        return f"order={self.order}, token_dim={self.token_dim}"


class LesionConditioner(nn.Module):
    """Lesion tokens for cross-attention: ``MaskCLIPEncoder(lesion_mask)`` + radiomics -> ``GatedFusion``.

    Modes (the paper's method and ablations): ``"gated"`` (GCDM), ``"concat"`` (plain concatenation + projection),
    ``"radiomics"`` (features only; no CLIP encoder is built and ``lesion_mask`` is ignored), ``"geometry"``
    (mask only; ``features`` ignored), ``"off"`` (conditioning branch off: neither encoder nor fusion is built and
    the output is a learned constant token sequence, so the UNet interface is unchanged).

    Null conditions (CFG): where ``drop_features`` the radiomic vector is replaced by ``null_radiomic``
    ``(radiomic_dim,)``; where ``drop_mask`` the CLIP vector is replaced by ``null_geometric`` ``(geometric_dim,)``.
    ``null="learned"``: both are ``nn.Parameter`` initialised ``N(0, 0.02^2)`` (distinct from the all-zero
    "no lesion" radiomic vector); ``null="zero"``: both are fixed zero buffers (then a dropped radiomic vector equals
    the "no lesion" vector). Nulls substitute the *inputs* of the fusion, so a fully dropped sample gives the
    constant ``fusion(null_radiomic, null_geometric)``.

    Args:
        mode: one of :data:`CONDITIONER_MODES`.
        radiomic_dim: number of radiomic features (67).
        num_tokens: tokens produced per sample.
        token_dim: width of each token (the UNet's cross-attention dim).
        m, n, top_k, hidden_dim, kernel_size: :class:`GatedFusion` arguments (``mode="gated"``).
        null: ``"learned"`` or ``"zero"``.
        clip_path: local CLIP checkpoint folder for the mask encoder (``None``: train a small one from scratch).
        freeze_clip: freeze a loaded CLIP encoder.
        mask_encoder: an already built mask encoder (any module with an ``output_dim`` attribute mapping
            ``(B, 1, H, W)`` to ``(B, output_dim)``); overrides ``clip_path`` / ``freeze_clip`` /
            ``encoder_kwargs``.
        encoder_kwargs: extra :class:`MaskCLIPEncoder` arguments (``image_size``, ``hidden_size``, ``output``, ...).

    Attributes:
        mask_encoder: the mask encoder, or ``None`` in modes ``"radiomics"`` / ``"off"``.
        fusion: the :class:`GatedFusion`, or ``None`` in mode ``"off"``.
        geometric_dim: width of the geometric vector (the encoder's ``output_dim``; 0 without an encoder).
    """

    def __init__(
        self,
        mode: str = "gated",
        radiomic_dim: int = 67,
        num_tokens: int = 1,
        token_dim: int = 768,
        m: int = 5,
        n: int = 5,
        top_k: int = 5,
        hidden_dim: int | None = None,
        kernel_size: int = 5,
        null: str = "learned",
        clip_path: str | os.PathLike | None = None,
        freeze_clip: bool = True,
        mask_encoder: nn.Module | None = None,
        encoder_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if mode not in CONDITIONER_MODES:
            raise ValueError(f"LesionConditioner: mode must be one of {CONDITIONER_MODES}, got {mode!r}")
        if null not in _NULLS:
            raise ValueError(f"LesionConditioner: null must be one of {_NULLS}, got {null!r}")
        self.mode = mode
        self.null = null
        self.radiomic_dim = int(radiomic_dim)
        self.num_tokens = int(num_tokens)
        self.token_dim = int(token_dim)
        self.uses_radiomics = mode in ("gated", "concat", "radiomics")
        self.uses_geometry = mode in ("gated", "concat", "geometry")

        self.mask_encoder: nn.Module | None = None
        self.fusion: GatedFusion | None = None
        self.geometric_dim = 0
        if mode == "off":
            self.off_tokens = nn.Parameter(torch.randn(self.num_tokens, self.token_dim) * _NULL_INIT_STD)
            return

        if self.uses_geometry:
            if mask_encoder is None:
                mask_encoder = MaskCLIPEncoder(clip_path=clip_path, freeze=freeze_clip, **dict(encoder_kwargs or {}))
            if not hasattr(mask_encoder, "output_dim"):
                raise ValueError("LesionConditioner: mask_encoder must have an `output_dim` attribute")
            self.mask_encoder = mask_encoder
            self.geometric_dim = int(mask_encoder.output_dim)
        self.fusion = GatedFusion(
            radiomic_dim=self.radiomic_dim,
            geometric_dim=self.geometric_dim if self.uses_geometry else 1,  # unused in "radiomics"
            m=m,
            n=n,
            top_k=top_k,
            num_tokens=self.num_tokens,
            token_dim=self.token_dim,
            hidden_dim=hidden_dim,
            mode=mode,
            kernel_size=kernel_size,
        )
        for name, dim, used in (
            ("null_radiomic", self.radiomic_dim, self.uses_radiomics),
            ("null_geometric", self.geometric_dim, self.uses_geometry),
        ):
            if not used:
                setattr(self, name, None)
            elif null == "learned":
                setattr(self, name, nn.Parameter(torch.randn(dim) * _NULL_INIT_STD))
            else:
                self.register_buffer(name, torch.zeros(dim), persistent=False)

    @staticmethod
    def _substitute(x: torch.Tensor | None, null: torch.Tensor, drop: torch.Tensor | None, b: int) -> torch.Tensor:
        """``x`` with rows where ``drop`` replaced by ``null``; all rows null when ``x`` is None."""
        if x is None:
            return null.unsqueeze(0).expand(b, -1)
        if drop is None:
            return x
        return torch.where(drop.to(x.device).view(-1, 1), null.to(x.dtype).unsqueeze(0), x)

    def forward(
        self,
        features: torch.Tensor | None,
        lesion_mask: torch.Tensor | None,
        drop_features: torch.Tensor | None = None,
        drop_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Lesion tokens for a batch.

        Args:
            features: ``(B, radiomic_dim)`` float normalised radiomics in ``[0, 1]`` (zero vector = no lesion). May
                be ``None`` when unused by the mode or when ``drop_features`` is all True.
            lesion_mask: ``(B, 1, H, W)`` float mask in ``[0, 1]``. May be ``None`` when unused by the mode or when
                ``drop_mask`` is all True (the CLIP encoder is then not run).
            drop_features: ``(B,)`` bool, True where the radiomic vector is replaced by its null; ``None`` = none.
            drop_mask: ``(B,)`` bool, True where the CLIP vector is replaced by its null; ``None`` = none. (The
                caller zeroes its soft-mask concat channels for the same samples, see :func:`zero_dropped`.)

        Returns:
            ``(B, num_tokens, token_dim)`` float tokens (unbounded reals).

        Raises:
            ValueError: wrong shapes, disagreeing batch sizes, or a needed input that is ``None``.
        """
        b = self._batch_size(features, lesion_mask, drop_features, drop_mask)
        if self.mode == "off":
            return self.off_tokens.unsqueeze(0).expand(b, -1, -1)
        assert self.fusion is not None

        rad = None
        if self.uses_radiomics:
            rad_in = None
            if not _all_true(drop_features):
                if features is None:
                    raise ValueError(f"LesionConditioner(mode={self.mode!r}): features are required, got None")
                rad_in = features
            rad = self._substitute(rad_in, self.null_radiomic, drop_features, b)

        geo = None
        if self.uses_geometry:
            assert self.mask_encoder is not None
            geo_in = None
            if not _all_true(drop_mask):
                if lesion_mask is None:
                    raise ValueError(f"LesionConditioner(mode={self.mode!r}): lesion_mask is required, got None")
                geo_in = self.mask_encoder(lesion_mask)
            geo = self._substitute(geo_in, self.null_geometric, drop_mask, b)

        if rad is not None and geo is not None:
            dtype = torch.promote_types(rad.dtype, geo.dtype)
            rad, geo = rad.to(dtype), geo.to(dtype)
        return self.fusion(rad, geo)

    @torch.no_grad()
    def unconditional(self, batch_size: int, device: torch.device | str | None = None) -> torch.Tensor:
        """Fully dropped tokens ``(batch_size, num_tokens, token_dim)`` for the CFG unconditional branch.

        Equal to ``forward`` with ``drop_features = drop_mask = True`` for every sample (no inputs needed).
        Runs without gradient.
        """
        drop = torch.ones(batch_size, dtype=torch.bool, device=device)
        out = self.forward(None, None, drop_features=drop, drop_mask=drop)
        return out if device is None else out.to(device)

    def _batch_size(self, *tensors: torch.Tensor | None) -> int:
        """The common batch size of ``(features, lesion_mask, drop_features, drop_mask)`` (``None`` skipped)."""
        sizes = {int(t.shape[0]) for t in tensors if t is not None}
        if not sizes:
            raise ValueError("LesionConditioner: cannot infer the batch size, every input is None")
        if len(sizes) > 1:
            raise ValueError(f"LesionConditioner: inputs disagree on the batch size: {sorted(sizes)}")
        features, lesion_mask, drop_features, drop_mask = tensors
        for name, d in (("drop_features", drop_features), ("drop_mask", drop_mask)):
            if d is not None and (d.ndim != 1 or d.dtype != torch.bool):
                raise ValueError(
                    f"LesionConditioner: {name} must be a (B,) bool tensor, got {d.dtype} {tuple(d.shape)}"
                )
        return sizes.pop()

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, null={self.null!r}, num_tokens={self.num_tokens}, token_dim={self.token_dim}"


def _all_true(drop: torch.Tensor | None) -> bool:
    """Whether a ``(B,)`` bool drop tensor is given, non-empty and all True."""
    return drop is not None and drop.numel() > 0 and bool(drop.all())
