"""Quantized-base LoRA linear: y = x·deq(W)ᵀ + s·(x·Aᵀ)·Bᵀ, with no gradient for W.

Chain rule (dY = ∂L/∂y, shapes: x (M, K), W (N, K), A (r, K), B (N, r)):

    dX = dY·deq(W) + s·(dY·B)·A          (M, K)
    dA = s·(dY·B)ᵀ·X                      (r, K)   contracted through r first: O(M·r·(N + K))
    dB = s·dYᵀ·(X·Aᵀ)                     (N, r)
    dW — none: the base is frozen and stored quantized.

Saved for backward: X and X·Aᵀ (M × r). W is decoded again in the backward (the reference
decodes one layer into a temporary; the Triton kernel decodes tile by tile inside the GEMM), so
no dense copy of W outlives a call. The same factor (dY·B) feeds dX and dA.

Two implementations of one op:

* :class:`QuantLoRALinearReference` — pure torch, fp32 math (weights rounded to the activation
  dtype first, as the kernel feeds them to the tensor cores). The CPU path and the tests' oracle.
* :class:`QuantLoRALinearTriton` — ``quant_lora_triton``: for M ≤ ``FUSED_MAX_M`` fused
  decode-in-GEMM kernels for the forward and dX that also form x·Aᵀ and dY·B in their main
  loop (split-K / split-N for small M); above it, W decoded into a one-layer temporary and
  cuBLAS. dA and dB (skinny, through r) are left to cuBLAS.

:func:`quant_lora_linear` picks one. ``qweight`` is any packed weight with the field layout of
``fedlora.quant`` (``kind``, ``shape``, format tensors, ``dequantize()``, ``tables()``); this
package does not import ``fedlora``.
"""

from __future__ import annotations

import os
import warnings

import torch


class KernelUnavailableError(RuntimeError):
    """The Triton backend was asked for where it cannot run."""


def _rank(A: torch.Tensor | None) -> int:
    return 0 if A is None else int(A.shape[0])


class QuantLoRALinearReference(torch.autograd.Function):
    """The pure-torch op (CPU path, test oracle): fp32 math, one layer decoded at a time."""

    @staticmethod
    def forward(ctx, x, qweight, tables, A, B, scale):  # type: ignore[override]
        K = qweight.shape[1]
        x2 = x.reshape(-1, K)  # (M, K)
        w = qweight.dequantize().to(x.dtype).float()  # (N, K): rounded as the kernel rounds it
        y = x2.float() @ w.t()  # (M, N)
        xa = None
        if _rank(A):
            xa = x2.float() @ A.float().t()  # (M, r)
            y = y + scale * (xa @ B.float().t())
        ctx.save_for_backward(x2, xa if xa is not None else x2.new_empty(0), A if A is not None else x2.new_empty(0), B if B is not None else x2.new_empty(0))
        ctx.qweight, ctx.scale, ctx.x_shape = qweight, scale, x.shape
        return y.to(x.dtype).reshape(*x.shape[:-1], qweight.shape[0])

    @staticmethod
    def backward(ctx, dy):  # type: ignore[override]
        x2, xa, A, B = ctx.saved_tensors
        s, qweight = ctx.scale, ctx.qweight
        dy2 = dy.reshape(-1, qweight.shape[0]).float()  # (M, N)
        need_x, _, _, need_a, need_b, _ = ctx.needs_input_grad
        has_lora = A.numel() > 0 and A.dim() == 2
        dyb = dy2 @ B.float() if has_lora else None  # (M, r)
        dx = da = db = None
        if need_x:
            w = qweight.dequantize().to(x2.dtype).float()  # (N, K), temporary
            dx = dy2 @ w
            if has_lora:
                dx = dx + s * (dyb @ A.float())
            dx = dx.to(x2.dtype).reshape(ctx.x_shape)
        if has_lora and need_a:
            da = (s * (dyb.t() @ x2.float())).to(A.dtype)  # (r, K)
        if has_lora and need_b:
            db = (s * (dy2.t() @ xa)).to(B.dtype)  # (N, r)
        return dx, None, None, da, db, None


def _mm_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a·b in a's dtype on the tensor cores (fp32 stays fp32), returned as fp32."""
    return (a @ b.to(a.dtype)).float()


class QuantLoRALinearTriton(torch.autograd.Function):
    """The Triton op: forward and dX by ``quant_lora_triton`` (fused decode-in-GEMM kernels at small
    M, which also form x·Aᵀ and dY·B in their main loop; a one-layer decode + cuBLAS at large M)."""

    @staticmethod
    def forward(ctx, x, qweight, tables, A, B, scale):  # type: ignore[override]
        from fedlora_kernels import quant_lora_triton as tk

        K, N = qweight.shape[1], qweight.shape[0]
        x2 = x.reshape(-1, K).contiguous()  # (M, K)
        y, xa = tk.forward(x2, qweight, tables, A, B, scale)  # (M, N), (M, r) or None
        empty = x2.new_empty(0)
        ctx.save_for_backward(x2, xa if xa is not None else empty, A if A is not None else empty, B if B is not None else empty)
        ctx.qweight, ctx.tables, ctx.scale, ctx.x_shape = qweight, tables, scale, x.shape
        return y.reshape(*x.shape[:-1], N)

    @staticmethod
    def backward(ctx, dy):  # type: ignore[override]
        from fedlora_kernels import quant_lora_triton as tk

        x2, xa, A, B = ctx.saved_tensors
        s, qweight = ctx.scale, ctx.qweight
        dy2 = dy.reshape(-1, qweight.shape[0]).contiguous()  # (M, N)
        need_x, _, _, need_a, need_b, _ = ctx.needs_input_grad
        has_lora = A.numel() > 0 and A.dim() == 2
        dx = da = db = dyb = None
        if need_x:
            dx, dyb = tk.backward_dx(dy2, qweight, ctx.tables, A if has_lora else None, B if has_lora else None, s)
            dx = dx.reshape(ctx.x_shape)
        elif has_lora and need_a:
            dyb = _mm_f32(dy2, B)  # (M, r)
        if has_lora and need_a:
            da = (s * _mm_f32(dyb.to(x2.dtype).t(), x2)).to(A.dtype)  # (r, K)
        if has_lora and need_b:
            db = (s * _mm_f32(dy2.t(), xa)).to(B.dtype)  # (N, r)
        return dx, None, None, da, db, None


def triton_status(device: torch.device) -> str | None:
    """Why the Triton backend cannot run on ``device`` (None when it can)."""
    if device.type != "cuda" and not (device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"):
        return f"tensors are on {device.type}; the Triton kernels need CUDA (or TRITON_INTERPRET=1 on CPU)"
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed (pip install 'triton>=3')"
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 0):
        return f"GPU compute capability {torch.cuda.get_device_capability(device)} < 8.0"
    return None


def resolve_backend(device: torch.device, backend: str = "auto") -> str:
    """``auto`` → ``triton`` on a capable CUDA device, else ``reference`` (with a warning on a
    GPU that cannot run the kernels); ``triton`` where it cannot run → KernelUnavailableError."""
    if backend not in ("auto", "triton", "reference"):
        raise ValueError(f"backend={backend!r} must be auto, triton or reference")
    if backend == "reference":
        return backend
    why = triton_status(device)
    if backend == "triton":
        if why:
            raise KernelUnavailableError(f"the Triton quantized-LoRA kernels cannot run here: {why}")
        return backend
    if why is None and device.type == "cuda":
        return "triton"
    if device.type == "cuda":
        warnings.warn(f"fedlora_kernels: falling back to the torch reference ({why}); it decodes each layer "
                      "into a temporary and is slower", RuntimeWarning, stacklevel=3)
    return "reference"


def quant_lora_linear(
    x: torch.Tensor,
    qweight,
    A: torch.Tensor | None = None,
    B: torch.Tensor | None = None,
    scale: float = 1.0,
    *,
    tables: dict[str, torch.Tensor] | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """y = x·deq(W)ᵀ + scale·(x·Aᵀ)·Bᵀ for x (..., K), A (r, K), B (N, r) (A, B optional).

    Gradients flow to x, A and B; never to the quantized weight. ``tables`` are the format's
    constant lookup tables on x's device (``qweight.tables(device)`` when omitted).
    """
    K = qweight.shape[1]
    if x.shape[-1] != K:
        raise ValueError(f"x has {x.shape[-1]} features; the quantized weight expects {K}")
    if (A is None) != (B is None) or (A is not None and (A.shape[1] != K or B.shape != (qweight.shape[0], A.shape[0]))):
        raise ValueError(
            f"A {None if A is None else tuple(A.shape)} and B {None if B is None else tuple(B.shape)} "
            f"must be (r, {K}) and ({qweight.shape[0]}, r)"
        )
    if A is not None and A.shape[0] == 0:
        A = B = None
    tables = tables if tables is not None else qweight.tables(x.device)
    if resolve_backend(x.device, backend) == "triton":
        return QuantLoRALinearTriton.apply(x, qweight, tables, A, B, scale)
    return QuantLoRALinearReference.apply(x, qweight, tables, A, B, scale)


def dequantize(qweight, *, tables: dict[str, torch.Tensor] | None = None, backend: str = "auto") -> torch.Tensor:
    """Dense fp32 deq(W) (N, K): by the Triton decoder on CUDA, else ``qweight.dequantize()``."""
    if resolve_backend(qweight.device, backend) == "triton":
        from fedlora_kernels import quant_lora_triton as tk

        return tk.dequantize(qweight, tables if tables is not None else qweight.tables(qweight.device))
    return qweight.dequantize()
