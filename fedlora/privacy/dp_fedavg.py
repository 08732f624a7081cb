"""The server's client-level DP (DP-FedAvg) for one run: its noise multiplier and δ, the
accountant, and each round's release recorded in the privacy ledger. The math of a release is in
:mod:`fedlora.privacy.client_level`; this module keeps the run's bookkeeping out of the round loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedlora.adapters.state import AdapterState
from fedlora.aggregation import GlobalState, Method
from fedlora.config import ConfigError, DPConfig
from fedlora.privacy.accounting import AccountantState, most_spent
from fedlora.privacy.client_level import (
    account_round,
    check_client_level_strategy,
    client_level_noise,
    client_level_spent,
    noise_generator,
    privatize_round,
)
from fedlora.privacy.ledger import append_entry, client_level_entry, restore_client_level_state


@dataclass
class ClientLevelDP:
    """Noise multiplier z, δ, the client population P and the accountant of one run."""

    noise_multiplier: float
    delta: float
    population: int
    accountant: AccountantState | None = None

    @classmethod
    def for_run(cls, dp: DPConfig, method: Method, ranks: list[int], *, clients_per_round: int, population: int,
                num_rounds: int) -> ClientLevelDP:
        """Check the method and the client ranks, then calibrate (z, δ) for the run. Raises
        ``ClientLevelDPError`` / ``ConfigError`` naming the problem."""
        check_client_level_strategy(method.name)
        if len(set(ranks)) > 1:
            raise ConfigError("dp.mode=client needs every client at the same rank (one clipping reference)")
        z, delta = client_level_noise(dp, clients_per_round=clients_per_round, population=population,
                                      num_rounds=num_rounds)
        return cls(z, delta, population)

    def release(self, method: Method, state: GlobalState, start: AdapterState, updates: list[AdapterState],
                run_dir: Path, rnd: int, clip: float, sampled: int | None = None) -> GlobalState:
        """Clip, average with equal weights, noise; account the release; record it in the ledger;
        the method then runs on the one privatised update (post-processing).

        ``sampled`` is how many clients the round selected (default: ``len(updates)``). The
        accountant's sampling rate is q = sampled / population, never the count that replied: a
        client that drops out was still selected, and counting only the replies would make q, and so
        ε, smaller than the selection that took place."""
        sampled = len(updates) if sampled is None else sampled
        if sampled < len(updates):
            raise ValueError(f"{len(updates)} updates from a round that selected {sampled} clients")
        rel = privatize_round(method.name, start, updates, [1.0] * len(updates), clip=clip,
                              noise_multiplier=self.noise_multiplier, generator=noise_generator())
        self.accountant = account_round(self.accountant, noise_multiplier=self.noise_multiplier, clients=sampled,
                                        population=self.population, delta=self.delta, round_index=rnd)
        eps = client_level_spent(self.accountant).epsilon
        append_entry(run_dir, client_level_entry(self.accountant, round_index=rnd, clip=clip, sampled=sampled,
                                                 aggregated=len(updates), population=self.population,
                                                 noise_std=rel.noise_std, epsilon=eps))
        return method.aggregate(state, [rel.update], [1.0])

    def checkpoint(self) -> dict[str, Any] | None:
        """The accountant as a checkpoint stores it."""
        return self.accountant.to_json() if self.accountant else None

    def restore(self, saved: dict[str, Any] | None, run_dir: Path) -> None:
        """The accountant from a checkpoint, or the ledger's when it knows more (a round that was
        interrupted after its release was recorded stays counted)."""
        self.accountant = most_spent(AccountantState.from_json(saved) if saved else None,
                                     restore_client_level_state(run_dir))
