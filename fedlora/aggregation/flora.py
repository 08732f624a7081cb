"""FLoRA: stacking-based exact aggregation for heterogeneous ranks (Wang, Shen, He, Sun, Wang,
Lyu & Li, NeurIPS 2024, "FLoRA: Federated Fine-Tuning Large Language Models with Heterogeneous
Low-Rank Adaptations", arXiv:2409.05976).

Clients may train different ranks r_i. The server stacks the factors instead of averaging them::

    B_stack = [B_1 … B_n]                          (d_out, Σr_i)
    A_stack = [p_1·s_1·A_1; …; p_n·s_n·A_n]         (Σr_i, d_in)
    B_stack·A_stack = Σ p_i·s_i·B_i·A_i = ΔW*       (exact, scale 1)

The stack is merged into the base (appended to ``base_terms`` — factored, or dense when that is
smaller, see :func:`~fedlora.aggregation.terms.stacked_term`) and every client starts the next
round from a fresh LoRA at its own rank: B = 0 and A drawn again from (seed, round, layer), so the
global adapter contributes nothing until trained. p_i·s_i live in the A blocks and the merge uses
scale 1: no alpha trick, and no zero-padding baseline with another scale.

A and B are always read by name from :class:`LoraFactors`, never told apart by comparing a shape
with the rank (the public-code trap that breaks when d == r·n or when client sampling changes n).
Like FedEx-LoRA, the merged stack is a full-precision side term a quantized base keeps beside its
packed weight. Aggregation is layer by layer (:func:`stack_layer`); the stack holds every client's
factors of a layer by construction, so it does not stream over clients.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fedlora.adapters.lora import layer_generator
from fedlora.adapters.state import AdapterState, LoraFactors
from fedlora.aggregation import padding, terms
from fedlora.aggregation.common import AggregationError, GlobalState, normalize_weights
from fedlora.aggregation.method import NEEDS_INDIVIDUAL_FACTORS, Buffered, ClientDP, Method


def stack_layer(factors: Sequence[LoraFactors], p: Sequence[float]) -> terms.BaseTerm:
    """One layer's exact merged update [B_1 … B_n]·[p_1 s_1 A_1; …] (clients with p_i = 0 skipped)."""
    return terms.stacked_term([(f.B, f.A, p_i * f.scale) for f, p_i in zip(factors, p, strict=True) if p_i > 0])


def fresh_factors(name: str, d_out: int, d_in: int, rank: int, scale: float, *, seed: int, round: int) -> LoraFactors:
    """A fresh LoRA for one layer: A drawn from (seed, round, layer), B = 0."""
    A = padding.fresh_rows(rank, d_in, layer_generator(seed, f"{name}#flora{round}"))
    return LoraFactors(A, torch.zeros(d_out, rank), scale)


def aggregate(
    state: GlobalState, updates: Sequence[AdapterState], weights: Sequence[float]
) -> GlobalState:
    """Merge each layer's stack into ``base_terms``; the next adapter is fresh (B = 0) at the
    layer's r_max with that client's scale."""
    p = normalize_weights(weights)
    layers = padding.collect_layers(updates)
    scales = padding.global_scales(layers)
    extras = padding.next_extras(state, padding.seen_scales(updates))
    stacks: dict[str, list[terms.BaseTerm]] = {}
    adapter: AdapterState = {}
    for name, factors in layers.items():
        stacks[name] = [stack_layer(factors, p)]
        d_out, d_in = factors[0].B.shape[0], factors[0].A.shape[1]
        r_max = max(padding.rank_of(f) for f in factors)
        adapter[name] = fresh_factors(
            name, d_out, d_in, r_max, scales[name], seed=int(extras.get("seed", 0)), round=extras["round"]
        )
    return GlobalState(adapter=adapter, base_terms=padding.appended_terms(state, stacks), extras=extras)


def slice_for_rank(
    state: GlobalState, rank: int, *, scale: float | None = None, truncate: bool = False
) -> AdapterState:
    """A fresh rank-``rank`` LoRA: the first rows of the round's fresh A (more rows are drawn
    when ``rank`` is above r_max) and B = 0. B is zero, so slicing loses nothing and
    ``truncate`` (kept for a uniform signature) changes nothing."""
    if rank < 1:
        raise AggregationError(f"rank {rank} must be positive")
    return padding.slice_for_rank(state, rank, scale=scale, truncate=True)


METHOD = Method(
    name="flora",
    paper="Wang, Shen, He, Sun, Wang, Lyu & Li, NeurIPS 2024, arXiv:2409.05976",
    exact=True,  # the merged stack equals Σ p_i·s_i·B_i·A_i for any updates and ranks
    mixed_ranks=True,  # stacking takes any ranks natively
    adapter_kind="lora",
    parts=("A", "B"),
    client_dp=ClientDP(refused=f"FLoRA stacks every client's B_i and A_i: {NEEDS_INDIVIDUAL_FACTORS}"
                       " to one noised update"),
    weighted_sum=False,  # the stack keeps each client's factors apart
    aggregation=Buffered(aggregate, why="the stack [B_1 … B_n]·[p_1·s_1·A_1; …] holds every client's factors "
                         "of a layer by construction"),
    slice_for_rank=slice_for_rank,
)
