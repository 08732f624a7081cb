"""Thin Flower-side strategy: client sampling and reply checks around a pure aggregation module.

The math of each method lives in ``fedlora.aggregation.<name>``; this class only decides who
trains, what each client is told, and which replies are fit to aggregate.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from types import ModuleType

import torch

from fedlora.adapters.state import AdapterState
from fedlora.aggregation import AGGREGATORS, GlobalState
from fedlora.config import ConfigError, FedloraConfig, StrategyConfig


@dataclass
class LoraStrategy:
    """Sampling and aggregation for one run."""

    cfg: StrategyConfig
    method: ModuleType

    @property
    def exact(self) -> bool:
        return bool(self.method.EXACT)

    def num_to_sample(self, available: int) -> int:
        return min(available, max(self.cfg.min_clients, math.ceil(self.cfg.fraction_train * available)))

    def sample(self, node_ids: list[int], rng: random.Random) -> list[int]:
        """Sampled node ids for a round (sorted, so messages go out in a stable order)."""
        return sorted(rng.sample(sorted(node_ids), self.num_to_sample(len(node_ids))))

    def train_config(self, round_index: int, num_rounds: int) -> dict:
        return {"round": round_index, "num_rounds": num_rounds, "strategy": self.cfg.name}

    def check_update(self, update: AdapterState, reference: AdapterState) -> str | None:
        """Why a client's update must be rejected, or None when it is fit to aggregate."""
        if set(update) != set(reference):
            return f"layers differ from the global adapter ({len(update)} vs {len(reference)})"
        for name, f in update.items():
            ref = reference[name]
            if f.A.shape != ref.A.shape or f.B.shape != ref.B.shape:
                return f"{name}: shapes A{tuple(f.A.shape)} B{tuple(f.B.shape)} ≠ global A{tuple(ref.A.shape)}"
            if not (torch.isfinite(f.A).all() and torch.isfinite(f.B).all()):
                return f"{name}: non-finite values"
        return None

    def aggregate(self, state: GlobalState, updates: list[AdapterState], weights: list[float]) -> GlobalState:
        return self.method.aggregate(state, updates, weights)


def make_strategy(cfg: FedloraConfig) -> LoraStrategy:
    """The strategy named by ``cfg.strategy.name``, checked against the run's client ranks."""
    name = cfg.strategy.name
    if name not in AGGREGATORS:
        raise ConfigError(f"strategy={name!r} is unknown; choose one of {', '.join(sorted(AGGREGATORS))}")
    method = AGGREGATORS[name]
    if len(set(cfg.client_ranks)) > 1 and not method.MIXED_RANKS:
        raise ConfigError(
            f"strategy={name} cannot aggregate clients of different ranks (client_ranks={cfg.client_ranks}); "
            "give every client the same rank or pick a strategy that supports mixed ranks"
        )
    return LoraStrategy(cfg.strategy, method)
