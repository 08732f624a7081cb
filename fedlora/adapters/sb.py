"""LoRA-SB: a fixed low-rank frame with a trainable r×r core (Ponkshe, Singhal, Gorbunov,
Tumanov, Horvath & Vepakomma, 2024, "Initialization using Update Approximation is a Silver Bullet
for Extreme Efficient Low-Rank Fine-Tuning", arXiv:2411.19557); the adapter of Fed-SB.

::

    x ─┬─► base: x·Wᵀ (frozen) ───────────────────────────────────────┐
       └─► dropout ─► A (r×d_in, fixed) ─► R (r×r) ─► B (d_out×r, fixed) ─► × s ─┴─► y

    ΔW = s·B·R·A

B and A (the *frame*) are identical on every client: drawn from (seed, layer) with orthonormal
columns/rows before an init round (:func:`data_free_frame`), then set to the top singular vectors
of a gradient estimate by the federated init (:mod:`fedlora.aggregation.fedsb_init`, :meth:`SBLinear.set_frame`).
Only R trains, so only r² numbers per layer travel, whatever the layer's width.

How it maps onto :class:`~fedlora.adapters.state.LoraFactors`: the adapter's ``lora_A`` *is* R
(trainable, r×r) and ``lora_B`` is a frozen r×r identity, so an SB adapter's state is the **core**
``LoraFactors(A=R, B=I, scale=s)``: ``core.B @ core.A`` is R, and the layer's dense update is
``s·frame_B·(core.B·core.A)·frame_A``. The generic machinery (``inject_adapters``,
``get/set_adapter_state``, ``trainable_parameters``, merge) therefore handles SB unchanged, and the
server, which holds the frame, lifts a core to a dense-meaningful update (``fedsb.lift_updates``).
On the wire a core travels as R alone, r² numbers per layer
(``state_to_arrays(state, parts=("R",))``, read back as ``LoraFactors(A=R, B=I)``).

Mixed ranks: the frame is nested (the first r columns of B / rows of A are the rank-r frame), so
a rank-r client must load the first r columns/rows of the server's r_max frame
(:func:`set_sb_frame`); frames drawn locally at different ranks are not nested.
"""

from __future__ import annotations

import torch
from torch import nn

from fedlora.adapters.lora import AdapterError, LoRALinear


def data_free_frame(
    d_out: int, d_in: int, rank: int, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random orthonormal frame: B (d_out, r) with orthonormal columns, A (r, d_in) with
    orthonormal rows (QR of Gaussian draws), so ‖s·B·R·A‖_F = s·‖R‖_F at the start."""
    b = torch.linalg.qr(torch.randn(d_out, rank, generator=generator)).Q  # (d_out, r)
    a = torch.linalg.qr(torch.randn(d_in, rank, generator=generator)).Q.t()  # (r, d_in)
    return b.contiguous(), a.contiguous()


class SBLinear(LoRALinear):
    """A frozen ``base`` plus s·B·R·A with a fixed frame (B, A) and a trainable core R.

    Same constructor as :class:`LoRALinear`, so ``inject_adapters(model, cfg, SBLinear)`` works.
    R starts at zero (the layer starts at the base) until :meth:`set_frame` gives it R₀.
    """

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
        # The frame is drawn from the generator as handed in, so a server can rebuild it with
        # data_free_frame(d_out, d_in, rank, layer_generator(seed, name)).
        saved = generator.get_state() if generator is not None else None
        super().__init__(base, rank, alpha, dropout=dropout, rslora=rslora, generator=generator)
        if saved is not None:
            generator.set_state(saved)
        device = self.lora_A.device
        frame_b, frame_a = data_free_frame(self.out_features, self.in_features, rank, generator)
        self.register_buffer("frame_B", frame_b.to(device))  # (d_out, r), fixed
        self.register_buffer("frame_A", frame_a.to(device))  # (r, d_in), fixed
        self.lora_A = nn.Parameter(torch.zeros(rank, rank, device=device))  # R (r, r), trained
        self.lora_B = nn.Parameter(torch.eye(rank, device=device), requires_grad=False)  # I (r, r)

    def core(self) -> torch.Tensor:
        """R = lora_B·lora_A, shape (r, r)."""
        return self.lora_B @ self.lora_A

    def delta_weight(self) -> torch.Tensor:
        """The dense update s·B·R·A, shape (d_out, d_in), fp32."""
        return self.scale * (self.frame_B @ self.core() @ self.frame_A)

    def lora_forward(self, x: torch.Tensor) -> torch.Tensor:
        """s·dropout(x)·Aᵀ·Rᵀ·Bᵀ in fp32; shape (..., d_out)."""
        h = self.dropout(x).to(self.frame_A.dtype) @ self.frame_A.t()  # (..., r)
        h = h @ self.core().t()  # (..., r)
        return self.scale * (h @ self.frame_B.t())  # (..., d_out)

    @torch.no_grad()
    def set_frame(self, B: torch.Tensor, A: torch.Tensor, R: torch.Tensor | None = None) -> None:
        """Load the frame (B (d_out, r), A (r, d_in)) and, if given, the core R (r, r)."""
        if self.merged:
            raise AdapterError("unmerge the adapter before changing its frame")
        if B.shape != self.frame_B.shape or A.shape != self.frame_A.shape:
            raise AdapterError(
                f"frame B{tuple(B.shape)} A{tuple(A.shape)} does not fit this rank-{self.rank} layer "
                f"(B{tuple(self.frame_B.shape)} A{tuple(self.frame_A.shape)}); slice the server's "
                "frame to the client's rank first"
            )
        self.frame_B.copy_(B)
        self.frame_A.copy_(A)
        if R is not None:
            self.lora_A.copy_(R)
            self.lora_B.copy_(torch.eye(self.rank))

    def extra_repr(self) -> str:
        return super().extra_repr() + ", frame=fixed, trained=R (r×r)"


def sb_modules(model: nn.Module) -> dict[str, SBLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, SBLinear)}


def get_sb_frame(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Every SB layer's frame (B, A) as detached fp32 CPU copies."""
    return {n: (m.frame_B.detach().float().cpu().clone(), m.frame_A.detach().float().cpu().clone())
            for n, m in sb_modules(model).items()}


def set_sb_frame(model: nn.Module, frame: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Load each layer's frame, sliced to the layer's own rank (nested frames)."""
    modules = sb_modules(model)
    if set(frame) != set(modules):
        raise AdapterError(f"frame layers differ from the model's SB layers: {sorted(set(frame) ^ set(modules))[:3]}")
    for name, (B, A) in frame.items():
        r = modules[name].rank
        if B.shape[1] < r:
            raise AdapterError(f"{name}: the frame has rank {B.shape[1]}, the layer rank {r}")
        modules[name].set_frame(B[:, :r], A[:r])
