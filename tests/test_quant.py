"""Quantized bases: storage per format, layouts, QuantLinear, exact side terms, model conversion."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fedlora.adapters import AdapterError, LoRALinear, adapter_modules, inject_adapters
from fedlora.config import AdapterConfig, QuantConfig
from fedlora.quant import (
    FORMATS,
    Int8Weight,
    IntKWeight,
    NF4Weight,
    QuantError,
    QuantLinear,
    quant_layers,
    quantize_model,
    quantized_state,
)
from fedlora.quant.intk import pack_plane, unpack_plane
from fedlora.quant.nf4 import NF4_LEVELS, dynamic_map

TARGETS = AdapterConfig().target_modules


def _w(d_out: int, d_in: int, seed: int = 0) -> torch.Tensor:
    return 0.02 * torch.randn(d_out, d_in, generator=torch.Generator().manual_seed(seed))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach() - b.detach()).norm() / b.detach().norm())


# --- storage and accuracy per format -----------------------------------------------------------


@pytest.mark.parametrize(
    "make, target, max_error",
    [
        (lambda w: NF4Weight.quantize(w), 0.516, 0.10),  # docs/quantization.md targets (bytes/param)
        (lambda w: NF4Weight.quantize(w, double_quant=False), 0.5625, 0.10),
        (lambda w: IntKWeight.quantize(w, bits=4, group_size=128), 0.531, 0.11),
        (lambda w: IntKWeight.quantize(w, bits=3, group_size=64), 0.44, 0.20),
        (lambda w: IntKWeight.quantize(w, bits=2, group_size=64), 0.32, 0.40),
        (lambda w: Int8Weight.quantize(w), 1.004, 0.01),
    ],
    ids=["nf4-dq", "nf4", "int4-g128", "int3-g64", "int2-g64", "int8"],
)
def test_storage_meets_the_bytes_per_parameter_targets(make, target, max_error):
    w = _w(512, 1024)
    q = make(w)
    assert q.bytes_per_param <= target
    assert _rel(q.dequantize(), w) <= max_error
    assert all(t.dtype != torch.float32 or t.numel() <= w.numel() // 64 for t in q.tensors().values())


def test_nf4_layout_high_nibble_first_flat_blocks_exact_levels():
    # Prepare: rows of 40 values, so 64-value blocks straddle rows; every value an exact level·absmax.
    levels = torch.tensor(NF4_LEVELS)
    idx = torch.arange(3 * 40) % 16
    w = (levels[idx] * 0.5).view(3, 40)
    # Execute
    q = NF4Weight.quantize(w, double_quant=False)
    # Assert
    assert q.codes[0].item() == (idx[0] << 4 | idx[1]).item()  # first value in the high nibble
    assert q.absmax.tolist() == [0.5, 0.5]  # ⌈120 / 64⌉ blocks over the flattened matrix
    assert torch.equal(q.dequantize(), w)


def test_int_planes_round_trip_and_int3_uses_two_planes():
    vals = torch.randint(0, 8, (5, 64), dtype=torch.uint8)
    for bits in (1, 2, 4):
        v = vals & ((1 << bits) - 1)
        assert torch.equal(unpack_plane(pack_plane(v, bits), bits), v)
    q = IntKWeight.quantize(_w(8, 64), bits=3, group_size=32)
    assert q.plane0.shape == (8, 16) and q.plane1.shape == (8, 8)
    assert int(q.codes().max()) <= 7


def test_group_size_that_does_not_divide_a_layer_is_a_clear_error():
    with pytest.raises(QuantError, match="group_size=64 does not divide .* d_in=96"):
        IntKWeight.quantize(_w(8, 96), bits=4, group_size=64)
    # NF4 blocks are flat, so the same shape works (the last block is zero-padded)
    assert NF4Weight.quantize(_w(8, 96)).dequantize().shape == (8, 96)


# --- bitsandbytes interoperability -------------------------------------------------------------


def test_nf4_interoperates_with_bitsandbytes():
    """Same layout: a checkpoint made by either library dequantises bit-identically in the other.

    The quantizers themselves differ only in how a value halfway-ish between two levels is
    rounded: ours takes the nearest level; bitsandbytes' binary search sometimes takes the
    other neighbour (≈0.1 % of the double-quantised absmax codes, by ≤ 1 step)."""
    bnb_f = pytest.importorskip("bitsandbytes.functional")
    w = _w(96, 200, seed=3)  # 19,200 values: 300 blocks, two 256-blocks of absmax
    for dq in (True, False):
        ours = NF4Weight.quantize(w, double_quant=dq)
        codes, st = bnb_f.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=dq)
        assert torch.equal(st.code, torch.tensor(NF4_LEVELS))
        assert torch.equal(codes.flatten(), ours.codes)  # same nibble order, same flat blocks
        if dq:
            assert torch.equal(st.state2.code, dynamic_map())
            assert torch.equal(st.state2.absmax, ours.absmax_scale)
            assert torch.equal(st.offset.reshape(1), ours.absmax_offset)
            assert (st.absmax.int() - ours.absmax.int()).abs().max() <= 1
            assert (st.absmax != ours.absmax).float().mean() < 0.01
        else:
            assert torch.equal(st.absmax, ours.absmax)
        # bitsandbytes' checkpoint, read by fedlora
        theirs = ours.with_tensors(
            {"codes": codes.flatten(), "absmax": st.absmax}
            | ({"absmax_scale": st.state2.absmax, "absmax_offset": st.offset.reshape(1)} if dq else {})
        )
        assert torch.equal(theirs.dequantize(), bnb_f.dequantize_4bit(codes, st))
        # fedlora's checkpoint, read by bitsandbytes
        st.absmax = ours.absmax
        if dq:
            st.state2.absmax, st.offset = ours.absmax_scale, ours.absmax_offset[0]
        assert torch.equal(bnb_f.dequantize_4bit(ours.codes.view(-1, 1), st), ours.dequantize())


# --- QuantLinear and the exact side term -------------------------------------------------------


def _layer(fmt: str = "nf4", d_out: int = 48, d_in: int = 64, max_rank: int = 8, policy: str = "svd") -> QuantLinear:
    cfg = QuantConfig(format=fmt, group_size=32, side_term_max_rank=max_rank, side_term_policy=policy)
    linear = torch.nn.Linear(d_in, d_out, bias=True)
    with torch.no_grad():
        linear.weight.copy_(_w(d_out, d_in, seed=5))
    return QuantLinear.from_linear(linear, cfg)


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_quant_linear_forward_is_x_times_dequantized_weight(fmt):
    layer = _layer(fmt)
    x = torch.randn(2, 7, 64)
    expected = F.linear(x, layer.dequantize(), layer.bias)
    assert _rel(layer(x), expected) < 1e-6
    assert list(layer.parameters()) == []  # nothing trainable, nothing full precision
    assert not any(t.dtype == torch.float32 and t.numel() >= 48 * 64 for t in layer.buffers())


def test_side_terms_append_exactly():
    layer = _layer(max_rank=8)
    terms = [(torch.randn(48, 3), torch.randn(3, 64)), (torch.randn(48, 4), torch.randn(4, 64))]
    for B, A in terms:
        report = layer.add_side_term(B, A)
        assert report["policy"] == "append" and report["error_fro"] == 0.0
    expected = layer.dequantize() + sum(B @ A for B, A in terms)
    x = torch.randn(5, 64)
    assert layer.side_rank == 7
    assert _rel(layer.effective_weight(), expected) < 1e-6
    assert _rel(layer(x), F.linear(x, expected, layer.bias)) < 1e-5


def test_svd_policy_truncates_and_reports_the_dropped_energy():
    # Prepare: rank 6 + rank 5 exceeds the max rank 8
    layer = _layer(max_rank=8, policy="svd")
    B1, A1, B2, A2 = torch.randn(48, 6), torch.randn(6, 64), torch.randn(48, 5), torch.randn(5, 64)
    layer.add_side_term(B1, A1)
    intended = (B1 @ A1 + B2 @ A2).double()
    # Execute
    report = layer.add_side_term(B2, A2)
    # Assert: 8 kept, and the dropped energy is that of the 3 smallest singular values
    s = torch.linalg.svdvals(intended)
    assert report["policy"] == "svd" and layer.side_rank == 8
    assert report["dropped_energy"] == pytest.approx(float((s[8:] ** 2).sum()), rel=1e-6)
    actual = (layer.side_B @ layer.side_A).double()
    assert float((actual - intended).norm()) == pytest.approx(report["error_fro"], rel=1e-4)
    assert report["relative_error"] == pytest.approx(report["error_fro"] / float(intended.norm()), rel=1e-6)
    with pytest.raises(QuantError, match="exceeds quant.side_term_max_rank=8"):
        layer.add_side_term(B2, A2, exact=True)


def test_requantize_policy_folds_the_side_term_and_reports_its_error():
    layer = _layer("int4", max_rank=4, policy="requantize")
    B, A = 0.01 * torch.randn(48, 6), torch.randn(6, 64)
    intended = layer.dequantize() + B @ A
    report = layer.add_side_term(B, A)
    assert report["policy"] == "requantize" and layer.side_rank == 2  # max_rank / 2 compensation
    err = float((layer.effective_weight() - intended).norm())
    assert err == pytest.approx(report["error_fro"], rel=1e-3)
    # compensation helps: less error than requantizing alone
    from fedlora.quant import quantize_weight

    plain = float((quantize_weight(intended, layer.cfg).dequantize() - intended).norm())
    assert report["error_fro"] < plain


def test_state_dict_round_trip_keeps_codes_and_side_term():
    layer = _layer()
    layer.add_side_term(torch.randn(48, 3), torch.randn(3, 64))
    fresh = _layer()  # same shapes, no side term
    fresh.load_state_dict(layer.state_dict())
    x = torch.randn(4, 64)
    assert torch.equal(fresh(x), layer(x))
    assert fresh.side_rank == 3


# --- LoRA over a quantized base ----------------------------------------------------------------


def test_fused_adapter_path_matches_unfused_and_trains_only_the_adapter():
    torch.manual_seed(0)
    layer = _layer()
    layer.add_side_term(torch.randn(48, 2), torch.randn(2, 64))  # side term rides along
    adapter = LoRALinear(layer, rank=4, alpha=8.0)
    with torch.no_grad():
        adapter.lora_B.normal_()
    x = torch.randn(3, 5, 64)
    assert adapter._fused_base()
    y = adapter(x)
    expected = layer(x) + adapter.lora_forward(x)
    assert _rel(y, expected) < 1e-5
    gA, gB = torch.autograd.grad(y.square().sum(), (adapter.lora_A, adapter.lora_B))
    eA, eB = torch.autograd.grad(expected.square().sum(), (adapter.lora_A, adapter.lora_B))
    assert _rel(gA, eA) < 1e-4 and _rel(gB, eB) < 1e-4


def test_merge_goes_through_the_side_term_and_unmerges_exactly():
    layer = _layer(max_rank=8)
    adapter = LoRALinear(layer, rank=4, alpha=8.0)
    with torch.no_grad():
        adapter.lora_B.normal_()
    x = torch.randn(6, 64)
    before = adapter(x)
    adapter.merge()
    assert layer.side_rank == 4
    assert _rel(adapter(x), before) < 1e-5
    adapter.unmerge()
    assert layer.side_rank == 0 and _rel(adapter(x), before) < 1e-6
    small = LoRALinear(_layer(max_rank=2), rank=4, alpha=8.0)
    with pytest.raises(QuantError, match="side_term_max_rank=2"):
        small.merge()  # never a silent rounding into the codes


# --- whole models -------------------------------------------------------------------------------


def test_quantize_model_report_and_in_place_replacement(tiny_model):
    cfg = QuantConfig(format="nf4")
    report = quantize_model(tiny_model, cfg, TARGETS)
    layers = quant_layers(tiny_model)
    assert report["layers"] == len(layers) == 14  # 2 blocks × 7 projections
    assert report["per_format"] == {"nf4": 14}
    assert report["quantized_bytes"] == sum(m.nbytes for m in layers.values())
    assert report["dense_bytes"] == 4 * report["quantized_params"]
    assert report["base_bytes_before"] - report["base_bytes_after"] > 0.8 * report["dense_bytes"]
    assert report["bytes_per_param"] < 0.53
    assert isinstance(tiny_model.lm_head, torch.nn.Linear)  # the head is never quantized


def test_all_linear_targets_and_none_format(tiny_model):
    assert quantize_model(tiny_model, QuantConfig(format="none"), TARGETS)["layers"] == 0
    report = quantize_model(tiny_model, QuantConfig(format="int8", targets="all_linear"), ["nothing"])
    assert report["layers"] == 14 and isinstance(tiny_model.lm_head, torch.nn.Linear)


def test_bad_group_size_leaves_the_model_untouched(tiny_model):
    # tiny model: hidden 64, MLP 160; group 128 divides neither d_in
    with pytest.raises(QuantError, match="group_size=128 does not divide"):
        quantize_model(tiny_model, QuantConfig(format="int4", group_size=128), TARGETS)
    assert quant_layers(tiny_model) == {}


@pytest.mark.parametrize("order", ["quantize_first", "inject_first"])
def test_training_step_over_a_quantized_model(tiny_model, order):
    acfg = AdapterConfig(rank=4)
    if order == "quantize_first":
        quantize_model(tiny_model, QuantConfig(format="int4", group_size=32), TARGETS)
        inject_adapters(tiny_model, acfg, LoRALinear)
    else:
        inject_adapters(tiny_model, acfg, LoRALinear)
        quantize_model(tiny_model, QuantConfig(format="int4", group_size=32), TARGETS)
    assert all(isinstance(m.base, QuantLinear) for m in adapter_modules(tiny_model).values())
    params = [p for p in tiny_model.parameters() if p.requires_grad]
    assert len(params) == 28 and all("lora_" in n for n, p in tiny_model.named_parameters() if p.requires_grad)
    opt = torch.optim.SGD(params, lr=0.5)
    ids = torch.randint(4, 90, (2, 16), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(3):
        loss = tiny_model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < losses[0]


def test_clients_load_the_servers_quantized_state(tiny_model, tokenizer):
    from fedlora.model.tiny import build_tiny_model

    cfg = QuantConfig(format="nf4")
    quantize_model(tiny_model, cfg, TARGETS)
    next(iter(quant_layers(tiny_model).values())).add_side_term(torch.randn(64, 2), torch.randn(2, 64))
    state = quantized_state(tiny_model)
    client = build_tiny_model(len(tokenizer), seed=1)  # different weights: everything must come from state
    quantize_model(client, cfg, TARGETS, state=state)
    for (name, a), (_, b) in zip(sorted(quant_layers(tiny_model).items()), sorted(quant_layers(client).items())):
        assert torch.equal(a.effective_weight(), b.effective_weight()), name


def test_merge_of_lora_sb_into_quantized_base_is_refused():
    from fedlora.adapters.sb import SBLinear

    sb = SBLinear(_layer(), rank=4, alpha=8.0, generator=torch.Generator().manual_seed(0))
    assert not sb._fused_base()
    with pytest.raises(AdapterError, match="cannot merge into a quantized base"):
        sb.merge()
