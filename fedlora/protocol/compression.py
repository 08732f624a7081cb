"""Compressed adapter payloads: fp16, bf16 and int8 with absmax scales along the rank axis.

An fp32 LoRA layer costs 4·r·(d_in + d_out) bytes. The schemes here trade exactness for bytes:

    scheme  bytes per factor (numel elements, rank r)   round-trip error on Gaussian factors
    none    4·numel                                      0 (bit-exact)
    fp16    2·numel                                      ≈ 2⁻¹¹ relative (10-bit mantissa)
    bf16    2·numel                                      ≈ 2⁻⁸ relative (7-bit mantissa, fp32 range)
    int8    numel + 4·r                                  ≈ absmax/127/√12 per element

int8 axis. One fp32 scale per rank component, i.e. per row of A (r, d_in) and per *column* of
B (d_out, r) — per row of Bᵀ. A rank-1 component b_k·a_kᵀ of the update then has one scale on each
side. Per-row scales on B would cost 4·d_out extra bytes (50 % of the int8 data of a rank-8 B);
along the rank axis the scales cost 4·r per factor, negligible. Value = q · scale, scale =
max|slice| / 127, q = round(value / scale) ∈ [−127, 127]; an all-zero slice gets scale 0.

The per-layer LoRA scale s stays a float. :func:`agg_error_effect` measures what compressing the
client updates (uplink) and the broadcast global adapter (downlink) does to a round's agg_error.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch

from fedlora.adapters.state import AdapterState, LoraFactors, state_nbytes
from fedlora.aggregation import fedavg
from fedlora.aggregation.common import GlobalState, aggregation_error, ideal_update, round_update

SCHEMES = ("none", "fp16", "bf16", "int8")
_FP16_MAX = float(torch.finfo(torch.float16).max)


class CompressionError(ValueError):
    """A tensor cannot be compressed (or decompressed) as asked."""


class CompressedTensor(NamedTuple):
    """A float32 tensor in compressed form: ``data`` (float32/float16/bfloat16/int8, the original
    shape) and, for int8, one fp32 ``scales`` entry per slice along ``scale_dim``."""

    scheme: str
    data: torch.Tensor
    scales: torch.Tensor | None = None
    scale_dim: int = 0

    @property
    def nbytes(self) -> int:
        """Payload bytes: the data plus the int8 scales."""
        extra = 0 if self.scales is None else 4 * self.scales.numel()
        return self.data.numel() * self.data.element_size() + extra


class CompressedFactors(NamedTuple):
    A: CompressedTensor  # (r, d_in), int8 scales per row
    B: CompressedTensor  # (d_out, r), int8 scales per column
    scale: float


CompressedState = dict[str, CompressedFactors]


def check_scheme(scheme: str) -> str:
    if scheme not in SCHEMES:
        raise CompressionError(f"compression {scheme!r} is unknown; use one of {', '.join(SCHEMES)}")
    return scheme


def compress_tensor(x: torch.Tensor, scheme: str, scale_dim: int = 0) -> CompressedTensor:
    """Compress a 2-d tensor (any float dtype, read as fp32)."""
    check_scheme(scheme)
    x = x.detach().to("cpu", torch.float32)
    if not torch.isfinite(x).all():
        raise CompressionError("cannot compress a tensor with non-finite values")
    if scheme == "none":
        return CompressedTensor(scheme, x.contiguous())
    if scheme == "fp16":
        peak = float(x.abs().max()) if x.numel() else 0.0
        if peak > _FP16_MAX:
            raise CompressionError(f"|value| {peak:.3g} overflows fp16 (max {_FP16_MAX:.0f}); use bf16 or int8")
        return CompressedTensor(scheme, x.to(torch.float16))
    if scheme == "bf16":
        return CompressedTensor(scheme, x.to(torch.bfloat16))
    if x.ndim != 2 or scale_dim not in (0, 1):
        raise CompressionError(f"int8 needs a 2-d tensor and scale_dim 0 or 1; got shape {tuple(x.shape)}, {scale_dim}")
    keep = 1 - scale_dim  # reduce over the other dim: scale_dim 0 → one scale per row
    scales = x.abs().amax(dim=keep) / 127.0 if x.numel() else torch.zeros(x.shape[scale_dim])
    divisor = torch.where(scales > 0, scales, torch.ones_like(scales)).unsqueeze(keep)  # (r, 1) or (1, r)
    q = torch.round(x / divisor).clamp_(-127, 127).to(torch.int8)
    return CompressedTensor(scheme, q, scales.to(torch.float32).contiguous(), scale_dim)


def decompress_tensor(c: CompressedTensor) -> torch.Tensor:
    """The fp32 tensor ``c`` stands for."""
    check_scheme(c.scheme)
    if c.scheme != "int8":
        return c.data.to(torch.float32)
    if c.scales is None or c.scales.numel() != c.data.shape[c.scale_dim]:
        raise CompressionError(
            f"int8 tensor of shape {tuple(c.data.shape)} needs {c.data.shape[c.scale_dim]} scales along "
            f"dim {c.scale_dim}; got {None if c.scales is None else c.scales.numel()}"
        )
    return c.data.to(torch.float32) * c.scales.to(torch.float32).unsqueeze(1 - c.scale_dim)


def compress_factors(f: LoraFactors, scheme: str) -> CompressedFactors:
    """A with scales per row, B with scales per column: both along the rank axis."""
    return CompressedFactors(compress_tensor(f.A, scheme, 0), compress_tensor(f.B, scheme, 1), f.scale)


def decompress_factors(c: CompressedFactors) -> LoraFactors:
    return LoraFactors(decompress_tensor(c.A), decompress_tensor(c.B), c.scale)


def compress_state(state: AdapterState, scheme: str) -> CompressedState:
    return {name: compress_factors(f, scheme) for name, f in state.items()}


def decompress_state(compressed: CompressedState) -> AdapterState:
    return {name: decompress_factors(c) for name, c in compressed.items()}


def nbytes(compressed: CompressedState) -> int:
    """Payload bytes of the factors (data + int8 scales), comparable with ``state_nbytes``."""
    return sum(c.A.nbytes + c.B.nbytes for c in compressed.values())


def expected_nbytes(state: AdapterState, scheme: str) -> int:
    """The byte formula: 4·numel (none), 2·numel (fp16, bf16), numel + 4·r per factor (int8)."""
    check_scheme(scheme)
    numel = sum(f.A.numel() + f.B.numel() for f in state.values())
    if scheme == "none":
        return 4 * numel
    if scheme in ("fp16", "bf16"):
        return 2 * numel
    return numel + sum(4 * 2 * f.rank for f in state.values())


def roundtrip(state: AdapterState, scheme: str) -> AdapterState:
    """What a receiver reconstructs from ``state`` sent compressed."""
    return decompress_state(compress_state(state, scheme))


def relative_error(state: AdapterState, approx: AdapterState) -> float:
    """‖approx − state‖_F / ‖state‖_F over every factor of every layer (float64)."""
    num = den = 0.0
    for name, f in state.items():
        for x, y in ((f.A, approx[name].A), (f.B, approx[name].B)):
            x64 = x.to(torch.float64)
            num += float(((y.to(torch.float64) - x64) ** 2).sum())
            den += float((x64**2).sum())
    return (num / den) ** 0.5 if den > 0 else 0.0


Aggregate = Callable[[GlobalState, Sequence[AdapterState], Sequence[float]], GlobalState]


def agg_error_effect(
    updates: Sequence[AdapterState],
    weights: Sequence[float],
    scheme: str,
    aggregate: Aggregate = fedavg.METHOD.aggregate,
    state: GlobalState | None = None,
) -> dict[str, float | int | str]:
    """One round aggregated from exact and from compressed client updates, against the exact ΔW*.

    - ``agg_error_fp32``: the method's own error (fp32 updates);
    - ``agg_error_up``: client updates sent compressed (uplink), the global adapter exact;
    - ``agg_error_up_down``: also the new global adapter compressed when it is broadcast
      (base terms, which only the server holds, stay exact);
    - ``update_rel_error``: round-trip error of the client factors themselves;
    - ``bytes_fp32``/``bytes``: one client's payload, uncompressed and compressed.

    ΔW* is always Σ p_i·s_i·B_i·A_i of the *uncompressed* updates, so the deltas are what
    compression costs on top of the method.
    """
    check_scheme(scheme)
    state = state if state is not None else GlobalState(adapter={})
    ideal = ideal_update(updates, weights)
    exact = aggregate(state, updates, weights)
    received = [roundtrip(u, scheme) for u in updates]
    lossy = aggregate(state, received, weights)
    broadcast = GlobalState(roundtrip(lossy.adapter, scheme), lossy.base_terms, lossy.extras)
    return {
        "scheme": scheme,
        "bytes_fp32": state_nbytes(updates[0]),
        "bytes": nbytes(compress_state(updates[0], scheme)),
        "update_rel_error": max(relative_error(u, r) for u, r in zip(updates, received, strict=True)),
        "agg_error_fp32": aggregation_error(round_update(state, exact), ideal),
        "agg_error_up": aggregation_error(round_update(state, lossy), ideal),
        "agg_error_up_down": aggregation_error(round_update(state, broadcast), ideal),
    }
