"""Federated LoRA-SB initialisation: the frame (B, A) and R₀ from the clients' gradients, without
pooling data and without any client sending a dense gradient.

LoRA-SB (arXiv:2411.19557) sets B = U_r, A = V_rᵀ from a truncated SVD of the full-weight gradient
G ≈ U_r·Σ_r·V_rᵀ, and R₀ so that the first update is one step of full fine-tuning:

    s·B·R₀·A = −η·U_r·Σ_r·V_rᵀ   ⇒   R₀ = −(η/s)·Σ_r            (W is not compensated)

In a federation G = Σ p_i·G_i lives on the clients. A randomized range finder (Halko, Martinsson &
Tropp, SIAM Review 2011) needs only two thin passes, per layer of shape (d_out, d_in), with
k = r + oversample::

    pass 1  server → clients: a seed; each draws the same Ω (d_in, k)
            client i → server: Y_i = G_i·Ω                       (d_out, k)
            server: Y = Σ p_i·Y_i = G·Ω,  Q = orth(Y)             (d_out, k)
    pass 2  server → clients: Q                                   (d_out, k)
            client i → server: Z_i = Qᵀ·G_i                       (k, d_in)
            server: Z = Σ p_i·Z_i = Qᵀ·G = Ũ·Σ·Vᵀ (a k×d_in SVD),  U = Q·Ũ
            B = U[:, :r],  A = Vᵀ[:r],  R₀ = −(η/s)·diag(Σ[:r])

Each client uploads k·(d_out + d_in) numbers instead of d_out·d_in (:func:`init_bytes`). When
rank(G) ≤ k the result is the exact truncated SVD of the pooled G; otherwise it is the standard
randomized approximation (add oversampling, or power passes, each two more thin passes, to tighten
it). The frame is nested: the first r' columns/rows are the rank-r' frame, as mixed ranks need.

All randomness comes from a private ``torch.Generator`` (the global RNG is never touched) and all
server arithmetic is float64. These are pure functions; the Flower glue ships the pieces. With DP
on, this round must be privatised too (noise on Y_i and Z_i, counted by the accountant) or replaced
by the data-free frame of :func:`fedlora.adapters.sb.data_free_frame`; nothing here adds noise.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from fedlora.aggregation.common import AggregationError, normalize_weights

DEFAULT_OVERSAMPLE = 8


class SBInit(NamedTuple):
    """One layer's LoRA-SB start: frame B (d_out, r), A (r, d_in), core R₀ (r, r), and the top
    singular values of the pooled gradient estimate (float32 except ``singular_values``)."""

    B: torch.Tensor
    A: torch.Tensor
    R0: torch.Tensor
    singular_values: torch.Tensor


def draw_sketch(d_in: int, width: int, seed: int) -> torch.Tensor:
    """Ω (d_in, width), Gaussian, float32, from ``seed`` alone: every client draws the same Ω."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(d_in, width, generator=g)


def client_range_sketch(grad: torch.Tensor, omega: torch.Tensor) -> torch.Tensor:
    """Pass 1 on a client: Y_i = G_i·Ω, shape (d_out, k), float32."""
    return (grad.to(torch.float64) @ omega.to(torch.float64)).to(torch.float32)


def server_range_basis(sketches: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """Pass 1 on the server: Q = orth(Σ p_i·Y_i), shape (d_out, k), float32."""
    Y = _weighted_sum(sketches, weights)
    return torch.linalg.qr(Y).Q.to(torch.float32)


def client_projection(grad: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """Pass 2 on a client: Z_i = Qᵀ·G_i, shape (k, d_in), float32."""
    return (basis.to(torch.float64).t() @ grad.to(torch.float64)).to(torch.float32)


def server_factors(
    projections: Sequence[torch.Tensor],
    weights: Sequence[float],
    basis: torch.Tensor,
    rank: int,
    *,
    lr: float,
    scale: float,
) -> SBInit:
    """Pass 2 on the server: SVD of Z = Σ p_i·Z_i, then B = Q·Ũ_r, A = V_rᵀ, R₀ = −(lr/scale)·Σ_r."""
    Z = _weighted_sum(projections, weights)  # (k, d_in)
    if rank > min(Z.shape):
        raise AggregationError(f"rank {rank} exceeds the sketch width {Z.shape[0]}; raise the oversampling")
    U_z, S, Vh = torch.linalg.svd(Z, full_matrices=False)  # (k, k), (k,), (k, d_in)
    B = basis.to(torch.float64) @ U_z[:, :rank]  # (d_out, r)
    R0 = torch.diag(-(lr / scale) * S[:rank])
    return SBInit(B.to(torch.float32), Vh[:rank].to(torch.float32), R0.to(torch.float32), S[:rank])


def federated_init(
    grads: Sequence[torch.Tensor],
    weights: Sequence[float],
    rank: int,
    *,
    lr: float,
    scale: float,
    oversample: int = DEFAULT_OVERSAMPLE,
    seed: int = 0,
) -> SBInit:
    """Both passes for one layer, clients and server in one process (tests, simulation)."""
    d_in = grads[0].shape[1]
    omega = draw_sketch(d_in, min(rank + oversample, d_in, grads[0].shape[0]), seed)
    basis = server_range_basis([client_range_sketch(g, omega) for g in grads], weights)
    projections = [client_projection(g, basis) for g in grads]
    return server_factors(projections, weights, basis, rank, lr=lr, scale=scale)


def init_bytes(
    d_out: int, d_in: int, rank: int, oversample: int = DEFAULT_OVERSAMPLE, itemsize: int = 4
) -> dict[str, int]:
    """Bytes per client of the two passes for one layer, next to a dense gradient upload.

    ``seed_down`` is Ω's 8-byte seed; ``dense_up`` what sending G_i would cost.
    """
    k = min(rank + oversample, d_in, d_out)
    out = {
        "seed_down": 8,
        "pass1_up": itemsize * d_out * k,
        "pass2_down": itemsize * d_out * k,
        "pass2_up": itemsize * k * d_in,
        "dense_up": itemsize * d_out * d_in,
    }
    out["total_up"] = out["pass1_up"] + out["pass2_up"]
    out["total_down"] = out["seed_down"] + out["pass2_down"]
    return out


def _weighted_sum(parts: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    if len(parts) != len(weights):
        raise AggregationError(f"{len(parts)} client pieces but {len(weights)} weights")
    total = torch.zeros(parts[0].shape, dtype=torch.float64)
    for part, p in zip(parts, normalize_weights(weights)):
        total.add_(part.to(torch.float64), alpha=p)
    return total
