"""int4 / int3 / int2 with group-wise asymmetric scales and bit packing.

Each row of W is cut into groups of ``group_size`` consecutive input features (the group size
must divide d_in; there is no padding). Per group, with b bits and qmax = 2^b − 1:

    s = fp16((hi − lo) / qmax),   z = clamp(round(−lo / s), 0, qmax)  (uint8)
    q = clamp(round(w / s) + z, 0, qmax)
    deq(W) = (q − z) · s            (q − z is an exact small integer: one fp32 rounding)

[lo, hi] is the group's [min, max] widened to contain 0 (so the integer zero point exists), then
shrunk by the clip ratio from ``CLIP_RATIOS`` that minimises the group's squared error — a cheap
search that matters at 2–3 bits, where min/max scaling wastes most of the few levels on outliers.

Codes are packed into bit planes of 4, 2 or 1 bits, least significant value first in each byte:
int4 = one 4-bit plane, int3 = a 2-bit plane (low bits) + a 1-bit plane (high bit), int2 = one
2-bit plane. A plane of p bits is a uint8 (d_out, d_in·p/8) tensor; value k of a row sits in byte
k // (8/p) at bit (k mod (8/p))·p. Planes keep every value inside one byte, so a kernel loads one
byte per plane per value and never straddles bytes.

Storage per parameter: b/8 + 3/group_size (fp16 scale + uint8 zero per group): int4 g128 0.523,
int4 g64 0.547, int3 g64 0.422, int2 g64 0.297.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from fedlora.quant.weight import QuantError, QuantizedWeight

PLANES: dict[int, tuple[int, ...]] = {4: (4,), 3: (2, 1), 2: (2,)}
"""Bit planes per width, low bits first."""
CLIP_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.55, 0.5)
FP16_MAX = 65504.0
CHUNK_VALUES = 1 << 22
"""Values quantised at a time (16 MiB of fp32): the clip search's temporaries stay small."""


def pack_plane(values: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 (N, K) values < 2^bits → uint8 (N, K·bits/8), least significant value first."""
    per_byte = 8 // bits
    v = values.view(values.shape[0], -1, per_byte).to(torch.int32)  # (N, K/per_byte, per_byte)
    shifts = torch.arange(per_byte, device=values.device, dtype=torch.int32) * bits
    return (v << shifts).sum(dim=-1).to(torch.uint8)


def unpack_plane(plane: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack_plane`: uint8 (N, K)."""
    per_byte = 8 // bits
    shifts = torch.arange(per_byte, device=plane.device, dtype=torch.uint8) * bits
    return ((plane[..., None] >> shifts) & ((1 << bits) - 1)).flatten(start_dim=1)


@dataclass(frozen=True)
class IntKWeight(QuantizedWeight):
    bits: int = 4
    group_size: int = 64
    plane0: torch.Tensor | None = None
    """uint8: the low 4 (int4) or 2 (int3, int2) bits of every code."""
    plane1: torch.Tensor | None = None
    """uint8: the high bit of every code (int3 only)."""
    scale: torch.Tensor | None = None
    """fp16 (d_out, d_in / group_size)."""
    zero: torch.Tensor | None = None
    """uint8 (d_out, d_in / group_size): integer zero points."""

    kind = "intk"

    @classmethod
    def quantize(cls, w: torch.Tensor, *, bits: int, group_size: int) -> IntKWeight:
        if bits not in PLANES:
            raise QuantError(f"int{bits} is not a supported width; use 4, 3 or 2 bits")
        d_out, d_in = int(w.shape[0]), int(w.shape[1])
        if d_in % group_size:
            raise QuantError(
                f"quant.group_size={group_size} does not divide this layer's d_in={d_in}; "
                f"choose a group size that divides {d_in} (e.g. {_divisor_hint(d_in)}) or use quant=nf4, "
                "whose flat blocks fit any shape"
            )
        w = w.detach().float()
        step = max(CHUNK_VALUES // d_in, 1)  # rows are independent: quantise a few at a time
        parts = [cls._quantize_rows(w[i : i + step], bits, group_size) for i in range(0, d_out, step)]
        if len(parts) == 1:
            return parts[0]
        cat = {name: torch.cat([getattr(p, name) for p in parts]) for name in ("plane0", "plane1", "scale", "zero")
               if getattr(parts[0], name) is not None}
        return replace(parts[0], shape=(d_out, d_in), **cat)

    @classmethod
    def _quantize_rows(cls, w: torch.Tensor, bits: int, group_size: int) -> IntKWeight:
        d_out, d_in = int(w.shape[0]), int(w.shape[1])
        qmax = (1 << bits) - 1
        g = w.view(d_out, d_in // group_size, group_size)  # (N, n_groups, G)
        lo0 = g.amin(dim=-1).clamp(max=0.0)
        hi0 = g.amax(dim=-1).clamp(min=0.0)
        best = None
        for ratio in CLIP_RATIOS:
            scale = _fp16_scale((hi0 - lo0) * ratio / qmax)
            zero = torch.round(-lo0 * ratio / scale).clamp(0, qmax)
            q = torch.clamp(torch.round(g / scale[..., None]) + zero[..., None], 0, qmax)
            err = (((q - zero[..., None]) * scale[..., None] - g) ** 2).sum(dim=-1)  # (N, n_groups)
            if best is None:
                best = [err, scale, zero, q]
            else:
                better = err < best[0]
                best[0] = torch.where(better, err, best[0])
                best[1] = torch.where(better, scale, best[1])
                best[2] = torch.where(better, zero, best[2])
                best[3] = torch.where(better[..., None], q, best[3])
        _, scale, zero, q = best
        q = q.to(torch.uint8).view(d_out, d_in)
        planes, offset = [], 0
        for p in PLANES[bits]:
            planes.append(pack_plane((q >> offset) & ((1 << p) - 1), p))
            offset += p
        return cls(
            (d_out, d_in), bits, group_size,
            planes[0], planes[1] if len(planes) > 1 else None,
            scale.to(torch.float16), zero.to(torch.uint8),
        )  # fmt: skip

    def codes(self) -> torch.Tensor:
        """The unpacked codes, uint8 (d_out, d_in)."""
        widths = PLANES[self.bits]
        q = unpack_plane(self.plane0, widths[0])
        if len(widths) > 1:
            q = q | (unpack_plane(self.plane1, widths[1]) << widths[0])
        return q

    def dequantize(self) -> torch.Tensor:
        d_out, d_in = self.shape
        q = self.codes().view(d_out, -1, self.group_size).float()  # (N, n_groups, G)
        centred = q - self.zero.float()[..., None]  # exact small integers
        return (centred * self.scale.float()[..., None]).view(d_out, d_in)


def _fp16_scale(scale: torch.Tensor) -> torch.Tensor:
    """Round scales to their stored fp16 value (so codes are chosen for the scale that is kept)."""
    if bool((scale > FP16_MAX).any()):
        raise QuantError(f"a group's range exceeds fp16 ({float(scale.max()):.3g}); this weight cannot be int-quantized")
    scale = scale.to(torch.float16).float()
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def _divisor_hint(d_in: int) -> str:
    fits = [g for g in (32, 64, 128, 256) if d_in % g == 0]
    return " or ".join(map(str, fits)) if fits else "none of 32/64/128/256 fits"
