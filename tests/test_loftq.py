"""LoftQ initialisation: the adapter starts by cancelling the quantization error."""

from __future__ import annotations

import pytest
import torch

from fedlora.adapters import LoRALinear, adapter_modules, get_adapter_state, inject_adapters, set_adapter_state
from fedlora.config import AdapterConfig, QuantConfig
from fedlora.quant import QuantError, loftq, quant_layers, quantize_model, quantize_weight, quantized_state

TARGETS = AdapterConfig().target_modules


def _weight(d_out: int = 96, d_in: int = 128, seed: int = 0) -> torch.Tensor:
    """A weight with a strong low-rank part plus noise, like trained projections."""
    g = torch.Generator().manual_seed(seed)
    low = torch.randn(d_out, 6, generator=g) @ torch.randn(6, d_in, generator=g)
    return 0.02 * (low / 3 + torch.randn(d_out, d_in, generator=g))


@pytest.mark.parametrize("fmt, min_gain", [("nf4", 0.05), ("int3", 0.08), ("int2", 0.10)])
def test_loftq_cancels_part_of_the_quantization_error(fmt, min_gain):
    # Prepare
    w = _weight()
    cfg = QuantConfig(format=fmt, group_size=64)
    # Execute
    res = loftq(w, lambda m: quantize_weight(m, cfg), rank=8, scale=2.0, iters=1)
    # Assert: the reported errors are the real ones, and LoftQ's is clearly lower
    approx = res.qweight.dequantize() + 2.0 * res.B @ res.A
    assert res.error_loftq == pytest.approx(float((w - approx).norm() / w.norm()), rel=1e-5)
    plain = quantize_weight(w, cfg).dequantize()
    assert res.error_quant == pytest.approx(float((w - plain).norm() / w.norm()), rel=1e-5)
    assert res.error_loftq < (1 - min_gain) * res.error_quant


def test_loftq_factors_are_the_best_rank_r_fit_split_evenly():
    w = _weight(seed=1)
    cfg = QuantConfig(format="int4", group_size=64)
    res = loftq(w, lambda m: quantize_weight(m, cfg), rank=4, scale=0.5, iters=1)
    resid = (w - res.qweight.dequantize()).double()
    u, s, vh = torch.linalg.svd(resid)
    best = (u[:, :4] * s[:4]) @ vh[:4]
    assert torch.allclose((0.5 * res.B @ res.A).double(), best, atol=1e-6)
    assert res.A.shape == (4, 128) and res.B.shape == (96, 4)
    assert float(res.A.norm()) == pytest.approx(float(res.B.norm()), rel=1e-4)  # √σ on each side


def test_more_iterations_do_not_lose_accuracy_at_2_bits():
    w = _weight(seed=2)
    cfg = QuantConfig(format="int2", group_size=64)
    errs = [loftq(w, lambda m: quantize_weight(m, cfg), rank=8, scale=1.0, iters=n).error_loftq for n in (1, 3)]
    assert errs[1] <= errs[0] * 1.01


def test_quantize_model_with_loftq_starts_closer_to_the_dense_model(tiny_model, tokenizer):
    from fedlora.model.tiny import build_tiny_model

    ids = torch.randint(4, 90, (2, 24), generator=torch.Generator().manual_seed(0))
    dense = tiny_model(ids).logits
    errors = {}
    for init in ("none", "loftq"):
        model = build_tiny_model(len(tokenizer), seed=0)
        inject_adapters(model, AdapterConfig(rank=8), LoRALinear)
        report = quantize_model(model, QuantConfig(format="int2", group_size=32, init=init, loftq_iters=2), TARGETS)
        with torch.no_grad():
            errors[init] = float((model(ids).logits - dense).norm() / dense.norm())
        if init == "loftq":
            assert report["loftq"]["error_loftq"] < report["loftq"]["error_quant"]
            assert all(float(m.lora_B.abs().max()) > 0 for m in adapter_modules(model).values())
    assert errors["loftq"] < 0.9 * errors["none"]


def test_loftq_needs_the_adapters_first(tiny_model):
    with pytest.raises(QuantError, match="call inject_adapters before quantize_model"):
        quantize_model(tiny_model, QuantConfig(format="nf4", init="loftq"), TARGETS)


def test_server_computes_loftq_once_and_clients_reproduce_its_model(tiny_model, tokenizer):
    from fedlora.model.tiny import build_tiny_model

    # Prepare: the server's model with LoftQ
    cfg = QuantConfig(format="int3", group_size=32, init="loftq")
    acfg = AdapterConfig(rank=4)
    inject_adapters(tiny_model, acfg, LoRALinear)
    quantize_model(tiny_model, cfg, TARGETS)
    shared_q, shared_adapter = quantized_state(tiny_model), get_adapter_state(tiny_model)
    # Execute: a client builds its model from what the server sends (no LoftQ of its own)
    client = build_tiny_model(len(tokenizer), seed=0)
    inject_adapters(client, acfg, LoRALinear)
    report = quantize_model(client, cfg, TARGETS, state=shared_q)
    set_adapter_state(client, shared_adapter)
    # Assert: identical model, bit for bit
    ids = torch.randint(4, 90, (2, 12), generator=torch.Generator().manual_seed(1))
    assert report["loftq"] is None
    assert len(quant_layers(client)) == 14
    assert torch.equal(client(ids).logits, tiny_model(ids).logits)
