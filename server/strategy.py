"""Thin Flower-side strategy: who trains, what each client is sent, which replies are fit to
aggregate. Every fact about a method (adapter kind, parts that travel, streaming, slicing, the
first state) comes from its declaration, ``fedlora.aggregation.<name>.METHOD``.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass

import numpy as np
import torch

from flwr.app import RecordDict

from fedlora.adapters.lora import lora_scale
from fedlora.adapters.state import AdapterState, arrays_to_state, layout_mismatch
from fedlora.aggregation import GlobalState, Method, RoundAggregate, resolve_method
from fedlora.aggregation.common import AggregationError, normalize_weights
from fedlora.config import FedloraConfig
from fedlora.node_check import NodeInfo  # what a node told the server when it was discovered
from fedlora.protocol.messages import (
    METRICS,
    NUM_EXAMPLES,
    TRAIN_EXAMPLES,
    TRAIN_LOSS,
    TRAIN_TOKENS,
    UPDATE,
    RoundConfig,
    from_array_record,
)


@dataclass
class LoraStrategy:
    """Sampling, payloads and aggregation for one run."""

    cfg: FedloraConfig
    method: Method

    @property
    def name(self) -> str:
        return self.method.name

    @property
    def exact(self) -> bool:
        return self.method.exact

    @property
    def adapter_kind(self) -> str:
        return self.cfg.adapter.kind if self.method.adapter_kind == "lora" else self.method.adapter_kind

    @property
    def parts(self) -> tuple[str, ...]:
        return self.method.parts

    def scale(self, rank: int) -> float:
        return lora_scale(self.cfg.adapter.alpha, rank, self.cfg.adapter.rslora)

    def num_to_sample(self, available: int) -> int:
        s = self.cfg.strategy
        return min(available, max(s.min_clients, math.ceil(s.fraction_train * available)))

    def sample(self, nodes: list[NodeInfo], rng: random.Random) -> list[NodeInfo]:
        """Sampled nodes, by partition id, so a seed picks the same clients on every run."""
        ordered = sorted(nodes, key=lambda n: n.partition_id)
        return sorted(rng.sample(ordered, self.num_to_sample(len(ordered))), key=lambda n: n.partition_id)

    def initial_state(self, adapter: AdapterState, min_rank: int) -> GlobalState:
        """The round-0 state from the server model's freshly initialised rank-r_max adapter."""
        extras = {"seed": self.cfg.adapter.init_seed, "min_rank": min_rank,
                  "lorafair_lambda": self.cfg.strategy.lorafair_lambda}
        return self.method.initial_state(adapter, extras)

    def frame_for(self, state: GlobalState, rank: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]] | None:
        """A rank-``rank`` client's slice of the Fed-SB frame (None for other methods)."""
        if "sb_frame" not in state.extras:
            return None
        return {n: (f["B"][:, :rank].contiguous(), f["A"][:rank].contiguous()) for n, f in state.extras["sb_frame"].items()}

    def round_config(self, rnd: int, rank: int) -> RoundConfig:
        """What a rank-``rank`` client is asked to do in round ``rnd``."""
        return RoundConfig(rnd, self.cfg.num_rounds, self.name, rank, self.adapter_kind, self.parts)

    def start_for(self, state: GlobalState, rank: int) -> AdapterState:
        """The adapter a rank-``rank`` client starts its round from."""
        return self.method.slice_for_rank(state, rank, scale=self.scale(rank))

    def expected_reply(self, start: AdapterState) -> dict[str, tuple[int, ...]]:
        """Key → shape of the update arrays a client that was sent ``start`` must reply with: the
        parts of its strategy (A and B, B alone, or the r×r core R) and a scale per layer."""
        shapes: dict[str, tuple[int, ...]] = {}
        for name, f in start.items():
            r = f.rank
            if "R" in self.parts:
                shapes[f"{name}.lora_R"] = (r, r)
            if "A" in self.parts:
                shapes[f"{name}.lora_A"] = tuple(f.A.shape)
            if "B" in self.parts:
                shapes[f"{name}.lora_B"] = tuple(f.B.shape)
            shapes[f"{name}.scale"] = (1,)
        return shapes

    def max_reply_bytes(self, start: AdapterState) -> int:
        """The largest train reply accepted from a client sent ``start``: ``strategy.max_reply_bytes``,
        or (0) four times the fp32 payload it should send plus 1 MiB for metrics and a privacy entry."""
        if self.cfg.strategy.max_reply_bytes:
            return self.cfg.strategy.max_reply_bytes
        return 4 * sum(4 * math.prod(shape) for shape in self.expected_reply(start).values()) + 2**20

    def check_reply(self, arrays: dict[str, np.ndarray], start: AdapterState) -> str | None:
        """Why a client's raw update arrays must be rejected (wrong keys, rank, shape or dtype,
        non-finite values), or None when they are fit to parse and aggregate. Checked before parsing,
        so a reply that leaves out a part it must send is never filled in from ``start``."""
        expected = self.expected_reply(start)
        missing, extra = sorted(set(expected) - set(arrays)), sorted(set(arrays) - set(expected))
        if missing or extra:
            return (f"wrong keys: {len(missing)} missing {missing[:3]}, {len(extra)} unexpected {extra[:3]} "
                    f"(strategy {self.name} replies with {', '.join(self.parts)} and a scale per layer)")
        for key, want in expected.items():
            got = tuple(np.shape(arrays[key]))
            if got == want:
                continue
            name, part = key.rsplit(".", 1)
            rank_axis = {"lora_A": 0, "lora_B": 1, "lora_R": 0}.get(part)
            # only the rank differs: A (r', d_in), B (d_out, r'), R (r', r')
            if rank_axis is not None and len(got) == 2 and (part != "lora_R" or got[0] == got[1]) and all(
                    g == w or i == rank_axis or part == "lora_R" for i, (g, w) in enumerate(zip(got, want))):
                return f"wrong rank: {key} has rank {got[rank_axis]}, but this client was sent rank {start[name].rank}"
            return f"wrong shape: {key} is {got}, expected {want}"
        for key, arr in arrays.items():
            if np.asarray(arr).dtype.kind != "f":
                return f"wrong dtype: {key} is {np.asarray(arr).dtype}, expected float32"
            if not np.isfinite(arr).all():
                return f"non-finite values in {key} ({int(np.size(arr) - np.isfinite(arr).sum())} of {np.size(arr)})"
        return None

    def check_update(self, update: AdapterState, start: AdapterState) -> str | None:
        """Why a parsed update must be rejected, or None when it is fit to aggregate."""
        reason = layout_mismatch(start, update)
        if reason:
            return f"wrong shape: does not match the adapter it was sent ({reason})"
        for name, f in update.items():
            if not (torch.isfinite(f.A).all() and torch.isfinite(f.B).all()) or not math.isfinite(f.scale):
                return f"non-finite values in {name}"
        return None

    def check_train_reply(self, content: RecordDict, start: AdapterState) -> tuple[str | None, AdapterState | None, dict]:
        """(why a train reply must be rejected or None, its parsed update, its metrics): metrics
        present and finite, not declined, then :meth:`check_reply` on the raw arrays, then parsed."""
        if METRICS not in content:
            return "malformed reply: no metrics record", None, {}
        metrics = dict(content[METRICS])
        if metrics.get("declined"):
            return "declined to train (its privacy budget would be exceeded)", None, metrics
        reason = _check_train_metrics(metrics)
        if reason:
            return f"malformed metrics: {reason}", None, metrics
        if UPDATE not in content:
            return "wrong keys: the reply has no update record", None, metrics
        arrays = from_array_record(content[UPDATE])
        reason = self.check_reply(arrays, start)
        if reason:
            return reason, None, metrics
        try:
            update = arrays_to_state(arrays, like=start)
        except ValueError as err:
            return f"malformed update ({err})", None, metrics
        return self.check_update(update, start), update, metrics

    def accumulator(self, state: GlobalState) -> RoundAggregate:
        """The round's aggregate: ``add`` each accepted reply, then ``finish`` (streaming where the
        method declares it, so the server holds running sums, not the replies)."""
        return self.method.begin(state)

    def lift(self, state: GlobalState, update: AdapterState) -> AdapterState:
        """A client update as ordinary LoRA factors (Fed-SB cores → s·B·R·A), for ΔW*."""
        return self.method.lift(state, update)


def _check_train_metrics(metrics: dict) -> str | None:
    """``num-examples`` a finite number > 0; ``train_tokens`` and ``train_examples``, where sent,
    finite and ≥ 0; ``train_loss`` finite, and present unless the client used no tokens."""
    def bad(key: str, value, rule: str) -> str:
        return f"{key}={value!r} (must be {rule})"

    def number(value) -> bool:
        return isinstance(value, (int, float)) and math.isfinite(value)

    if not number(n := metrics.get(NUM_EXAMPLES)) or n <= 0:
        return bad(NUM_EXAMPLES, n, "a finite number > 0")
    for key in (TRAIN_TOKENS, TRAIN_EXAMPLES):
        if key in metrics and (not number(metrics[key]) or metrics[key] < 0):
            return bad(key, metrics[key], "a finite number ≥ 0")
    if metrics.get(TRAIN_TOKENS, 1) > 0 and not number(metrics.get(TRAIN_LOSS)):
        return bad(TRAIN_LOSS, metrics.get(TRAIN_LOSS), "a finite number when train_tokens > 0")
    if TRAIN_LOSS in metrics and not number(metrics[TRAIN_LOSS]):
        return bad(TRAIN_LOSS, metrics[TRAIN_LOSS], "a finite number")
    return None


def short_error(text: str, limit: int = 300) -> str:
    """A client's error report in one line: the first ``SomeError: message`` line of a traceback
    (the root cause), else its first line; terminal colour codes removed."""
    lines = [ln.strip() for ln in re.sub(r"\x1b\[[0-9;]*m", "", str(text)).splitlines() if ln.strip()]
    causes = [ln for ln in lines if re.match(r"^[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt)\b:", ln)]
    line = (causes or lines or [""])[0]
    return line if len(line) <= limit else line[: limit - 1] + "…"


class IdealAccumulator:
    """Streaming ΔW* = Σ p_i·s_i·B_i·A_i in float64, one dense sum per layer."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.total = 0.0

    def add(self, update: AdapterState, weight: float) -> None:
        for name, f in update.items():
            d = weight * f.delta(torch.float64)
            self.sums[name] = self.sums[name] + d if name in self.sums else d
        self.total += weight

    def result(self) -> dict[str, torch.Tensor]:
        if self.total <= 0:
            raise AggregationError("no updates")
        return {n: s / self.total for n, s in self.sums.items()}


def make_strategy(cfg: FedloraConfig) -> LoraStrategy:
    """The strategy named by ``cfg.strategy.name``, checked against the config
    (:func:`fedlora.aggregation.resolve_method`; raises ``ConfigError``)."""
    return LoraStrategy(cfg, resolve_method(cfg))


__all__ = ["IdealAccumulator", "LoraStrategy", "NodeInfo", "make_strategy", "normalize_weights", "short_error"]
