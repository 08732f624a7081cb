"""The per-client ε budget (``dp.max_epsilon``): train this round, or decline?

A client asks *before* training whether its history plus the round it is about to run would
exceed the budget (at the run's δ, with the headline accountant). If so it declines: it trains
nothing, spends nothing, and says so in its reply; the server carries on with the others and the
ledger records the refusal. A budget that cannot pay for even the first round is a configuration
error (:class:`~fedlora.privacy.accounting.BudgetSpentError`), raised before any training.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedlora.privacy.accounting import BudgetSpentError, compose, headline_epsilon


@dataclass(frozen=True)
class BudgetDecision:
    """Whether the next round fits the budget, and the figures behind the answer."""

    train: bool
    epsilon_now: float
    """ε spent before this round."""
    epsilon_after: float
    """ε after this round if it trains."""
    max_epsilon: float | None
    reason: str
    """Empty when training; otherwise the sentence the client's reply carries."""


def check_round_budget(
    history: list[list[float]],
    *,
    sigma: float,
    q: float,
    steps: int,
    delta: float,
    max_epsilon: float | None,
    accountant: str = "rdp",
) -> BudgetDecision:
    """Would ``steps`` more steps at (σ, q) push ε above ``max_epsilon``? (None: no budget.)"""
    now = headline_epsilon(history, delta, accountant)
    after = headline_epsilon(compose(history, sigma, q, steps), delta, accountant)
    if max_epsilon is None or after <= max_epsilon:
        return BudgetDecision(True, now, after, max_epsilon, "")
    reason = (
        f"privacy budget: ε would reach {after:.3f} > dp.max_epsilon={max_epsilon:g} after this round "
        f"(spent so far {now:.3f} at δ={delta:.3g}); the client declines to train"
    )
    return BudgetDecision(False, now, after, max_epsilon, reason)


def require_affordable_start(decision: BudgetDecision, history: list[list[float]]) -> None:
    """Raise :class:`BudgetSpentError` when a client with no history cannot afford one round."""
    if not decision.train and not history:
        raise BudgetSpentError(
            f"dp.max_epsilon={decision.max_epsilon:g} is already spent at the start: a single round costs "
            f"ε={decision.epsilon_after:.3f}, so no client could ever train; raise dp.max_epsilon, raise "
            "dp.noise_multiplier (or lower dp.target_epsilon), or lower train.local_steps/train.batch_size"
        )
