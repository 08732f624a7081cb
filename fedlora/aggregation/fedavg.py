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
from fedlora.aggregation.common import AggregationError, GlobalState, check_same_layout, stream_all

EXACT = False
"""Whether s·B̄·Ā equals Σ p_i·s_i·B_i·A_i for any client updates."""
MIXED_RANKS = False
"""Whether clients of different ranks can take part in one round."""


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


def aggregate(
    state: GlobalState, updates: Sequence[AdapterState], weights: Sequence[float]
) -> GlobalState:
    """Weighted mean of each factor over clients (weights need not sum to one); the base is
    untouched, so ``state.base_terms`` carry over unchanged."""
    acc = stream_all(FedAvgAccumulator(), updates, weights)
    return GlobalState(adapter=acc.result(), base_terms=state.base_terms, extras=state.extras)
