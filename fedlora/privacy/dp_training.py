"""Example-level DP-SGD on a client: the plain local loop of :mod:`fedlora.training.local`, made private.

Each optimiser step (Abadi et al., 2016, arXiv:1607.00133)::

    S      = Poisson(q) sample of the client's N_k examples, q = batch/N_k  (|S| varies, may be 0)
    g_i    = ∇ ℓ_i for i ∈ S, over the trainable adapter parameters only   (exact, batched)
    ḡ_i    = g_i · min(1, C / ‖g_i‖)                                       (per-example clipping)
    G      = (Σ_{i∈S} ḡ_i + N(0, σ²C²·I)) / batch                          (fp32 noise, expected batch)
    AdamW step on G; the accountant composes one sampled-Gaussian step (σ, q)

ℓ_i is example i's mean token loss over its response tokens (so an example's weight does not depend
on which other examples were sampled with it). S is cut into physical micro-batches of
``dp.physical_batch_size`` for memory; the sum is over all of them, then one noisy step — the
"virtual batch" that Opacus' BatchMemoryManager provides. With ``dp.ghost_clipping`` only the
per-example norms are kept (one layer at a time) and a second backward of Σ c_i·ℓ_i produces the
clipped sum directly.

Only adapter parameters are touched: the frozen base (``nn.Linear`` or quantized) is never read
for gradients and never written; the model is never moved (the Opacus #820 trap).

Sampling and noise come from a ``torch.Generator`` seeded with 63 bits from the OS
(``secrets``): the server knows the run's seed, so noise derived from it could be subtracted.
``dp_seed`` exists for tests only. (Opacus' ``secure_mode`` would use a CSPRNG via torchcsprng,
which is not a dependency here; the report says so.)
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from fedlora.adapters import trainable_parameters
from fedlora.config import DPConfig, TrainConfig
from fedlora.data.records import IGNORE_INDEX, collate
from fedlora.privacy.accounting import (
    AccountantState,
    BudgetSpentError,
    ExamplePlan,
    plan_example_level,
    privacy_spent,
)
from fedlora.privacy.budget import check_round_budget, require_affordable_start
from fedlora.privacy.grad_samplers import AdapterTaps, GradSampleCollector, dense_sq_norms, dense_weighted_sum
from fedlora.training.local import TrainResult, activation_checkpointing, lr_multiplier, move
from fedlora_kernels import linear_cross_entropy

NOISE_DTYPE = torch.float32


@dataclass
class DPTrainResult(TrainResult):
    """:class:`~fedlora.training.local.TrainResult` plus the round's privacy figures."""

    declined: bool = False
    reason: str = ""
    epsilon: float = 0.0
    """Cumulative ε (headline accountant) after this round, over every round so far."""
    epsilon_rdp: float = 0.0
    best_alpha: float | None = None
    epsilon_prv: float | None = None
    delta: float = 0.0
    sigma: float = 0.0
    q: float = 0.0
    clip: float = 0.0
    batch_size: int = 0
    physical_batch_size: int = 0
    dp_steps: int = 0
    """Sampled-Gaussian steps this round (0 when declined)."""
    total_steps: int = 0
    num_examples: int = 0
    accountant: str = "rdp"
    empty_batches: int = 0
    """Steps whose Poisson sample held no example: the step applied noise alone, and ``loss`` is
    NaN when every step was empty (no example was used)."""

    def metrics(self) -> dict[str, int | float]:
        """Numbers for the reply's MetricRecord (Flower metrics are int/float only)."""
        out: dict[str, int | float] = {
            "declined": int(self.declined), "epsilon": self.epsilon, "epsilon_rdp": self.epsilon_rdp,
            "delta": self.delta, "sigma": self.sigma, "q": self.q, "dp_steps": self.dp_steps,
            "dp_total_steps": self.total_steps, "dp_empty_steps": self.empty_batches,
        }  # fmt: skip
        if self.epsilon_prv is not None:
            out["epsilon_prv"] = self.epsilon_prv
        if self.best_alpha is not None:
            out["best_alpha"] = self.best_alpha
        return out


# ---------------------------------------------------------------------------------------------
# the pieces of one private step


def poisson_sample(num_examples: int, q: float, generator: torch.Generator) -> list[int]:
    """Indices of a Poisson(q) sample: each example independently with probability q (what the
    accountant assumes; Opacus' ``UniformWithReplacementSampler`` draws the same way)."""
    keep = torch.rand(num_examples, generator=generator) < q  # (N,)
    return keep.nonzero().flatten().tolist()


def per_example_losses(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """ℓ_i = mean token loss over example i's response tokens, shape (B,), and the token counts (B,).

    Same objective as :func:`fedlora.training.loss.response_loss` (chunked CE on scored positions only),
    normalised per example instead of per batch.
    """
    hidden = model.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state  # (B, T, H)
    targets = batch["labels"][:, 1:]  # (B, T-1)
    keep = targets != IGNORE_INDEX  # (B, T-1)
    head = model.get_output_embeddings()
    softcap = getattr(model.config, "final_logit_softcapping", None)
    counts = keep.sum(1)  # (B,)
    losses = [
        linear_cross_entropy(hidden[i, :-1][keep[i]], head.weight, targets[i][keep[i]], softcap=softcap) / max(int(counts[i]), 1)
        for i in range(hidden.shape[0])
    ]
    return torch.stack(losses), counts


@dataclass
class ClippedSum:
    """Σ_i ḡ_i per trainable parameter (fp32) and what the micro-batches saw."""

    grads: list[torch.Tensor]
    norms: torch.Tensor
    """Per-example gradient norms before clipping (B,)."""
    loss_sum: float
    """Σ_i ℓ_i·n_i: summed token loss."""
    tokens: int
    examples: int


def clip_factors(norms: torch.Tensor, clip: float) -> torch.Tensor:
    """min(1, C/‖g_i‖) per example (Opacus' form: C/(‖g_i‖ + 1e-6), capped at 1)."""
    return (clip / (norms + 1e-6)).clamp(max=1.0)


def clipped_gradient_sum(
    model: nn.Module,
    params: Sequence[nn.Parameter],
    examples: Sequence[dict[str, list[int]]],
    *,
    pad_id: int,
    clip: float,
    physical_batch_size: int,
    collector: GradSampleCollector,
    ghost: bool = False,
) -> ClippedSum:
    """Σ_i min(1, C/‖g_i‖)·g_i over ``examples``, in micro-batches of ``physical_batch_size``.

    ``collector`` must be active (``with``) on ``model``; mode ``grads`` (standard) or ``norms``
    (``ghost=True``: norms first, then a second backward of Σ c_i·ℓ_i gives the clipped sum).
    """
    device = params[0].device
    total = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    norms, loss_sum, tokens = [], 0.0, 0
    for start in range(0, len(examples), physical_batch_size):
        micro = examples[start : start + physical_batch_size]
        batch = move(collate(micro, pad_id), device)
        collector.reset()
        collector.taps.enabled = True
        losses, counts = per_example_losses(model, batch)  # (b,), (b,)
        if ghost:
            losses.sum().backward(retain_graph=True)
            sq = collector.sq_norms if collector.sq_norms is not None else torch.zeros(len(micro), device=device)
            n = sq.clamp(min=0).sqrt()
            factors = clip_factors(n, clip)
            for p in params:
                p.grad = None
            collector.taps.enabled = False  # the second backward must not tap again
            (losses * factors.detach()).sum().backward()
            for acc, p in zip(total, params, strict=True):
                if p.grad is not None:
                    acc += p.grad.float()
        else:
            losses.sum().backward()
            per_param = [collector.grads.get(p) for p in params]
            sq = sum(gs.flatten(1).pow(2).sum(1) for gs in per_param if gs is not None)
            n = sq.sqrt() if torch.is_tensor(sq) else torch.zeros(len(micro), device=device)
            factors = clip_factors(n, clip)
            for acc, gs in zip(total, per_param, strict=True):
                if gs is not None:
                    acc += torch.einsum("b,b...->...", factors, gs)
        for p in params:
            p.grad = None  # the non-private batch gradient autograd also formed: never used
        norms.append(n.detach())
        loss_sum += float((losses.detach() * counts).sum())
        tokens += int(counts.sum())
    all_norms = torch.cat(norms) if norms else torch.zeros(0, device=device)
    return ClippedSum(total, all_norms, loss_sum, tokens, len(examples))


def noisy_mean(
    summed: Sequence[torch.Tensor], *, sigma: float, clip: float, expected_batch_size: int, generator: torch.Generator
) -> list[torch.Tensor]:
    """(Σ ḡ_i + N(0, σ²C²)) / batch per parameter; the noise is drawn in fp32 on each tensor's device."""
    out = []
    for s in summed:
        noise = torch.randn(s.shape, generator=generator, dtype=NOISE_DTYPE, device=generator.device)
        out.append((s.to(NOISE_DTYPE) + (sigma * clip) * noise.to(s.device)) / expected_batch_size)
    return out


def private_generators(device: torch.device, dp_seed: int | None) -> tuple[torch.Generator, torch.Generator]:
    """(sampling generator on CPU, noise generator on ``device``), seeded from the OS unless a test
    passes ``dp_seed``."""
    seed = secrets.randbits(63) if dp_seed is None else int(dp_seed)
    sampling = torch.Generator().manual_seed(seed)
    noise = torch.Generator(device=device).manual_seed((seed + 0x9E3779B97F4A7C15) % 2**63)
    return sampling, noise


def _check_params(model: nn.Module, params: list[nn.Parameter]) -> None:
    adapter_params = {id(p) for n, p in model.named_parameters() if n.rsplit(".", 1)[-1] in ("lora_A", "lora_B")}
    stray = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in adapter_params]
    if stray:
        raise ValueError(f"DP-SGD here covers adapter parameters only, but {stray[:3]} also train; freeze them")
    if not params:
        raise ValueError("the model has no trainable parameters; were adapters injected?")
    low = [p.dtype for p in params if p.dtype != torch.float32]
    if low:
        raise ValueError(f"adapter parameters must be fp32 under DP (noise is drawn in fp32), found {low[0]}")


# ---------------------------------------------------------------------------------------------
# the round


def train_local_dp(
    model: nn.Module,
    examples: Sequence[dict[str, list[int]]],
    train_cfg: TrainConfig,
    dp_cfg: DPConfig,
    *,
    pad_id: int,
    round_index: int,
    num_rounds: int,
    seed: int,
    accountant_state: AccountantState | dict | str | None,
    on_step: Callable[[int, float], None] | None = None,
    dp_seed: int | None = None,
) -> tuple[DPTrainResult, AccountantState]:
    """One round of DP-SGD (``train_cfg.local_steps`` noisy steps) on this client's ``examples``.

    ``accountant_state`` is what the previous round returned (None for the first round); the
    returned state has this round composed in and must be kept for the next one. Everything is
    validated first (:func:`~fedlora.privacy.accounting.plan_example_level`); a budget that cannot
    pay for one round raises :class:`~fedlora.privacy.accounting.BudgetSpentError`. When the round
    would exceed ``dp.max_epsilon`` the client declines: nothing trains, the result has
    ``declined=True`` and a reason, and the returned state records the refusal.

    ``seed`` drives dropout masks only; ``dp_seed`` (tests only) fixes sampling and noise.
    ``train_cfg.gradient_checkpointing`` recomputes activations in the backward; the per-example
    gradients are the same (the taps' saved inputs are recomputed too, each call tapped once).
    """
    state = AccountantState.coerce(accountant_state)
    plan = plan_example_level(dp_cfg, train_cfg, num_examples=len(examples), num_rounds=num_rounds, state=state)
    decision = check_round_budget(
        state.history, sigma=plan.sigma, q=plan.q, steps=plan.local_steps, delta=plan.delta,
        max_epsilon=dp_cfg.max_epsilon, accountant=plan.accountant,
    )  # fmt: skip
    require_affordable_start(decision, state.history)
    base_state = _with_plan(state, plan)
    if not decision.train:
        new_state = base_state.with_round(_round_entry(round_index, plan, 0, declined=True, reason=decision.reason))
        return _result(plan, new_state, loss=float("nan"), steps=0, examples=0, tokens=0, seconds=0.0,
                       declined=True, reason=decision.reason), new_state  # fmt: skip

    params = trainable_parameters(model)
    _check_params(model, params)
    device = params[0].device
    sampling_gen, noise_gen = private_generators(device, dp_seed)
    torch.manual_seed(seed)  # dropout masks (not part of the privacy analysis)
    optimizer = torch.optim.AdamW(params, lr=train_cfg.lr, weight_decay=train_cfg.weight_decay)
    offset, total = (round_index - 1) * train_cfg.local_steps, num_rounds * train_cfg.local_steps
    loss_sum, tokens, seen, empty = 0.0, 0, 0, 0
    start = time.perf_counter()
    model.train()
    try:
        with activation_checkpointing(model, train_cfg.gradient_checkpointing), \
                GradSampleCollector(model, "norms" if dp_cfg.ghost_clipping else "grads") as collector:
            for step in range(plan.local_steps):
                lr = train_cfg.lr * lr_multiplier(offset + step, total, train_cfg.warmup_steps, train_cfg.lr_schedule)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                batch = [examples[i] for i in poisson_sample(len(examples), plan.q, sampling_gen)]
                summed = clipped_gradient_sum(
                    model, params, batch, pad_id=pad_id, clip=plan.clip,
                    physical_batch_size=plan.physical_batch_size, collector=collector, ghost=dp_cfg.ghost_clipping,
                )  # fmt: skip
                grads = noisy_mean(summed.grads, sigma=plan.sigma, clip=plan.clip,
                                   expected_batch_size=plan.batch_size, generator=noise_gen)  # fmt: skip
                for p, g in zip(params, grads, strict=True):
                    p.grad = g.to(p.dtype)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                loss_sum += summed.loss_sum
                tokens += summed.tokens
                seen += summed.examples
                empty += summed.examples == 0
                if on_step is not None:
                    on_step(step + 1, summed.loss_sum / max(summed.tokens, 1))
    finally:
        model.eval()
    new_state = base_state.composed(plan.sigma, plan.q, plan.local_steps).with_round(
        _round_entry(round_index, plan, plan.local_steps)
    )
    return _result(plan, new_state, loss=loss_sum / tokens if tokens else float("nan"), steps=plan.local_steps,
                   examples=seen, tokens=tokens, seconds=time.perf_counter() - start,
                   empty_batches=empty), new_state  # fmt: skip


def _with_plan(state: AccountantState, plan: ExamplePlan) -> AccountantState:
    s = AccountantState.coerce(state)
    s.delta, s.sigma, s.num_examples = plan.delta, plan.sigma, plan.num_examples
    if plan.calibration is not None:
        s.calibration = dict(plan.calibration)
    return s


def _round_entry(round_index: int, plan: ExamplePlan, steps: int, *, declined: bool = False, reason: str = "",
                 phase: str = "train") -> dict:  # fmt: skip
    return {"round": int(round_index), "phase": phase, "steps": int(steps), "sigma": plan.sigma, "q": plan.q,
            "clip": plan.clip, "batch_size": plan.batch_size, "physical_batch_size": plan.physical_batch_size,
            "local_steps": plan.local_steps, "declined": declined, "reason": reason}  # fmt: skip


def _result(plan: ExamplePlan, state: AccountantState, **fields) -> DPTrainResult:
    spent = privacy_spent(state.history, plan.delta, plan.accountant)
    return DPTrainResult(
        epsilon=spent.epsilon, epsilon_rdp=spent.epsilon_rdp, best_alpha=spent.best_alpha,
        epsilon_prv=spent.epsilon_prv, delta=plan.delta, sigma=plan.sigma, q=plan.q, clip=plan.clip,
        batch_size=plan.batch_size, physical_batch_size=plan.physical_batch_size,
        dp_steps=fields["steps"], total_steps=state.total_steps, num_examples=plan.num_examples,
        accountant=spent.accountant, **fields,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# the Fed-SB initialisation's gradient estimate, privatised


def private_dense_gradient(
    model: nn.Module,
    examples: Sequence[dict[str, list[int]]],
    train_cfg: TrainConfig,
    dp_cfg: DPConfig,
    *,
    pad_id: int,
    num_rounds: int,
    accountant_state: AccountantState | dict | str | None,
    steps: int = 1,
    charge: bool = True,
    dp_seed: int | None = None,
) -> tuple[dict[str, torch.Tensor], DPTrainResult, AccountantState]:
    """A private estimate of the full-weight gradient ∂L/∂W (d_out, d_in) of every adapted layer,
    for the Fed-SB initialisation (:mod:`fedlora.aggregation.fedsb_init`), which touches private data too.

    Same mechanism as a DP-SGD step, on the dense weight gradients instead of the adapter's::

        Ĝ = mean over ``steps`` Poisson(q) batches of (Σ_i clip_C(∇_W ℓ_i) + N(0, σ²C²)) / batch

    where ∇_W ℓ_i = Σ_t g_itᵀ·x_it is clipped jointly over all adapted layers; its norm is found
    without forming it (Gram matrices, :func:`~fedlora.privacy.grad_samplers.dense_sq_norms`). The
    ``steps`` steps are charged to the accountant as round 0 (phase ``fedsb_init``) and counted in
    σ's calibration, so the init and the training rounds together end at ``dp.target_epsilon``.

    The sketches the init sends (Y_i = Ĝ·Ω, then Z_i = Qᵀ·Ĝ) are post-processing of this one Ĝ:
    keep Ĝ between the two passes (or call again with the same secret ``dp_seed`` and
    ``charge=False``, which reproduces the same release); never draw fresh noise for pass 2.
    """
    state = AccountantState.coerce(accountant_state)
    done = sum(int(r["steps"]) for r in state.rounds if r.get("phase", "train") != "train")
    plan = plan_example_level(dp_cfg, train_cfg, num_examples=len(examples), num_rounds=num_rounds, state=state,
                              extra_planned_steps=done + (steps if charge else 0))  # fmt: skip
    if charge:
        decision = check_round_budget(state.history, sigma=plan.sigma, q=plan.q, steps=steps, delta=plan.delta,
                                      max_epsilon=dp_cfg.max_epsilon, accountant=plan.accountant)  # fmt: skip
        require_affordable_start(decision, state.history)
        if not decision.train:
            raise BudgetSpentError(f"the Fed-SB initialisation cannot run: {decision.reason}")
    params = trainable_parameters(model)
    _check_params(model, params)
    device = params[0].device
    sampling_gen, noise_gen = private_generators(device, dp_seed)
    captured: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}

    def on_grad(name, _module, _x_tilde, x, g):  # the base weight sees x (no dropout)
        captured.setdefault(name, []).append((x, g))

    estimate: dict[str, torch.Tensor] = {}
    loss_sum, tokens, seen = 0.0, 0, 0
    start = time.perf_counter()
    model.eval()  # no adapter dropout: the estimate is of the base weights' gradient
    with AdapterTaps(model, on_grad) as taps:
        summed = {n: torch.zeros(m.out_features, m.in_features, device=device) for n, m in taps.modules.items()}
        for _ in range(steps):
            for v in summed.values():
                v.zero_()
            batch = [examples[i] for i in poisson_sample(len(examples), plan.q, sampling_gen)]
            for lo in range(0, len(batch), plan.physical_batch_size):
                micro = batch[lo : lo + plan.physical_batch_size]
                captured.clear()
                with torch.enable_grad():
                    losses, counts = per_example_losses(model, move(collate(micro, pad_id), device))
                    losses.sum().backward()
                for p in params:
                    p.grad = None
                sq = sum(dense_sq_norms(x, g) for calls in captured.values() for x, g in calls)  # (b,)
                factors = clip_factors(sq.clamp(min=0).sqrt(), plan.clip)
                for name, calls in captured.items():
                    for x, g in calls:
                        summed[name] += dense_weighted_sum(x, g, factors)
                loss_sum += float((losses.detach() * counts).sum())
                tokens += int(counts.sum())
                seen += len(micro)
            for name, total in summed.items():
                noise = torch.randn(total.shape, generator=noise_gen, dtype=NOISE_DTYPE, device=noise_gen.device)
                private = (total + plan.sigma * plan.clip * noise.to(device)) / plan.batch_size
                estimate[name] = estimate.get(name, 0) + private / steps
    new_state = _with_plan(state, plan)
    if charge:
        new_state = new_state.composed(plan.sigma, plan.q, steps).with_round(
            _round_entry(0, plan, steps, phase="fedsb_init")
        )
    result = _result(plan, new_state, loss=loss_sum / max(tokens, 1), steps=steps if charge else 0, examples=seen,
                     tokens=tokens, seconds=time.perf_counter() - start)  # fmt: skip
    return estimate, result, new_state
