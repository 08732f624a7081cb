"""Compressed adapter payloads: bytes equal the formula, round-trip errors per scheme, and what
compression does to a round's agg_error."""

from __future__ import annotations

import pytest
import torch

from fedlora.adapters import LoraFactors
from fedlora.adapters.state import state_nbytes
from fedlora.aggregation import GlobalState, fedex
from fedlora.protocol.compression import (
    SCHEMES,
    CompressionError,
    agg_error_effect,
    compress_state,
    compress_tensor,
    decompress_tensor,
    expected_nbytes,
    nbytes,
    relative_error,
    roundtrip,
)

SHAPES = {"q": (64, 40), "k": (16, 40), "down": (40, 128), "odd": (7, 13)}  # (d_out, d_in)
RANK = 8
# Measured on these Gaussian factors (see test output of the error test): comfortably below, and far
# above zero so a scheme that silently returns fp32 would be caught.
MAX_REL_ERROR = {"none": 0.0, "fp16": 1e-3, "bf16": 1e-2, "int8": 1e-2}
MIN_REL_ERROR = {"none": 0.0, "fp16": 1e-5, "bf16": 1e-4, "int8": 1e-4}


def gaussian_state(seed: int = 0, rank: int = RANK) -> dict[str, LoraFactors]:
    g = torch.Generator().manual_seed(seed)
    return {n: LoraFactors(torch.randn(rank, d_in, generator=g) / d_in**0.5, torch.randn(d_out, rank, generator=g) * 0.01,
                           2.0) for n, (d_out, d_in) in SHAPES.items()}


@pytest.mark.parametrize("scheme", SCHEMES)
def test_bytes_equal_the_formula(scheme):
    # Prepare
    state = gaussian_state()
    numel = sum(f.A.numel() + f.B.numel() for f in state.values())
    formula = {"none": 4 * numel, "fp16": 2 * numel, "bf16": 2 * numel,
               "int8": numel + sum(4 * RANK + 4 * RANK for _ in state)}[scheme]
    # Execute
    measured = nbytes(compress_state(state, scheme))
    # Assert
    assert measured == formula == expected_nbytes(state, scheme)
    if scheme == "none":
        assert measured == state_nbytes(state)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_round_trip_error_per_scheme(scheme):
    state = gaussian_state()
    err = relative_error(state, roundtrip(state, scheme))
    print(f"{scheme}: relative round-trip error {err:.3e}")
    assert MIN_REL_ERROR[scheme] <= err <= MAX_REL_ERROR[scheme]
    if scheme == "none":
        back = roundtrip(state, scheme).values()
        assert all(torch.equal(f.A, g.A) and torch.equal(f.B, g.B) for f, g in zip(state.values(), back))


def test_int8_scales_lie_along_the_rank_axis():
    # Prepare: A (r, d_in) with an all-zero row; B (d_out, r)
    g = torch.Generator().manual_seed(1)
    A, B = torch.randn(4, 9, generator=g), torch.randn(11, 4, generator=g)
    A[2] = 0.0
    # Execute
    cA, cB = compress_tensor(A, "int8", scale_dim=0), compress_tensor(B, "int8", scale_dim=1)
    # Assert: one scale per rank component on both sides, the absmax element maps to ±127
    assert cA.scales.shape == (4,) and cB.scales.shape == (4,)
    torch.testing.assert_close(cA.scales, A.abs().amax(dim=1) / 127, rtol=0, atol=0)
    torch.testing.assert_close(cB.scales, B.abs().amax(dim=0) / 127, rtol=0, atol=0)
    assert cA.data.abs().amax(dim=1).tolist() == [127, 127, 0, 127]
    assert cB.data.abs().amax(dim=0).tolist() == [127] * 4
    back = decompress_tensor(cA)
    assert torch.equal(back[2], torch.zeros(9))
    # each element within half a quantisation step of its row's scale
    assert bool(((back - A).abs() <= cA.scales.unsqueeze(1) / 2 + 1e-7).all())


def test_fp16_overflow_and_non_finite_values_are_refused():
    with pytest.raises(CompressionError, match="overflows fp16"):
        compress_tensor(torch.tensor([[1e5]]), "fp16")
    assert decompress_tensor(compress_tensor(torch.tensor([[1e5]]), "bf16")).item() == pytest.approx(1e5, rel=1e-2)
    with pytest.raises(CompressionError, match="non-finite"):
        compress_tensor(torch.tensor([[float("nan")]]), "int8")
    with pytest.raises(CompressionError, match="unknown"):
        compress_tensor(torch.ones(1, 1), "int4")


def client_updates(n: int = 4) -> list[dict[str, LoraFactors]]:
    """Clients that started from one global adapter and drifted apart (FedAvg is then inexact)."""
    start = gaussian_state(seed=10)
    g = torch.Generator().manual_seed(11)
    return [{name: LoraFactors(f.A + 0.3 * torch.randn(f.A.shape, generator=g) / f.A.shape[1] ** 0.5,
                               f.B + 0.003 * torch.randn(f.B.shape, generator=g), f.scale)
             for name, f in start.items()} for _ in range(n)]


@pytest.mark.parametrize("scheme", SCHEMES)
def test_agg_error_effect_fedavg(scheme):
    # Execute
    r = agg_error_effect(client_updates(), [1, 2, 3, 4], scheme)
    print(r)
    # Assert: FedAvg's own error is unchanged by "none"; compression adds at most a few times the
    # round-trip error of the factors (errors of A and B add up in B·A, uplink and downlink add up)
    assert r["agg_error_fp32"] > 1e-2
    if scheme == "none":
        assert r["agg_error_up"] == r["agg_error_fp32"] == r["agg_error_up_down"]
    assert abs(r["agg_error_up"] - r["agg_error_fp32"]) <= 3 * r["update_rel_error"]
    assert abs(r["agg_error_up_down"] - r["agg_error_fp32"]) <= 6 * r["update_rel_error"]
    assert r["bytes"] == expected_nbytes(client_updates()[0], scheme)


@pytest.mark.parametrize("scheme", ["fp16", "bf16", "int8"])
def test_agg_error_effect_exact_method_shows_the_compression_error_alone(scheme):
    # FedEx-LoRA is exact on fp32 updates, so its compressed agg_error is compression's own cost.
    r = agg_error_effect(client_updates(), [1, 1, 1, 1], scheme, aggregate=fedex.aggregate, state=GlobalState(adapter={}))
    print(r)
    assert r["agg_error_fp32"] < 1e-6
    assert 0.1 * r["update_rel_error"] <= r["agg_error_up"] <= 3 * r["update_rel_error"]
    assert r["agg_error_up_down"] >= r["agg_error_up"] * 0.5
