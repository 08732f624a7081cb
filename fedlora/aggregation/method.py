"""The one declaration every aggregation method makes: :class:`Method`.

Each module in ``fedlora.aggregation`` ends with ``METHOD = Method(...)``, a frozen object that
holds every fact the rest of fedlora needs about the method — what clients train and send, what
client-level DP may clip, whether the aggregate streams, how a client of rank r starts — and the
functions that carry it out. The server, the client, the privacy code and the benchmarks read
these fields; nothing probes a module for optional functions, and no other file keeps a table
keyed by method name. :meth:`Method.__post_init__` checks the declaration when the module is
imported, so a method that leaves a fact out or contradicts itself fails at import, not in round 7.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from fedlora.adapters.state import AdapterState
from fedlora.aggregation.common import AggregationError, GlobalState, normalize_weights

ADAPTER_KINDS = ("lora", "frozen_a", "sb")
"""``lora``: plain LoRA (A and B trainable); ``frozen_a``: A drawn from the run's seed per layer
and frozen; ``sb``: LoRA-SB, a fixed frame B, A around a trainable r×r core R."""

PARTS = ("A", "B", "R")
"""Adapter parts that can travel: LoRA's A (r, d_in) and B (d_out, r), LoRA-SB's core R (r, r)."""


class Accumulator(Protocol):
    """A round's running aggregate: replies are folded in one by one as they arrive."""

    def add(self, update: AdapterState, weight: float) -> None: ...


@dataclass(frozen=True)
class Streaming:
    """Replies fold into running sums one by one, so the server's memory does not grow with the
    number of clients: ``accumulator(state)`` starts a round, ``finish(state, acc)`` ends it."""

    accumulator: Callable[[GlobalState], Accumulator]
    finish: Callable[[GlobalState, Any], GlobalState]


@dataclass(frozen=True)
class Buffered:
    """The method needs every update of a layer at once; ``why`` says what for. The server keeps
    the round's replies and calls ``aggregate(state, updates, weights)`` after the last one."""

    aggregate: Callable[[GlobalState, Sequence[AdapterState], Sequence[float]], GlobalState]
    why: str


@dataclass(frozen=True)
class ClientDP:
    """What client-level DP (DP-FedAvg on the server) may do with this method: clip and noise the
    listed trained factors of each update (names of :class:`LoraFactors` fields: an SB client's
    state is the core ``LoraFactors(A=R, B=I)``, so Fed-SB lists ``A``), or be refused, with why."""

    clipped: tuple[str, ...] = ()
    refused: str = ""


NEEDS_INDIVIDUAL_FACTORS = (
    "it needs every client's individual factors (their products B_i·A_i), which the clipped-and-noised "
    "mean does not release; on the privatised mean alone it would silently degenerate"
)
"""Why client-level DP refuses the methods whose aggregate uses each client's B_i·A_i (the common
part of their :attr:`ClientDP.refused`)."""


def plain_initial_state(adapter: AdapterState, extras: dict[str, Any]) -> GlobalState:
    """Round 0 from the server model's freshly initialised rank-r_max adapter, unchanged."""
    return GlobalState(adapter=adapter, extras=dict(extras))


def same_for_every_rank(state: GlobalState, rank: int, *, scale: float | None = None,
                        truncate: bool = False) -> AdapterState:
    """Every client starts from the global adapter as it is (methods with equal ranks only)."""
    return state.adapter


def as_lora(state: GlobalState, update: AdapterState) -> AdapterState:
    """A reply that already is ordinary LoRA factors (s·B·A per layer)."""
    return update


class RoundAggregate:
    """One round's aggregation, the same object for streaming and buffered methods: ``add`` every
    accepted reply with its weight (any non-negative scale; the method normalises), then ``finish``."""

    def __init__(self, method: Method, state: GlobalState) -> None:
        self.method, self.state = method, state
        agg = method.aggregation
        self._acc = agg.accumulator(state) if isinstance(agg, Streaming) else None
        self._updates: list[AdapterState] = []
        self._weights: list[float] = []
        self.count = 0

    def add(self, update: AdapterState, weight: float) -> None:
        if weight < 0:
            raise AggregationError(f"client weight {weight} must be non-negative")
        if self._acc is not None:
            self._acc.add(update, weight)
        else:
            self._updates.append(update)
            self._weights.append(weight)
        self.count += 1

    def finish(self) -> GlobalState:
        if self.count == 0:
            raise AggregationError("no client updates to aggregate")
        agg = self.method.aggregation
        if isinstance(agg, Streaming):
            return agg.finish(self.state, self._acc)
        return agg.aggregate(self.state, self._updates, self._weights)


@dataclass(frozen=True)
class Method:
    """Everything fedlora knows about one aggregation method (see the module docstring)."""

    name: str
    """``strategy=<name>``."""
    paper: str
    """Authors, venue or arXiv id."""
    exact: bool
    """Whether the new global update equals ΔW* = Σ p_i·s_i·B_i·A_i for any client updates."""
    mixed_ranks: bool
    """Whether clients of different ranks can take part in one round."""
    adapter_kind: str
    """What clients train: one of :data:`ADAPTER_KINDS`; ``lora`` also admits
    ``adapter.kind=frozen_a`` from the config."""
    parts: tuple[str, ...]
    """Adapter parts that travel, both ways (and a scale per layer)."""
    client_dp: ClientDP
    """What client-level DP may clip and noise, or why it is refused."""
    weighted_sum: bool
    """Whether the new global state is a function of Σ w_i·x_i over exactly what the clients send
    (so secure aggregation, which reveals only that sum, can compute it)."""
    aggregation: Streaming | Buffered
    """How replies are combined."""
    initial_state: Callable[[AdapterState, dict[str, Any]], GlobalState] = plain_initial_state
    """Round 0 from the server model's rank-r_max adapter and the run's extras (``seed``,
    ``min_rank``, ``lorafair_lambda``)."""
    slice_for_rank: Callable[..., AdapterState] = same_for_every_rank
    """``(state, rank, *, scale=None, truncate=False)``: the adapter a rank-``rank`` client starts
    from, in its own scale ``scale``."""
    lift: Callable[[GlobalState, AdapterState], AdapterState] = as_lora
    """A parsed reply as ordinary LoRA factors (for ΔW* and agg_error)."""

    def __post_init__(self) -> None:
        problems = []
        if not self.name.isidentifier() or self.name != self.name.lower():
            problems.append(f"name {self.name!r} must be a lower-case identifier")
        if not self.paper.strip():
            problems.append("paper must name the source")
        if self.adapter_kind not in ADAPTER_KINDS:
            problems.append(f"adapter_kind {self.adapter_kind!r} is not one of {ADAPTER_KINDS}")
        if not self.parts or len(set(self.parts)) != len(self.parts) or not set(self.parts) <= set(PARTS):
            problems.append(f"parts {self.parts} must be distinct names from {PARTS}")
        if ("R" in self.parts) != (self.adapter_kind == "sb"):
            problems.append("the core R travels exactly when clients train LoRA-SB (adapter_kind='sb')")
        if self.adapter_kind == "frozen_a" and "A" in self.parts:
            problems.append("a frozen A never travels")
        dp = self.client_dp
        if bool(dp.clipped) == bool(dp.refused.strip()):
            problems.append("client_dp must either list the clipped factors or give the reason it is refused")
        if not set(dp.clipped) <= {"A", "B"}:
            problems.append(f"client_dp.clipped {dp.clipped} must name LoraFactors fields (A, B)")
        if isinstance(self.aggregation, Buffered):
            if not self.aggregation.why.strip():
                problems.append("a buffered method must say why it needs every update of a layer at once")
        elif not isinstance(self.aggregation, Streaming):
            problems.append("aggregation must be Streaming(...) or Buffered(...)")
        if problems:
            raise TypeError(f"aggregation method {self.name!r} is declared wrongly: " + "; ".join(problems))

    @property
    def streams(self) -> bool:
        """Whether the server's memory for a round is flat in the number of replies."""
        return isinstance(self.aggregation, Streaming)

    def begin(self, state: GlobalState) -> RoundAggregate:
        """Start aggregating the round that begins from ``state``."""
        return RoundAggregate(self, state)

    def aggregate(self, state: GlobalState, updates: Sequence[AdapterState], weights: Sequence[float]) -> GlobalState:
        """All of a round at once (tests, benchmarks): the same arithmetic as :meth:`begin`, with
        the weights normalised to p_i = w_i / Σ w_j first. Raises :class:`AggregationError` on
        empty input or bad weights."""
        agg = self.begin(state)
        for update, p in zip(updates, normalize_weights(weights), strict=True):
            agg.add(update, p)
        return agg.finish()
