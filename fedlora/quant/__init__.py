"""Quantized frozen bases: NF4, int8, int4/3/2 weights, ``QuantLinear``, LoftQ, model conversion.

See ``docs/quantization.md`` for the formats, bytes per parameter, the side-term policy, the
quality table and the storage and speed targets.
"""

from fedlora.quant.formats import FORMATS, quantize_weight
from fedlora.quant.int8 import Int8Weight
from fedlora.quant.intk import IntKWeight
from fedlora.quant.linear import QuantLinear
from fedlora.quant.loftq import LoftQResult, loftq
from fedlora.quant.model import quant_layers, quantize_model, quantized_state
from fedlora.quant.nf4 import NF4Weight
from fedlora.quant.weight import QuantError, QuantizedWeight

__all__ = [
    "FORMATS",
    "Int8Weight",
    "IntKWeight",
    "LoftQResult",
    "NF4Weight",
    "QuantError",
    "QuantLinear",
    "QuantizedWeight",
    "loftq",
    "quant_layers",
    "quantize_model",
    "quantize_weight",
    "quantized_state",
]
