"""The GCDM denoiser: a MONAI ``DiffusionModelUNet`` fed by concatenated mask latents and lesion cross-attention tokens.

Input of the UNet (channels, in this order)::

    z_t                      latent_channels        the noisy image latent
    mask_latent              mask_latent_channels   the VAE latent of the soft mask (zeroed where the mask is dropped)
    extra_concat (optional)  extra_concat_channels  e.g. inpainting: resized region mask + masked-image latent

The soft mask has 3 channels ``[background, breast, lesion-blurred]`` and the stage-1 VAE has 1 input channel, so
every selected soft-mask channel is encoded *separately* by the frozen encoder, ``E(G(M)_c)`` (see
:class:`custom.engines.diffusion.FrozenLatentEncoder`), and the per-channel latents are concatenated:
``mask_latent_channels = len(mask_channels) * latent_channels`` (12 for the default ``mask_channels=[0, 1, 2]`` and
4 latent channels; the reference GCDM code had one 4-channel latent of an RGB-like mask).

Cross-attention context ``(B, L * num_tokens [+ extra tokens], token_dim)``: one :class:`LesionConditioner` run on
each of the ``L = max_lesions`` lesion *slots* of every image (``B * L`` conditioner samples), tokens concatenated
slot after slot along the token axis. An empty slot (``lesion_present == 0``) gets the "no lesion" radiomic vector
(zeros) and an empty lesion mask: the inputs are multiplied by ``lesion_present`` here, so whatever a data
pipeline puts into empty slots the network sees the same "no lesion" condition.

Classifier-free guidance: ``drop_features`` / ``drop_mask`` are ``(B,)`` bool per *image*, broadcast to its slots.
Dropping the mask zeroes the mask-latent channels AND replaces the CLIP geometric vector by the conditioner's null;
dropping the features replaces the radiomic vector by its null. The unconditional branch drops both.

Extension points (set from the bundle config, no trainer change needed):

* ``extra_concat_channels``: more concatenated input channels, passed as ``extra_concat`` (never CFG-dropped).
* ``token_sources``: named modules producing more tokens, ``source(inputs) -> (B, T, token_dim)``; each reads the
  keyword argument of its own name from ``forward(**extra_inputs)`` (e.g. ``clinical=...``), and its tokens are
  zeroed for samples where both features and mask are dropped (the unconditional branch).
* ``time_attributes``: clinical attributes added to the UNet's timestep embedding instead
  (:class:`~custom.networks.attributes.AttributeEmbedding` as the UNet's ``class_embedding``, MONAI's own hook); they
  read ``forward(attributes=(B, K) codes)`` at every call (also with a precomputed ``context``), and samples whose
  features and mask are both dropped get every attribute's null.
* ``lesion_labels``: per-slot lesion labels (category, BI-RADS; :mod:`custom.data.lesion_labels`), read from
  ``forward(lesion_labels=(B, L, K) codes)``: :class:`~custom.networks.attributes.SlotLabelEmbedding` of a slot's
  codes is added to each of that slot's tokens after the fusion. Empty slots and samples whose features and mask are
  both dropped get every label's null; in training each label is also dropped on its own (``lesion_label_drop``).
  ``lesion_label_mode="spatial"`` puts the labels into the UNet input instead: one more input channel per label,
  holding ``(code + 1) / n_values`` over each lesion's area at latent resolution (area-pooled lesion mask, the
  largest value where lesions overlap) and 0 elsewhere, where not given, in empty slots, in the unconditional branch
  and where the label is dropped in training (:meth:`GCDMNetwork.label_channels`). Concatenated channels are the
  path the network demonstrably learns at a small budget (it follows the mask), which the cross-attention tokens
  were measured not to be (bundle/docs/README.md, per-lesion labels).
* ``spatial_feature_channels`` ``K > 0``: the lesion's radiomic features also enter the UNet input, beside the
  cross-attention tokens (which stay): a learned linear map of each slot's 67 normalised features to ``K`` values,
  painted over that slot's area-pooled lesion mask at latent resolution and summed over slots; 0 outside lesions,
  in empty slots and where the features are dropped (:meth:`GCDMNetwork.feature_channels`). ``0`` (the default)
  builds nothing and gives the GCDM network unchanged. Added in 0.9.2 because guidance on the features alone was
  measured to do nothing through the tokens (bundle/docs/README.md, "Guidance, lesions clipped at white").
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from custom.errors import MammoInputError

from .conditioning import LesionConditioner, concat_token_sources, zero_dropped

__all__ = ["GCDMNetwork", "UNET_RESERVED_KWARGS", "LESION_LABEL_MODES", "check_spatial_feature_channels"]

#: How per-slot lesion labels enter the network (:class:`GCDMNetwork`'s ``lesion_label_mode``).
LESION_LABEL_MODES = ("tokens", "spatial")

#: ``DiffusionModelUNet`` arguments that :class:`GCDMNetwork` sets itself (they may not appear in ``unet_kwargs``).
UNET_RESERVED_KWARGS = ("spatial_dims", "in_channels", "out_channels", "with_conditioning", "cross_attention_dim")


def check_spatial_feature_channels(spatial_feature_channels: Any) -> int:
    """``spatial_feature_channels``: an integer >= 0 (a boolean, a fraction or text is refused).

    Raises:
        MammoInputError: naming ``spatial_feature_channels`` (a ``ValueError``).
    """
    value = spatial_feature_channels
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value != int(value) or value < 0:
        raise MammoInputError("spatial_feature_channels", f"must be an integer >= 0, got {value!r}")
    return int(value)


class GCDMNetwork(nn.Module):
    """Noise predictor ``eps(z_t, t | soft mask, lesion features)`` of GCDM.

    Args:
        latent_channels: channels of the image latent (the stage-1 ``latent_channels``).
        mask_latent_channels: channels of the soft-mask latent (``len(mask_channels) * latent_channels``); 0 turns
            the mask concatenation off.
        conditioner: a :class:`LesionConditioner` (or a mapping of its constructor arguments); its ``token_dim`` is
            the UNet's ``cross_attention_dim``.
        unet_kwargs: remaining :class:`monai.networks.nets.DiffusionModelUNet` arguments (``channels``,
            ``attention_levels``, ``num_res_blocks``, ``num_head_channels``, ``norm_num_groups``,
            ``use_flash_attention``, ...); the arguments in :data:`UNET_RESERVED_KWARGS` are derived here.
        max_lesions: lesion slots ``L`` per image.
        extra_concat_channels: further concatenated input channels (``extra_concat`` in :meth:`forward`).
        token_sources: optional name -> module producing extra ``(B, T, token_dim)`` tokens (see module docstring).
        time_attributes: attribute names added to the timestep embedding (``attribute_mode: "time"``); empty = none.
        time_attribute_drop: their per-attribute training drop rates (as ``AttributeTokens``).
        lesion_labels: per-slot lesion-label names (``lesion_category``, ``lesion_birads``); empty = none.
        lesion_label_drop: their per-label training drop rates.
        lesion_label_mode: ``"spatial"`` (input channels over the lesion, the default) or ``"tokens"`` (added to
            the slot's cross-attention tokens), see the module docstring.
        spatial_feature_channels: ``K`` input channels carrying the lesion features over each lesion
            (:meth:`feature_channels`); 0 = none (the default).
        spatial_dims: 2.
        channels_last: run the UNet in ``torch.channels_last`` memory format (a speed switch on GPUs).

    Attributes:
        unet: the ``DiffusionModelUNet``; ``unet.in_channels == latent_channels + mask_latent_channels +
            extra_concat_channels`` (+ one per lesion label with ``lesion_label_mode="spatial"``, +
            ``spatial_feature_channels``).
        conditioner: the lesion conditioner.
        num_context_tokens: tokens in the cross-attention context from the lesion slots (``L * num_tokens``).
    """

    def __init__(
        self,
        latent_channels: int,
        mask_latent_channels: int,
        conditioner: LesionConditioner | Mapping[str, Any],
        unet_kwargs: Mapping[str, Any] | None = None,
        max_lesions: int = 2,
        extra_concat_channels: int = 0,
        token_sources: Mapping[str, nn.Module] | None = None,
        spatial_dims: int = 2,
        channels_last: bool = False,
        time_attributes: Sequence[str] = (),
        time_attribute_drop: Mapping[str, float] | None = None,
        lesion_labels: Sequence[str] = (),
        lesion_label_drop: Mapping[str, float] | None = None,
        lesion_label_mode: str = "spatial",
        spatial_feature_channels: int = 0,
    ) -> None:
        super().__init__()
        from monai.networks.nets import DiffusionModelUNet

        if latent_channels < 1 or mask_latent_channels < 0 or extra_concat_channels < 0 or max_lesions < 1:
            raise ValueError(
                f"GCDMNetwork: need latent_channels >= 1, mask_latent_channels >= 0, extra_concat_channels >= 0, "
                f"max_lesions >= 1; got {latent_channels}, {mask_latent_channels}, {extra_concat_channels}, "
                f"{max_lesions}"
            )
        unet_kwargs = dict(unet_kwargs or {})
        reserved = sorted(k for k in unet_kwargs if k in UNET_RESERVED_KWARGS)
        if reserved:
            raise ValueError(f"GCDMNetwork: unet_kwargs may not set {reserved}; they are derived from the latents")
        if unet_kwargs.get("use_flash_attention") and float(unet_kwargs.get("dropout_cattn", 0.0)) > 0:
            # MONAI's SDPA path passes dropout_p whatever the mode: eval outputs would be random
            raise ValueError("GCDMNetwork: use_flash_attention with dropout_cattn > 0 drops attention at inference too; "
                             "turn one of them off")
        if isinstance(conditioner, Mapping):
            conditioner = LesionConditioner(**dict(conditioner))
        self.conditioner = conditioner
        self.latent_channels = int(latent_channels)
        self.mask_latent_channels = int(mask_latent_channels)
        self.extra_concat_channels = int(extra_concat_channels)
        self.max_lesions = int(max_lesions)
        self.token_dim = int(conditioner.token_dim)
        self.num_context_tokens = self.max_lesions * int(conditioner.num_tokens)
        self.channels_last = bool(channels_last)
        if lesion_label_mode not in LESION_LABEL_MODES:
            raise ValueError(f"lesion_label_mode: must be one of {', '.join(LESION_LABEL_MODES)}, got {lesion_label_mode!r}")
        self.lesion_label_mode = lesion_label_mode
        spatial_labels = len(lesion_labels or ()) if lesion_label_mode == "spatial" else 0
        self.spatial_feature_channels = check_spatial_feature_channels(spatial_feature_channels)
        self.feature_map: nn.Linear | None = (nn.Linear(int(conditioner.radiomic_dim), self.spatial_feature_channels)
                                              if self.spatial_feature_channels else None)
        self.in_channels = (self.latent_channels + self.mask_latent_channels + self.extra_concat_channels
                            + spatial_labels + self.spatial_feature_channels)
        self.unet = DiffusionModelUNet(
            spatial_dims=spatial_dims,
            in_channels=self.in_channels,
            out_channels=self.latent_channels,
            with_conditioning=True,
            cross_attention_dim=self.token_dim,
            **unet_kwargs,
        )
        self.token_sources = nn.ModuleDict(dict(token_sources or {}))
        if "lesion" in self.token_sources:
            raise ValueError("GCDMNetwork: 'lesion' is the lesion-token source's name; choose another")
        self.time_attributes: tuple[str, ...] = tuple(time_attributes or ())
        if self.time_attributes:
            from .attributes import AttributeEmbedding

            if "attributes" in self.token_sources:
                raise ValueError("GCDMNetwork: attributes as tokens and in the time embedding at once; choose one")
            width = int(self.unet.time_embed[-1].out_features)
            # MONAI's class-conditioning hook: forward adds class_embedding(class_labels) to the time embedding
            self.unet.class_embedding = AttributeEmbedding(self.time_attributes, width, time_attribute_drop)
            self.unet.num_class_embeds = len(self.time_attributes)
        self.slot_labels: nn.Module | None = None
        self.lesion_labels: tuple[str, ...] = ()
        if lesion_labels:
            from .attributes import SlotLabelEmbedding

            if "lesion_labels" in self.token_sources:
                raise ValueError("GCDMNetwork: 'lesion_labels' is the per-slot label input's name; rename the token source")
            labels = SlotLabelEmbedding(lesion_labels, self.token_dim if lesion_label_mode == "tokens" else 1,
                                        lesion_label_drop)
            self.lesion_labels = tuple(labels.names)
            if lesion_label_mode == "tokens":
                self.slot_labels = labels
            else:  # only the names, drop rates and value counts are used
                self.register_buffer("label_drop_rates", labels.drop_rates.clone(), persistent=False)
                self.label_values = tuple(labels.null_index[n] for n in self.lesion_labels)
        if self.channels_last:
            self.unet.to(memory_format=torch.channels_last)

    def context(
        self,
        features: torch.Tensor,
        lesion_masks: torch.Tensor,
        lesion_present: torch.Tensor,
        drop_features: torch.Tensor | None = None,
        drop_mask: torch.Tensor | None = None,
        **extra_inputs: torch.Tensor,
    ) -> torch.Tensor:
        """Cross-attention context ``(B, L * num_tokens [+ extra], token_dim)`` (see the module docstring).

        Args:
            features: ``(B, L, 67)`` normalised radiomics (zeros in empty slots).
            lesion_masks: ``(B, L, H, W)`` binary lesion masks, one per slot.
            lesion_present: ``(B, L)`` 1 where the slot holds a lesion, 0 otherwise.
            drop_features, drop_mask: ``(B,)`` bool CFG drop events (``None`` = nothing dropped).
            extra_inputs: inputs of the extra token sources, by source name; ``lesion_labels`` ``(B, L, K)`` int
                codes (``-1`` = not given) when the network reads per-slot lesion labels.
        """
        if features.ndim != 3 or lesion_masks.ndim != 4 or lesion_present.ndim != 2:
            raise ValueError(
                "GCDMNetwork: expected features (B, L, F), lesion_masks (B, L, H, W), lesion_present (B, L); got "
                f"{tuple(features.shape)}, {tuple(lesion_masks.shape)}, {tuple(lesion_present.shape)}"
            )
        b, slots = features.shape[:2]
        if slots != self.max_lesions or lesion_masks.shape[:2] != (b, slots) or lesion_present.shape != (b, slots):
            raise ValueError(
                f"GCDMNetwork: {self.max_lesions} lesion slots expected; got features {tuple(features.shape)}, "
                f"lesion_masks {tuple(lesion_masks.shape)}, lesion_present {tuple(lesion_present.shape)}"
            )
        present = lesion_present.to(features.dtype)
        feats = (features * present.unsqueeze(-1)).reshape(b * slots, -1)  # empty slot -> "no lesion" zeros
        masks = (lesion_masks * present.to(lesion_masks.dtype)[..., None, None]).reshape(b * slots, 1, *lesion_masks.shape[2:])

        def per_slot(drop: torch.Tensor | None) -> torch.Tensor | None:
            return None if drop is None else drop.to(torch.bool).repeat_interleave(slots)

        tokens = self.conditioner(feats, masks, drop_features=per_slot(drop_features), drop_mask=per_slot(drop_mask))
        if self.slot_labels is not None and self.lesion_label_mode == "tokens":
            tokens = tokens + self._slot_label_vectors(extra_inputs.get("lesion_labels"), lesion_present,
                                                       drop_features, drop_mask).to(tokens.dtype)[:, None, :]
        tokens = tokens.reshape(b, slots * tokens.shape[1], tokens.shape[2])
        if not len(self.token_sources):
            return tokens
        missing = [k for k in self.token_sources if k not in extra_inputs]
        if missing:
            raise ValueError(f"GCDMNetwork: inputs missing for token sources {missing}")
        both = None
        if drop_features is not None and drop_mask is not None:
            both = drop_features.to(torch.bool) & drop_mask.to(torch.bool)
        sources = {"lesion": tokens}
        for name, module in self.token_sources.items():
            sources[name] = zero_dropped(module(extra_inputs[name]), both).to(tokens.dtype)
        return concat_token_sources(sources, ["lesion", *self.token_sources])

    def _slot_codes(self, codes: torch.Tensor | None, lesion_present: torch.Tensor,
                    drop_features: torch.Tensor | None, drop_mask: torch.Tensor | None) -> torch.Tensor:
        """``(B, L, K)`` label codes, forced to "not given" (-1) in empty slots and in samples whose features and
        mask are both dropped (the unconditional branch)."""
        b, slots = lesion_present.shape
        k = len(self.lesion_labels)
        if codes is None or codes.ndim != 3 or tuple(codes.shape) != (b, slots, k):
            got = None if codes is None else tuple(codes.shape)
            raise ValueError(f"GCDMNetwork: lesion_labels (B={b}, L={slots}, {k}) codes expected for "
                             f"{list(self.lesion_labels)}, got {got}")
        codes = codes.long().to(lesion_present.device)
        off = lesion_present <= 0
        if drop_features is not None and drop_mask is not None:
            both = (drop_features.to(torch.bool) & drop_mask.to(torch.bool)).to(off.device)
            off = off | both[:, None]
        return torch.where(off[..., None], torch.full_like(codes, -1), codes)

    def _slot_label_vectors(self, codes: torch.Tensor | None, lesion_present: torch.Tensor,
                            drop_features: torch.Tensor | None, drop_mask: torch.Tensor | None) -> torch.Tensor:
        """``(B * L, token_dim)`` label vectors of the slots (``lesion_label_mode="tokens"``)."""
        assert self.slot_labels is not None
        b, slots = lesion_present.shape
        codes = self._slot_codes(codes, lesion_present, drop_features, drop_mask)
        return self.slot_labels(codes.reshape(b * slots, len(self.lesion_labels)))

    def label_channels(self, codes: torch.Tensor | None, lesion_masks: torch.Tensor, lesion_present: torch.Tensor,
                       size: Sequence[int], drop_features: torch.Tensor | None = None,
                       drop_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The ``lesion_label_mode="spatial"`` input channels ``(B, K, h, w)`` in ``[0, 1]``: label ``k`` of slot
        ``s`` is ``(code + 1) / n_values_k`` (0 when not given, in an empty slot or in the unconditional branch) times
        the slot's lesion mask area-pooled to ``size``; the largest value where lesions overlap. In training each
        label of each sample is zeroed with its own drop rate (``lesion_label_drop``)."""
        b, slots = lesion_present.shape
        codes = self._slot_codes(codes, lesion_present, drop_features, drop_mask)
        n_values = torch.tensor(self.label_values, dtype=lesion_masks.dtype, device=lesion_masks.device)
        value = (codes.to(lesion_masks.device).to(lesion_masks.dtype) + 1.0) / n_values  # (B, L, K); -1 -> 0
        if self.training:
            rates = self.label_drop_rates.to(lesion_masks.device)
            keep = torch.rand(b, 1, len(self.lesion_labels), device=lesion_masks.device) >= rates
            value = value * keep.to(value.dtype)
        area = torch.nn.functional.adaptive_avg_pool2d(lesion_masks.float(), tuple(int(v) for v in size))  # (B, L, h, w)
        return (value[..., None, None] * area[:, :, None].to(value.dtype)).amax(dim=1)

    def feature_channels(self, features: torch.Tensor, lesion_masks: torch.Tensor, lesion_present: torch.Tensor,
                         size: Sequence[int], drop_features: torch.Tensor | None = None) -> torch.Tensor:
        """The ``spatial_feature_channels`` input channels ``(B, K, h, w)``: ``feature_map(features[b, s])``
        (``(K,)``, unbounded) times slot ``s``'s lesion mask area-pooled to ``size``, summed over the slots; 0 in
        empty slots (``lesion_present == 0``) and for samples whose features are dropped (``drop_features``: CFG
        drops in training, the unconditional branch at sampling).

        Args:
            features: ``(B, L, 67)`` normalised radiomics; lesion_masks: ``(B, L, H, W)`` in ``{0, 1}``;
            lesion_present: ``(B, L)``; size: the latent ``(h, w)``; drop_features: ``(B,)`` bool or ``None``.
        """
        assert self.feature_map is not None
        keep = lesion_present.to(features.dtype)
        if drop_features is not None:
            keep = keep * (~drop_features.to(torch.bool)).to(features.dtype)[:, None].to(keep.device)
        value = self.feature_map(features) * keep[..., None]  # (B, L, K)
        area = torch.nn.functional.adaptive_avg_pool2d(lesion_masks.float(), tuple(int(v) for v in size))  # (B, L, h, w)
        return (value[..., None, None] * area[:, :, None].to(value.dtype)).sum(dim=1)

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        mask_latent: torch.Tensor | None,
        features: torch.Tensor,
        lesion_masks: torch.Tensor,
        lesion_present: torch.Tensor,
        drop_features: torch.Tensor | None = None,
        drop_mask: torch.Tensor | None = None,
        extra_concat: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
        **extra_inputs: torch.Tensor,
    ) -> torch.Tensor:
        """Predict the noise of ``x``.

        Args:
            x: ``(B, latent_channels, h, w)`` noisy latent ``z_t``.
            timesteps: ``(B,)`` integer diffusion timesteps.
            mask_latent: ``(B, mask_latent_channels, h, w)`` soft-mask latent (``None`` only when
                ``mask_latent_channels == 0``); zeroed here where ``drop_mask``.
            features, lesion_masks, lesion_present, drop_features, drop_mask, extra_inputs: see :meth:`context`.
            extra_concat: ``(B, extra_concat_channels, h, w)`` when ``extra_concat_channels > 0``.
            context: ``(B, T, token_dim)`` cross-attention context precomputed by :meth:`context` with the same
                ``features`` / ``lesion_masks`` / ``lesion_present`` / drop flags / ``extra_inputs``. It does not
                depend on ``x`` or ``timesteps``, so a sampler computes it once per run instead of once per step;
                when given, ``features``, ``lesion_masks``, ``lesion_present``, ``drop_features`` and
                ``extra_inputs`` are not read again (``drop_mask`` still zeroes the mask-latent channels; with
                ``lesion_label_mode="spatial"`` the label channels still read ``lesion_masks``, ``lesion_present``,
                the drop flags and ``extra_inputs["lesion_labels"]``; with ``spatial_feature_channels`` the feature
                channels still read ``features``, ``lesion_masks``, ``lesion_present`` and ``drop_features``).

        Returns:
            ``(B, latent_channels, h, w)`` predicted noise.
        """
        parts = [x]
        if self.mask_latent_channels:
            if mask_latent is None or mask_latent.shape[1] != self.mask_latent_channels:
                got = None if mask_latent is None else tuple(mask_latent.shape)
                raise ValueError(f"GCDMNetwork: mask_latent must have {self.mask_latent_channels} channels, got {got}")
            parts.append(zero_dropped(mask_latent.to(x.dtype), drop_mask))
        if self.extra_concat_channels:
            if extra_concat is None or extra_concat.shape[1] != self.extra_concat_channels:
                got = None if extra_concat is None else tuple(extra_concat.shape)
                raise ValueError(f"GCDMNetwork: extra_concat must have {self.extra_concat_channels} channels, got {got}")
            parts.append(extra_concat.to(x.dtype))
        if self.lesion_labels and self.lesion_label_mode == "spatial":
            parts.append(self.label_channels(extra_inputs.get("lesion_labels"), lesion_masks, lesion_present,
                                             x.shape[2:], drop_features, drop_mask).to(x.dtype))
        if self.spatial_feature_channels:
            parts.append(self.feature_channels(features, lesion_masks, lesion_present, x.shape[2:],
                                               drop_features).to(x.dtype))
        if any(p.shape[0] != x.shape[0] or p.shape[2:] != x.shape[2:] for p in parts):
            raise ValueError(f"GCDMNetwork: concat inputs disagree in shape: {[tuple(p.shape) for p in parts]}")
        h = torch.cat(parts, dim=1)
        if self.channels_last:
            h = h.contiguous(memory_format=torch.channels_last)
        if context is None:
            context = self.context(features, lesion_masks, lesion_present, drop_features, drop_mask, **extra_inputs)
        elif context.ndim != 3 or context.shape[0] != x.shape[0] or context.shape[2] != self.token_dim:
            raise ValueError(
                f"GCDMNetwork: context must be (B={x.shape[0]}, T, {self.token_dim}), got {tuple(context.shape)}"
            )
        if not self.time_attributes:
            return self.unet(h, timesteps, context=context.to(h.dtype))
        codes = extra_inputs.get("attributes")
        if codes is None or codes.ndim != 2 or codes.shape != (x.shape[0], len(self.time_attributes)):
            got = None if codes is None else tuple(codes.shape)
            raise ValueError(f"GCDMNetwork: attributes (B={x.shape[0]}, {len(self.time_attributes)}) codes expected for "
                             f"{list(self.time_attributes)}, got {got}")
        if drop_features is not None and drop_mask is not None:  # the unconditional branch: every attribute's null
            both = (drop_features.to(torch.bool) & drop_mask.to(torch.bool)).to(codes.device)
            codes = torch.where(both[:, None], torch.full_like(codes, -1), codes)
        return self.unet(h, timesteps, context=context.to(h.dtype), class_labels=codes)

    @property
    def attribute_names(self) -> tuple[str, ...]:
        """The clinical attributes the network reads (as tokens or in the time embedding), in code order."""
        if self.time_attributes:
            return self.time_attributes
        src = self.token_sources["attributes"] if "attributes" in self.token_sources else None
        return tuple(src.names) if src is not None else ()

    @property
    def lesion_label_names(self) -> tuple[str, ...]:
        """The per-slot lesion labels the network reads, in code order (empty when none)."""
        return self.lesion_labels

    def extra_repr(self) -> str:
        return (
            f"latent_channels={self.latent_channels}, mask_latent_channels={self.mask_latent_channels}, "
            f"extra_concat_channels={self.extra_concat_channels}, max_lesions={self.max_lesions}, "
            f"token_dim={self.token_dim}"
        )
