"""HetLoRA: heterogeneous-rank LoRA by zero-padding, norm-weighted averaging and truncation (Cho,
Liu, Xu, Fahrezi & Joshi, EMNLP 2024, "Heterogeneous LoRA for Federated Fine-tuning of On-Device
Foundation Models", arXiv:2401.06432). An inexact baseline for the mixed-rank methods.

Each client's factors are zero-padded to r_max and averaged with weights proportional to the size
of its update ("sparsity-weighted aggregation")::

    q_i ∝ p_i·‖s_i·B_i·A_i‖_F  (per layer, Σ q_i = 1)
    Ā = Σ q_i·pad(A_i),   B̄ = Σ q_i·(s_i/s_g)·pad(B_i),   global update s_g·B̄·Ā

A rank-r_i client then receives the first r_i rows of Ā and columns of B̄ (truncation), losing the
rest. The paper weights by the norm alone with equal-size clients; we multiply by the data weight
p_i, which reduces to it when the p_i are equal. Its rank self-pruning is not implemented.

Not exact, twice over: the product of averages is FedAvg's error, with weights q_i instead of
p_i, and truncation drops whatever a low-rank client cannot hold. The error is measured, never
hidden. Aggregation streams (:class:`HetLoRAAccumulator`): fp64 running sums per layer.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fedlora.adapters.state import AdapterState, LoraFactors
from fedlora.aggregation import padding
from fedlora.aggregation.common import AggregationError, GlobalState
from fedlora.aggregation.method import ClientDP, Method, Streaming

_TINY = 1e-30
"""Added to every norm so a layer whose updates are all zero falls back to the data weights."""


def update_norm(f: LoraFactors) -> float:
    """‖s·B·A‖_F without forming B·A: √(Σ (BᵀB) ⊙ (AAᵀ)) with r×r Gram matrices."""
    A, B = f.A.to(torch.float64), f.B.to(torch.float64)
    return abs(f.scale) * float(torch.sum((B.t() @ B) * (A @ A.t())).clamp_min(0).sqrt())


class HetLoRAAccumulator:
    """Running Σ q_i·A_i, Σ q_i·s_i·B_i and Σ q_i (fp64, zero-padded to the largest rank) per layer."""

    def __init__(self) -> None:
        self._sums: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._total: dict[str, float] = {}
        self._top: dict[str, tuple[int, float]] = {}
        self.rank_scales: dict[int, float] = {}
        self.count = 0

    def add(self, update: AdapterState, weight: float) -> None:
        if weight < 0:
            raise AggregationError(f"client weight {weight} must be non-negative")
        if self._sums and set(update) != set(self._sums):
            raise AggregationError(f"client {self.count} has different layers than the others")
        for name, f in update.items():
            r = f.A.shape[0]
            q = weight * (update_norm(f) + _TINY)
            if name in self._sums:
                sum_A, sum_B = self._sums[name]
                sum_A, sum_B = padding.pad_rows(sum_A, r), padding.pad_cols(sum_B, r)
            else:
                sum_A = torch.zeros(r, f.A.shape[1], dtype=torch.float64)
                sum_B = torch.zeros(f.B.shape[0], r, dtype=torch.float64)
            sum_A[:r].add_(f.A, alpha=q)
            sum_B[:, :r].add_(f.B, alpha=q * f.scale)
            self._sums[name] = (sum_A, sum_B)
            self._total[name] = self._total.get(name, 0.0) + q
            if name not in self._top or r > self._top[name][0]:
                self._top[name] = (r, f.scale)
            self.rank_scales.setdefault(r, f.scale)
        self.count += 1

    def result(self) -> AdapterState:
        if self.count == 0 or not any(t > 0 for t in self._total.values()):
            raise AggregationError("no client updates (or only zero weights) to aggregate")
        out: AdapterState = {}
        for name, (sum_A, sum_B) in self._sums.items():
            total, s_g = self._total[name], self._top[name][1]
            out[name] = LoraFactors((sum_A / total).to(torch.float32), (sum_B / (total * s_g)).to(torch.float32), s_g)
        return out


def accumulator(state: GlobalState) -> HetLoRAAccumulator:
    """An empty accumulator for the round that starts from ``state`` (streaming glue: ``add`` each
    reply as it arrives, then :func:`finish`)."""
    return HetLoRAAccumulator()


def finish(state: GlobalState, acc: HetLoRAAccumulator) -> GlobalState:
    """The next global state from a filled accumulator."""
    return GlobalState(
        adapter=acc.result(), base_terms=state.base_terms, extras=padding.next_extras(state, acc.rank_scales)
    )


def slice_for_rank(
    state: GlobalState, rank: int, *, scale: float | None = None, truncate: bool = True
) -> AdapterState:
    """Truncation: the first ``rank`` rows of Ā and columns of B̄ (the dropped part is lost)."""
    return padding.slice_for_rank(state, rank, scale=scale, truncate=truncate)


METHOD = Method(
    name="hetlora",
    paper="Cho, Liu, Xu, Fahrezi & Joshi, EMNLP 2024, arXiv:2401.06432",
    exact=False,  # norm-weighted averages of the factors, then truncation
    mixed_ranks=True,  # zero-padding to r_max, truncation back to each client's rank
    adapter_kind="lora",
    parts=("A", "B"),
    client_dp=ClientDP(refused="HetLoRA weights clients by ‖B_i·A_i‖, data-dependent unequal weights, so one "
                       "client's influence is unbounded and the sensitivity C/m does not hold"),
    weighted_sum=False,  # the weights depend on each client's own update
    aggregation=Streaming(accumulator, finish),
    slice_for_rank=slice_for_rank,
)
