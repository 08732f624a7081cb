"""The dense linear layers fedlora adapts, and the one place their weight layout is read.

Two kinds of frozen dense layer compute y = x·Wᵀ + b with W of shape (d_out, d_in):

- ``torch.nn.Linear`` stores ``weight`` as (d_out, d_in);
- ``transformers.pytorch_utils.Conv1D`` (GPT-2, GPT-J-style OpenAI GPT models) stores it
  transposed, as (d_in, d_out), and computes y = x·weight + b.

Everything that reads or writes a base weight as a matrix (the adapter's merge, the exact base
terms of FedEx-LoRA and FLoRA, quantization, LoftQ, the dense gradients of Fed-SB's init) goes
through :func:`weight_view`, which always gives (d_out, d_in) — for ``Conv1D`` a transposed *view*
of the same storage, so an in-place ``copy_`` into it updates the layer. Sizes come from
:func:`features`. A layer's forward is never touched: the adapter calls ``base(x)`` as it is.

This module imports nothing from fedlora, so the math packages (adapters, quant) and the layers
above them can all use it.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

DENSE_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, Conv1D)
"""Dense frozen layers an adapter can wrap and quantization can replace."""


def is_transposed(layer: nn.Module) -> bool:
    """True when ``layer`` stores its weight as (d_in, d_out) (``Conv1D``)."""
    return isinstance(layer, Conv1D)


def features(layer: nn.Module) -> tuple[int, int]:
    """``(d_in, d_out)`` of a dense layer (``nn.Linear``, ``Conv1D``) or of any module with
    ``in_features``/``out_features`` (a ``QuantLinear``, an adapter). Raises ``TypeError`` for a
    module that has neither."""
    if isinstance(layer, Conv1D):
        d_in, d_out = layer.weight.shape
        return int(d_in), int(d_out)
    if hasattr(layer, "in_features") and hasattr(layer, "out_features"):
        return int(layer.in_features), int(layer.out_features)
    raise TypeError(f"{type(layer).__name__} is not a linear layer (no in_features/out_features)")


def weight_view(layer: nn.Module) -> torch.Tensor:
    """The layer's weight as a (d_out, d_in) tensor sharing its storage (``Conv1D``: the transpose
    view, not contiguous), so ``weight_view(layer).copy_(w)`` writes the layer's weight."""
    return as_out_in(layer, layer.weight)


def as_out_in(layer: nn.Module, t: torch.Tensor) -> torch.Tensor:
    """``t``, a tensor in the layout of ``layer.weight`` (the weight itself, its gradient), as
    (d_out, d_in): transposed for ``Conv1D``, unchanged otherwise."""
    return t.t() if isinstance(layer, Conv1D) else t
