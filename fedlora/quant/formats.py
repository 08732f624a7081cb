"""The registry of quantized formats: ``quant.format`` → a function (fp32 weight, config) → packed.

An explicit dict, no import side effects. To add a format: a file with its ``QuantizedWeight`` dataclass
(quantize / dequantize / tensors), an entry here, a ``_deq_tile`` branch in
``kernels/quant_lora_triton.py`` (or none: the torch reference then runs it), and tests.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from fedlora.config import QuantConfig
from fedlora.quant.int8 import Int8Weight
from fedlora.quant.intk import IntKWeight, _divisor_hint
from fedlora.quant.nf4 import NF4Weight
from fedlora.quant.weight import QuantError, QuantizedWeight


def _nf4(w: torch.Tensor, cfg: QuantConfig) -> QuantizedWeight:
    return NF4Weight.quantize(w, double_quant=cfg.double_quant)


def _int8(w: torch.Tensor, cfg: QuantConfig) -> QuantizedWeight:
    return Int8Weight.quantize(w)


def _int4(w: torch.Tensor, cfg: QuantConfig) -> QuantizedWeight:
    return IntKWeight.quantize(w, bits=4, group_size=cfg.group_size)


def _int3(w: torch.Tensor, cfg: QuantConfig) -> QuantizedWeight:
    return IntKWeight.quantize(w, bits=3, group_size=cfg.group_size)


def _int2(w: torch.Tensor, cfg: QuantConfig) -> QuantizedWeight:
    return IntKWeight.quantize(w, bits=2, group_size=cfg.group_size)


FORMATS: dict[str, Callable[[torch.Tensor, QuantConfig], QuantizedWeight]] = {
    "nf4": _nf4,
    "int8": _int8,
    "int4": _int4,
    "int3": _int3,
    "int2": _int2,
}


def quantize_weight(w: torch.Tensor, cfg: QuantConfig) -> QuantizedWeight:
    """Pack a (d_out, d_in) weight in ``cfg.format``."""
    try:
        fn = FORMATS[cfg.format]
    except KeyError:
        raise QuantError(f"quant.format={cfg.format!r} has no quantizer; choose one of {sorted(FORMATS)}") from None
    return fn(w, cfg)


def shape_problem(name: str, d_out: int, d_in: int, cfg: QuantConfig) -> str | None:
    """Why ``cfg`` cannot quantize a (d_out, d_in) layer (None when it can)."""
    if cfg.format in ("int4", "int3", "int2") and d_in % cfg.group_size:
        return (
            f"{name}: quant.group_size={cfg.group_size} does not divide d_in={d_in}; use quant.group_size="
            f"{_divisor_hint(d_in)}, or quant=nf4 (flat 64-value blocks fit any shape)"
        )
    return None
