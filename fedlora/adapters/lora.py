"""LoRA: a frozen linear layer plus a trainable low-rank update (Hu et al., 2021, arXiv:2106.09685).

::

    x ─┬─► base: x·Wᵀ (frozen, d_out × d_in) ───────────────────────┐
       └─► dropout ─► A (r × d_in) ─► B (d_out × r) ─► × s ─────────┴─► y

    y = x·Wᵀ + s · dropout(x)·Aᵀ·Bᵀ,   s = alpha / r   (alpha / √r with rsLoRA)

The adapter factors are kept in fp32 whatever the base dtype, so a bf16 base does not round the
(small) update away. ``delta_weight()`` is the one dense view of the update, s·B·A, used by merges,
exactness checks and tests. The base is any module that maps x → x·Wᵀ (+ b): ``nn.Linear``, a
``transformers`` ``Conv1D`` (GPT-2; its weight is stored transposed, (d_in, d_out)) or a quantized
``QuantLinear``. The base's sizes and its weight as a (d_out, d_in) matrix are read only through
:mod:`fedlora.linear_layout`, the one place that knows the Conv1D layout.
"""

from __future__ import annotations

import math
import zlib

import torch
from torch import nn

from fedlora.linear_layout import features, weight_view


class AdapterError(ValueError):
    """An adapter cannot be built or loaded as asked."""


def lora_scale(alpha: float, rank: int, rslora: bool) -> float:
    """s = alpha/r, or alpha/√r with rsLoRA (Kalajdzievski, 2023, arXiv:2312.03732)."""
    return alpha / math.sqrt(rank) if rslora else alpha / rank


def layer_generator(seed: int, layer_name: str) -> torch.Generator:
    """A generator seeded by (seed, layer name): every client draws the same A for a layer, and
    different layers draw different A (one shared seed for every layer would repeat A)."""
    return torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(layer_name.encode())) % 2**63)


class LoRALinear(nn.Module):
    """A frozen ``base`` linear layer with a trainable low-rank update s·B·A."""

    def __init__(
        self,
        base: nn.Module,
        rank: int,
        alpha: float,
        *,
        dropout: float = 0.0,
        rslora: bool = False,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        d_in, d_out = features(base)
        if rank > min(d_in, d_out):
            raise AdapterError(
                f"LoRA rank {rank} exceeds the layer's smallest dimension min(d_in={d_in}, "
                f"d_out={d_out}); lower adapter.rank or add a smaller adapter.rank_pattern entry"
            )
        self.base = base
        self.rank, self.alpha, self.rslora = rank, alpha, rslora
        self.scale = lora_scale(alpha, rank, rslora)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        device = next(iter([*base.parameters(), *base.buffers()])).device  # a quantized base has only buffers
        # A ~ U(-1/√d_in, 1/√d_in) (Kaiming-uniform with a=√5, as in nn.Linear and PEFT); B = 0,
        # so the adapted layer starts exactly at the base layer.
        bound = 1.0 / math.sqrt(d_in)
        a = torch.empty(rank, d_in).uniform_(-bound, bound, generator=generator)
        self.lora_A = nn.Parameter(a.to(device))  # (r, d_in)
        self.lora_B = nn.Parameter(torch.zeros(d_out, rank, device=device))  # (d_out, r)
        self.merged = False

    @property
    def in_features(self) -> int:
        return features(self.base)[0]

    @property
    def out_features(self) -> int:
        return features(self.base)[1]

    def delta_weight(self) -> torch.Tensor:
        """The dense update s·B·A, shape (d_out, d_in), fp32."""
        return self.scale * (self.lora_B @ self.lora_A)

    def lora_forward(self, x: torch.Tensor) -> torch.Tensor:
        """s·dropout(x)·Aᵀ·Bᵀ in fp32; shape (..., d_out)."""
        h = self.dropout(x).to(self.lora_A.dtype) @ self.lora_A.t()  # (..., r)
        return self.scale * (h @ self.lora_B.t())  # (..., d_out)

    def _fused_base(self) -> bool:
        """True when the base runs base + s·B·A as one op (a quantized base's fused kernel): only
        for the plain s·B·A update (subclasses that change ``lora_forward`` keep the generic path)
        and without dropout (the fused op feeds the same x to both branches)."""
        return (
            hasattr(self.base, "fused_lora_forward")
            and isinstance(self.dropout, nn.Identity)
            and type(self).lora_forward is LoRALinear.lora_forward
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.merged and self._fused_base():
            return self.base.fused_lora_forward(x, self.lora_A, self.lora_B, self.scale)
        y = self.base(x)
        if self.merged:
            return y
        return y + self.lora_forward(x).to(y.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold s·B·A into the base weight (faster inference); ``unmerge`` undoes it.

        Exact in fp32; on a bf16/fp16 base the sum is rounded to the base dtype. A quantized base
        (one with ``add_side_term``) cannot absorb s·B·A into its codes: the update goes into its
        exact full-precision side term, or a clear error is raised if that would exceed the
        side term's maximum rank — never a silent requantization.
        """
        if not self.merged and hasattr(self.base, "add_side_term"):
            if type(self).lora_forward is not LoRALinear.lora_forward:
                raise AdapterError(f"{type(self).__name__} cannot merge into a quantized base; keep it unmerged")
            self._merge_token = self.base.add_side_term(self.scale * self.lora_B.detach(), self.lora_A.detach(), exact=True)
            self.merged = True
        if not self.merged:
            w = weight_view(self.base)  # (d_out, d_in), whatever the base's storage layout
            w.copy_((w.float() + self.delta_weight()).to(w.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged and hasattr(self.base, "remove_side_term"):
            self.base.remove_side_term(self._merge_token)
            self.merged = False
        if self.merged:
            w = weight_view(self.base)
            w.copy_((w.float() - self.delta_weight()).to(w.dtype))
            self.merged = False

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}, scale={self.scale:.4g}, rslora={self.rslora}"
