"""Exact side terms: updates added to the frozen base weight, W_eff = W + Σ_k terms, kept in the
smaller of two fp32 forms.

FedEx-LoRA residuals, FLoRA stacks and the columns the rank-aware methods fold away are exact
updates. :func:`stacked_term` keeps one factored (:class:`LoraFactors`, scale 1, the coefficients
folded into the A blocks) when rank·(d_out + d_in) ≤ d_out·d_in and otherwise stores it dense as a
:class:`DenseTerm` (d_out·d_in numbers, never an identity factor); the dense product is only formed
on that path. Applying terms to a model: :mod:`fedlora.adapters.base_terms`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from fedlora.adapters.state import LoraFactors


class DenseTerm(NamedTuple):
    """An exact side term stored dense: ``weight`` (d_out, d_in) times ``scale``.

    It answers ``delta()``, ``rank``, ``A`` and ``B`` like :class:`LoraFactors`, so code written for
    factored terms (``round_update``, a serialiser) still works: ``B`` is the weight and ``A`` an
    identity built only when asked for. Code that knows the type should ship ``weight`` alone.
    """

    weight: torch.Tensor
    scale: float = 1.0

    @property
    def B(self) -> torch.Tensor:
        return self.weight

    @property
    def A(self) -> torch.Tensor:
        return torch.eye(self.weight.shape[1], dtype=self.weight.dtype)

    @property
    def rank(self) -> int:
        return self.weight.shape[1]

    def delta(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Dense scale·weight, shape (d_out, d_in)."""
        return self.scale * self.weight.to(dtype)


BaseTerm = LoraFactors | DenseTerm


def term_nbytes(term: BaseTerm) -> int:
    """Bytes of a side term as stored (fp32): factors, or the dense matrix."""
    if isinstance(term, DenseTerm):
        return term.weight.element_size() * term.weight.numel()
    return term.A.element_size() * term.A.numel() + term.B.element_size() * term.B.numel()


def stacked_term(parts: Sequence[tuple[torch.Tensor, torch.Tensor, float]]) -> BaseTerm:
    """The exact term Σ_k c_k·B_k·A_k in its smaller fp32 form, with c_k folded into the A blocks:

    factored [B_1 … B_K]·[c_1·A_1; …; c_K·A_K] (scale 1) when Σ r_k·(d_out + d_in) ≤ d_out·d_in,
    else dense. Each block is scaled in float64 and rounded once; the dense sum is formed in float64
    block by block, without a stacked copy.
    """
    (d_out, _), d_in = parts[0][0].shape, parts[0][1].shape[1]
    rank = sum(B.shape[1] for B, _, _ in parts)
    if rank * (d_out + d_in) <= d_out * d_in:
        B = torch.cat([B.to(torch.float32) for B, _, _ in parts], dim=1)  # (d_out, Σr_k)
        A = torch.cat([(c * A.to(torch.float64)).to(torch.float32) for _, A, c in parts])  # (Σr_k, d_in)
        return LoraFactors(A, B, 1.0)
    dense = torch.zeros(d_out, d_in, dtype=torch.float64)
    for B, A, c in parts:
        dense.addmm_(B.to(torch.float64), A.to(torch.float64), alpha=c)
    return DenseTerm(dense.to(torch.float32), 1.0)


def compact_term(B: torch.Tensor, A: torch.Tensor, scale: float = 1.0) -> BaseTerm:
    """The exact term scale·B·A in its smaller fp32 form (see :func:`stacked_term`)."""
    return stacked_term([(B, A, scale)])
