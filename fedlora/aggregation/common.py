"""Helpers shared by every aggregation method."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from fedlora.adapters.state import AdapterState, LoraFactors, layout_mismatch
from fedlora.aggregation.terms import DenseTerm



class AggregationError(ValueError):
    """Client updates cannot be combined as given."""


def normalize_weights(weights: Sequence[float]) -> list[float]:
    """p_i = w_i / Σ w_j; weights must be non-negative with a positive sum."""
    if not weights:
        raise AggregationError("no client updates to aggregate")
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise AggregationError(f"client weights {list(weights)} must be ≥ 0 with a positive sum")
    total = float(sum(weights))
    return [float(w) / total for w in weights]


def check_same_layout(reference: AdapterState, update: AdapterState, who: str = "client") -> None:
    """Raise unless ``update`` has the same layers and shapes as ``reference``."""
    reason = layout_mismatch(reference, update)
    if reason:
        raise AggregationError(f"{who} update does not match the others ({reason}); mixed ranks need a rank-aware strategy")


@dataclass
class GlobalState:
    """What the server holds between rounds: an explicit value, passed in and returned.

    ``adapter`` is what every client starts its next round from. ``base_terms`` are exact
    low-rank terms folded into the frozen base weight (FedEx-LoRA residuals, FLoRA stacks), kept
    factored per layer in the order they were added: W_eff = W + Σ_k B_k·A_k (scale folded in).
    """

    adapter: AdapterState
    base_terms: dict[str, list[LoraFactors | DenseTerm]] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)
    """Method-specific state (e.g. a LoRA-FAIR λ, Fed-SB factors), checkpointed with the rest."""


def round_update(before: GlobalState, after: GlobalState) -> dict[str, torch.Tensor]:
    """ΔW_global per layer for the round that turned ``before`` into ``after`` (float64).

    The adapter the clients will start from (s·B·A in full) plus every base term added this
    round; compared against ΔW* = Σ p_i·s_i·B_i·A_i it gives the round's aggregation error.
    """
    out: dict[str, torch.Tensor] = {}
    for name, f in after.adapter.items():
        delta = f.delta(torch.float64)
        for term in after.base_terms.get(name, [])[len(before.base_terms.get(name, [])):]:
            delta = delta + term.delta(torch.float64)
        out[name] = delta
    return out


def ideal_update(updates: Sequence[AdapterState], weights: Sequence[float]) -> dict[str, torch.Tensor]:
    """ΔW* = Σ p_i·s_i·B_i·A_i per layer, in float64 (the reference every method is held to)."""
    p = normalize_weights(weights)
    out: dict[str, torch.Tensor] = {}
    for update, p_i in zip(updates, p, strict=True):
        for name, f in update.items():
            d = p_i * f.delta(torch.float64)
            out[name] = out[name] + d if name in out else d
    return out


def aggregation_error(global_update: dict[str, torch.Tensor], ideal: dict[str, torch.Tensor]) -> float:
    """‖ΔW_global − ΔW*‖_F / ‖ΔW*‖_F over all layers together (0 when ΔW* = 0 and equal)."""
    num = sum(float(torch.sum((global_update[n] - ideal[n]) ** 2)) for n in ideal)
    den = sum(float(torch.sum(ideal[n] ** 2)) for n in ideal)
    return (num / den) ** 0.5 if den > 0 else (0.0 if num == 0 else float("inf"))
