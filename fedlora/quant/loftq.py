"""LoftQ initialisation: quantize W so that a rank-r adapter can cancel the quantization error
(Li, Yu, Liang, He, Karampatziakis, Chen & Zhao, 2023, arXiv:2310.08659).

Alternate, starting from B·A = 0:

    Q_t      = quant(W − s·B_t·A_t)
    s·B·A    = SVD_r(W − deq(Q_t))          (best rank-r fit of what Q_t misses)

so that deq(Q) + s·B·A ≈ W. The singular values are split evenly between the factors,
B = U_r·√Σ_r/√s and A = √Σ_r·V_rᵀ/√s, which keeps ‖A‖ and ‖B‖ of the same size for training.
With one iteration this is "quantize, then fit the residual"; more iterations let the codes move
to where the adapter helps most. Gains are small at 4 bits and large at 2–3 bits (Li et al.).

In a federation the server runs this once (:func:`fedlora.quant.quantize_model` with
``quant.init=loftq``) and ships Q and (A₀, B₀) to every client, so all start from the same model.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

from fedlora.quant.weight import QuantizedWeight


class LoftQResult(NamedTuple):
    qweight: QuantizedWeight
    A: torch.Tensor
    """(r, d_in) fp32."""
    B: torch.Tensor
    """(d_out, r) fp32."""
    error_quant: float
    """‖W − deq(quant(W))‖_F / ‖W‖_F: plain quantization (the first iteration's Q)."""
    error_loftq: float
    """‖W − deq(Q) − s·B·A‖_F / ‖W‖_F: what is left with the LoftQ initialisation."""


@torch.no_grad()
def loftq(
    weight: torch.Tensor,
    quantize: Callable[[torch.Tensor], QuantizedWeight],
    *,
    rank: int,
    scale: float,
    iters: int = 1,
) -> LoftQResult:
    """LoftQ for one (d_out, d_in) weight with a rank-``rank`` adapter of scale ``scale``."""
    if iters < 1:
        raise ValueError(f"quant.loftq_iters={iters} must be at least 1")
    w = weight.detach().float()
    norm = float(w.norm()) or 1.0
    low_rank = torch.zeros_like(w)  # s·B·A
    error_quant = None
    for _ in range(iters):
        qweight = quantize(w - low_rank)
        resid = w - qweight.dequantize()
        if error_quant is None:
            error_quant = float(resid.norm()) / norm
        u, s, vh = torch.linalg.svd(resid, full_matrices=False)
        u, s, vh = u[:, :rank], s[:rank], vh[:rank]
        low_rank = (u * s) @ vh
    root = (s / scale).sqrt()
    B = u * root  # (d_out, r)
    A = root[:, None] * vh  # (r, d_in)
    error_loftq = float((resid - scale * (B @ A)).norm()) / norm
    return LoftQResult(qweight, A.contiguous(), B.contiguous(), error_quant, error_loftq)
