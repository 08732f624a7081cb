"""FFA-LoRA: federated LoRA with a frozen, shared A (Sun, Li, Li & Ding, ICLR 2024,
"Improving LoRA in Privacy-preserving Federated Learning", arXiv:2403.12313).

Every client draws the same random A₀ per layer from a shared seed and never trains it; only B
trains (from B = 0) and only B travels: r·d_out numbers per layer. The server averages B::

    B̄ = Σ p_i·(s_i/s_g)·B_i,   global update s_g·B̄·A₀ = Σ p_i·s_i·B_i·A₀ = ΔW*      (exact)

Exact for any weights, with the cost that every update lives in A₀'s row space. Noise added to B
under DP stays linear (ξ_B·A₀), which is why the paper prefers it under DP.

Mixed ranks (exact): one shared A₀ of rank r_max; a rank-r_i client trains the first r_i columns
of B against the first r_i rows of A₀. B_i is zero-padded to r_max, which keeps B_i·A₀ unchanged.
Columns of B̄ that the round's smallest client could not receive back (beyond the floor rank, see
:mod:`fedlora.aggregation.padding`) are folded exactly into ``base_terms``; with equal ranks
nothing is folded and W is untouched, as in the paper.

Every client's A is checked to be bit-identical to the shared A (prefix): a trainable A or a
per-layer seed collision are the known traps of public implementations, and an A that moved would
silently break exactness. Aggregation streams (:class:`FFAAccumulator`): one running fp64 sum of
B per layer, so server memory does not grow with the number of clients.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fedlora.adapters.state import AdapterState, LoraFactors
from fedlora.aggregation import padding, terms
from fedlora.aggregation.common import AggregationError, GlobalState
from fedlora.aggregation.method import ClientDP, Method, Streaming


class FFAAccumulator:
    """Running sums Σ w_i·s_i·B_i (fp64, zero-padded to the largest rank seen) per layer, and the
    shared A per layer, checked bit-for-bit against every client's A.

    ``shared`` is the global adapter holding the run's A₀ and its scale; B̄ is returned at that
    A's rank and scale. Without it the first client's A is taken, replaced by a longer one when a
    higher-rank client arrives (its prefix must match), and B̄ takes the top-rank client's scale.
    """

    def __init__(self, shared: AdapterState | None = None) -> None:
        self._A: dict[str, torch.Tensor] = {n: f.A for n, f in (shared or {}).items()}
        self._shared_scale = {n: f.scale for n, f in (shared or {}).items()}
        self._fixed_A = bool(shared)
        self._sum_B: dict[str, torch.Tensor] = {}
        self._top: dict[str, tuple[int, float]] = {}  # layer → (rank, scale) of its top-rank client
        self.rank_scales: dict[int, float] = {}
        self.total_weight = 0.0
        self.count = 0

    def _check_A(self, name: str, A: torch.Tensor) -> None:
        ref = self._A.get(name)
        if ref is None:
            self._A[name] = A.clone()
            return
        k = min(A.shape[0], ref.shape[0])
        if A.shape[1] != ref.shape[1] or not torch.equal(A[:k], ref[:k]):
            raise AggregationError(
                f"FFA-LoRA: layer {name}: client {self.count} sent an A that differs from the shared "
                f"frozen A (first {k} rows); A must stay frozen (requires_grad=False) and be the "
                "shared one drawn from the run's seed"
            )
        if A.shape[0] > ref.shape[0]:
            if self._fixed_A:
                raise AggregationError(
                    f"FFA-LoRA: layer {name}: client {self.count} has rank {A.shape[0]} above the "
                    f"shared A's rank {ref.shape[0]}"
                )
            self._A[name] = A.clone()

    def add(self, update: AdapterState, weight: float) -> None:
        if weight < 0:
            raise AggregationError(f"client weight {weight} must be non-negative")
        if self._sum_B and set(update) != set(self._sum_B):
            raise AggregationError(f"client {self.count} has different layers than the others")
        for name, f in update.items():
            self._check_A(name, f.A)
            r = f.A.shape[0]
            s = self._sum_B.get(name)
            s = f.B.new_zeros(f.B.shape[0], r, dtype=torch.float64) if s is None else padding.pad_cols(s, r)
            s[:, :r].add_(f.B, alpha=weight * f.scale)  # fp32 → fp64 in place, no temporary
            self._sum_B[name] = s
            if name not in self._top or r > self._top[name][0]:
                self._top[name] = (r, f.scale)
            self.rank_scales.setdefault(r, f.scale)
        self.total_weight += weight
        self.count += 1

    def result(self) -> AdapterState:
        """B̄ = Σ w_i s_i B_i / (Σ w_i · s_g), zero-padded to the shared A's rank, with that A."""
        if self.count == 0 or self.total_weight <= 0:
            raise AggregationError("no client updates (or only zero weights) to aggregate")
        out: AdapterState = {}
        for name, s in self._sum_B.items():
            A, s_g = self._A[name], self._shared_scale.get(name, self._top[name][1])
            b_bar = padding.pad_cols(s, A.shape[0]) / (self.total_weight * s_g)
            out[name] = LoraFactors(A, b_bar.to(torch.float32), s_g)
        return out


def accumulator(state: GlobalState) -> FFAAccumulator:
    """An empty accumulator for the round that starts from ``state`` (streaming glue: ``add`` each
    reply as it arrives, then :func:`finish`)."""
    return FFAAccumulator(state.adapter)


def finish(state: GlobalState, acc: FFAAccumulator) -> GlobalState:
    """The next global state from a filled accumulator."""
    floor = padding.floor_rank(state.extras, list(acc.rank_scales))
    adapter: AdapterState = {}
    folded: dict[str, list[terms.BaseTerm]] = {}
    for name, f in acc.result().items():
        kept_B, dropped = padding.split_columns(f.B, f.A, floor, f.scale)
        adapter[name] = LoraFactors(f.A, kept_B, f.scale)
        if dropped is not None:
            folded[name] = [dropped]
    return GlobalState(
        adapter=adapter,
        base_terms=padding.appended_terms(state, folded),
        extras=padding.next_extras(state, acc.rank_scales),
    )


def slice_for_rank(
    state: GlobalState, rank: int, *, scale: float | None = None, truncate: bool = False
) -> AdapterState:
    """A rank-``rank`` client's start: the first ``rank`` rows of the shared A (bit-identical) and
    columns of B̄ in the client's scale. Ranks above the shared A's are refused."""
    out: AdapterState = {}
    for name, f in state.adapter.items():
        if rank > f.A.shape[0]:
            raise AggregationError(
                f"FFA-LoRA: layer {name}'s shared A has rank {f.A.shape[0]}; a rank-{rank} client "
                "needs the run to start from a shared A of rank ≥ the largest client rank"
            )
        out[name] = padding.slice_factors(
            f, rank, padding.resolve_scale(state, f, rank, scale), layer=name, truncate=truncate
        )
    return out


METHOD = Method(
    name="ffa",
    paper="Sun, Li, Li & Ding, ICLR 2024, arXiv:2403.12313",
    exact=True,  # s_g·B̄·A₀ = Σ p_i·s_i·B_i·A₀ for any updates
    mixed_ranks=True,  # rank-r_i clients train the first r_i columns of B against the shared A₀
    adapter_kind="frozen_a",
    parts=("B",),
    client_dp=ClientDP(clipped=("B",)),  # the shared A is public and checked unchanged
    weighted_sum=True,
    aggregation=Streaming(accumulator, finish),
    slice_for_rank=slice_for_rank,
)
