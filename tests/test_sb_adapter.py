"""The LoRA-SB adapter (fixed frame B, A; trainable core R) and the federated LoRA-SB init."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from fedlora.aggregation import fedsb_init
from fedlora.adapters import (
    LoraFactors,
    arrays_to_state,
    get_adapter_state,
    inject_adapters,
    set_adapter_state,
    state_to_arrays,
    trainable_parameters,
)
from fedlora.adapters.lora import layer_generator
from fedlora.adapters.sb import (
    SBLinear,
    data_free_frame,
    get_sb_frame,
    set_sb_frame,
)
from fedlora.config import AdapterConfig


def _layer(d_out: int, d_in: int, rank: int = 3, seed: int = 0) -> SBLinear:
    torch.manual_seed(seed)
    base = nn.Linear(d_in, d_out).requires_grad_(False)
    m = SBLinear(base, rank, alpha=6.0, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        m.lora_A.copy_(torch.randn(rank, rank))
    return m


@pytest.mark.parametrize("shape", [(7, 7), (9, 5), (4, 11)], ids=["square", "tall", "wide"])
def test_sb_layer_forward_and_dense_view_are_s_b_r_a(shape):
    # Prepare
    d_out, d_in = shape
    m = _layer(d_out, d_in)
    x = torch.randn(6, d_in)
    # Execute
    y = m(x)
    dense = m.delta_weight()
    # Assert
    expected = m.scale * m.frame_B.double() @ m.lora_A.double() @ m.frame_A.double()
    torch.testing.assert_close(dense.double(), expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(y, x @ (m.base.weight + dense).t() + m.base.bias, rtol=1e-5, atol=1e-5)
    m.merge()
    torch.testing.assert_close(m(x), y, rtol=1e-5, atol=1e-5)


def test_only_r_trains_and_the_frame_stays_bit_identical():
    # Prepare
    m = _layer(9, 5)
    frame_b, frame_a, r0 = m.frame_B.clone(), m.frame_A.clone(), m.lora_A.detach().clone()
    opt = torch.optim.AdamW(m.parameters(), lr=0.1, weight_decay=0.1)
    # Execute
    opt.zero_grad()
    (m(torch.randn(8, 5)) - 1.0).pow(2).mean().backward()
    opt.step()
    # Assert
    assert [p.shape for p in m.parameters() if p.requires_grad] == [torch.Size([3, 3])]
    assert torch.equal(m.frame_B, frame_b) and torch.equal(m.frame_A, frame_a)
    assert torch.equal(m.lora_B, torch.eye(3))
    assert not torch.equal(m.lora_A, r0)


def test_inject_state_and_wire_round_trip_on_the_tiny_model(tiny_model):
    # Prepare
    cfg = AdapterConfig(rank=4, init_seed=3)
    names = inject_adapters(tiny_model, cfg, SBLinear)
    # Execute
    state = get_adapter_state(tiny_model)
    state = {n: LoraFactors(torch.randn(4, 4), f.B, f.scale) for n, f in state.items()}
    set_adapter_state(tiny_model, state)
    wire = state_to_arrays(get_adapter_state(tiny_model), parts=("R",))
    # Assert: the state is the r×r core; on the wire it is R alone, r² numbers per layer
    assert all(p.shape == (4, 4) for p in trainable_parameters(tiny_model))
    assert len(trainable_parameters(tiny_model)) == len(names)
    assert sum(a.size for k, a in wire.items() if not k.endswith(".scale")) == 16 * len(names)
    back = arrays_to_state(wire)
    for n in names:
        assert torch.equal(back[n].B @ back[n].A, state[n].A)


def test_the_server_can_rebuild_every_clients_data_free_frame(tiny_model):
    # Prepare
    cfg = AdapterConfig(rank=4, init_seed=5)
    names = inject_adapters(tiny_model, cfg, SBLinear)
    modules = dict(tiny_model.named_modules())
    # Execute
    frames = get_sb_frame(tiny_model)
    rebuilt = {
        n: data_free_frame(modules[n].out_features, modules[n].in_features, 4, layer_generator(5, n)) for n in names
    }
    # Assert: identical, orthonormal, and different across layers
    for n in names:
        assert torch.equal(frames[n][0], rebuilt[n][0]) and torch.equal(frames[n][1], rebuilt[n][1])
        torch.testing.assert_close(frames[n][0].t() @ frames[n][0], torch.eye(4), atol=1e-5, rtol=0)
        torch.testing.assert_close(frames[n][1] @ frames[n][1].t(), torch.eye(4), atol=1e-5, rtol=0)
    assert not torch.equal(frames[names[0]][1], frames[names[1]][1])


def test_set_sb_frame_slices_the_servers_frame_to_each_rank():
    # Prepare: a rank-2 layer loads the first columns/rows of a rank-4 frame
    m = _layer(9, 5, rank=2)
    B, A = data_free_frame(9, 5, 4, torch.Generator().manual_seed(1))
    model = nn.ModuleDict({"l": m})
    # Execute
    set_sb_frame(model, {"l": (B, A)})
    # Assert
    assert torch.equal(m.frame_B, B[:, :2]) and torch.equal(m.frame_A, A[:2])


# ---------------------------------------------------------------------------------------------
# Federated initialisation


def _low_rank_grads(d_out, d_in, rank, n, seed=0):
    """Client gradients sharing one rank-``rank`` subspace, so the pooled gradient has rank r."""
    g = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(d_out, rank, generator=g, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(d_in, rank, generator=g, dtype=torch.float64)).Q
    return [(U @ torch.randn(rank, rank, generator=g, dtype=torch.float64) @ V.t()).float() for _ in range(n)]


@pytest.mark.parametrize("shape", [(30, 30), (40, 24), (20, 50)], ids=["square", "tall", "wide"])
def test_federated_init_recovers_the_pooled_gradients_subspace(shape):
    # Prepare
    d_out, d_in = shape
    grads, weights, rank = _low_rank_grads(d_out, d_in, 4, n=3), [1.0, 3.0, 2.0], 4
    pooled = sum(w * g.double() for w, g in zip(weights, grads)) / sum(weights)
    U, S, Vh = torch.linalg.svd(pooled)
    # Execute
    init = fedsb_init.federated_init(grads, weights, rank, lr=0.5, scale=2.0, oversample=3, seed=9)
    # Assert: principal angles ~0 (cosines are the singular values of BᵀU_r), and s·B·R₀·A = −lr·G_r
    cos_b = torch.linalg.svdvals(init.B.double().t() @ U[:, :rank])
    cos_a = torch.linalg.svdvals(init.A.double() @ Vh[:rank].t())
    assert float(cos_b.min()) > 1 - 1e-6 and float(cos_a.min()) > 1 - 1e-6
    torch.testing.assert_close(init.singular_values, S[:rank], rtol=1e-5, atol=1e-6)
    step = 2.0 * init.B.double() @ init.R0.double() @ init.A.double()
    torch.testing.assert_close(step, -0.5 * pooled, rtol=1e-4, atol=1e-5)


def test_federated_init_bytes_match_the_pieces_and_beat_a_dense_gradient():
    # Prepare
    d_out, d_in, rank, over = 40, 24, 4, 3
    grads = _low_rank_grads(d_out, d_in, rank, n=2)
    omega = fedsb_init.draw_sketch(d_in, rank + over, seed=1)
    # Execute
    Y = fedsb_init.client_range_sketch(grads[0], omega)
    Q = fedsb_init.server_range_basis([Y, fedsb_init.client_range_sketch(grads[1], omega)], [1, 1])
    Z = fedsb_init.client_projection(grads[0], Q)
    nbytes = fedsb_init.init_bytes(d_out, d_in, rank, over)
    # Assert
    assert nbytes["pass1_up"] == Y.numel() * Y.element_size() == 4 * d_out * (rank + over)
    assert nbytes["pass2_down"] == Q.numel() * Q.element_size()
    assert nbytes["pass2_up"] == Z.numel() * Z.element_size() == 4 * (rank + over) * d_in
    assert nbytes["total_up"] == 4 * (rank + over) * (d_out + d_in) < nbytes["dense_up"] == 4 * d_out * d_in
    big = fedsb_init.init_bytes(4096, 11008, 16)  # a Llama-2-7B MLP layer, k = 24: 124× less than dense
    assert big["dense_up"] / big["total_up"] == pytest.approx(4096 * 11008 / (24 * (4096 + 11008)))
    assert big["dense_up"] / big["total_up"] > 100


def test_federated_init_leaves_the_global_rng_alone():
    # Prepare
    grads = _low_rank_grads(20, 12, 3, n=2)
    torch.manual_seed(1234)
    state = torch.get_rng_state()
    # Execute
    fedsb_init.federated_init(grads, [1, 1], 3, lr=0.1, scale=1.0, seed=4)
    data_free_frame(20, 12, 3, torch.Generator().manual_seed(0))
    # Assert
    assert torch.equal(torch.get_rng_state(), state)


def test_init_frame_loads_into_sb_layers_and_gives_one_full_step():
    # Prepare
    grads = _low_rank_grads(9, 5, 3, n=2, seed=3)
    init = fedsb_init.federated_init(grads, [1, 1], 3, lr=0.2, scale=2.0, oversample=2)
    m = _layer(9, 5)  # alpha 6, rank 3 → s = 2
    # Execute
    m.set_frame(init.B, init.A, init.R0)
    # Assert: the layer starts one full-fine-tuning step away from W (W is not compensated)
    pooled = (grads[0].double() + grads[1].double()) / 2
    torch.testing.assert_close(m.delta_weight().double(), -0.2 * pooled, rtol=1e-4, atol=1e-5)
    assert np.isclose(m.scale, 2.0)
