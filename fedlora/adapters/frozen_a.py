"""LoRA with a frozen, seeded A: only B trains (the adapter of FFA-LoRA, Sun et al., ICLR 2024,
arXiv:2403.12313).

Every client draws the same A for a layer from (seed, layer name) and never changes it, so the
server's average of B is exact: mean(B_i)·A = mean(B_i·A). Different layers get different A.
"""

from __future__ import annotations

from fedlora.adapters.lora import LoRALinear


class FrozenALoRALinear(LoRALinear):
    """:class:`LoRALinear` whose A is a frozen buffer-like parameter (``requires_grad=False``)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.lora_A.requires_grad_(False)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", frozen_A=True"
