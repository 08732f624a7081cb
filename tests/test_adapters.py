"""LoRA modules: the dense view, merge/unmerge, injection, state round trips, frozen A."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedlora.adapters import (
    AdapterError,
    FrozenALoRALinear,
    LoRALinear,
    arrays_to_state,
    get_adapter_state,
    inject_adapters,
    set_adapter_state,
    state_to_arrays,
    trainable_parameters,
)
from fedlora.config import AdapterConfig


def _trained_lora(d_in=12, d_out=7, rank=3, rslora=False) -> LoRALinear:
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(d_in, d_out), rank, alpha=6.0, rslora=rslora)
    with torch.no_grad():
        layer.lora_B.normal_()  # B = 0 at init; give it a real update
    return layer


@pytest.mark.parametrize("shape", [(12, 7), (9, 9), (5, 16)])
@pytest.mark.parametrize("rslora", [False, True])
def test_delta_weight_equals_change_in_output(shape, rslora):
    # Prepare
    d_in, d_out = shape
    layer = _trained_lora(d_in, d_out, rank=3, rslora=rslora)
    x = torch.randn(4, 5, d_in)
    # Execute
    change = layer(x) - layer.base(x)
    # Assert
    expected = x @ layer.delta_weight().t()
    torch.testing.assert_close(change, expected, rtol=1e-5, atol=1e-6)
    assert layer.scale == pytest.approx(6.0 / (3**0.5 if rslora else 3))


def test_merge_then_unmerge_restores_weight_and_output():
    layer = _trained_lora()
    x = torch.randn(3, 12)
    w0 = layer.base.weight.detach().clone()
    y0 = layer(x)
    layer.merge()
    torch.testing.assert_close(layer(x), y0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.base.weight, w0 + layer.delta_weight(), rtol=0, atol=1e-6)
    layer.unmerge()
    torch.testing.assert_close(layer.base.weight, w0, rtol=0, atol=1e-6)
    torch.testing.assert_close(layer(x), y0, rtol=1e-5, atol=1e-6)


def test_fresh_adapter_leaves_model_output_unchanged(tiny_model):
    ids = torch.randint(0, 50, (2, 10))
    before = tiny_model(ids).logits
    names = inject_adapters(tiny_model, AdapterConfig(rank=4), LoRALinear)
    after = tiny_model(ids).logits
    assert len(names) == 2 * 7  # 2 layers × q,k,v,o,gate,up,down
    torch.testing.assert_close(after, before)


def test_injection_freezes_base_and_counts_trainable_parameters(tiny_model):
    inject_adapters(tiny_model, AdapterConfig(rank=4), LoRALinear)
    n_trainable = sum(p.numel() for p in trainable_parameters(tiny_model))
    # hidden 64, intermediate 160, kv dim 32 (2 kv heads × 16): r·(d_in + d_out) per layer
    per_layer = 4 * ((64 + 64) + (64 + 32) + (64 + 32) + (64 + 64) + 2 * (64 + 160) + (160 + 64))
    assert n_trainable == 2 * per_layer
    assert all(not p.requires_grad for n, p in tiny_model.named_parameters() if "lora_" not in n)


def test_rank_pattern_sets_per_module_rank(tiny_model):
    cfg = AdapterConfig(rank=4, rank_pattern={r"\.v_proj$": 2, "mlp": 8})
    inject_adapters(tiny_model, cfg, LoRALinear)
    state = get_adapter_state(tiny_model)
    assert state["model.layers.0.self_attn.v_proj"].rank == 2
    assert state["model.layers.1.mlp.down_proj"].rank == 8
    assert state["model.layers.0.self_attn.q_proj"].rank == 4


def test_patterns_matching_nothing_raise_before_any_change(tiny_model):
    with pytest.raises(AdapterError, match="matches no linear layer.*named like"):
        inject_adapters(tiny_model, AdapterConfig(target_modules=["attention.query"]), LoRALinear)
    assert not any(isinstance(m, LoRALinear) for m in tiny_model.modules())


def test_rank_larger_than_layer_raises_naming_the_module(tiny_model):
    with pytest.raises(AdapterError, match=r"rank 40 for model\.layers\.0\.self_attn\.k_proj.*d_out=32"):
        inject_adapters(tiny_model, AdapterConfig(rank=40), LoRALinear)
    assert not any(isinstance(m, LoRALinear) for m in tiny_model.modules())


def test_state_round_trips_through_arrays_and_into_another_model(tokenizer):
    from fedlora.model.tiny import build_tiny_model

    src, dst = build_tiny_model(len(tokenizer)), build_tiny_model(len(tokenizer))
    for m in (src, dst):
        inject_adapters(m, AdapterConfig(rank=4), LoRALinear)
    with torch.no_grad():
        for p in trainable_parameters(src):
            p.normal_()
    set_adapter_state(dst, arrays_to_state(state_to_arrays(get_adapter_state(src))))
    ids = torch.randint(0, 50, (2, 8))
    torch.testing.assert_close(dst(ids).logits, src(ids).logits)


def test_loading_a_state_of_another_rank_is_refused(tiny_model, tokenizer):
    from fedlora.model.tiny import build_tiny_model

    other = build_tiny_model(len(tokenizer))
    inject_adapters(tiny_model, AdapterConfig(rank=4), LoRALinear)
    inject_adapters(other, AdapterConfig(rank=2), LoRALinear)
    with pytest.raises(AdapterError, match="rank mismatch"):
        set_adapter_state(tiny_model, get_adapter_state(other))


def test_frozen_a_keeps_a_bit_identical_through_training_and_differs_across_layers(tiny_model):
    inject_adapters(tiny_model, AdapterConfig(rank=4), FrozenALoRALinear)
    before = get_adapter_state(tiny_model)
    opt = torch.optim.AdamW(trainable_parameters(tiny_model), lr=1e-2)
    ids = torch.randint(0, 50, (2, 12))
    for _ in range(2):
        opt.zero_grad()
        tiny_model(ids, labels=ids).loss.backward()
        opt.step()
    after = get_adapter_state(tiny_model)
    for name in before:
        assert torch.equal(before[name].A, after[name].A)
    assert any(not torch.equal(before[n].B, after[n].B) for n in before)
    q0, q1 = before["model.layers.0.self_attn.q_proj"].A, before["model.layers.1.self_attn.q_proj"].A
    assert not torch.equal(q0, q1)


def test_same_init_seed_gives_every_client_the_same_a(tokenizer):
    from fedlora.model.tiny import build_tiny_model

    states = []
    for model_seed in (0, 1):  # different base weights, same adapter seed
        m = build_tiny_model(len(tokenizer), seed=model_seed)
        inject_adapters(m, AdapterConfig(rank=4, init_seed=7), LoRALinear)
        states.append(get_adapter_state(m))
    for name in states[0]:
        assert torch.equal(states[0][name].A, states[1][name].A)
