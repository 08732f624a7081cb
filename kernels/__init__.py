"""fedlora's compute kernels (installed as ``fedlora_kernels``).

One file per op: a pure-torch reference that is the CPU path, and (where there is one) a Triton
kernel that is dispatched on CUDA. See ``../shared/docs/KERNELS.md``.
"""

from fedlora_kernels.cross_entropy import linear_cross_entropy

__all__ = ["linear_cross_entropy"]
