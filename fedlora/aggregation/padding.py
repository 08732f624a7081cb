"""Rank bookkeeping shared by the rank-aware methods: zero-padding, slicing, folding, and the
factored-or-dense form of an exact side term.

Heterogeneous ranks (docs/aggregation.md, "Mixed ranks"). A client of rank r_i is
zero-padded to r_max (extra rows of A and columns of B are zero), which leaves B_i·A_i unchanged.
Clients may also use different scales s_i = alpha/r_i, so every method folds s_i into the factor
it averages and stores the global adapter with one scale s_g, the scale of the highest-rank client
of the round (:func:`global_scales`); :func:`slice_for_rank` converts back to a client's own scale.

The round's **floor rank** (:func:`floor_rank`) is the smallest rank any client may start the next
round with: the smallest rank of the round, or ``extras["min_rank"]`` when the run sets it lower
(client sampling can leave the lowest-rank clients out of a round). Exact methods keep only the
first ``floor`` columns of the global B (the top-left block of Fed-SB's R) in the adapter and fold
the rest, exactly, into ``base_terms``; then any client of rank ≥ floor receives the whole global
update: the first r_i columns plus zeros. :func:`slice_for_rank` refuses to drop a non-zero part
unless asked to truncate (HetLoRA's lossy baseline).

Folded columns become exact side terms in their smaller form (:mod:`fedlora.aggregation.terms`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from fedlora.adapters.lora import layer_generator
from fedlora.adapters.state import AdapterState, LoraFactors
from fedlora.aggregation.common import AggregationError, GlobalState
from fedlora.aggregation.terms import BaseTerm, compact_term


def rank_of(f: LoraFactors) -> int:
    return f.A.shape[0]


def collect_layers(updates: Sequence[AdapterState]) -> dict[str, list[LoraFactors]]:
    """Per layer, every client's factors; ranks may differ, layer names and (d_out, d_in) may not."""
    if not updates:
        raise AggregationError("no client updates to aggregate")
    names = set(updates[0])
    layers: dict[str, list[LoraFactors]] = {n: [] for n in sorted(names)}
    for i, update in enumerate(updates):
        if set(update) != names:
            diff = sorted(set(update) ^ names)
            raise AggregationError(f"client {i} update has different layers than client 0: {diff[:3]}")
        for name, f in update.items():
            if f.A.ndim != 2 or f.B.ndim != 2 or f.A.shape[0] != f.B.shape[1]:
                raise AggregationError(
                    f"client {i} layer {name}: A{tuple(f.A.shape)} B{tuple(f.B.shape)} are not "
                    "A (r, d_in), B (d_out, r)"
                )
            ref = layers[name][0] if layers[name] else f
            if (f.B.shape[0], f.A.shape[1]) != (ref.B.shape[0], ref.A.shape[1]):
                raise AggregationError(
                    f"client {i} layer {name} is {f.B.shape[0]}×{f.A.shape[1]}, "
                    f"client 0 has {ref.B.shape[0]}×{ref.A.shape[1]} (d_out×d_in)"
                )
            layers[name].append(f)
    return layers


def layout_of(update: AdapterState) -> AdapterState:
    """The shapes and scales of ``update`` on the meta device: a reference for layout checks that
    keeps no client's numbers alive."""
    return {n: LoraFactors(torch.empty(f.A.shape, device="meta"), torch.empty(f.B.shape, device="meta"), f.scale)
            for n, f in update.items()}


def global_scales(layers: dict[str, list[LoraFactors]]) -> dict[str, float]:
    """Per layer, s_g: the scale of the first client with the highest rank."""
    return {name: max(fs, key=rank_of).scale for name, fs in layers.items()}


def floor_rank(extras: dict[str, Any], ranks: Sequence[int]) -> int:
    """Smallest rank a client may start the next round with (see the module docstring)."""
    floor = min(ranks)
    if extras.get("min_rank") is not None:
        floor = min(floor, int(extras["min_rank"]))
    return max(floor, 1)


def seen_scales(updates: Sequence[AdapterState]) -> dict[int, float]:
    """rank → scale of every client adapter in ``updates`` (the first seen wins)."""
    scales: dict[int, float] = {}
    for update in updates:
        for f in update.values():
            scales.setdefault(rank_of(f), f.scale)
    return scales


def next_extras(state: GlobalState, rank_scales: dict[int, float], **more: Any) -> dict[str, Any]:
    """A new extras dict (the old one is not mutated): round counter + 1 and the rank → scale
    pairs seen so far, which :func:`slice_for_rank` uses to hand a client its own scale."""
    scales = {**rank_scales, **state.extras.get("rank_scales", {})}
    return {**state.extras, "round": int(state.extras.get("round", 0)) + 1, "rank_scales": scales, **more}


def appended_terms(state: GlobalState, new: dict[str, list[BaseTerm]]) -> dict[str, list[BaseTerm]]:
    """``state.base_terms`` with this round's terms appended, in new lists: the old state's lists
    are left untouched so ``round_update(before, after)`` can tell the round's terms apart."""
    out = {name: list(terms) for name, terms in state.base_terms.items()}
    for name, terms in new.items():
        out.setdefault(name, []).extend(terms)
    return out


def fresh_rows(rows: int, d_in: int, generator: torch.Generator) -> torch.Tensor:
    """Rows of a fresh LoRA A: U(−1/√d_in, 1/√d_in) as :class:`LoRALinear` draws them."""
    bound = 1.0 / d_in**0.5
    return torch.empty(rows, d_in).uniform_(-bound, bound, generator=generator)


def resolve_scale(state: GlobalState, f: LoraFactors, rank: int, scale: float | None) -> float:
    """The scale a rank-``rank`` client uses: given, the stored adapter's own when ``rank`` is its
    rank, or one seen in an earlier round (``extras["rank_scales"]``)."""
    if scale is not None:
        return float(scale)
    if rank == rank_of(f):
        return f.scale
    seen = state.extras.get("rank_scales", {})
    if rank in seen:
        return float(seen[rank])
    raise AggregationError(
        f"the scale of a rank-{rank} adapter is unknown to this state (seen ranks {sorted(seen)}); "
        "pass scale=fedlora.adapters.lora_scale(alpha, rank, rslora)"
    )


def slice_factors(
    f: LoraFactors,
    rank: int,
    scale: float,
    *,
    layer: str,
    seed: int = 0,
    truncate: bool = False,
) -> LoraFactors:
    """A rank-``rank`` adapter with the same s·B·A as ``f`` (B rescaled by f.scale/scale).

    Taking fewer columns than ``f`` has is refused when a dropped column of B is non-zero, unless
    ``truncate``. Taking more pads B with zero columns and A with fresh rows seeded by
    (seed, layer), so training can move the new directions.
    """
    r = rank_of(f)
    if rank < r and not truncate and torch.count_nonzero(f.B[:, rank:]):
        raise AggregationError(
            f"a rank-{rank} client cannot receive layer {layer}'s rank-{r} global update without "
            f"dropping part of it; set extras['min_rank'] <= {rank} before aggregating (the part is "
            "then folded into the exact base terms) or pass truncate=True to accept the loss"
        )
    ratio = f.scale / scale
    B = f.B[:, :rank] if ratio == 1.0 else (f.B[:, :rank].double() * ratio).float()
    A = f.A[:rank].clone()
    if rank > r:
        extra = fresh_rows(rank - r, f.A.shape[1], layer_generator(seed, f"{layer}#pad{r}"))
        A = torch.cat([A, extra.to(A.dtype)])
        B = torch.cat([B, B.new_zeros(B.shape[0], rank - r)], dim=1)
    return LoraFactors(A, B.clone(), scale)


def slice_for_rank(
    state: GlobalState, rank: int, *, scale: float | None = None, truncate: bool = False
) -> AdapterState:
    """The adapter a rank-``rank`` client starts the next round from (fedavg, fedex, hetlora, and
    the base of the per-method versions): the first ``rank`` rows of A and columns of B."""
    seed = int(state.extras.get("seed", 0))
    return {
        name: slice_factors(
            f, rank, resolve_scale(state, f, rank, scale), layer=name, seed=seed, truncate=truncate
        )
        for name, f in state.adapter.items()
    }


def split_columns(B: torch.Tensor, A: torch.Tensor, floor: int, scale: float) -> tuple[torch.Tensor, BaseTerm | None]:
    """Split s·B·A at column ``floor`` of B: returns B with columns ≥ floor zeroed (kept in the
    adapter) and the exact term s·B[:, floor:]·A[floor:] to fold into the base (None if empty)."""
    if floor >= B.shape[1] or not torch.count_nonzero(B[:, floor:]):
        return B, None
    dropped = compact_term(B[:, floor:].double(), A[floor:].double(), scale)
    kept = B.clone()
    kept[:, floor:] = 0
    return kept, dropped


def pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    """``t`` with zero rows appended up to ``rows`` (a running sum growing to a new max rank)."""
    if t.shape[0] >= rows:
        return t
    return torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])])


def pad_cols(t: torch.Tensor, cols: int) -> torch.Tensor:
    if t.shape[1] >= cols:
        return t
    return torch.cat([t, t.new_zeros(t.shape[0], cols - t.shape[1])], dim=1)
