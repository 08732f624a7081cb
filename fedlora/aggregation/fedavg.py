"""FedAvg on LoRA factors ("FedIT": Zhang et al., 2024, arXiv:2305.05644; McMahan et al., 2017).

Ā = Σ p_i A_i,  B̄ = Σ p_i B_i,  global update s·B̄·Ā.

Not exact: Σ p_i B_i A_i − B̄Ā = Σ p_i (B_i − B̄)(A_i − Ā), zero only when all A_i or all B_i are
equal. It is the baseline the exact methods are measured against.

The average streams: :class:`FedAvgAccumulator` keeps one running fp64 sum per factor, so server
memory does not grow with the number of clients.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fedlora.adapters.state import AdapterState, LoraFactors
from fedlora.aggregation.common import AggregationError, GlobalState, check_same_layout
from fedlora.aggregation.method import ClientDP, Method, Streaming


class FedAvgAccumulator:
    """Running weighted sums Σ w_i A_i and Σ w_i B_i in float64."""

    def __init__(self) -> None:
        self._sums: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}
        self._reference: AdapterState | None = None
        self.total_weight = 0.0
        self.count = 0

    def add(self, update: AdapterState, weight: float) -> None:
        if weight < 0:
            raise AggregationError(f"client weight {weight} must be non-negative")
        if self._reference is None:
            self._reference = update
            self._sums = {
                n: (torch.zeros_like(f.A, dtype=torch.float64), torch.zeros_like(f.B, dtype=torch.float64), f.scale)
                for n, f in update.items()
            }
        check_same_layout(self._reference, update)
        for name, f in update.items():
            sum_a, sum_b, _ = self._sums[name]
            sum_a.add_(f.A.to(torch.float64), alpha=weight)
            sum_b.add_(f.B.to(torch.float64), alpha=weight)
        self.total_weight += weight
        self.count += 1

    def result(self) -> AdapterState:
        if self.count == 0 or self.total_weight <= 0:
            raise AggregationError("no client updates (or only zero weights) to aggregate")
        w = self.total_weight
        return {
            n: LoraFactors((a / w).to(torch.float32), (b / w).to(torch.float32), s)
            for n, (a, b, s) in self._sums.items()
        }


def accumulator(state: GlobalState) -> FedAvgAccumulator:
    """An empty accumulator for the round that starts from ``state``."""
    return FedAvgAccumulator()


def finish(state: GlobalState, acc: FedAvgAccumulator) -> GlobalState:
    """The weighted mean of each factor; the base is untouched, so ``state.base_terms`` carry over."""
    return GlobalState(adapter=acc.result(), base_terms=state.base_terms, extras=state.extras)


METHOD = Method(
    name="fedavg",
    paper="Zhang et al., ICASSP 2024 (FedIT), arXiv:2305.05644; McMahan et al., AISTATS 2017",
    exact=False,  # Σ p_i B_i A_i − B̄Ā = Σ p_i (B_i − B̄)(A_i − Ā): measured as agg_error
    mixed_ranks=False,
    adapter_kind="lora",
    parts=("A", "B"),
    client_dp=ClientDP(clipped=("A", "B")),
    weighted_sum=True,
    aggregation=Streaming(accumulator, finish),
)
