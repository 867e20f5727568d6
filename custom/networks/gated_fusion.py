"""Gated fusion of a lesion's radiomic vector and its geometric (CLIP mask) embedding into cross-attention tokens.

This is the "gated conditional" part of GCDM (arXiv 2507.19201). For one lesion it takes

* ``radiomic``: the ``radiomic_dim`` (67) normalised PyRadiomics features, values in ``[0, 1]``
  (an all-zero vector means "no lesion"), and
* ``geometric``: the ``geometric_dim`` (768) CLIP embedding of the binary lesion mask
  (unbounded reals, roughly unit scale),

and returns ``num_tokens`` tokens of width ``token_dim`` for the diffusion UNet's cross-attention.

Gated path (``mode="gated"``), with ``Dg = geometric_dim``, ``Dr = radiomic_dim``, ``W = Dg + Dr``:

1. *lift*: ``Conv1d(1 -> m)`` over the feature axis turns the geometric vector into ``m`` candidates
   ``(B, m, Dg)``; ``Conv1d(1 -> n)`` turns the radiomic vector into ``n`` candidates ``(B, n, Dr)``
   (kernel ``kernel_size``, zero "same" padding, so the length is kept).
2. *pair*: every (geometric ``i``, radiomic ``j``) combination is concatenated, pair index ``p = i * n + j``
   -> ``pairs`` ``(B, m*n, W)``.
3. *gate*: ``gates = sigmoid-MLP(pair) * mean(pair)`` ``(B, m*n, 1)`` (the mean over the pair's ``W`` features,
   i.e. ``w_gate = AVG(f_comb) ⊙ MLP(f_comb)``); residual ``res = pair + pair * gate``.
4. *score and select*: ``scores = mean(res)`` over features ``(B, m*n)``; the ``top_k`` pairs with the highest
   score, in descending score order (``torch.topk``), are kept ``(B, top_k, W)``.
5. *project*: a 1x1 ``Conv1d(top_k -> 2*top_k)`` mixes the selected pairs (so the rank order matters, as in the
   reference), the mean over its ``2*top_k`` output channels gives ``(B, W)``, and a ``Linear(W ->
   num_tokens*token_dim)`` reshaped to ``(B, num_tokens, token_dim)`` gives the tokens. With ``num_tokens=1`` this
   is exactly the reference's single 768-d token; ``num_tokens > 1`` only widens that last Linear.

Ablations (same input/output contract):

* ``"concat"``: no lifts, gates or top-k; ``Linear(W -> num_tokens*token_dim)`` of ``[geometric, radiomic]``.
* ``"radiomics"``: ``Linear(Dr -> num_tokens*token_dim)`` of the radiomic vector; ``geometric`` is ignored
  (may be ``None``).
* ``"geometry"``: ``Linear(Dg -> num_tokens*token_dim)`` of the geometric vector; ``radiomic`` is ignored
  (may be ``None``).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["GatedFusion", "FUSION_MODES"]

#: The modes :class:`GatedFusion` accepts.
FUSION_MODES: tuple[str, ...] = ("gated", "concat", "radiomics", "geometry")

#: Width of the gate MLP's hidden layer in the reference implementation.
_REFERENCE_GATE_HIDDEN = 128


class GatedFusion(nn.Module):
    """Fuse radiomic features and a geometric embedding into ``(B, num_tokens, token_dim)`` tokens.

    Args:
        radiomic_dim: length ``Dr`` of the radiomic vector (67 PyRadiomics features).
        geometric_dim: length ``Dg`` of the geometric vector (the CLIP mask embedding, 768).
        m: number of geometric candidates made by the geometric lift (``mode="gated"``).
        n: number of radiomic candidates made by the radiomic lift (``mode="gated"``).
        top_k: number of (geometric, radiomic) pairs kept by the gate scores; ``1 <= top_k <= m * n``.
        num_tokens: number of output tokens (1 in the paper); the last Linear outputs ``num_tokens * token_dim``
            values that are reshaped to ``(num_tokens, token_dim)``.
        token_dim: width of each output token (the UNet's cross-attention context dim, 768).
        hidden_dim: hidden width of the gate MLP; ``None`` means 128, as in the reference.
        mode: ``"gated"`` (the method), ``"concat"``, ``"radiomics"`` or ``"geometry"`` (ablations, see the module
            docstring).
        kernel_size: odd kernel length of the two lift ``Conv1d`` layers (5 in the reference).

    Raises:
        ValueError: an unknown ``mode``, a non-positive size, an even ``kernel_size`` or ``top_k > m * n``.
    """

    def __init__(
        self,
        radiomic_dim: int = 67,
        geometric_dim: int = 768,
        m: int = 5,
        n: int = 5,
        top_k: int = 5,
        num_tokens: int = 1,
        token_dim: int = 768,
        hidden_dim: int | None = None,
        mode: str = "gated",
        kernel_size: int = 5,
    ) -> None:
        super().__init__()
        if mode not in FUSION_MODES:
            raise ValueError(f"GatedFusion: mode must be one of {FUSION_MODES}, got {mode!r}")
        hidden_dim = _REFERENCE_GATE_HIDDEN if hidden_dim is None else hidden_dim
        for name, value in (
            ("radiomic_dim", radiomic_dim),
            ("geometric_dim", geometric_dim),
            ("m", m),
            ("n", n),
            ("top_k", top_k),
            ("num_tokens", num_tokens),
            ("token_dim", token_dim),
            ("hidden_dim", hidden_dim),
            ("kernel_size", kernel_size),
        ):
            if int(value) != value or value < 1:
                raise ValueError(f"GatedFusion: {name} must be a positive integer, got {value!r}")
        if kernel_size % 2 != 1:
            raise ValueError(f"GatedFusion: kernel_size must be odd (length-preserving lift), got {kernel_size}")
        if top_k > m * n:
            raise ValueError(f"GatedFusion: top_k={top_k} must be <= m*n={m * n} (m={m}, n={n} candidate pairs)")

        self.radiomic_dim = int(radiomic_dim)
        self.geometric_dim = int(geometric_dim)
        self.m = int(m)
        self.n = int(n)
        self.top_k = int(top_k)
        self.num_tokens = int(num_tokens)
        self.token_dim = int(token_dim)
        self.hidden_dim = int(hidden_dim)
        self.mode = mode
        self.kernel_size = int(kernel_size)
        self.pair_dim = self.geometric_dim + self.radiomic_dim
        out_dim = self.num_tokens * self.token_dim

        if mode == "gated":
            pad = self.kernel_size // 2
            self.geometric_lift = nn.Conv1d(1, self.m, kernel_size=self.kernel_size, padding=pad)
            self.radiomic_lift = nn.Conv1d(1, self.n, kernel_size=self.kernel_size, padding=pad)
            self.gate_mlp = nn.Sequential(
                nn.Linear(self.pair_dim, self.hidden_dim),
                nn.ReLU(),
                nn.Linear(self.hidden_dim, 1),
                nn.Sigmoid(),
            )
            self.pair_mixer = nn.Conv1d(self.top_k, 2 * self.top_k, kernel_size=1)
            self.proj = nn.Linear(self.pair_dim, out_dim)
        elif mode == "concat":
            self.proj = nn.Linear(self.pair_dim, out_dim)
        elif mode == "radiomics":
            self.proj = nn.Linear(self.radiomic_dim, out_dim)
        else:  # geometry
            self.proj = nn.Linear(self.geometric_dim, out_dim)

    @property
    def uses_radiomics(self) -> bool:
        """Whether ``forward`` reads the radiomic input (False only for ``mode="geometry"``)."""
        return self.mode != "geometry"

    @property
    def uses_geometry(self) -> bool:
        """Whether ``forward`` reads the geometric input (False only for ``mode="radiomics"``)."""
        return self.mode != "radiomics"

    def _check(self, x: torch.Tensor | None, dim: int, name: str) -> torch.Tensor:
        if x is None:
            raise ValueError(f"GatedFusion(mode={self.mode!r}): {name} is required, got None")
        if x.ndim != 2 or x.shape[1] != dim:
            raise ValueError(f"GatedFusion: {name} must have shape (B, {dim}), got {tuple(x.shape)}")
        return x

    def _tokens(self, flat: torch.Tensor) -> torch.Tensor:
        """``(B, in)`` -> ``proj`` -> ``(B, num_tokens, token_dim)``."""
        return self.proj(flat).view(flat.shape[0], self.num_tokens, self.token_dim)

    def forward(
        self,
        radiomic: torch.Tensor | None,
        geometric: torch.Tensor | None,
        return_details: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Fuse one radiomic vector and one geometric vector per sample into tokens.

        Args:
            radiomic: ``(B, radiomic_dim)`` float, normalised features in ``[0, 1]`` (not checked); ignored (may be
                ``None``) in ``mode="geometry"``.
            geometric: ``(B, geometric_dim)`` float CLIP mask embedding (any real values); ignored (may be ``None``)
                in ``mode="radiomics"``.
            return_details: also return the gated path's intermediates (for tests and gate logging).

        Returns:
            ``tokens`` ``(B, num_tokens, token_dim)`` (unbounded reals); with ``return_details=True`` the pair
            ``(tokens, details)``. In ``mode="gated"`` ``details`` holds, with ``P = m * n`` and ``W = Dg + Dr``:
            ``"geometric_candidates"`` ``(B, m, Dg)``, ``"radiomic_candidates"`` ``(B, n, Dr)``, ``"pairs"``
            ``(B, P, W)`` (pair ``p = i * n + j`` is ``[geometric candidate i, radiomic candidate j]``), ``"gates"``
            ``(B, P, 1)`` (``sigmoid-MLP(pair) * mean(pair)``), ``"scores"`` ``(B, P)`` (mean of ``pair * (1 +
            gate)``), ``"topk_indices"`` ``(B, top_k)`` int64 in ``[0, P)``, descending score, and ``"selected"``
            ``(B, top_k, W)``. The ablation modes have no intermediates: ``details`` is an empty dict.

        Raises:
            ValueError: a needed input is missing or has the wrong shape, or the batch sizes differ.
        """
        details: dict[str, torch.Tensor] = {}
        if self.mode == "radiomics":
            tokens = self._tokens(self._check(radiomic, self.radiomic_dim, "radiomic"))
        elif self.mode == "geometry":
            tokens = self._tokens(self._check(geometric, self.geometric_dim, "geometric"))
        else:
            rad = self._check(radiomic, self.radiomic_dim, "radiomic")
            geo = self._check(geometric, self.geometric_dim, "geometric")
            if rad.shape[0] != geo.shape[0]:
                raise ValueError(
                    f"GatedFusion: batch sizes differ: radiomic {tuple(rad.shape)}, geometric {tuple(geo.shape)}"
                )
            if self.mode == "concat":
                tokens = self._tokens(torch.cat([geo, rad], dim=-1))
            else:
                tokens, details = self._gated(rad, geo)
        if return_details:
            return tokens, details
        return tokens

    def _gated(self, rad: torch.Tensor, geo: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        b = rad.shape[0]
        geo_c = self.geometric_lift(geo.unsqueeze(1))  # (B, m, Dg)
        rad_c = self.radiomic_lift(rad.unsqueeze(1))  # (B, n, Dr)
        pairs = torch.cat(
            [
                geo_c.unsqueeze(2).expand(b, self.m, self.n, self.geometric_dim),
                rad_c.unsqueeze(1).expand(b, self.m, self.n, self.radiomic_dim),
            ],
            dim=-1,
        ).reshape(b, self.m * self.n, self.pair_dim)  # (B, P, W), p = i * n + j
        gates = self.gate_mlp(pairs) * pairs.mean(dim=-1, keepdim=True)  # (B, P, 1)
        res = pairs + pairs * gates  # (B, P, W)
        scores = res.mean(dim=-1)  # (B, P)
        topk_indices = torch.topk(scores, self.top_k, dim=-1, largest=True, sorted=True).indices  # (B, k)
        selected = torch.gather(res, 1, topk_indices.unsqueeze(-1).expand(b, self.top_k, self.pair_dim))
        fused = self.pair_mixer(selected).mean(dim=1)  # (B, 2k, W) -> (B, W)
        details = {
            "geometric_candidates": geo_c,
            "radiomic_candidates": rad_c,
            "pairs": pairs,
            "gates": gates,
            "scores": scores,
            "topk_indices": topk_indices,
            "selected": selected,
        }
        return self._tokens(fused), details

    def extra_repr(self) -> str:
        s = f"mode={self.mode!r}, radiomic_dim={self.radiomic_dim}, geometric_dim={self.geometric_dim}"
        if self.mode == "gated":
            s += f", m={self.m}, n={self.n}, top_k={self.top_k}"
        return s + f", num_tokens={self.num_tokens}, token_dim={self.token_dim}"
