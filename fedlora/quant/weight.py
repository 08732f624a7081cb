"""What every quantized weight format shares: the error type and the weight container's contract.

A format is one dataclass (``NF4Weight``, ``Int8Weight``, ``IntKWeight``) holding the packed codes
and scales of one (d_out, d_in) matrix as plain tensors, with

* ``quantize(w, cfg)`` — fp32 matrix → packed weight (classmethod);
* ``dequantize()`` — the reference dequantiser: packed weight → fp32 (d_out, d_in). The Triton
  kernels in ``fedlora_kernels.quant_lora`` read the same tensors and are tested bit-exact
  against it;
* ``tensors()`` / ``with_tensors()`` — the persistent storage, so :class:`~fedlora.quant.linear.QuantLinear`
  can hold it as buffers (``.to(device)``, ``state_dict``) and rebuild the dataclass from them;
* ``tables()`` — small constant lookup tables (NF4's 16 values, the 256-entry double-quant map)
  that the kernels read from device memory; identical for every layer, not persistent, and not
  counted in bytes per parameter (they are ≤ 1.1 KB per layer).

The field names are the contract with the kernels: renaming one is a kernel change too.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch


class QuantError(ValueError):
    """A layer cannot be quantized, or a quantized layer cannot do what was asked, as configured."""


@dataclass(frozen=True)
class QuantizedWeight:
    """Base of the packed formats: the logical shape (d_out, d_in) plus format tensors."""

    shape: tuple[int, int]

    kind = "base"
    """Which kernel dequantisation path reads this format: ``nf4``, ``int8`` or ``intk``."""

    @property
    def out_features(self) -> int:
        return self.shape[0]

    @property
    def in_features(self) -> int:
        return self.shape[1]

    def tensors(self) -> dict[str, torch.Tensor]:
        """The persistent tensors (codes, scales), by field name."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if isinstance(getattr(self, f.name), torch.Tensor)}

    def with_tensors(self, tensors: dict[str, torch.Tensor]) -> QuantizedWeight:
        """The same format and metadata with these tensors (e.g. after ``.to(device)``)."""
        return dataclasses.replace(self, **tensors)

    def tables(self, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """Constant lookup tables the kernels need on ``device`` (none by default)."""
        return {}

    @property
    def nbytes(self) -> int:
        """Bytes of persistent storage (codes + scales)."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    @property
    def bytes_per_param(self) -> float:
        return self.nbytes / (self.shape[0] * self.shape[1])

    @property
    def device(self) -> torch.device:
        return next(iter(self.tensors().values())).device

    def dequantize(self) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError
