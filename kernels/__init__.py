"""fedlora's compute kernels (installed as ``fedlora_kernels``).

One file per op: a pure-torch reference that is the CPU path, and (where there is one) a Triton
kernel that is dispatched on CUDA. See ``docs/quantization.md``. Triton itself is imported
only when a kernel runs (``quant_lora_triton``), never by importing this package.
"""

from fedlora_kernels.cross_entropy import linear_cross_entropy
from fedlora_kernels.quant_lora import KernelUnavailableError, dequantize, quant_lora_linear

__all__ = ["KernelUnavailableError", "dequantize", "linear_cross_entropy", "quant_lora_linear"]
