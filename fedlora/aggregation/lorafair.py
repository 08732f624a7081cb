"""LoRA-FAIR: FedAvg plus a server-side correction of B (Bian, Wang, Zhang & Xu, ICCV 2025,
"LoRA-FAIR: Federated LoRA Fine-Tuning with Aggregation and Initialization Refinement",
arXiv:2411.14961).

Clients train A and B as in FedAvg. The server averages them and corrects B̄ so that the product
of the averages points where the ideal update points::

    Ā = Σ p_i·A_i,   B̄ = Σ p_i·(s_i/s_g)·B_i,   T = ΔW*/s_g = Σ p_i·(s_i/s_g)·B_i·A_i
    ΔB = argmin 1 − cos((B̄ + ΔB)·Ā, T) + λ·‖ΔB‖_F        (gradient steps, the paper's; λ ≈ 0.01)
    ΔB = (T − B̄·Ā)·Āᵀ·(Ā·Āᵀ + λI)⁻¹                      (ridge: a deterministic oracle)

Clients start the next round from (Ā, B̄ + ΔB); W is unchanged. Everything is in B's units
(T = ΔW*/s_g), so λ penalises the stored correction and the ridge is the doc's formula when s = 1.

Not exact: the result stays in Ā's row space. Both objectives need T only through
C = T·Āᵀ (d_out, r) and ‖T‖_F, since ⟨M·Ā, T⟩ = ⟨M, C⟩ and ‖M·Ā‖² = ⟨M, M·Ā·Āᵀ⟩;
so the correction is d_out·r² work per layer. The gradient version takes backtracking steps that never
increase the objective, hence cos((B̄+ΔB)Ā, T) ≥ cos(B̄Ā, T) + λ‖ΔB‖ ≥ FedAvg's cosine.

Streaming (:class:`LoraFairAccumulator`): C needs Ā, known only after the last reply, so T itself
is accumulated, in one of two forms whose memory does not grow with the number of clients:

- dense (default): T as an fp64 d_out×d_in sum per layer — exact, the paper's computation, fine
  for small models (a 7B model's would be ~52 GB);
- ``sketch_rank=k``: a single-pass randomized sketch of T (Tropp, Yurtsever, Udell & Cevher,
  SIMAX 2017): Y = T·Ω (d_out, k) and Z = Ψ·T (2k+1, d_in), with Ω, Ψ seeded per layer. T is
  recovered exactly while rank(T) ≤ k (n·r ≤ k), otherwise as its near-best rank-k approximation;
  memory O(k·(d_out + d_in)) per layer.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fedlora.adapters.lora import layer_generator
from fedlora.adapters.state import AdapterState, LoraFactors
from fedlora.aggregation import padding
from fedlora.aggregation.common import AggregationError, GlobalState, check_same_layout, normalize_weights
from fedlora.aggregation.method import NEEDS_INDIVIDUAL_FACTORS, ClientDP, Method, Streaming

DEFAULT_LAMBDA = 0.01
DEFAULT_STEPS = 20


def cosine(M: torch.Tensor, G: torch.Tensor, C: torch.Tensor, t_norm: float) -> float:
    """cos(M·Ā, T) from C = T·Āᵀ, G = Ā·Āᵀ and ‖T‖ (0 when either side is zero)."""
    d2 = float(torch.sum(M * (M @ G)))
    if d2 <= 0 or t_norm <= 0:
        return 0.0
    return float(torch.sum(M * C)) / (d2**0.5 * t_norm)


def ridge_correction(B_bar: torch.Tensor, G: torch.Tensor, C: torch.Tensor, lam: float) -> torch.Tensor:
    """ΔB = (T − B̄Ā)·Āᵀ·(ĀĀᵀ + λI)⁻¹ = (C − B̄·G)·(G + λI)⁻¹  (float64, shape of B̄)."""
    rhs = C - B_bar @ G  # (d_out, r)
    K = G + lam * torch.eye(G.shape[0], dtype=G.dtype)
    return (torch.linalg.pinv(K, hermitian=True) @ rhs.t()).t() if lam == 0 else torch.linalg.solve(K, rhs.t()).t()


def gradient_correction(
    B_bar: torch.Tensor, G: torch.Tensor, C: torch.Tensor, t_norm: float, lam: float, steps: int = DEFAULT_STEPS
) -> torch.Tensor:
    """The paper's correction: minimise 1 − cos((B̄+ΔB)Ā, T) + λ‖ΔB‖_F from ΔB = 0 by gradient
    steps with backtracking (a step is taken only if it lowers the objective). Deterministic."""

    def objective(d: torch.Tensor) -> tuple[float, torch.Tensor]:
        M = B_bar + d
        MG = M @ G  # (d_out, r)
        n, d2 = float(torch.sum(M * C)), float(torch.sum(M * MG))
        D = d2**0.5
        grad_cos = C / (D * t_norm) - (n / (D**3 * t_norm)) * MG
        dn = float(torch.linalg.vector_norm(d))
        grad = -grad_cos + (lam / dn) * d if dn > 0 else -grad_cos
        return 1.0 - n / (D * t_norm) + lam * dn, grad

    d = torch.zeros_like(B_bar)
    if cosine(B_bar, G, C, t_norm) == 0.0 and float(torch.sum(B_bar * (B_bar @ G))) <= 0:
        return d  # B̄Ā = 0: the cosine is undefined, leave B̄ alone
    f, g = objective(d)
    step = 0.1 * float(torch.linalg.vector_norm(B_bar)) / max(float(torch.linalg.vector_norm(g)), 1e-300)
    for _ in range(steps):
        for _ in range(30):  # backtracking: halve until the objective drops
            trial = d - step * g
            f_trial, g_trial = objective(trial)
            if f_trial < f:
                d, f, g = trial, f_trial, g_trial
                step *= 2.0
                break
            step *= 0.5
        else:
            break  # no decrease found: at a (numerical) minimum
    return d


class LoraFairAccumulator:
    """Running fp64 sums Σ w_i·A_i, Σ w_i·s_i·B_i and T (dense, or sketched when ``sketch_rank``).

    ``result(...)`` applies the correction; :meth:`layer_stats` gives (Ā, B̄, G, C, ‖T‖, s_g) per
    layer for tests and diagnostics.
    """

    def __init__(self, sketch_rank: int | None = None, seed: int = 0) -> None:
        if sketch_rank is not None and sketch_rank < 1:
            raise AggregationError(f"sketch_rank={sketch_rank} must be a positive integer or None")
        self.sketch_rank, self.seed = sketch_rank, seed
        self._reference: AdapterState | None = None
        self._sums: dict[str, list[torch.Tensor]] = {}  # layer → [ΣwA, ΣwsB, T or Y, (Z, Ω, Ψ)]
        self._scale: dict[str, float] = {}
        self.rank_scales: dict[int, float] = {}
        self.total_weight = 0.0
        self.count = 0

    def _start(self, name: str, f: LoraFactors) -> list[torch.Tensor]:
        (r, d_in), d_out = f.A.shape, f.B.shape[0]
        sums = [torch.zeros(r, d_in, dtype=torch.float64), torch.zeros(d_out, r, dtype=torch.float64)]
        if self.sketch_rank is None:
            return sums + [torch.zeros(d_out, d_in, dtype=torch.float64)]
        k = self.sketch_rank
        g = layer_generator(self.seed, f"{name}#lorafair-sketch")
        omega = torch.randn(d_in, k, generator=g, dtype=torch.float64)  # (d_in, k)
        psi = torch.randn(2 * k + 1, d_out, generator=g, dtype=torch.float64)  # (2k+1, d_out)
        Y = torch.zeros(d_out, k, dtype=torch.float64)
        Z = torch.zeros(2 * k + 1, d_in, dtype=torch.float64)
        return sums + [Y, Z, omega, psi]

    def add(self, update: AdapterState, weight: float) -> None:
        if weight < 0:
            raise AggregationError(f"client weight {weight} must be non-negative")
        if self._reference is None:
            self._reference = padding.layout_of(update)
        check_same_layout(self._reference, update, who=f"client {self.count}")
        for name, f in update.items():
            if name not in self._sums:
                self._sums[name] = self._start(name, f)
                self._scale[name] = f.scale
                self.rank_scales.setdefault(f.A.shape[0], f.scale)
            sums = self._sums[name]
            A, sB = f.A.to(torch.float64), f.scale * f.B.to(torch.float64)
            sums[0].add_(A, alpha=weight)
            sums[1].add_(sB, alpha=weight)
            if self.sketch_rank is None:
                sums[2].addmm_(sB, A, alpha=weight)  # T += w·s·B·A
            else:
                Y, Z, omega, psi = sums[2:]
                Y.addmm_(sB, A @ omega, alpha=weight)  # (d_out, k)
                Z.addmm_(psi @ sB, A, alpha=weight)  # (2k+1, d_in)
        self.total_weight += weight
        self.count += 1

    def layer_stats(self) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float, float]]:
        """Per layer (Ā, B̄, G = ĀĀᵀ, C = T·Āᵀ, ‖T‖_F, s_g), float64, B in units of s_g."""
        if self.count == 0 or self.total_weight <= 0:
            raise AggregationError("no client updates (or only zero weights) to aggregate")
        w = self.total_weight
        out = {}
        for name, sums in self._sums.items():
            s_g = self._scale[name]
            A_bar, B_bar = sums[0] / w, sums[1] / (w * s_g)
            if self.sketch_rank is None:
                T = sums[2] / (w * s_g)
                C, t_norm = T @ A_bar.t(), float(torch.linalg.matrix_norm(T))
            else:
                Y, Z, _, psi = sums[2:]
                Q = torch.linalg.qr(Y).Q  # (d_out, k): an orthonormal basis of T's range
                X = torch.linalg.lstsq(psi @ Q, Z).solution / (w * s_g)  # (k, d_in): T ≈ Q·X
                C, t_norm = Q @ (X @ A_bar.t()), float(torch.linalg.matrix_norm(X))
            out[name] = (A_bar, B_bar, A_bar @ A_bar.t(), C, t_norm, s_g)
        return out

    def result(self, method: str = "gradient", lam: float = DEFAULT_LAMBDA, steps: int = DEFAULT_STEPS) -> AdapterState:
        """(Ā, B̄ + ΔB) per layer, ΔB from ``method`` = "gradient" (the paper's) or "ridge"."""
        if method not in ("gradient", "ridge"):
            raise AggregationError(f"LoRA-FAIR method {method!r} is unknown; use 'gradient' or 'ridge'")
        out: AdapterState = {}
        for name, (A_bar, B_bar, G, C, t_norm, s_g) in self.layer_stats().items():
            if method == "ridge":
                dB = ridge_correction(B_bar, G, C, lam)
            else:
                dB = gradient_correction(B_bar, G, C, t_norm, lam, steps)
            out[name] = LoraFactors(A_bar.to(torch.float32), (B_bar + dB).to(torch.float32), s_g)
        return out


def aggregate(
    state: GlobalState,
    updates: Sequence[AdapterState],
    weights: Sequence[float],
    *,
    method: str | None = None,
    lam: float | None = None,
    steps: int = DEFAULT_STEPS,
    sketch_rank: int | None = None,
) -> GlobalState:
    """FedAvg + correction of B; the base is untouched. Options default to ``state.extras``
    (``lorafair_method``, ``lorafair_lambda``, ``lorafair_sketch_rank``), else gradient, 0.01, dense."""
    acc = accumulator(state, sketch_rank=sketch_rank)
    for update, p in zip(updates, normalize_weights(weights), strict=True):
        acc.add(update, p)
    return finish(state, acc, method=method, lam=lam, steps=steps)


def accumulator(state: GlobalState, *, sketch_rank: int | None = None) -> LoraFairAccumulator:
    """An empty accumulator for the round that starts from ``state`` (streaming glue: ``add`` each
    reply as it arrives, then :func:`finish`)."""
    if sketch_rank is None:
        sketch_rank = state.extras.get("lorafair_sketch_rank")
    return LoraFairAccumulator(sketch_rank=sketch_rank, seed=int(state.extras.get("seed", 0)))


def finish(
    state: GlobalState,
    acc: LoraFairAccumulator,
    *,
    method: str | None = None,
    lam: float | None = None,
    steps: int = DEFAULT_STEPS,
) -> GlobalState:
    """The next global state from a filled accumulator: (Ā, B̄ + ΔB) per layer."""
    method = method or state.extras.get("lorafair_method", "gradient")
    if lam is None:
        lam = float(state.extras.get("lorafair_lambda", DEFAULT_LAMBDA))
    return GlobalState(
        adapter=acc.result(method, lam, steps),
        base_terms=state.base_terms,
        extras=padding.next_extras(state, acc.rank_scales),
    )


METHOD = Method(
    name="lorafair",
    paper="Bian, Wang, Zhang & Xu, ICCV 2025, arXiv:2411.14961",
    exact=False,  # the corrected product stays in Ā's row space
    mixed_ranks=False,  # the paper's setting
    adapter_kind="lora",
    parts=("A", "B"),
    client_dp=ClientDP(refused=f"LoRA-FAIR corrects B̄ towards T = Σ p_i·s_i·B_i·A_i: {NEEDS_INDIVIDUAL_FACTORS}"
                       " (its correction is then exactly zero, i.e. FedAvg)"),
    weighted_sum=False,  # T is a sum of products B_i·A_i, not of what clients send
    aggregation=Streaming(accumulator, finish),
    slice_for_rank=padding.slice_for_rank,
)
