"""FedEx-LoRA: exact aggregation by folding FedAvg's error into the base (Singhal, Ponkshe &
Vepakomma, 2024, "Exact Aggregation for Federated and Efficient Fine-Tuning of Foundation
Models", arXiv:2410.09432).

Clients train A and B as in FedAvg. The server averages the factors and adds the residual, the
part of the ideal update the averages miss, to the frozen weight::

    Ā = Σ p_i·A_i,   B̄ = Σ p_i·(s_i/s_g)·B_i
    R = Σ p_i·s_i·B_i·A_i − s_g·B̄·Ā
      = [B_1 … B_n, B̄] · [p_1·s_1·A_1; …; p_n·s_n·A_n; −s_g·Ā]          (rank ≤ Σr_i + r_max)
    W ← W + R,   clients continue from (Ā, B̄):   s_g·B̄·Ā + R = ΔW*          (exact)

R is built from the fp32-rounded Ā, B̄ the clients will actually receive, so the identity holds
for the stored numbers, not only in exact arithmetic. R is kept factored — one
:class:`LoraFactors` with p_i·s_i folded into the A blocks and scale 1 — and becomes a dense
:class:`~fedlora.aggregation.terms.DenseTerm` only when rank·(d_out + d_in) > d_out·d_in
(:func:`~fedlora.aggregation.terms.stacked_term`). Every product is ``B @ A`` in nn.Linear layout
(d_out, d_in), which is what the paper's GPT-2 Conv1D code gets wrong for square layers.

Quantized base: W cannot absorb R without re-quantising, so R is never added to W here; it stays a
full-precision side term in ``base_terms`` (W_eff = W + Σ terms), which a quantized base keeps
next to its packed weight. Consolidating many terms (merge into an fp32 W, or SVD-truncate with the
dropped energy reported) is the owner of the base's job.

Mixed ranks (exact): clients are zero-padded to r_max. Columns of B̄ above the floor rank (see
:mod:`fedlora.aggregation.padding`) are zeroed in the adapter, which puts them in R as well, so any
client of rank ≥ floor receives the whole update next round.

Aggregation runs layer by layer (:func:`aggregate_layer`); the residual needs every client's
factors of that layer, so it does not stream over clients, but no dense d_out×d_in matrix is formed
unless the dense form is the smaller one.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fedlora.adapters.state import AdapterState, LoraFactors
from fedlora.aggregation import padding, terms
from fedlora.aggregation.common import GlobalState, normalize_weights
from fedlora.aggregation.method import NEEDS_INDIVIDUAL_FACTORS, Buffered, ClientDP, Method


def aggregate_layer(
    factors: Sequence[LoraFactors], p: Sequence[float], *, floor: int, scale: float
) -> tuple[LoraFactors, terms.BaseTerm]:
    """One layer: the global adapter (Ā, B̄ at r_max, scale ``scale`` = s_g) and the residual term.

    ``p`` are normalised weights; ``floor`` is the rank above which B̄'s columns go into R.
    """
    r_max = max(padding.rank_of(f) for f in factors)
    d_out, d_in = factors[0].B.shape[0], factors[0].A.shape[1]
    a_bar = torch.zeros(r_max, d_in, dtype=torch.float64)
    b_bar = torch.zeros(d_out, r_max, dtype=torch.float64)
    for f, p_i in zip(factors, p, strict=True):
        r = padding.rank_of(f)
        a_bar[:r].add_(f.A, alpha=p_i)
        b_bar[:, :r].add_(f.B, alpha=p_i * f.scale / scale)
    b_bar[:, floor:] = 0  # folded into R below: s_g·B̄_kept·Ā + R = ΔW* all the same
    a32, b32 = a_bar.to(torch.float32), b_bar.to(torch.float32)

    # R = [B_1 … B_n, B̄]·[p_1 s_1 A_1; …; p_n s_n A_n; −s_g Ā]  (rank Σr_i + r_max)
    parts = [(f.B, f.A, p_i * f.scale) for f, p_i in zip(factors, p) if p_i > 0] + [(b32, a32, -scale)]
    return LoraFactors(a32, b32, scale), terms.stacked_term(parts)


def aggregate(
    state: GlobalState, updates: Sequence[AdapterState], weights: Sequence[float]
) -> GlobalState:
    """Average the factors and append each layer's residual to ``base_terms``."""
    p = normalize_weights(weights)
    layers = padding.collect_layers(updates)
    scales = padding.global_scales(layers)
    rank_scales = padding.seen_scales(updates)
    floor = padding.floor_rank(state.extras, list(rank_scales))
    adapter: AdapterState = {}
    residuals: dict[str, list[terms.BaseTerm]] = {}
    for name, factors in layers.items():
        adapter[name], residual = aggregate_layer(factors, p, floor=floor, scale=scales[name])
        residuals[name] = [residual]
    return GlobalState(
        adapter=adapter,
        base_terms=padding.appended_terms(state, residuals),
        extras=padding.next_extras(state, rank_scales),
    )


METHOD = Method(
    name="fedex",
    paper="Singhal, Ponkshe & Vepakomma, 2024, arXiv:2410.09432",
    exact=True,  # s_g·B̄·Ā + R = ΔW* for any updates
    mixed_ranks=True,  # zero-padding to r_max keeps the residual exact
    adapter_kind="lora",
    parts=("A", "B"),
    client_dp=ClientDP(refused=f"FedEx-LoRA adds the residual Σ p_i·B_i·A_i − B̄·Ā: {NEEDS_INDIVIDUAL_FACTORS}"
                       " to FedAvg"),
    weighted_sum=False,  # the residual is a sum of products B_i·A_i
    aggregation=Buffered(aggregate, why="the residual R = [B_1 … B_n, B̄]·[p_1·s_1·A_1; …; −s_g·Ā] is built "
                         "from every client's factors of a layer, kept factored (rank Σr_i + r_max)"),
    slice_for_rank=padding.slice_for_rank,
)
