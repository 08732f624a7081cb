"""Client-level DP (DP-FedAvg) on the server: clipping bound, noise std z·C/m, equal weights,
refused strategies, the strategies running on the privatised update, and accounting over rounds."""

from __future__ import annotations

import pytest
import torch

from fedlora.adapters.state import LoraFactors
from fedlora.aggregation import METHODS, fedavg, fedsb, ffa
from fedlora.aggregation.common import GlobalState
from fedlora.config import DPConfig
from fedlora.privacy.accounting import AccountantState, epsilon_rdp
from fedlora.privacy.dp_fedavg import ClientLevelDP
from fedlora.privacy.ledger import read_ledger
from fedlora.privacy.client_level import (
    ClientLevelDPError,
    account_round,
    check_client_level_strategy,
    check_secure_aggregation,
    client_level_noise,
    client_level_spent,
    clip_update,
    noise_generator,
    privatize_round,
    update_norm,
)

LAYERS = {"l0": (96, 64), "l1": (48, 80)}  # (d_out, d_in): square-ish and non-square


def _state(rank: int = 4, seed: int = 0, b_scale: float = 0.0):
    g = torch.Generator().manual_seed(seed)
    return {n: LoraFactors(torch.randn(rank, d_in, generator=g), b_scale * torch.randn(d_out, rank, generator=g), 2.0)
            for n, (d_out, d_in) in LAYERS.items()}  # fmt: skip


def _moved(start, seed: int, size: float, factors=("A", "B")):
    g = torch.Generator().manual_seed(seed)
    return {n: LoraFactors(f.A + size * torch.randn(f.A.shape, generator=g) if "A" in factors else f.A,
                           f.B + size * torch.randn(f.B.shape, generator=g) if "B" in factors else f.B, f.scale)
            for n, f in start.items()}  # fmt: skip


def test_clipping_bounds_every_update_and_leaves_short_ones_alone():
    # Prepare
    start = _state(b_scale=0.1)
    long, short = _moved(start, 1, 1.0), _moved(start, 2, 1e-4)
    # Execute
    clipped_long, norm_long = clip_update(start, long, 0.5, ("A", "B"))
    clipped_short, norm_short = clip_update(start, short, 0.5, ("A", "B"))
    # Assert
    assert norm_long > 10 and update_norm(start, clipped_long, ("A", "B")) == pytest.approx(0.5, rel=1e-6)
    assert norm_short < 0.5
    assert all(torch.allclose(clipped_short[n].B, short[n].B) and torch.allclose(clipped_short[n].A, short[n].A)
               for n in start)  # fmt: skip


def test_noise_std_is_z_c_over_m_and_the_mean_is_exact_without_noise():
    # Prepare: m = 4 clients whose updates are zero, so θ' − θ_start is the noise alone
    start, m, z, clip = _state(b_scale=0.1), 4, 1.5, 0.2
    zero = [dict(start) for _ in range(m)]
    moved = [_moved(start, s, 0.01) for s in range(m)]
    # Execute
    noisy = privatize_round("fedavg", start, zero, [1.0] * m, clip=clip, noise_multiplier=z, generator=noise_generator(0))
    exact = privatize_round("fedavg", start, moved, [1.0] * m, clip=10.0, noise_multiplier=0.0, generator=noise_generator(0))
    # Assert
    noise = torch.cat([(noisy.update[n].A - start[n].A).flatten() for n in start]
                      + [(noisy.update[n].B - start[n].B).flatten() for n in start])  # fmt: skip
    assert noise.numel() > 1_000 and noisy.noise_std == z * clip / m
    assert float(noise.std()) == pytest.approx(z * clip / m, rel=0.05)
    for n in start:
        mean_b = sum(u[n].B for u in moved) / m
        assert torch.allclose(exact.update[n].B, mean_b, atol=1e-6)


def test_strategies_run_on_the_privatised_update_unchanged():
    # Prepare: FedAvg (A and B train) and FFA-LoRA (only B; the shared A must stay bit-identical)
    start = _state(b_scale=0.1)
    fedavg_updates = [_moved(start, s, 0.05) for s in range(3)]
    ffa_updates = [_moved(start, s, 0.05, factors=("B",)) for s in range(3)]
    # Execute
    rel_avg = privatize_round("fedavg", start, fedavg_updates, [1, 1, 1], clip=0.3, noise_multiplier=1.0, generator=noise_generator(1))
    rel_ffa = privatize_round("ffa", start, ffa_updates, [1, 1, 1], clip=0.3, noise_multiplier=1.0, generator=noise_generator(1))
    state_avg = fedavg.METHOD.aggregate(GlobalState(adapter=start), [rel_avg.update], [1.0])
    state_ffa = ffa.METHOD.aggregate(GlobalState(adapter=start), [rel_ffa.update], [1.0])
    # Assert: the strategy returns θ' itself; FFA's A never moved, its B got the noise
    for n in start:
        assert torch.allclose(state_avg.adapter[n].B, rel_avg.update[n].B) and torch.allclose(state_avg.adapter[n].A, rel_avg.update[n].A)
        assert torch.equal(state_ffa.adapter[n].A, start[n].A)
        assert torch.allclose(state_ffa.adapter[n].B, rel_ffa.update[n].B)
    with pytest.raises(ClientLevelDPError, match="keeps fixed"):
        privatize_round("ffa", start, fedavg_updates, [1, 1, 1], clip=0.3, noise_multiplier=1.0, generator=noise_generator(1))


def test_fedsb_cores_are_clipped_and_noised():
    # Prepare: Fed-SB clients send cores LoraFactors(A=R, B=I)
    r = 4
    frame = {n: (torch.linalg.qr(torch.randn(d_out, r)).Q, torch.linalg.qr(torch.randn(d_in, r)).Q.t()) for n, (d_out, d_in) in LAYERS.items()}
    state = fedsb.initial_state(frame, scale=2.0)
    start = state.extras["sb_core"]
    cores = [{n: LoraFactors(c.A + 0.1 * torch.randn(r, r), c.B, c.scale) for n, c in start.items()} for _ in range(2)]
    # Execute
    release = privatize_round("fedsb", start, cores, [1, 1], clip=0.05, noise_multiplier=0.0, generator=noise_generator(0))
    new = fedsb.METHOD.aggregate(state, [release.update], [1.0])
    # Assert: R̄ is the mean of the clipped cores, which is within C of the start
    assert update_norm(start, release.update, ("A",)) <= 0.05 * (1 + 1e-6)
    for n in start:
        assert torch.allclose(new.extras["sb_core"][n].A, release.update[n].A, atol=1e-6)


def test_unequal_weights_and_unsupported_strategies_are_refused():
    start = _state()
    updates = [_moved(start, s, 0.01) for s in range(2)]
    with pytest.raises(ClientLevelDPError, match="equal client weights"):
        privatize_round("fedavg", start, updates, [10.0, 30.0], clip=1.0, noise_multiplier=1.0, generator=noise_generator(0))
    for name in ("fedex", "flora", "lorafair", "hetlora"):
        with pytest.raises(ClientLevelDPError, match=f"strategy.name={name}: .*individual|strategy.name={name}: .*unbounded"):
            check_client_level_strategy(name)
        with pytest.raises(ClientLevelDPError, match="secure aggregation"):
            check_secure_aggregation(name)
    with pytest.raises(ClientLevelDPError, match="does not know"):
        check_client_level_strategy("fedmystery")
    assert {n for n, m in METHODS.items() if m.client_dp.refused} == {"fedex", "flora", "lorafair", "hetlora"}
    assert check_client_level_strategy("ffa", secure_aggregation=True) == ("B",)


def test_secure_aggregation_verifies_the_client_side_clipping():
    start = _state(b_scale=0.1)
    clipped, _ = clip_update(start, _moved(start, 1, 1.0), 0.5, ("A", "B"))
    raw = _moved(start, 2, 1.0)
    ok = privatize_round("fedavg", start, [clipped], [1], clip=0.5, noise_multiplier=0.0, generator=noise_generator(0),
                         secure_aggregation=True)  # fmt: skip
    assert torch.allclose(ok.update["l0"].B, clipped["l0"].B)
    with pytest.raises(ClientLevelDPError, match="not clipped on the client"):
        privatize_round("fedavg", start, [raw], [1], clip=0.5, noise_multiplier=0.0, generator=noise_generator(0),
                        secure_aggregation=True)  # fmt: skip


def test_client_level_accounting_composes_rounds_at_q_m_over_population():
    # Prepare: z = 1.2, m = 10 of P = 100 clients per round, 30 rounds
    z, delta = client_level_noise(DPConfig(mode="client", noise_multiplier=1.2), clients_per_round=10, population=100,
                                  num_rounds=30)  # fmt: skip
    state = None
    # Execute
    for rnd in range(1, 31):
        state = AccountantState.from_json(account_round(state, noise_multiplier=z, clients=10, population=100,
                                                        delta=delta, round_index=rnd).to_json())  # fmt: skip
    spent = client_level_spent(state)
    # Assert
    assert delta == 1e-5 and state.history == [[1.2, 0.1, 30]]
    assert spent.epsilon == epsilon_rdp([[1.2, 0.1, 30]], 1e-5)[0] == pytest.approx(3.41, abs=0.01)
    calibrated, _ = client_level_noise(DPConfig(mode="client", target_epsilon=2.0), clients_per_round=10,
                                       population=100, num_rounds=30)  # fmt: skip
    assert 1.95 <= epsilon_rdp([[calibrated, 0.1, 30]], 1e-5)[0] <= 2.0
    with pytest.raises(ClientLevelDPError, match="must lie in"):
        client_level_noise(DPConfig(mode="client", noise_multiplier=1.0), clients_per_round=5, population=3, num_rounds=1)


def test_a_client_that_drops_out_still_counts_in_the_sampling_rate(tmp_path):
    # Prepare: 4 of a population of 8 selected; one of them never replies
    dp = ClientLevelDP(noise_multiplier=1.0, delta=1e-5, population=8)
    start = _state()
    updates = [_moved(start, seed, 0.1) for seed in range(3)]
    state = GlobalState(adapter=start)
    # Execute
    dp.release(METHODS["fedavg"], state, start, updates, tmp_path, rnd=1, clip=1.0, sampled=4)
    # Assert: q = 4/8 (the selection), the noise averages the 3 that arrived, ε at q = 0.5
    (entry,) = read_ledger(tmp_path)
    assert (entry["clients"], entry["aggregated"], entry["q"]) == (4, 3, 0.5)
    assert entry["noise_std"] == pytest.approx(1.0 * 1.0 / 3)
    assert entry["epsilon"] == pytest.approx(epsilon_rdp([[1.0, 0.5, 1]], 1e-5)[0])
    with pytest.raises(ValueError, match="3 updates from a round that selected 2 clients"):
        dp.release(METHODS["fedavg"], state, start, updates, tmp_path, rnd=2, clip=1.0, sampled=2)
