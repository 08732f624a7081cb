"""Fed-SB: federated LoRA-SB, averaging only the r×r core (Singhal, Ponkshe, Vartak & Vepakomma,
2025, "Fed-SB: A Silver Bullet for Extreme Communication Efficiency and Performance in (Private)
Federated LoRA Fine-Tuning", arXiv:2502.15436).

Every client holds the same fixed frame (B (d_out, r), A (r, d_in)) and trains only R (r, r);
ΔW_i = s_i·B·R_i·A (:class:`fedlora.adapters.sb.SBLinear`). Clients send R only — r² numbers
per layer, independent of the layer's width. The server averages the cores::

    R̄ = Σ p_i·(s_i/s_g)·R_i,    s_g·B·R̄·A = Σ p_i·s_i·B·R_i·A = ΔW*      (exact)

Each round's R̄ is computed from that round's replies only (clients send their full trained R,
which already includes the R̄ they started from); a list of updates that is never reset, so that
round t re-averages every earlier round, is the known trap of public code.

State layout (the frame lives on the server, so a core is enough to reconstruct everything):

- ``extras["sb_frame"][layer] = {"B": B, "A": A}`` — the fixed r_max frame, set once
  (:func:`initial_state`, from :mod:`fedlora.aggregation.fedsb_init` or a data-free draw);
- ``extras["sb_core"][layer] = LoraFactors(A=R̄, B=I, scale=s_g)`` — what clients start from
  (:func:`slice_for_rank` cuts it to a client's rank);
- ``adapter[layer] = LoraFactors(A=frame A, B=frame B·R̄, scale=s_g)`` — the same update as an
  ordinary rank-r LoRA, so ``round_update``/``aggregation_error`` and LoRA export work unchanged.

Client updates are cores (``LoraFactors(A=R_i, B=I, s_i)``, what ``get_adapter_state`` returns for
an SB model); :func:`lift_updates` turns them into ordinary LoRA factors for ``ideal_update``.

Mixed ranks (exact): the frame is nested, a rank-r_i client trains the top-left r_i×r_i block of R
against the first r_i frame columns/rows; zero-padding the cores is exact. The part of R̄ outside
the floor rank's top-left block (see :mod:`fedlora.aggregation.padding`) is folded into
``base_terms`` so any client of rank ≥ floor receives the whole update.

Aggregation streams (:class:`FedSBAccumulator`): one r_max×r_max fp64 sum per layer.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fedlora.adapters.lora import layer_generator
from fedlora.adapters.sb import data_free_frame
from fedlora.adapters.state import AdapterState, LoraFactors
from fedlora.aggregation import padding, terms
from fedlora.aggregation.common import AggregationError, GlobalState
from fedlora.aggregation.method import ClientDP, Method, Streaming

Frame = dict[str, tuple[torch.Tensor, torch.Tensor]]
"""layer → (B (d_out, r), A (r, d_in))."""


def _core(f: LoraFactors) -> torch.Tensor:
    """R = core.B·core.A (r, r) in float64; refuses anything that is not a square core."""
    R = f.B.to(torch.float64) @ f.A.to(torch.float64)
    if R.shape[0] != R.shape[1]:
        raise AggregationError(
            f"Fed-SB expects cores LoraFactors(A=R (r, r), B=I (r, r)); got B·A of shape {tuple(R.shape)}"
        )
    return R


def _frame(state: GlobalState) -> dict[str, dict[str, torch.Tensor]]:
    try:
        return state.extras["sb_frame"]
    except KeyError:
        raise AggregationError(
            "Fed-SB needs the frame in state.extras['sb_frame']; build the first state with "
            "fedlora.aggregation.fedsb.initial_state(frame, scale)"
        ) from None


def initial_state(
    frame: Frame, scale: float, core: dict[str, torch.Tensor] | None = None, **extras
) -> GlobalState:
    """The round-0 state: the frame (B, A per layer, rank r_max), R₀ (zeros if not given) at the
    scale of a rank-r_max client, and any further extras (``seed``, ``min_rank``)."""
    sb_frame = {n: {"B": B.to(torch.float32), "A": A.to(torch.float32)} for n, (B, A) in frame.items()}
    cores = {}
    for name, (B, _) in frame.items():
        r = B.shape[1]
        R = core[name] if core is not None else torch.zeros(r, r)
        cores[name] = LoraFactors(R.to(torch.float32), torch.eye(r), scale)
    ranks = {c.rank for c in cores.values()}
    return GlobalState(
        adapter={n: _lift(sb_frame[n], c) for n, c in cores.items()},
        extras={
            "sb_frame": sb_frame,
            "sb_core": cores,
            "rank_scales": {ranks.pop(): scale} if len(ranks) == 1 else {},
            **extras,
        },
    )


def _lift(frame: dict[str, torch.Tensor], core: LoraFactors) -> LoraFactors:
    """A core (rank r ≤ frame rank) as ordinary LoRA factors: A = frame A[:r], B = frame B[:, :r]·R."""
    R = _core(core)
    r = R.shape[0]
    B = (frame["B"][:, :r].to(torch.float64) @ R).to(torch.float32)  # (d_out, r)
    return LoraFactors(frame["A"][:r], B, core.scale)


def lift_update(state: GlobalState, update: AdapterState) -> AdapterState:
    """A client's cores as ordinary LoRA factors (for ``ideal_update``): s_i·B·R_i·A per layer."""
    frame = _frame(state)
    return {name: _lift(frame[name], core) for name, core in update.items()}


def data_free_state(adapter: AdapterState, extras: dict) -> GlobalState:
    """Round 0 without the clients' gradients: a random orthonormal frame per layer drawn from
    (``extras["seed"]``, layer) at the shapes and rank of ``adapter`` (the server model's rank-r_max
    LoRA, whose scale the frame takes), and R₀ = 0."""
    seed = int(extras.get("seed", 0))
    frame = {name: data_free_frame(f.B.shape[0], f.A.shape[1], f.rank, generator=layer_generator(seed, name))
             for name, f in adapter.items()}
    return initial_state(frame, next(iter(adapter.values())).scale, **extras)


class FedSBAccumulator:
    """Running Σ w_i·s_i·R_i (fp64, zero-padded to the largest rank seen) per layer."""

    def __init__(self) -> None:
        self._sum_R: dict[str, torch.Tensor] = {}
        self._top: dict[str, tuple[int, float]] = {}  # layer → (rank, scale) of its top-rank client
        self.rank_scales: dict[int, float] = {}
        self.total_weight = 0.0
        self.count = 0

    def add(self, update: AdapterState, weight: float) -> None:
        if weight < 0:
            raise AggregationError(f"client weight {weight} must be non-negative")
        if self._sum_R and set(update) != set(self._sum_R):
            raise AggregationError(f"client {self.count} has different layers than the others")
        for name, f in update.items():
            R = _core(f)
            r = R.shape[0]
            s = self._sum_R.get(name)
            s = R.new_zeros(r, r) if s is None else padding.pad_cols(padding.pad_rows(s, r), r)
            s[:r, :r].add_(R, alpha=weight * f.scale)
            self._sum_R[name] = s
            if name not in self._top or r > self._top[name][0]:
                self._top[name] = (r, f.scale)
            self.rank_scales.setdefault(r, f.scale)
        self.total_weight += weight
        self.count += 1

    def result(self) -> dict[str, LoraFactors]:
        """R̄ per layer as a core ``LoraFactors(A=R̄ (fp64), B=I, s_g)`` at the largest client rank."""
        if self.count == 0 or self.total_weight <= 0:
            raise AggregationError("no client updates (or only zero weights) to aggregate")
        out = {}
        for name, s in self._sum_R.items():
            s_g = self._top[name][1]
            out[name] = LoraFactors(s / (self.total_weight * s_g), torch.eye(s.shape[0], dtype=torch.float64), s_g)
        return out


def accumulator(state: GlobalState) -> FedSBAccumulator:
    """An empty accumulator for the round that starts from ``state`` (streaming glue: ``add`` each
    reply as it arrives, then :func:`finish`)."""
    _frame(state)
    return FedSBAccumulator()


def finish(state: GlobalState, acc: FedSBAccumulator) -> GlobalState:
    """The next global state from a filled accumulator."""
    frame = _frame(state)
    floor = padding.floor_rank(state.extras, list(acc.rank_scales))
    adapter: AdapterState = {}
    cores: dict[str, LoraFactors] = {}
    folded: dict[str, list[terms.BaseTerm]] = {}
    for name, mean in acc.result().items():
        B_f, A_f = frame[name]["B"], frame[name]["A"]
        r_frame = B_f.shape[1]
        if mean.rank > r_frame:
            raise AggregationError(f"Fed-SB layer {name}: a client core has rank {mean.rank} > frame rank {r_frame}")
        # store R̄ at the frame-rank scale (the state's), whatever the top client's rank was
        s_frame = state.extras["sb_core"][name].scale
        R = padding.pad_cols(padding.pad_rows(mean.A, r_frame), r_frame) * (mean.scale / s_frame)
        outside = R.clone()
        outside[:floor, :floor] = 0  # what a rank-floor client could not receive: fold it
        cores[name] = LoraFactors((R - outside).to(torch.float32), torch.eye(r_frame), s_frame)
        adapter[name] = _lift(frame[name], cores[name])
        if torch.count_nonzero(outside):
            term = terms.compact_term(B_f.to(torch.float64), outside @ A_f.to(torch.float64), s_frame)
            folded[name] = [term]
    return GlobalState(
        adapter=adapter,
        base_terms=padding.appended_terms(state, folded),
        extras=padding.next_extras(state, acc.rank_scales, sb_core=cores),
    )


def slice_for_rank(
    state: GlobalState, rank: int, *, scale: float | None = None, truncate: bool = False
) -> AdapterState:
    """A rank-``rank`` client's start: the top-left block of R̄ as a core ``LoraFactors(A=R, B=I,
    s)`` in the client's scale (load it with ``set_adapter_state`` after ``set_sb_frame``).
    Refuses to drop a non-zero part of R̄ unless ``truncate``."""
    out: AdapterState = {}
    for name, core in state.extras["sb_core"].items():
        R = core.B @ core.A
        r = R.shape[0]
        if rank > r:
            raise AggregationError(f"Fed-SB layer {name}: rank {rank} exceeds the frame rank {r}")
        rest = R.clone()
        rest[:rank, :rank] = 0
        if not truncate and torch.count_nonzero(rest):
            raise AggregationError(
                f"a rank-{rank} client cannot receive layer {name}'s rank-{r} core without dropping "
                f"part of it; set extras['min_rank'] <= {rank} before aggregating or pass truncate=True"
            )
        s = padding.resolve_scale(state, core, rank, scale)
        block = R[:rank, :rank] if s == core.scale else (R[:rank, :rank].double() * (core.scale / s)).float()
        out[name] = LoraFactors(block.clone(), torch.eye(rank), s)
    return out


METHOD = Method(
    name="fedsb",
    paper="Singhal, Ponkshe, Vartak & Vepakomma, 2025, arXiv:2502.15436",
    exact=True,  # s_g·B·R̄·A = Σ p_i·s_i·B·R_i·A for any cores
    mixed_ranks=True,  # nested frames: a rank-r client trains the top-left r×r block of R
    adapter_kind="sb",
    parts=("R",),
    client_dp=ClientDP(clipped=("A",)),  # an SB client's state is the core LoraFactors(A=R, B=I)
    weighted_sum=True,
    aggregation=Streaming(accumulator, finish),
    initial_state=data_free_state,
    slice_for_rank=slice_for_rank,
    lift=lift_update,
)
