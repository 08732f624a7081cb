"""NF4: 4-bit NormalFloat with block-wise absmax, optionally double-quantised (QLoRA; Dettmers,
Pagnoni, Holtzman & Zettlemoyer, 2023, arXiv:2305.14314).

Layout (the same as bitsandbytes' ``quantize_4bit(..., quant_type="nf4")``, so a checkpoint made by
one dequantises identically in the other; ``tests/test_quant.py`` checks it when bitsandbytes is
installed):

* the weight is flattened row-major and cut into blocks of 64 values (the last block is padded
  with zeros, so any shape works — blocks may straddle rows);
* each value becomes the index (0–15) of the nearest of the 16 NF4 levels times its block's
  absmax; two indices per byte, the first value in the **high** nibble;
* absmax (one per block) is stored either as fp32 (0.5625 B/param in all) or, with double
  quantisation, minus its mean (``absmax_offset``) as 8-bit codes of the signed dynamic map in
  blocks of 256 with one fp32 scale each (0.5 + 1/64 + 4/16384 ≈ 0.5159 B/param).

Dequantisation is two single-rounding products: ``absmax = dyn[q_a]·scale_b + offset`` then
``w = nf4[q]·absmax``, formed in that order in fp32 by the reference and the kernels alike.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fedlora.quant.weight import QuantizedWeight

BLOCK = 64
"""Values per absmax block (fixed by the format)."""
ABSMAX_BLOCK = 256
"""Absmax values per double-quantisation block."""

# The 16 NF4 levels: quantiles of N(0, 1) normalised to [-1, 1], with an exact zero (QLoRA,
# appendix E). They are the format's definition; fp32 values as written by every NF4 tool.
NF4_LEVELS = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044006, 0.5626170039176941, 0.7229568362236023, 1.0,
)  # fmt: skip


def nf4_table(device: torch.device | str = "cpu") -> torch.Tensor:
    """The 16 NF4 levels, fp32."""
    return torch.tensor(NF4_LEVELS, dtype=torch.float32, device=device)


def dynamic_map(device: torch.device | str = "cpu") -> torch.Tensor:
    """The signed 8-bit dynamic map that double quantisation uses (256 sorted fp32 values).

    Seven decades: for exponent i = 0..6 the midpoints of 2^i + 1 equal steps over [0.1, 1],
    times 10^(i-6), with both signs; plus 0 and 1. Built in fp32 (``torch.linspace``) so its values
    are bit-identical to bitsandbytes' ``create_dynamic_map(signed=True)``.
    """
    values: list[float] = []
    for i in range(7):
        edges = torch.linspace(0.1, 1.0, 2**i + 1)  # fp32, as the map is defined
        mids = (10.0 ** (i - 6)) * ((edges[:-1] + edges[1:]) / 2)
        values += mids.tolist() + (-mids).tolist()
    values += [0.0, 1.0]
    return torch.tensor(sorted(values), dtype=torch.float32, device=device)


def nearest_index(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Index of the nearest entry of the sorted ``table`` for each value of ``x`` (uint8)."""
    mids = (table[1:] + table[:-1]) / 2
    return torch.bucketize(x, mids).to(torch.uint8)


CHUNK_VALUES = 1 << 22
"""Values quantised at a time (16 MiB of fp32): the temporaries of a large layer stay this small."""


def _blocks(flat: torch.Tensor, size: int) -> torch.Tensor:
    """Zero-pad a 1-D tensor to a multiple of ``size`` and view it as (n_blocks, size) (a view
    without a copy when no padding is needed)."""
    pad = (-flat.numel()) % size
    return (F.pad(flat, (0, pad)) if pad else flat).view(-1, size)


def _blockwise_absmax_quant(x: torch.Tensor, table: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-wise absmax quantisation of 1-D ``x`` onto ``table``: (uint8 codes, fp32 absmax).
    Blocks are independent, so they are done :data:`CHUNK_VALUES` values at a time."""
    blocks = _blocks(x, size)  # (n_blocks, size)
    codes = torch.empty(blocks.shape, dtype=torch.uint8, device=x.device)
    absmax = torch.empty(blocks.shape[0], dtype=blocks.dtype, device=x.device)
    step = max(CHUNK_VALUES // size, 1)
    for i in range(0, blocks.shape[0], step):
        part = blocks[i : i + step]
        amax = part.abs().amax(dim=1)  # (step,)
        safe = torch.where(amax > 0, amax, torch.ones_like(amax))
        codes[i : i + step] = nearest_index(part / safe[:, None], table)
        absmax[i : i + step] = amax
    return codes.flatten()[: x.numel()], absmax


def pack_nibbles(idx: torch.Tensor) -> torch.Tensor:
    """uint8 indices 0..15 → bytes, first of each pair in the high nibble (odd length padded)."""
    if idx.numel() % 2:
        idx = torch.cat([idx, idx.new_zeros(1)])
    pairs = idx.view(-1, 2)
    return (pairs[:, 0] << 4) | pairs[:, 1]


def unpack_nibbles(codes: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_nibbles`: the first ``n`` indices (uint8)."""
    return torch.stack([codes >> 4, codes & 15], dim=1).flatten()[:n]


@dataclass(frozen=True)
class NF4Weight(QuantizedWeight):
    """A (d_out, d_in) matrix in NF4 (see the module docstring for the layout)."""

    codes: torch.Tensor
    """uint8 (⌈d_out·d_in/2⌉,): two 4-bit level indices per byte, high nibble first."""
    absmax: torch.Tensor
    """Per 64-value block: fp32, or uint8 dynamic-map codes when double-quantised."""
    absmax_scale: torch.Tensor | None = None
    """fp32 (⌈n_blocks/256⌉,): scale of each 256-block of absmax codes (double quant only)."""
    absmax_offset: torch.Tensor | None = None
    """fp32 (1,): the mean absmax subtracted before double quantisation (double quant only)."""

    kind = "nf4"

    @property
    def double_quant(self) -> bool:
        return self.absmax_scale is not None

    @classmethod
    def quantize(cls, w: torch.Tensor, *, double_quant: bool = True) -> NF4Weight:
        """fp32 (d_out, d_in) → NF4; the nearest level per value (ties to the lower level)."""
        shape = (int(w.shape[0]), int(w.shape[1]))
        flat = w.detach().float().flatten()
        idx, absmax = _blockwise_absmax_quant(flat, nf4_table(w.device), BLOCK)
        codes = pack_nibbles(idx)
        if not double_quant:
            return cls(shape, codes, absmax)
        offset = absmax.mean().reshape(1)
        q_absmax, scale = _blockwise_absmax_quant(absmax - offset, dynamic_map(w.device), ABSMAX_BLOCK)
        return cls(shape, codes, q_absmax, scale, offset)

    def absmax_fp32(self) -> torch.Tensor:
        """Per-block absmax in fp32 (decoded from the double-quantised codes if need be)."""
        if not self.double_quant:
            return self.absmax
        table = dynamic_map(self.absmax.device)
        scale = self.absmax_scale.repeat_interleave(ABSMAX_BLOCK)[: self.absmax.numel()]
        decoded = table[self.absmax.long()] * scale  # one rounding …
        return decoded + self.absmax_offset  # … then another: the kernels do the same two steps

    def dequantize(self) -> torch.Tensor:
        n = self.shape[0] * self.shape[1]
        levels = nf4_table(self.codes.device)[unpack_nibbles(self.codes, n).long()]  # (n,)
        absmax = self.absmax_fp32().repeat_interleave(BLOCK)[:n]
        return (levels * absmax).view(self.shape)  # the same single product as the kernels

    def tables(self, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        return {"levels": nf4_table(device), "absmax_levels": dynamic_map(device)}
