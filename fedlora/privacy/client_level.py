"""Client-level DP on the server: DP-FedAvg (McMahan, Ramage, Talwar & Zhang, ICLR 2018,
"Learning Differentially Private Recurrent Language Models", arXiv:1710.06963).

The privacy unit is a client's whole dataset. Each round, with m clients sampled out of a
population P and every client's update taken relative to the round's starting global state::

    Δ_i  = θ_i − θ_start                         (the trained factors only, all layers together)
    Δ̄_i  = Δ_i · min(1, C / ‖Δ_i‖)                (per-client clipping)
    θ'   = θ_start + (1/m)·Σ_i Δ̄_i + N(0, (z·C/m)²·I)      (equal weights: sensitivity C/m)
    ε    = RDP of the sampled Gaussian mechanism (σ = z, q = m/P), composed over rounds

The strategy then runs on the single privatised update ``θ'`` with weight 1
(``aggregate(state, [θ'], [1.0])``): every strategy below whose aggregate is the mean of the
trained factors returns exactly θ', and anything it does afterwards is post-processing.

Which strategies that is well-defined for (:func:`check_client_level_strategy`):

- ``fedavg`` (A and B), ``ffa`` (B; the shared A is public and checked unchanged), ``fedsb`` (the
  r×r core R): their new state is a function of the mean of the trained factors alone.
- ``fedex``, ``flora``: refused. FedEx adds the residual Σ p_i·B_i·A_i − B̄·Ā and FLoRA stacks
  every client's B_i, A_i: both need each client's individual factors (their products), which the
  clipped-and-noised mean does not release; run on θ' alone they would silently degenerate.
  Noising those products too would be a second, dense (d_out × d_in per layer) release.
- ``lorafair``: refused for the same reason. Its correction targets T = Σ p_i·s_i·B_i·A_i
  (see :mod:`fedlora.aggregation.lorafair`), a function of individual products; from θ' alone the
  correction is exactly zero and LoRA-FAIR would silently be FedAvg.
- ``hetlora``: refused. Its weights q_i ∝ ‖B_i·A_i‖ are data-dependent and unequal, so one
  client's weight is unbounded and the sensitivity C/m does not hold.

Under secure aggregation the server never sees an individual update: clipping must then happen on
each client (:func:`clip_update` is pure and runs there) and strategies that need individual
factors (``fedex``, ``flora``, ``lorafair``, ``hetlora``) cannot run at all
(:func:`check_secure_aggregation`).

Noise: a ``torch.Generator`` the caller passes; :func:`noise_generator` seeds one from the OS —
a generator seeded from the run's public config seed would let anyone subtract the noise.
Sampling: Flower samples a fixed number m of clients uniformly; the accountant assumes Poisson
sampling at q = m/P, the standard approximation (also Flower's and TensorFlow Federated's).
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from fedlora.adapters.state import AdapterState, LoraFactors, layout_mismatch
from fedlora.aggregation import METHODS
from fedlora.config import DPConfig
from fedlora.privacy.accounting import (
    AccountantState,
    PrivacyConfigError,
    PrivacySpent,
    calibrate_noise,
    privacy_spent,
)

class ClientLevelDPError(PrivacyConfigError):
    """Client-level DP cannot be combined with this strategy or these updates."""


def supported_strategies() -> list[str]:
    """Methods whose declaration admits client-level DP (``METHOD.client_dp.clipped``)."""
    return sorted(name for name, m in METHODS.items() if m.client_dp.clipped)


def check_client_level_strategy(strategy: str, *, secure_aggregation: bool = False) -> tuple[str, ...]:
    """The factors client-level DP clips and noises for ``strategy`` (its declaration's
    ``client_dp``), or a :class:`ClientLevelDPError` saying why it is refused."""
    method = METHODS.get(strategy)
    if method is None:
        raise ClientLevelDPError(
            f"dp.mode=client does not know strategy.name={strategy!r}; supported: {supported_strategies()}"
        )
    if method.client_dp.refused:
        raise ClientLevelDPError(
            f"dp.mode=client cannot run with strategy.name={strategy}: {method.client_dp.refused}. "
            f"Use one of {supported_strategies()} (ffa and fedsb keep the noise linear in the update)"
        )
    if secure_aggregation:
        check_secure_aggregation(strategy)
    return method.client_dp.clipped


def check_secure_aggregation(strategy: str) -> None:
    """Refuse methods whose aggregate is not a weighted sum of exactly what clients send
    (``METHOD.weighted_sum``): under secure aggregation the server learns only that sum."""
    method = METHODS[strategy]
    if not method.weighted_sum:
        why = method.client_dp.refused or "it needs more than the sum of the updates"
        raise ClientLevelDPError(
            f"strategy.name={strategy} cannot run under secure aggregation: the server only learns the "
            f"sum of the updates, but {why}"
        )


def check_equal_weights(weights: Sequence[float]) -> None:
    """DP-FedAvg's sensitivity C/m needs every client weighted 1/m (not by N_k)."""
    if not weights:
        raise ClientLevelDPError("no client updates to privatise")
    if any(not math.isclose(w, weights[0], rel_tol=1e-12, abs_tol=0.0) for w in weights) or weights[0] <= 0:
        raise ClientLevelDPError(
            f"client-level DP needs equal client weights (sensitivity C/m), got {list(weights)[:6]}; "
            "weight every reply 1 instead of by its number of examples"
        )


# ---------------------------------------------------------------------------------------------
# clipping and noise: pure tensor math


def update_norm(start: AdapterState, update: AdapterState, factors: Sequence[str]) -> float:
    """‖θ_i − θ_start‖ over the trained factors of every layer together (float64)."""
    sq = 0.0
    for name, f in update.items():
        for attr in factors:
            sq += float(torch.sum((getattr(f, attr).double() - getattr(start[name], attr).double()) ** 2))
    return math.sqrt(sq)


def _check_layout(start: AdapterState, update: AdapterState, factors: Sequence[str], who: str) -> None:
    reason = layout_mismatch(start, update)
    if reason:
        raise ClientLevelDPError(f"{who}'s update does not match the round's start ({reason}): client-level DP needs equal ranks")
    for name, f in update.items():
        s = start[name]
        for attr in ("A", "B"):
            if attr not in factors and not torch.equal(getattr(f, attr), getattr(s, attr)):
                raise ClientLevelDPError(
                    f"{who} changed {name}.{attr}, which this strategy keeps fixed; its change would "
                    "escape clipping and noise"
                )


def clip_update(start: AdapterState, update: AdapterState, clip: float, factors: Sequence[str]) -> tuple[AdapterState, float]:
    """θ_start + Δ·min(1, C/‖Δ‖) and ‖Δ‖ (runs on the server, or on a client under secure
    aggregation). Untrained factors are returned as the start's."""
    _check_layout(start, update, factors, "a client")
    norm = update_norm(start, update, factors)
    scale = min(1.0, clip / (norm + 1e-12))
    out: AdapterState = {}
    for name, f in update.items():
        s = start[name]
        parts = {
            attr: (getattr(s, attr).double() + scale * (getattr(f, attr).double() - getattr(s, attr).double())).float()
            if attr in factors else getattr(s, attr)
            for attr in ("A", "B")
        }  # fmt: skip
        out[name] = LoraFactors(parts["A"], parts["B"], s.scale)
    return out, norm


def noised_mean(
    start: AdapterState,
    clipped: Sequence[AdapterState],
    *,
    noise_multiplier: float,
    clip: float,
    factors: Sequence[str],
    generator: torch.Generator,
) -> AdapterState:
    """θ_start + (1/m)·Σ_i Δ̄_i + N(0, (z·C/m)²) on every trained coordinate (fp64 sums, fp32 out)."""
    m = len(clipped)
    std = noise_multiplier * clip / m
    out: AdapterState = {}
    for name, s in start.items():
        parts = {}
        for attr in ("A", "B"):
            base = getattr(s, attr)
            if attr not in factors:
                parts[attr] = base
                continue
            mean = sum(getattr(c[name], attr).double() - base.double() for c in clipped) / m
            noise = torch.randn(base.shape, generator=generator, dtype=torch.float64)
            parts[attr] = (base.double() + mean + std * noise).float()
        out[name] = LoraFactors(parts["A"], parts["B"], s.scale)
    return out


def noise_generator(seed: int | None = None) -> torch.Generator:
    """A CPU generator for the server's noise: 63 bits from the OS unless a test passes ``seed``."""
    return torch.Generator().manual_seed(secrets.randbits(63) if seed is None else int(seed))


@dataclass(frozen=True)
class ClientLevelRelease:
    """One round's privatised update and what the ledger records about it."""

    update: AdapterState
    """θ' — hand it to the strategy as the single update: ``aggregate(state, [θ'], [1.0])``."""
    clients: int
    noise_std: float
    clipped_clients: int
    """How many updates were longer than C (server-side diagnostic; not part of the report)."""


def privatize_round(
    strategy: str,
    start: AdapterState,
    updates: Sequence[AdapterState],
    weights: Sequence[float],
    *,
    clip: float,
    noise_multiplier: float,
    generator: torch.Generator,
    secure_aggregation: bool = False,
) -> ClientLevelRelease:
    """Clip every update to C around ``start`` (what the clients started from, in their own
    representation: the SB core for fedsb), average with equal weights, add N(0, (z·C/m)²)."""
    factors = check_client_level_strategy(strategy, secure_aggregation=secure_aggregation)
    check_equal_weights(weights)
    if len(updates) != len(weights):
        raise ClientLevelDPError(f"{len(updates)} updates but {len(weights)} weights")
    if clip <= 0 or noise_multiplier < 0:
        raise ClientLevelDPError(f"clip={clip} must be > 0 and noise multiplier z={noise_multiplier} ≥ 0")
    clipped, norms = [], []
    for i, update in enumerate(updates):
        if secure_aggregation:  # already clipped on the client; verify the bound instead of trusting it
            _check_layout(start, update, factors, f"client {i}")
            norm = update_norm(start, update, factors)
            if norm > clip * (1 + 1e-5):
                raise ClientLevelDPError(f"client {i}'s update has norm {norm:.4g} > C={clip}: not clipped on the client")
            clipped.append(update)
        else:
            c, norm = clip_update(start, update, clip, factors)
            clipped.append(c)
        norms.append(norm)
    std = noise_multiplier * clip / len(updates)
    theta = noised_mean(start, clipped, noise_multiplier=noise_multiplier, clip=clip, factors=factors, generator=generator)
    return ClientLevelRelease(theta, len(updates), std, sum(n > clip for n in norms))


# ---------------------------------------------------------------------------------------------
# accounting over rounds


def client_level_delta(population: int) -> float:
    """min(1e-5, 1/(10·P)): the client-level analogue of example-level δ with N_k → P."""
    if population < 1:
        raise PrivacyConfigError("client-level DP needs a population of at least one client")
    return min(1e-5, 1.0 / (10 * population))


def client_level_noise(dp: DPConfig, *, clients_per_round: int, population: int, num_rounds: int) -> tuple[float, float]:
    """(z, δ) for the run: ``dp.noise_multiplier``, or calibrated for ``dp.target_epsilon`` over
    ``num_rounds`` releases at q = m/P. Raises :class:`ClientLevelDPError` on bad input."""
    if dp.mode != "client":
        raise ClientLevelDPError(f"client-level DP needs dp.mode=client, got dp.mode={dp.mode}")
    if not 1 <= clients_per_round <= population:
        raise ClientLevelDPError(f"clients per round m={clients_per_round} must lie in [1, population={population}]")
    delta = dp.delta if dp.delta is not None else client_level_delta(population)
    if delta >= 1.0 / population:
        raise ClientLevelDPError(f"dp.delta={delta:g} must be below 1/population = 1/{population}")
    if dp.noise_multiplier is not None:
        return float(dp.noise_multiplier), delta
    if dp.target_epsilon is None:
        raise ClientLevelDPError("dp.mode=client needs dp.noise_multiplier or dp.target_epsilon")
    return calibrate_noise(dp.target_epsilon, delta, clients_per_round / population, num_rounds, dp.accountant), delta


def account_round(state: AccountantState | None, *, noise_multiplier: float, clients: int, population: int,
                  delta: float, round_index: int) -> AccountantState:  # fmt: skip
    """The server's client-level accountant after one more release at q = m/P."""
    s = AccountantState.coerce(state)
    if s.delta is not None and s.delta != delta:
        raise ClientLevelDPError(f"client-level δ changed mid-run ({s.delta:g} → {delta:g})")
    q = clients / population
    s = s.composed(noise_multiplier, q, 1)
    s.delta, s.sigma, s.num_examples = delta, noise_multiplier, population
    return s.with_round({"round": int(round_index), "phase": "client_level", "steps": 1, "sigma": noise_multiplier,
                         "q": q, "clients": int(clients), "declined": False, "reason": ""})  # fmt: skip


def client_level_spent(state: AccountantState, accountant: str = "rdp") -> PrivacySpent:
    if state.delta is None:
        raise ClientLevelDPError("the client-level accountant has no δ yet (no round released)")
    return privacy_spent(state.history, state.delta, accountant)
