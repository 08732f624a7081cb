"""Exact low-rank terms folded into a frozen base weight: W_eff = W + Σ_k B_k·A_k.

FedEx-LoRA residuals and FLoRA stacks live here. On a dense base (``nn.Linear``, or a ``Conv1D``
whose transposed storage :func:`fedlora.linear_layout.weight_view` hides) they are added to the weight in
fp32 (a bf16 base would round small terms away, so the sum is formed in fp32 and cast once). A
quantized base cannot absorb them without requantising, so they go to its full-precision low-rank
side term (:meth:`fedlora.quant.QuantLinear.add_side_term`, with the documented policy when its
rank grows); the returned reports say what, if anything, that policy dropped.
"""

from __future__ import annotations

import torch
from torch import nn

from fedlora.adapters.inject import adapter_modules
from fedlora.adapters.lora import AdapterError
from fedlora.adapters.state import LoraFactors
from fedlora.linear_layout import weight_view


@torch.no_grad()
def apply_base_terms(model: nn.Module, terms: dict[str, list[LoraFactors]]) -> list[dict]:
    """Add every term's s·B·A to the base weight of the adapter layer it names; returns the side-term
    reports of quantized layers (empty on a dense base)."""
    modules = adapter_modules(model)
    unknown = sorted(set(terms) - set(modules))
    if unknown:
        raise AdapterError(f"base terms name layers this model does not adapt: {unknown[:3]}")
    reports = []
    for name, layer_terms in terms.items():
        if not layer_terms:
            continue
        base = modules[name].base
        if hasattr(base, "add_side_term"):  # quantized: keep the terms exact beside the codes
            for t in layer_terms:  # a DenseTerm answers B = its weight, A = identity
                b, a = (t.scale * t.B.float()).to(base.side_B.device), t.A.float().to(base.side_A.device)
                reports.append({"layer": name, **base.add_side_term(b, a)})
            continue
        w = weight_view(base)  # (d_out, d_in); a Conv1D base's transposed view writes through
        total = w.float()
        for t in layer_terms:
            total = total + t.delta(torch.float32).to(w.device)
        w.copy_(total.to(w.dtype))
    return reports
