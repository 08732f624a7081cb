"""FedAvg on LoRA factors against a float64 reference, and the exactness metric around it."""

from __future__ import annotations

import pytest
import torch

from fedlora.adapters import LoraFactors
from fedlora.aggregation import AggregationError, GlobalState, aggregation_error, ideal_update, round_update
from fedlora.aggregation import fedavg

SHAPES = {"square": (8, 8), "wide": (6, 20), "tall": (24, 5)}  # (d_out, d_in)


def _updates(n_clients: int, rank: int = 3, seed: int = 0, scale: float = 2.0):
    g = torch.Generator().manual_seed(seed)
    return [
        {name: LoraFactors(torch.randn(rank, d_in, generator=g), torch.randn(d_out, rank, generator=g), scale)
         for name, (d_out, d_in) in SHAPES.items()}
        for _ in range(n_clients)
    ]


@pytest.mark.parametrize("weights", [[1, 1, 1], [10, 1, 5]])
def test_fedavg_factors_equal_float64_weighted_means(weights):
    # Prepare
    updates = _updates(3)
    p = torch.tensor(weights, dtype=torch.float64) / sum(weights)
    # Execute
    result = fedavg.METHOD.aggregate(GlobalState(adapter={}), updates, weights).adapter
    # Assert
    for name in SHAPES:
        ref_a = sum(p[i] * updates[i][name].A.double() for i in range(3))
        ref_b = sum(p[i] * updates[i][name].B.double() for i in range(3))
        torch.testing.assert_close(result[name].A.double(), ref_a, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(result[name].B.double(), ref_b, rtol=1e-6, atol=1e-6)
        assert result[name].scale == 2.0


def test_fedavg_error_matches_the_cross_term_formula():
    # Σp_i B_iA_i − B̄Ā = Σ p_i (B_i − B̄)(A_i − Ā): the error FedAvg is known to make.
    updates, weights = _updates(4, seed=1), [3, 1, 1, 2]
    p = [w / sum(weights) for w in weights]
    before = GlobalState(adapter={})
    after = fedavg.METHOD.aggregate(before, updates, weights)
    ideal = ideal_update(updates, weights)
    for name in SHAPES:
        a_bar, b_bar = after.adapter[name].A.double(), after.adapter[name].B.double()
        cross = sum(pi * (u[name].B.double() - b_bar) @ (u[name].A.double() - a_bar) for pi, u in zip(p, updates))
        torch.testing.assert_close(ideal[name] - round_update(before, after)[name], 2.0 * cross, rtol=1e-5, atol=1e-5)
    assert aggregation_error(round_update(before, after), ideal) > 0.1


def test_fedavg_is_exact_when_all_clients_share_a():
    updates = _updates(3, seed=2)
    for u in updates[1:]:
        for name in SHAPES:
            u[name] = LoraFactors(updates[0][name].A.clone(), u[name].B, u[name].scale)
    after = fedavg.METHOD.aggregate(GlobalState(adapter={}), updates, [1, 2, 3])
    assert aggregation_error(round_update(GlobalState({}), after), ideal_update(updates, [1, 2, 3])) < 1e-6


def test_streaming_accumulator_holds_fixed_memory_and_matches_batch():
    updates = _updates(6, seed=3)
    acc = fedavg.FedAvgAccumulator()
    for u in updates:
        acc.add(u, 1.0)
    assert len(acc._sums) == len(SHAPES)  # one running sum per layer, whatever the client count
    batch = fedavg.METHOD.aggregate(GlobalState({}), updates, [1.0] * 6).adapter
    for name in SHAPES:
        torch.testing.assert_close(acc.result()[name].A, batch[name].A)


def test_mixed_ranks_and_bad_weights_are_refused_with_reasons():
    low, high = _updates(1, rank=2)[0], _updates(1, rank=4)[0]
    with pytest.raises(AggregationError, match="mixed ranks need a rank-aware strategy"):
        fedavg.METHOD.aggregate(GlobalState({}), [low, high], [1, 1])
    with pytest.raises(AggregationError, match="positive sum"):
        fedavg.METHOD.aggregate(GlobalState({}), [low, low], [0, 0])
