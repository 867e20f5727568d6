"""Clinical-attribute tokens for the GCDM cross-attention context (a ``token_sources`` entry of
:class:`~custom.networks.gcdm.GCDMNetwork`).

:class:`AttributeTokens` turns the ``(B, K)`` attribute codes of :func:`custom.data.attributes.encode_attributes`
into ``K`` tokens ``(B, K, token_dim)``: attribute ``k`` has its own embedding table with one row per value plus one
learned *null* row, used where the attribute is not given (code ``-1``) or dropped. During training (module in
``train()`` mode) every attribute is dropped to its null independently with its own rate (``drop_rates``), so at
sampling time any subset of attributes can be given and the rest stay "unconditional" for that attribute.

Two ways into the UNet (``attribute_mode`` in ``configs/common.json``; GBCI uses cross-attention and FiLM):

* ``tokens`` (default): :class:`AttributeTokens`, one cross-attention token per attribute through the same hook as
  the lesion tokens (a ``token_sources`` entry), each with its own null for per-attribute CFG dropping.
* ``time``: :class:`AttributeEmbedding`, the sum of the attributes' embeddings (same tables, same nulls, same
  per-attribute dropping) added to the UNet's timestep embedding through MONAI ``DiffusionModelUNet``'s own
  class-embedding hook (``class_embedding`` / ``class_labels``, ADM-style class conditioning). Every ResNet block
  adds a projection of that embedding to its features: a global shift of every block, i.e. FiLM without the scale,
  with no fork of the UNet. It suits a whole-image property (breast density) that a few attention tokens may not
  reach. The edit study measures which one controls density (bundle/docs/README.md).

Classifier-free guidance: :class:`~custom.networks.gcdm.GCDMNetwork` zeroes every extra token source for samples
whose features *and* mask are dropped (its unconditional branch), so the guided sampler's unconditional prediction
has no attribute either; training sees that state with probability ``p_both``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from custom.data.attributes import ATTRIBUTES, NOT_GIVEN, check_attribute_names
from custom.data.lesion_labels import LESION_LABELS, check_lesion_label_names

__all__ = ["AttributeTokens", "AttributeEmbedding", "SlotLabelEmbedding", "attribute_token_sources",
           "time_attribute_names", "check_attribute_mode", "ATTRIBUTE_MODES", "DEFAULT_ATTRIBUTE_DROP"]

#: ``attribute_mode`` values (module docstring)
ATTRIBUTE_MODES = ("tokens", "time")

#: Training drop rate of an attribute not named in ``drop_rates``.
DEFAULT_ATTRIBUTE_DROP = 0.1


class AttributeTokens(nn.Module):
    """``(B, K)`` int64 attribute codes -> ``(B, K, token_dim)`` tokens.

    Args:
        names: attribute names, in code order (see :data:`custom.data.attributes.ATTRIBUTES`).
        token_dim: the UNet's ``cross_attention_dim``.
        drop_rates: name -> training drop probability in ``[0, 1]`` (default :data:`DEFAULT_ATTRIBUTE_DROP` each).
        init_std: std of the embedding initialisation.
        vocabulary: name -> values (default :data:`custom.data.attributes.ATTRIBUTES`; the lesion slots use
            :data:`custom.data.lesion_labels.LESION_LABELS`).

    Attributes:
        null_index: ``{name: row of the null token}`` (= the number of values of that attribute).
        last_dropped: ``(B, K)`` bool of the last training forward (for tests / logging).
    """

    def __init__(self, names: Sequence[str], token_dim: int, drop_rates: Mapping[str, float] | None = None,
                 init_std: float = 0.02, vocabulary: Mapping[str, Sequence[str]] | None = None) -> None:
        super().__init__()
        vocabulary = ATTRIBUTES if vocabulary is None else vocabulary
        self.names = check_attribute_names(names, "attribute_names")
        missing = [n for n in self.names if n not in vocabulary]
        if missing:
            raise ValueError(f"{type(self).__name__}: no vocabulary for {missing}")
        if not self.names:
            raise ValueError("AttributeTokens: at least one attribute name is needed")
        drop_rates = dict(drop_rates or {})
        unknown = [k for k in drop_rates if k not in self.names]
        if unknown:
            raise ValueError(f"AttributeTokens: drop rates for attributes not in the list: {unknown}")
        rates = [float(drop_rates.get(n, DEFAULT_ATTRIBUTE_DROP)) for n in self.names]
        if any(not 0.0 <= r <= 1.0 for r in rates):
            raise ValueError(f"AttributeTokens: drop rates must lie in [0, 1], got {dict(zip(self.names, rates))}")
        self.register_buffer("drop_rates", torch.tensor(rates, dtype=torch.float32), persistent=False)
        self.token_dim = int(token_dim)
        self.tables = nn.ModuleDict({n: nn.Embedding(len(vocabulary[n]) + 1, self.token_dim) for n in self.names})
        for table in self.tables.values():
            nn.init.normal_(table.weight, std=init_std)
        self.null_index = {n: len(vocabulary[n]) for n in self.names}
        self.last_dropped: torch.Tensor | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.names)

    def forward(self, codes: torch.Tensor, drop: torch.Tensor | None = None) -> torch.Tensor:
        """Tokens of ``codes`` ``(B, K)`` (``-1`` = not given -> null token).

        Args:
            codes: ``(B, K)`` integer codes, ``K == len(names)``.
            drop: optional ``(B, K)`` bool: attributes forced to their null (overrides the random training drop).

        Returns:
            ``(B, K, token_dim)``.
        """
        codes = torch.as_tensor(codes)
        if codes.ndim != 2 or codes.shape[1] != len(self.names):
            raise ValueError(f"AttributeTokens: codes (B, {len(self.names)}) expected for {self.names}, got {tuple(codes.shape)}")
        codes = codes.long()
        if drop is None and self.training:
            drop = torch.rand(codes.shape, device=codes.device) < self.drop_rates.to(codes.device)
        if drop is not None:
            self.last_dropped = drop.detach()
        tokens = []
        for k, name in enumerate(self.names):
            c = codes[:, k]
            n_values = self.null_index[name]
            if bool(((c < NOT_GIVEN) | (c >= n_values)).any()):
                raise ValueError(f"AttributeTokens: code out of range for {name!r} ({n_values} values): {c.tolist()}")
            null = (c == NOT_GIVEN) if drop is None else (c == NOT_GIVEN) | drop[:, k].to(torch.bool)
            idx = torch.where(null, torch.full_like(c, n_values), c)
            tokens.append(self.tables[name](idx.to(self.tables[name].weight.device)))
        return torch.stack(tokens, dim=1)

    def extra_repr(self) -> str:
        return f"names={self.names}, token_dim={self.token_dim}, drop_rates={self.drop_rates.tolist()}"


class AttributeEmbedding(AttributeTokens):
    """``(B, K)`` int64 attribute codes -> one ``(B, dim)`` vector, the sum of the K attribute embeddings (each
    attribute's value row, or its null row where not given or dropped, exactly as :class:`AttributeTokens`).

    Used as the ``class_embedding`` of MONAI's ``DiffusionModelUNet`` (``attribute_mode: "time"``): the UNet adds it
    to its timestep embedding. Arguments as :class:`AttributeTokens`, with ``token_dim`` the UNet's time-embedding
    width (``4 * channels[0]``)."""

    def forward(self, codes: torch.Tensor, drop: torch.Tensor | None = None) -> torch.Tensor:
        return super().forward(codes, drop).sum(dim=1)


class SlotLabelEmbedding(AttributeEmbedding):
    """``(N, K)`` int64 lesion-label codes of ``N`` lesion slots -> ``(N, token_dim)``, the sum of the K label
    embeddings (:data:`custom.data.lesion_labels.LESION_LABELS`: category, BI-RADS), each with its own learned null
    row (not given, an empty slot, or dropped: in training each label independently with its own rate).

    :class:`~custom.networks.gcdm.GCDMNetwork` (``lesion_labels``) adds this vector to every token of its slot, after
    the gated fusion, so a slot's tokens say "this lesion is a BI-RADS 5 mass" next to its radiomics and mask. Arguments
    as :class:`AttributeTokens`, with ``names`` a subset of ``LESION_LABELS``."""

    def __init__(self, names: Sequence[str], token_dim: int, drop_rates: Mapping[str, float] | None = None,
                 init_std: float = 0.02) -> None:
        names = check_lesion_label_names(names)
        if not names:
            raise ValueError("SlotLabelEmbedding: at least one lesion label name is needed")
        super().__init__(names, token_dim, drop_rates, init_std, vocabulary=LESION_LABELS)


def check_attribute_mode(mode: object) -> str:
    """``attribute_mode``: one of :data:`ATTRIBUTE_MODES`, else ``ValueError`` naming the option."""
    value = str(mode).strip().lower() if isinstance(mode, str) else mode
    if value not in ATTRIBUTE_MODES:
        raise ValueError(f"attribute_mode: must be one of {', '.join(ATTRIBUTE_MODES)}, got {str(mode)[:40]!r}")
    return value


def time_attribute_names(names: Sequence[str] | None, mode: str = "tokens") -> tuple[str, ...]:
    """The ``time_attributes`` argument of :class:`~custom.networks.gcdm.GCDMNetwork`: ``names`` when
    ``mode == "time"``, else empty."""
    names = check_attribute_names(names, "attribute_names")
    return tuple(names) if check_attribute_mode(mode) == "time" else ()


def attribute_token_sources(names: Sequence[str] | None, token_dim: int,
                            drop_rates: Mapping[str, float] | None = None,
                            mode: str = "tokens") -> dict[str, nn.Module] | None:
    """The ``token_sources`` argument of :class:`~custom.networks.gcdm.GCDMNetwork` for an attribute list:
    ``{"attributes": AttributeTokens(...)}``, or ``None`` when ``names`` is empty (attributes off) or ``mode`` is
    ``time`` (the attributes then go into the time embedding, :func:`time_attribute_names`)."""
    names = check_attribute_names(names, "attribute_names")
    if not names or check_attribute_mode(mode) != "tokens":
        return None
    return {"attributes": AttributeTokens(names, token_dim, drop_rates)}
