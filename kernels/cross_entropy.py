"""Chunked linear + cross-entropy for large vocabularies (reference implementation).

The default model's output head is 262,144 × 640: full logits for a 4 × 256-token batch are
1 GiB in fp32, and their gradient another. This op never holds more than ``chunk_size × V``
logits: for each chunk of tokens it computes logits, the loss and, when a backward will follow,
the gradient w.r.t. the hidden states right away, then drops the logits.

Chain rule (per token t, logits z = h·Wᵀ, optional soft-cap z ← c·tanh(z/c)):
    loss_t   = logsumexp(z) − z[y_t]
    ∂loss/∂z = softmax(z) − onehot(y_t)          (× (1 − tanh²(z/c)) under the cap)
    ∂loss/∂h = (∂loss/∂z)·W                       (N × H, saved for backward)
    ∂loss/∂W = (∂loss/∂z)ᵀ·h                      (only when the head trains; V × H)
``backward`` scales the saved gradients by the incoming grad_output.
"""

from __future__ import annotations

import torch


def _chunk_loss_and_grads(
    h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, softcap: float | None, need_grad: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    z = (h @ weight.t()).float()  # (n, V)
    if softcap is not None:
        t = torch.tanh(z / softcap)
        z = softcap * t
    lse = torch.logsumexp(z, dim=-1)  # (n,)
    loss = (lse - z.gather(1, targets[:, None]).squeeze(1)).sum()
    if not need_grad:
        return loss, None
    grad_z = torch.softmax(z, dim=-1)  # (n, V)
    grad_z[torch.arange(len(targets), device=z.device), targets] -= 1.0
    if softcap is not None:
        grad_z *= 1.0 - t * t
    return loss, grad_z


class LinearCrossEntropy(torch.autograd.Function):
    """sum_t CE(h_t·Wᵀ, y_t), computed chunk by chunk; gradients formed in the forward pass."""

    @staticmethod
    def forward(ctx, h, weight, targets, chunk_size, softcap):  # type: ignore[override]
        need_h = h.requires_grad
        need_w = weight.requires_grad
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h = torch.empty_like(h, dtype=torch.float32) if need_h else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
        for start in range(0, h.shape[0], chunk_size):
            hc, yc = h[start : start + chunk_size], targets[start : start + chunk_size]
            loss, grad_z = _chunk_loss_and_grads(hc, weight, yc, softcap, need_h or need_w)
            total += loss
            if grad_z is not None:
                if need_h:
                    grad_h[start : start + chunk_size] = grad_z @ weight.float()  # (n, H)
                if need_w:
                    grad_w += grad_z.t() @ hc.float()  # (V, H)
        ctx.save_for_backward(
            grad_h if grad_h is not None else torch.empty(0), grad_w if grad_w is not None else torch.empty(0)
        )
        ctx.dtypes = (h.dtype, weight.dtype, need_h, need_w)
        return total

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        grad_h, grad_w = ctx.saved_tensors
        h_dtype, w_dtype, need_h, need_w = ctx.dtypes
        gh = (grad_h * grad_out).to(h_dtype) if need_h else None
        gw = (grad_w * grad_out).to(w_dtype) if need_w else None
        return gh, gw, None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    chunk_size: int = 256,
    softcap: float | None = None,
) -> torch.Tensor:
    """Summed cross-entropy of ``hidden (N, H) @ weight (V, H)ᵀ`` against ``targets (N,)``.

    Equals ``F.cross_entropy(hidden @ weight.T, targets, reduction="sum")`` (with the optional
    Gemma-style logit soft-cap) while holding at most ``chunk_size × V`` logits at a time.
    """
    if hidden.ndim != 2 or targets.ndim != 1 or hidden.shape[0] != targets.shape[0]:
        raise ValueError(f"expected hidden (N, H) and targets (N,), got {tuple(hidden.shape)}, {tuple(targets.shape)}")
    if hidden.shape[0] == 0:
        return hidden.sum() * 0.0
    return LinearCrossEntropy.apply(hidden, weight, targets, chunk_size, softcap)
