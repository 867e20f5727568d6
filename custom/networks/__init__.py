"""Conditioning networks of GCDM: CLIP mask encoder, gated radiomic/geometric fusion, lesion conditioner.

- :class:`MaskCLIPEncoder`: lesion mask ``(B, 1, H, W)`` in ``[0, 1]`` -> CLIP vector ``(B, output_dim)``.
- :class:`GatedFusion`: radiomics ``(B, 67)`` + CLIP vector ``(B, 768)`` -> tokens ``(B, num_tokens, token_dim)``.
- :class:`LesionConditioner`: both of the above plus CFG null conditions and the ablation modes.
- :func:`cfg_dropout_masks`, :func:`zero_dropped`: classifier-free-guidance drop events and their application.
- :func:`concat_token_sources`, :class:`TokenSources`: join named token sequences along the token axis.
"""

from .conditioning import (
    CONDITIONER_MODES,
    LesionConditioner,
    TokenSources,
    cfg_dropout_masks,
    concat_token_sources,
    zero_dropped,
)
from .gated_fusion import FUSION_MODES, GatedFusion
from .mask_encoder import CLIP_MEAN, CLIP_STD, MaskCLIPEncoder

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "CONDITIONER_MODES",
    "FUSION_MODES",
    "GatedFusion",
    "LesionConditioner",
    "MaskCLIPEncoder",
    "TokenSources",
    "cfg_dropout_masks",
    "concat_token_sources",
    "zero_dropped",
]
