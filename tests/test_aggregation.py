"""Every LoRA-aware aggregator against a float64 dense reference computed here, independently.

ΔW* = Σ p_i·s_i·B_i·A_i is formed in this file from the raw client tensors (never through the
library's ``ideal_update``), on square and non-square layers, equal and unequal weights, equal and
mixed ranks. Exact methods must stay below 1e-5 relative error in fp32 and pass a functional check
with real adapter modules: the global layer's output on random x equals Σ p_i × the clients'
outputs (a transposed residual, the FedEx trap, fails it on square layers). Inexact methods must
report a real, non-zero error. Tests follow Prepare / Execute / Assert.
"""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

from fedlora.adapters import FrozenALoRALinear, LoRALinear, LoraFactors, inject_adapters
from fedlora.adapters.sb import SBLinear
from fedlora.aggregation import AggregationError, GlobalState, aggregation_error, round_update
from fedlora.aggregation import fedavg, fedex, fedsb, ffa, flora, hetlora, lorafair, padding, terms
from fedlora.aggregation.common import normalize_weights
from fedlora.config import AdapterConfig

SHAPES = {"square": (12, 12), "tall": (20, 12), "wide": (12, 28)}  # (d_out, d_in)
ALPHA = 8.0
RANKS = {"equal": [4, 4, 4], "mixed": [2, 4, 3]}
WEIGHTS = {"equal": [1.0, 1.0, 1.0], "unequal": [5.0, 1.0, 2.0]}


def scale(rank: int) -> float:
    return ALPHA / rank


# ---------------------------------------------------------------------------------------------
# Rounds: client updates, the state before, and each client's dense update in float64


def _updates(ranks, seed=0, shapes=SHAPES):
    """Random client factors (A and B both trained) and each client's dense s·B·A in float64."""
    g = torch.Generator().manual_seed(seed)
    updates = [
        {n: LoraFactors(torch.randn(r, di, generator=g), torch.randn(do, r, generator=g), scale(r))
         for n, (do, di) in shapes.items()}
        for r in ranks
    ]
    deltas = [{n: f.scale * f.B.double() @ f.A.double() for n, f in u.items()} for u in updates]
    return updates, deltas


def _lora_round(aggregate, ranks, weights, seed=0, shapes=SHAPES, before=None):
    before = before or GlobalState(adapter={})
    updates, deltas = _updates(ranks, seed, shapes)
    return before, updates, deltas, aggregate(before, updates, weights)


def _ffa_round(ranks, weights, seed=0):
    g = torch.Generator().manual_seed(seed)
    r_max = max(ranks)
    shared = {n: torch.randn(r_max, di, generator=g) for n, (_, di) in SHAPES.items()}
    before = GlobalState({n: LoraFactors(shared[n], torch.zeros(do, r_max), scale(r_max))
                          for n, (do, _) in SHAPES.items()})
    updates = [
        {n: LoraFactors(shared[n][:r].clone(), torch.randn(do, r, generator=g), scale(r))  # A stays the shared A
         for n, (do, _) in SHAPES.items()}
        for r in ranks
    ]
    deltas = [{n: f.scale * f.B.double() @ f.A.double() for n, f in u.items()} for u in updates]
    return before, updates, deltas, ffa.METHOD.aggregate(before, updates, weights)


def _frame(r_max, seed):
    g = torch.Generator().manual_seed(seed)
    orthonormal = lambda rows: torch.linalg.qr(torch.randn(rows, r_max, generator=g)).Q  # noqa: E731
    return {n: (orthonormal(do), orthonormal(di).t()) for n, (do, di) in SHAPES.items()}


def _cores(ranks, seed):
    g = torch.Generator().manual_seed(seed)
    return [{n: LoraFactors(torch.randn(r, r, generator=g), torch.eye(r), scale(r)) for n in SHAPES} for r in ranks]


def _fedsb_round(ranks, weights, seed=0, before=None):
    frame = _frame(max(ranks), seed + 100)
    before = before or fedsb.initial_state(frame, scale(max(ranks)))
    updates = _cores(ranks, seed)
    B = {n: fr["B"].double() for n, fr in before.extras["sb_frame"].items()}
    A = {n: fr["A"].double() for n, fr in before.extras["sb_frame"].items()}
    # a rank-r client's update s·B[:, :r]·R·A[:r] (nested frame), with R = core.A since core.B = I
    deltas = [{n: f.scale * B[n][:, : f.rank] @ f.A.double() @ A[n][: f.rank] for n, f in u.items()} for u in updates]
    return before, updates, deltas, fedsb.METHOD.aggregate(before, updates, weights)


ROUNDS = {
    "ffa": _ffa_round,
    "fedex": lambda ranks, weights, seed=0: _lora_round(fedex.aggregate, ranks, weights, seed),
    "flora": lambda ranks, weights, seed=0: _lora_round(flora.aggregate, ranks, weights, seed),
    "fedsb": _fedsb_round,
}
MODULES = {"ffa": ffa, "fedex": fedex, "flora": flora, "fedsb": fedsb}


def _reference(deltas, weights):
    p = torch.tensor(weights, dtype=torch.float64) / sum(weights)
    return {n: sum(p[i] * d[n] for i, d in enumerate(deltas)) for n in deltas[0]}


def _rel_err(got, ref):
    return float(torch.linalg.matrix_norm(got - ref) / torch.linalg.matrix_norm(ref))


# ---------------------------------------------------------------------------------------------
# Modules for the functional check


def _base(name, seed=7):
    do, di = SHAPES[name]
    torch.manual_seed(seed)
    return nn.Linear(di, do)


def _client_module(method, name, update, state):
    f = update[name]
    if method == "fedsb":
        m = SBLinear(_base(name), f.rank, ALPHA)
        fr = state.extras["sb_frame"][name]
        m.set_frame(fr["B"][:, : f.rank], fr["A"][: f.rank], f.B @ f.A)
        return m
    m = (FrozenALoRALinear if method == "ffa" else LoRALinear)(_base(name), f.rank, ALPHA)
    with torch.no_grad():
        m.lora_A.copy_(f.A)
        m.lora_B.copy_(f.B)
    return m


def _global_module(method, name, before, after, rank):
    """The layer a rank-``rank`` client starts the next round with: base + this round's new
    terms merged into W, adapter from the method's ``slice_for_rank``."""
    base = _base(name)
    with torch.no_grad():
        w = base.weight.double()
        for term in after.base_terms.get(name, [])[len(before.base_terms.get(name, [])):]:
            w = w + term.delta(torch.float64)
        base.weight.copy_(w.float())
    start = MODULES[method].METHOD.slice_for_rank(after, rank, scale=scale(rank))[name]
    if method == "fedsb":
        m = SBLinear(base, rank, ALPHA)
        fr = after.extras["sb_frame"][name]
        m.set_frame(fr["B"][:, :rank], fr["A"][:rank], start.B @ start.A)
        return m
    m = LoRALinear(base, rank, ALPHA)
    with torch.no_grad():
        m.lora_A.copy_(start.A)
        m.lora_B.copy_(start.B)
    return m


# ---------------------------------------------------------------------------------------------
# Exact methods


@pytest.mark.parametrize("weights", WEIGHTS.values(), ids=WEIGHTS.keys())
@pytest.mark.parametrize("ranks", RANKS.values(), ids=RANKS.keys())
@pytest.mark.parametrize("method", ROUNDS)
def test_exact_methods_match_the_float64_reference(method, ranks, weights):
    # Prepare / Execute
    before, updates, deltas, after = ROUNDS[method](ranks, weights)
    ref = _reference(deltas, weights)
    # Assert: per layer, and as the library's metric reports it
    got = round_update(before, after)
    for name in SHAPES:
        assert got[name].shape == SHAPES[name]
        assert _rel_err(got[name], ref[name]) < 1e-5, name
    assert aggregation_error(got, ref) < 1e-5
    assert MODULES[method].METHOD.exact and MODULES[method].METHOD.mixed_ranks


@pytest.mark.parametrize("ranks", RANKS.values(), ids=RANKS.keys())
@pytest.mark.parametrize("method", ROUNDS)
def test_global_layer_output_is_the_weighted_mean_of_client_outputs(method, ranks):
    # Prepare
    weights = WEIGHTS["unequal"]
    p = normalize_weights(weights)
    before, updates, _, after = ROUNDS[method](ranks, weights, seed=3)
    for name, (_, d_in) in SHAPES.items():
        x = torch.randn(5, d_in, generator=torch.Generator().manual_seed(11))
        with torch.no_grad():
            expected = sum(p_i * _client_module(method, name, u, before)(x).double() for p_i, u in zip(p, updates))
            # Execute: the top-rank client and the lowest-rank client start from the same function
            outputs = {r: _global_module(method, name, before, after, r)(x).double() for r in {min(ranks), max(ranks)}}
        # Assert
        for r, y in outputs.items():
            assert _rel_err(y, expected) < 1e-5, (name, r)


# ---------------------------------------------------------------------------------------------
# Inexact methods report a real error


def test_fedavg_hetlora_lorafair_report_real_errors_and_lorafair_beats_fedavg():
    # Prepare
    weights = WEIGHTS["unequal"]
    # Execute
    before, _, deltas, avg = _lora_round(fedavg.METHOD.aggregate, RANKS["equal"], weights, seed=5)
    _, _, _, fair = _lora_round(lorafair.aggregate, RANKS["equal"], weights, seed=5)
    ridge_aggregate = functools.partial(lorafair.aggregate, method="ridge")
    _, _, _, ridge = _lora_round(ridge_aggregate, RANKS["equal"], weights, seed=5)
    _, _, het_deltas, het = _lora_round(hetlora.METHOD.aggregate, RANKS["mixed"], weights, seed=5)
    ref, het_ref = _reference(deltas, weights), _reference(het_deltas, weights)
    errors = {
        "fedavg": aggregation_error(round_update(before, avg), ref),
        "lorafair": aggregation_error(round_update(before, fair), ref),
        "ridge": aggregation_error(round_update(before, ridge), ref),
        "hetlora": aggregation_error(round_update(before, het), het_ref),
    }
    # Assert: clearly non-zero on random updates; the ridge never does worse than FedAvg
    assert all(e > 0.05 for e in errors.values()), errors
    assert errors["ridge"] <= errors["fedavg"]
    assert not (fedavg.METHOD.exact or hetlora.METHOD.exact or lorafair.METHOD.exact)


# ---------------------------------------------------------------------------------------------
# FFA-LoRA traps


def test_ffa_a_is_bit_identical_after_a_real_optimiser_step_and_after_aggregation():
    # Prepare: two clients, each a FrozenALoRALinear with the same seeded A
    clients, a0 = [], None
    for seed in (1, 2):
        torch.manual_seed(seed)
        m = FrozenALoRALinear(nn.Linear(12, 20), 4, ALPHA, generator=torch.Generator().manual_seed(0))
        a0 = m.lora_A.detach().clone()
        opt = torch.optim.AdamW(m.parameters(), lr=0.1, weight_decay=0.1)  # every parameter, on purpose
        # Execute: a real local step
        for _ in range(2):
            opt.zero_grad()
            loss = (m(torch.randn(8, 12)) - 1.0).pow(2).mean()
            loss.backward()
            opt.step()
        clients.append(m)
    updates = [{"l": LoraFactors(m.lora_A.detach().clone(), m.lora_B.detach().clone(), m.scale)} for m in clients]
    after = ffa.METHOD.aggregate(GlobalState({"l": LoraFactors(a0, torch.zeros(20, 4), clients[0].scale)}), updates, [1, 3])
    # Assert
    for m in clients:
        assert torch.equal(m.lora_A, a0) and not m.lora_A.requires_grad
        assert torch.count_nonzero(m.lora_B) > 0
    assert torch.equal(after.adapter["l"].A, a0)
    assert torch.equal(ffa.slice_for_rank(after, 2, scale=scale(2), truncate=True)["l"].A, a0[:2])


def test_ffa_a_differs_across_layers_of_the_tiny_model(tiny_model):
    # Prepare / Execute
    names = inject_adapters(tiny_model, AdapterConfig(kind="frozen_a", rank=4), FrozenALoRALinear)
    modules = dict(tiny_model.named_modules())
    a = {n: modules[n].lora_A for n in names}
    # Assert: frozen everywhere, and no two layers of the same shape share an A
    assert all(not t.requires_grad for t in a.values())
    for i, n1 in enumerate(names):
        for n2 in names[i + 1:]:
            if a[n1].shape == a[n2].shape:
                assert not torch.equal(a[n1], a[n2]), (n1, n2)


def test_ffa_refuses_a_client_whose_a_moved():
    # Prepare
    before, updates, _, _ = _ffa_round(RANKS["equal"], WEIGHTS["equal"])
    moved = dict(updates[1])
    f = moved["tall"]
    moved["tall"] = LoraFactors(f.A + 1e-6, f.B, f.scale)
    # Execute / Assert
    with pytest.raises(AggregationError, match="differs from the shared frozen A"):
        ffa.METHOD.aggregate(before, [updates[0], moved, updates[2]], WEIGHTS["equal"])


# ---------------------------------------------------------------------------------------------
# FedEx-LoRA


def test_fedex_keeps_the_residual_factored_when_smaller_else_dense():
    # Prepare: a wide layer where (n+1)·r·(d_out+d_in) < d_out·d_in, and a small one where not
    shapes = {"big": (64, 48), "small": (12, 12)}
    # Execute
    before, _, deltas, after = _lora_round(fedex.aggregate, [2, 2, 2], [1, 2, 3], shapes=shapes)
    # Assert
    big, small = after.base_terms["big"][0], after.base_terms["small"][0]
    assert isinstance(big, LoraFactors) and big.rank == 4 * 2 and big.scale == 1.0
    assert isinstance(small, terms.DenseTerm) and small.weight.shape == (12, 12)
    assert terms.term_nbytes(big) == 4 * 8 * (64 + 48) < 4 * 64 * 48
    ref = _reference(deltas, [1, 2, 3])
    assert aggregation_error(round_update(before, after), ref) < 1e-5


def test_fedex_two_rounds_append_terms_without_touching_the_previous_state():
    # Prepare
    s0 = GlobalState(adapter={})
    _, _, _, s1 = _lora_round(fedex.aggregate, RANKS["mixed"], WEIGHTS["unequal"], seed=1)
    lengths = {n: len(t) for n, t in s1.base_terms.items()}
    # Execute: round 2 continues from s1
    _, updates, deltas, s2 = _lora_round(fedex.aggregate, RANKS["mixed"], WEIGHTS["equal"], seed=2, before=s1)
    # Assert
    assert {n: len(t) for n, t in s1.base_terms.items()} == lengths == {n: 1 for n in SHAPES}
    assert {n: len(t) for n, t in s2.base_terms.items()} == {n: 2 for n in SHAPES}
    assert s0.base_terms == {}
    assert aggregation_error(round_update(s1, s2), _reference(deltas, WEIGHTS["equal"])) < 1e-5


# ---------------------------------------------------------------------------------------------
# FLoRA


def test_flora_is_exact_when_d_equals_r_times_n_and_under_client_sampling():
    # Prepare: d = r·n = 8 (shape comparisons cannot tell A from B), then a sampled subset
    shapes = {"sq8": (8, 8), "wide": (8, 16)}
    rng_state = torch.get_rng_state()
    # Execute
    s0, _, d1, s1 = _lora_round(flora.aggregate, [2, 2, 2, 2], [1, 1, 2, 4], seed=4, shapes=shapes)
    _, _, d2, s2 = _lora_round(flora.aggregate, [4, 2], [3, 1], seed=5, shapes=shapes, before=s1)
    # Assert
    assert aggregation_error(round_update(s0, s1), _reference(d1, [1, 1, 2, 4])) < 1e-5
    assert aggregation_error(round_update(s1, s2), _reference(d2, [3, 1])) < 1e-5
    for n in shapes:
        assert torch.count_nonzero(s2.adapter[n].B) == 0  # fresh LoRA every round
        assert s1.adapter[n].rank == 2 and s2.adapter[n].rank == 4
        assert not torch.equal(s1.adapter[n].A[:2], s2.adapter[n].A[:2])  # A is re-drawn
    assert torch.equal(torch.get_rng_state(), rng_state)


# ---------------------------------------------------------------------------------------------
# Fed-SB


def test_fedsb_round_result_depends_only_on_that_rounds_updates():
    # Prepare
    s0, _, _, s1 = _fedsb_round(RANKS["equal"], WEIGHTS["unequal"], seed=1)
    round2 = _cores(RANKS["equal"], seed=2)
    # Execute: round 2 after round 1, and round 2 alone from the initial state
    after_both = fedsb.METHOD.aggregate(s1, round2, WEIGHTS["equal"])
    alone = fedsb.METHOD.aggregate(s0, round2, WEIGHTS["equal"])
    # Assert
    for n in SHAPES:
        assert torch.equal(after_both.extras["sb_core"][n].A, alone.extras["sb_core"][n].A)
        assert torch.equal(after_both.adapter[n].B, alone.adapter[n].B)
    assert all(not t for t in after_both.base_terms.values())


def test_slicing_below_the_floor_is_refused_unless_min_rank_was_set():
    # Prepare: an equal-rank round, then a rank-2 client asks for its start
    s0, _, _, s1 = _fedsb_round(RANKS["equal"], WEIGHTS["equal"], seed=1)
    with pytest.raises(AggregationError, match="min_rank"):
        fedsb.slice_for_rank(s1, 2, scale=scale(2))
    # Execute: the run declares its smallest client rank before aggregating
    s0_min = GlobalState(s0.adapter, s0.base_terms, {**s0.extras, "min_rank": 2})
    _, updates, deltas, s1_min = _fedsb_round(RANKS["equal"], WEIGHTS["equal"], seed=1, before=s0_min)
    # Assert: exact, the part above rank 2 is in the base, and a rank-2 client gets all of it
    assert aggregation_error(round_update(s0_min, s1_min), _reference(deltas, WEIGHTS["equal"])) < 1e-5
    x = torch.randn(3, 12)
    with torch.no_grad():
        low = _global_module("fedsb", "square", s0_min, s1_min, 2)(x)
        top = _global_module("fedsb", "square", s0_min, s1_min, 4)(x)
    assert _rel_err(low.double(), top.double()) < 1e-6


def test_fedex_hands_a_lower_rank_client_its_exact_start_when_min_rank_is_set():
    # Prepare
    before = GlobalState(adapter={}, extras={"min_rank": 1})
    # Execute
    _, _, deltas, after = _lora_round(fedex.aggregate, RANKS["equal"], WEIGHTS["unequal"], seed=6, before=before)
    # Assert: only the first column of B̄ stays in the adapter; the output is the same for ranks 1 and 4
    assert aggregation_error(round_update(before, after), _reference(deltas, WEIGHTS["unequal"])) < 1e-5
    for name, (_, d_in) in SHAPES.items():
        assert torch.count_nonzero(after.adapter[name].B[:, 1:]) == 0
        x = torch.randn(3, d_in)
        with torch.no_grad():
            y1 = _global_module("fedex", name, before, after, 1)(x)
            y4 = _global_module("fedex", name, before, after, 4)(x)
        assert _rel_err(y1.double(), y4.double()) < 1e-6


# ---------------------------------------------------------------------------------------------
# LoRA-FAIR


def _fair_stats(updates, weights, sketch_rank=None):
    acc = lorafair.LoraFairAccumulator(sketch_rank=sketch_rank)
    for u, p in zip(updates, normalize_weights(weights)):
        acc.add(u, p)
    return acc.layer_stats()


def test_lorafair_ridge_correction_is_zero_when_all_clients_share_a():
    # Prepare
    updates, _ = _updates(RANKS["equal"], seed=8)
    for u in updates[1:]:
        for n in SHAPES:
            u[n] = LoraFactors(updates[0][n].A.clone(), u[n].B, u[n].scale)
    # Execute
    stats = _fair_stats(updates, WEIGHTS["unequal"])
    # Assert
    for A_bar, B_bar, G, C, t, _ in stats.values():
        dB = lorafair.ridge_correction(B_bar, G, C, 0.01)
        assert float(dB.abs().max()) < 1e-10 * max(1.0, float(B_bar.abs().max()))


def test_lorafair_ridge_improves_cosine_and_shrinks_with_lambda():
    # Prepare
    updates, _ = _updates(RANKS["equal"], seed=9)
    # Execute
    stats = _fair_stats(updates, WEIGHTS["unequal"])
    # Assert
    for A_bar, B_bar, G, C, t, _ in stats.values():
        corrections = [lorafair.ridge_correction(B_bar, G, C, lam) for lam in (0.01, 0.1, 1.0, 10.0)]
        norms = [float(torch.linalg.matrix_norm(dB)) for dB in corrections]
        assert all(a > b for a, b in zip(norms, norms[1:])), norms
        dB = lorafair.ridge_correction(B_bar, G, C, 0.01)
        assert lorafair.cosine(B_bar + dB, G, C, t) >= lorafair.cosine(B_bar, G, C, t)


def test_lorafair_gradient_steps_improve_cosine_over_fedavg():
    # Prepare
    updates, _ = _updates(RANKS["equal"], seed=10)
    # Execute
    stats = _fair_stats(updates, WEIGHTS["unequal"])
    # Assert: strictly better, by the objective's own guarantee cos_new ≥ cos_old + λ‖ΔB‖
    for A_bar, B_bar, G, C, t, _ in stats.values():
        dB = lorafair.gradient_correction(B_bar, G, C, t, lam=0.01)
        before, after = lorafair.cosine(B_bar, G, C, t), lorafair.cosine(B_bar + dB, G, C, t)
        assert after >= before + 0.01 * float(torch.linalg.matrix_norm(dB)) - 1e-12
        assert after > before + 1e-3


def test_lorafair_factored_cosine_equals_the_dense_cosine():
    # Prepare
    updates, deltas = _updates(RANKS["equal"], seed=10)
    T = _reference(deltas, WEIGHTS["unequal"])
    # Execute
    stats = _fair_stats(updates, WEIGHTS["unequal"])
    # Assert: cos(B̄Ā, ΔW*) from r×r quantities equals the dense cosine (scale cancels)
    for n, (A_bar, B_bar, G, C, t, _) in stats.items():
        product = (B_bar @ A_bar).flatten()
        dense = float(product @ T[n].flatten()) / float(product.norm() * T[n].norm())
        assert lorafair.cosine(B_bar, G, C, t) == pytest.approx(dense, rel=1e-10)


def test_lorafair_sketch_is_exact_while_n_times_r_fits_and_close_after():
    # Prepare: 3 clients of rank 4 → rank(T) ≤ 12
    updates, _ = _updates(RANKS["equal"], seed=12)
    # Execute
    dense = _fair_stats(updates, WEIGHTS["unequal"])
    sketch = _fair_stats(updates, WEIGHTS["unequal"], sketch_rank=12)
    # Assert
    for n in SHAPES:
        torch.testing.assert_close(sketch[n][3], dense[n][3], rtol=1e-9, atol=1e-9)  # C = T·Āᵀ
        assert abs(sketch[n][4] - dense[n][4]) < 1e-9 * dense[n][4]  # ‖T‖


# ---------------------------------------------------------------------------------------------
# HetLoRA


def test_hetlora_weights_by_update_norm_and_truncates():
    # Prepare: client 1 sends a zero update, which must get zero weight
    updates, _ = _updates(RANKS["mixed"], seed=13)
    zero = {n: LoraFactors(f.A, torch.zeros_like(f.B), f.scale) for n, f in updates[1].items()}
    # Execute
    with_zero = hetlora.METHOD.aggregate(GlobalState({}), [updates[0], zero, updates[2]], [1, 1, 1])
    without = hetlora.METHOD.aggregate(GlobalState({}), [updates[0], updates[2]], [1, 1])
    low = hetlora.slice_for_rank(with_zero, 2, scale=scale(2))
    # Assert
    for n in SHAPES:
        # the zero (rank-4) client has weight ≈ 1e-30: same A rows and s·B columns as without it
        w, wo = with_zero.adapter[n], without.adapter[n]
        torch.testing.assert_close(w.scale * w.B[:, :3], wo.scale * wo.B)
        torch.testing.assert_close(w.A[:3], wo.A)
        assert low[n].rank == 2 and low[n].scale == scale(2)
    assert hetlora.update_norm(updates[0]["wide"]) == pytest.approx(
        float(torch.linalg.matrix_norm(updates[0]["wide"].delta(torch.float64))), rel=1e-9
    )


# ---------------------------------------------------------------------------------------------
# Streaming accumulators


def _held_tensors(obj, seen=None) -> tuple[int, int]:
    """(number of tensors, total elements) reachable from an accumulator's attributes."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return 0, 0
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        return 1, obj.numel() if obj.device.type != "meta" else 0
    items = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (list, tuple)) else (
        vars(obj).values() if hasattr(obj, "__dict__") else ()
    )
    count = total = 0
    for item in items:
        c, t = _held_tensors(item, seen)
        count, total = count + c, total + t
    return count, total


def _streams(module, kind, **options):
    """(make accumulator, finish → adapter, batch aggregate, update kind) for a streaming module."""
    return (
        lambda s: module.accumulator(s, **options),
        lambda s, acc: module.finish(s, acc).adapter,
        (lambda s, u, w: module.aggregate(s, u, w, **options)) if options else module.METHOD.aggregate,
        kind,
    )


STREAMING = {
    "fedavg": _streams(fedavg, "lora"),
    "ffa": _streams(ffa, "ffa"),
    "fedsb": _streams(fedsb, "fedsb"),
    "hetlora": _streams(hetlora, "lora"),
    "lorafair": _streams(lorafair, "lora"),
    "lorafair-sketch": _streams(lorafair, "lora", sketch_rank=6),
}


def _many_updates(kind, n, seed=20):
    if kind == "ffa":
        before, updates, _, _ = _ffa_round([4] * n, [1.0] * n, seed=seed)
    elif kind == "fedsb":
        before, updates, _, _ = _fedsb_round([4] * n, [1.0] * n, seed=seed)
    else:
        before, updates = GlobalState({}), _updates([4] * n, seed=seed)[0]
    return before, updates


@pytest.mark.parametrize("name", STREAMING)
def test_streaming_accumulator_matches_batch_and_holds_fixed_memory(name):
    make, finish, aggregate, kind = STREAMING[name]
    held = {}
    for n in (3, 30):
        # Prepare
        before, updates = _many_updates(kind, n)
        weights = [1.0 + i % 4 for i in range(n)]
        acc = make(before)
        # Execute
        for u, p in zip(updates, normalize_weights(weights)):
            acc.add(u, p)
        held[n] = _held_tensors(acc)
        streamed = finish(before, acc)
        batch = aggregate(before, updates, weights).adapter
        # Assert: bit-identical to the batch path
        for layer in SHAPES:
            assert torch.equal(streamed[layer].A, batch[layer].A)
            assert torch.equal(streamed[layer].B, batch[layer].B)
    assert held[3] == held[30], held


# ---------------------------------------------------------------------------------------------
# Padding helpers


def test_side_terms_and_slicing_helpers():
    # Prepare
    g = torch.Generator().manual_seed(30)
    B, A = torch.randn(6, 5, generator=g, dtype=torch.float64), torch.randn(5, 4, generator=g, dtype=torch.float64)
    # Execute
    dense = terms.compact_term(B, A, 2.0)  # 5·(6+4) = 50 > 24: dense
    factored = terms.compact_term(B[:, :1], A[:1], 2.0)  # 1·10 ≤ 24: factored
    state = GlobalState({"l": LoraFactors(A[:2].float(), B[:, :2].float(), 1.0)}, extras={"rank_scales": {2: 1.0}})
    # Assert
    assert isinstance(dense, terms.DenseTerm) and isinstance(factored, LoraFactors)
    torch.testing.assert_close(dense.delta(torch.float64), 2.0 * B @ A, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(dense.B @ dense.A, dense.weight)  # LoraFactors-like view
    up = padding.slice_for_rank(state, 3, scale=0.5)["l"]  # more rank: zero B column, fresh A row
    assert up.rank == 3 and torch.count_nonzero(up.B[:, 2]) == 0 and torch.count_nonzero(up.A[2]) > 0
    torch.testing.assert_close(up.delta(torch.float64), state.adapter["l"].delta(torch.float64))
    with pytest.raises(AggregationError, match="scale of a rank-3 adapter is unknown"):
        padding.slice_for_rank(state, 3)
    with pytest.raises(AggregationError, match="min_rank"):
        padding.slice_for_rank(state, 1, scale=1.0)
    assert padding.slice_for_rank(state, 1, scale=1.0, truncate=True)["l"].rank == 1


def test_mixed_layouts_are_refused_with_the_client_named():
    updates, _ = _updates([4, 4])
    broken = dict(updates[1])
    broken.pop("wide")
    with pytest.raises(AggregationError, match="client 1"):
        fedex.aggregate(GlobalState({}), [updates[0], broken], [1, 1])
    with pytest.raises(AggregationError, match="mixed ranks need a rank-aware strategy"):
        lorafair.aggregate(GlobalState({}), _updates([2, 4])[0], [1, 1])
