"""int8 with one symmetric scale per output channel (LLM.int8()-style storage without the outlier
split; Dettmers et al., 2022, arXiv:2208.07339).

    q[n, k] = round(w[n, k] / s[n]) ∈ [-127, 127],   s[n] = max_k |w[n, k]| / 127
    deq(W)[n, k] = q[n, k] · s[n]                      (one fp32 product)

Storage: 1 byte per value + one fp32 scale per row (1 + 4/d_in ≈ 1.006 B/param at d_in = 640).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedlora.quant.weight import QuantizedWeight

QMAX = 127
CHUNK_VALUES = 1 << 22
"""Values quantised at a time (16 MiB of fp32)."""


@dataclass(frozen=True)
class Int8Weight(QuantizedWeight):
    codes: torch.Tensor
    """int8 (d_out, d_in)."""
    scale: torch.Tensor
    """fp32 (d_out,): one scale per output channel."""

    kind = "int8"

    @classmethod
    def quantize(cls, w: torch.Tensor) -> Int8Weight:
        """fp32 (d_out, d_in) → int8; rows are independent, so they are done about
        :data:`CHUNK_VALUES` values at a time (small temporaries for a large layer)."""
        w = w.detach().float()
        codes = torch.empty(w.shape, dtype=torch.int8, device=w.device)
        scale = torch.empty(w.shape[0], dtype=torch.float32, device=w.device)
        step = max(CHUNK_VALUES // max(int(w.shape[1]), 1), 1)
        for i in range(0, w.shape[0], step):
            part = w[i : i + step]
            absmax = part.abs().amax(dim=1)  # (rows,)
            s = torch.where(absmax > 0, absmax / QMAX, torch.ones_like(absmax))
            codes[i : i + step] = torch.round(part / s[:, None]).clamp_(-QMAX, QMAX).to(torch.int8)
            scale[i : i + step] = s
        return cls((int(w.shape[0]), int(w.shape[1])), codes, scale)

    def dequantize(self) -> torch.Tensor:
        return self.codes.float() * self.scale[:, None]
