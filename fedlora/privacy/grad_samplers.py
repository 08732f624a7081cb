"""Per-example gradients of the adapter parameters, exact, from one batched backward pass.

For an adapter layer with input x (B, T, d_in), the input its factors see x̃ = dropout(x), and
g = ∂L/∂y (B, T, d_out) where L = Σ_i ℓ_i is the sum of per-example losses, example i's gradient
is a sum over its own positions only (nothing mixes examples in a decoder)::

    LoRA   y = base(x) + s·x̃·Aᵀ·Bᵀ      u = x̃·Aᵀ (B, T, r),  v = g·B (B, T, r)
           ∂ℓ_i/∂B = s·Σ_t g_itᵀ·u_it  (d_out, r)     ∂ℓ_i/∂A = s·Σ_t v_itᵀ·x̃_it  (r, d_in)
    SB     y = base(x) + s·x̃·A_fᵀ·Rᵀ·B_fᵀ,  R = lora_B·lora_A
           h = x̃·A_fᵀ,  k = s·g·B_f (B, T, r)      ∂ℓ_i/∂R = Σ_t k_itᵀ·h_it  (r, r)
           ∂ℓ_i/∂lora_A = lora_Bᵀ·∂ℓ_i/∂R           ∂ℓ_i/∂lora_B = ∂ℓ_i/∂R·lora_Aᵀ

Only parameters with ``requires_grad`` get one (frozen-A LoRA: B only). The frozen base is never
touched, whatever module it is (``nn.Linear``, a quantized base with a fused kernel): the formulas
need x̃ and g only.

Why not Opacus' ``GradSampleModule`` (whose grad-sampler signature ``(layer, activations,
backprops)`` these functions follow): its forward hook records the adapter's *input* x, but the
factors see dropout(x) with a mask drawn in the forward — a grad sampler fed x is wrong whenever
``adapter.dropout > 0``; it rejects trainable layers that hold buffers (LoRA-SB's frame) in strict
mode; and adding a layer means mutating its class-level ``GRAD_SAMPLERS`` registry (global state).
:class:`AdapterTaps` instead hooks the adapter's dropout (to record x̃ with its actual mask) and
the adapter's output tensor (a tensor hook receives exactly ∂L/∂y for that forward call).

Adding an adapter kind is one function ``(module, x̃, g) -> {param name: (B, *param.shape)}`` and
one entry in :data:`GRAD_SAMPLERS`.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from torch import nn

from fedlora.adapters.frozen_a import FrozenALoRALinear
from fedlora.adapters.inject import adapter_modules
from fedlora.adapters.lora import LoRALinear
from fedlora.adapters.sb import SBLinear

GradSampler = Callable[[nn.Module, torch.Tensor, torch.Tensor], dict[str, torch.Tensor]]
"""(adapter, x̃ (B, T, d_in) fp32, g (B, T, d_out) fp32) → {parameter name: (B, *shape)}."""


def lora_grad_sample(module: LoRALinear, x: torch.Tensor, g: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-example ∂ℓ/∂A and ∂ℓ/∂B of y = base(x) + s·x̃·Aᵀ·Bᵀ (those that train)."""
    out = {}
    if module.lora_B.requires_grad:
        u = x @ module.lora_A.detach().t()  # (B, T, r)
        out["lora_B"] = module.scale * torch.einsum("bto,btr->bor", g, u)  # (B, d_out, r)
    if module.lora_A.requires_grad:
        v = g @ module.lora_B.detach()  # (B, T, r)
        out["lora_A"] = module.scale * torch.einsum("btr,bti->bri", v, x)  # (B, r, d_in)
    return out


def sb_grad_sample(module: SBLinear, x: torch.Tensor, g: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-example gradients of LoRA-SB's core R = lora_B·lora_A (normally only lora_A = R trains)."""
    h = x @ module.frame_A.t().float()  # (B, T, r)
    k = module.scale * (g @ module.frame_B.float())  # (B, T, r): ∂L/∂(h·Rᵀ)
    d_core = torch.einsum("btp,btq->bpq", k, h)  # (B, r, r)
    out = {}
    if module.lora_A.requires_grad:
        out["lora_A"] = module.lora_B.detach().t() @ d_core  # (B, r, r)
    if module.lora_B.requires_grad:
        out["lora_B"] = d_core @ module.lora_A.detach().t()  # (B, r, r)
    return out


GRAD_SAMPLERS: dict[type[nn.Module], GradSampler] = {
    LoRALinear: lora_grad_sample,
    FrozenALoRALinear: lora_grad_sample,
    SBLinear: sb_grad_sample,
}
"""Exact types only: a subclass may change the forward, and a wrong formula must not be guessed."""


def grad_sampler(module: nn.Module) -> GradSampler:
    try:
        return GRAD_SAMPLERS[type(module)]
    except KeyError:
        raise TypeError(
            f"no per-example gradient formula for adapter type {type(module).__name__}; add one to "
            "fedlora.privacy.grad_samplers.GRAD_SAMPLERS"
        ) from None


def dense_sq_norms(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """‖Σ_t g_itᵀ·x_it‖²_F per example (the base weight's per-example gradient) without forming
    it: Σ_{t,t'} (g_t·g_t')(x_t·x_t'), with (T×T) Gram matrices ("ghost norm"). Shape (B,)."""
    return torch.einsum("bst,bst->b", g @ g.transpose(1, 2), x @ x.transpose(1, 2))


def dense_weighted_sum(x: torch.Tensor, g: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Σ_i w_i·Σ_t g_itᵀ·x_it, shape (d_out, d_in): the clipped sum of dense per-example gradients."""
    return torch.einsum("bto,bti->oi", g * weights[:, None, None], x)


# ---------------------------------------------------------------------------------------------
# taps: (x̃, x, g) of every adapter call during backward

TapFn = Callable[[str, nn.Module, torch.Tensor, torch.Tensor, torch.Tensor], None]
"""(adapter name, adapter, x̃ (B, T, d_in), x (B, T, d_in), g (B, T, d_out)), all fp32."""


class _Tap(torch.autograd.Function):
    """Identity on an adapter's output y whose backward hands (x̃, x, ∂L/∂y) to a callback.

    x̃ and x go through ``save_for_backward``, so under activation checkpointing they are dropped
    after the forward and recomputed inside the backward like every other saved activation (a
    closure holding them would keep them alive and undo the memory saving). The recomputed
    forward builds a second ``_Tap`` node that is never backpropagated: each call's callback runs
    exactly once, from the original graph, with the recomputed (bit-identical, same dropout mask)
    inputs.
    """

    @staticmethod
    def forward(ctx, output, x_tilde, x, callback):  # noqa: ANN001, ANN205
        ctx.callback = callback
        ctx.save_for_backward(x_tilde, x)
        return output.view_as(output)

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        x_tilde, x = ctx.saved_tensors
        ctx.callback(x_tilde, x, grad)
        return grad, None, None, None


class AdapterTaps:
    """While active, every backward through an adapter of ``model`` calls ``on_grad`` once per
    forward call of that adapter, with the inputs that call saw and the gradient of its output.

    Only forward calls made with grad enabled (and an output that requires grad) are tapped, so
    evaluation inside the context costs nothing; ``enabled = False`` mutes the callbacks (the
    forward still routes the output through the tap, so that a checkpointed region recomputes the
    same saved tensors whatever ``enabled`` was). Works with activation checkpointing
    (non-reentrant, as :func:`fedlora.training.local.activation_checkpointing` sets it): the forward
    hooks fire again in the recompute, but only the original forward's tap is backpropagated.
    Hooks are removed on exit.
    """

    def __init__(self, model: nn.Module, on_grad: TapFn) -> None:
        self.modules = adapter_modules(model)
        if not self.modules:
            raise ValueError("the model has no adapters; were they injected?")
        for module in self.modules.values():
            grad_sampler(module)  # unknown adapter types fail here, before any training
            if module.merged:
                raise ValueError("an adapter is merged into its base; unmerge it before DP training")
        self.on_grad = on_grad
        self.enabled = True
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._dropped: dict[int, torch.Tensor] = {}

    def __enter__(self) -> AdapterTaps:
        for name, module in self.modules.items():
            if isinstance(module.dropout, nn.Dropout):
                self._handles.append(module.dropout.register_forward_hook(partial(self._record_dropout, module)))
            self._handles.append(module.register_forward_hook(partial(self._record_call, name)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._dropped.clear()

    def _record_dropout(self, adapter: nn.Module, _module, _inputs, output: torch.Tensor) -> None:
        # Runs inside the adapter's forward, just before its own forward hook consumes it.
        self._dropped[id(adapter)] = output.detach()

    def _record_call(self, name: str, module: nn.Module, inputs, output: torch.Tensor):
        dropped = self._dropped.pop(id(module), None)
        if not (torch.is_grad_enabled() and output.requires_grad):
            return None
        x = inputs[0].detach()
        # Without a Dropout module (or on a fused base, which requires none) the factors see x.
        x_tilde = dropped if dropped is not None else x
        return _Tap.apply(output, x_tilde, x, partial(self._on_output_grad, name, module))

    def _on_output_grad(self, name, module, x_tilde, x, grad) -> None:
        if not self.enabled:  # e.g. the second backward of ghost clipping reuses the same graph
            return
        b = x.shape[0]
        self.on_grad(
            name, module,
            x_tilde.reshape(b, -1, x_tilde.shape[-1]).float(),  # (B, T, d_in)
            x.reshape(b, -1, x.shape[-1]).float(),  # (B, T, d_in)
            grad.reshape(b, -1, grad.shape[-1]).float(),  # (B, T, d_out)
        )  # fmt: skip


class GradSampleCollector:
    """Per-example gradients (``mode="grads"``) or only their squared norms (``mode="norms"``,
    for ghost clipping: no per-example tensor outlives its layer's hook) of every trainable
    adapter parameter, for the examples of one backward pass.

    ``grads[param]`` is (B, *param.shape); ``sq_norms`` is (B,) summed over all parameters.
    """

    def __init__(self, model: nn.Module, mode: str = "grads") -> None:
        if mode not in ("grads", "norms"):
            raise ValueError(f"mode={mode!r} must be grads or norms")
        self.mode = mode
        self.taps = AdapterTaps(model, self._on_grad)
        self.grads: dict[nn.Parameter, torch.Tensor] = {}
        self.sq_norms: torch.Tensor | None = None
        self._seen: set[str] = set()

    def __enter__(self) -> GradSampleCollector:
        self.taps.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.taps.__exit__(*exc)

    def reset(self) -> None:
        self.grads, self.sq_norms, self._seen = {}, None, set()

    def _on_grad(self, name, module, x_tilde, _x, g) -> None:
        samples = grad_sampler(module)(module, x_tilde, g)
        if self.mode == "norms":
            if name in self._seen:  # ‖Σ calls‖² ≠ Σ ‖call‖²: norms-only mode needs one call per layer
                raise RuntimeError(f"adapter {name} ran twice in one forward; ghost clipping needs one call per adapter")
            self._seen.add(name)
            for gs in samples.values():
                sq = gs.flatten(1).pow(2).sum(1)  # (B,)
                self.sq_norms = sq if self.sq_norms is None else self.sq_norms + sq
            return
        for pname, gs in samples.items():
            param = getattr(module, pname)
            self.grads[param] = self.grads[param] + gs if param in self.grads else gs
