"""The records fedlora's ServerApp and ClientApp exchange (Flower Message API).

Both apps import this one module, so the keys live in one place. A train/evaluate message holds

- ``global``  (ArrayRecord): the client's starting adapter, only the parts its strategy sends
  (A and B; B alone for FFA-LoRA; the core R alone for Fed-SB);
- ``base``    (ArrayRecord, optional): exact terms folded into the frozen base (FedEx residuals,
  FLoRA stacks), factored ``term{k}.lora_A/B`` or dense ``term{k}.dense``;
- ``frame``   (ArrayRecord, optional): a B·R·A adapter's fixed frame, sent once per client;
- ``config``  (ConfigRecord): a :class:`RoundConfig` (round, number of rounds, strategy, rank,
  adapter kind, the parts to send back).

A train reply holds ``update`` (ArrayRecord) and ``metrics`` (MetricRecord with ``num-examples``,
``train_loss`` …); an evaluate reply holds ``metrics`` only; a query reply (node discovery)
holds ``metrics`` with ``partition-id``, ``rank``, ``num-examples``, ``num-partitions`` and
``own-data``. Fed-SB's init round is two more queries, each a :class:`SBInitQuery` (``sb_sketch``,
``sb_project``): the server sends the range ``basis`` with the second, and each reply holds the
client's ``sketch`` and ``metrics``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedlora.adapters.state import AdapterState, arrays_to_state, state_to_arrays
from fedlora.aggregation.terms import BaseTerm, DenseTerm

GLOBAL, BASE, FRAME, CONFIG, UPDATE, METRICS = "global", "base", "frame", "config", "update", "metrics"
PRIVACY = "privacy"
"""A train reply's privacy ledger entry (ConfigRecord ``entry``: JSON), under DP."""
SKETCH, BASIS = "sketch", "basis"
"""Fed-SB init: a client's gradient sketch (reply), the server's range basis (second query)."""

QUERY = "query"
"""The config key that names a query message's question."""
NODE_INFO, SB_SKETCH, SB_PROJECT = "node-info", "sb_sketch", "sb_project"
"""Query names: node discovery; Fed-SB init pass 1 (Y_i = G_i·Ω) and pass 2 (Z_i = Qᵀ·G_i)."""
NUM_EXAMPLES, PARTITION_ID, RANK = "num-examples", "partition-id", "rank"
"""Metric keys of a node-info reply (``num-examples`` is also every train reply's weight)."""
NUM_PARTITIONS, OWN_DATA = "num-partitions", "own-data"
"""More metric keys of a node-info reply: the node's ``num-partitions``, and 1 when it trains its own
``data-path`` file (0: its partition of the shared dataset); the server checks the replies together
(:mod:`fedlora.node_check`)."""
TRAIN_LOSS, TRAIN_TOKENS, TRAIN_SECONDS = "train_loss", "train_tokens", "train_seconds"
TRAIN_EXAMPLES = "train_examples"
"""Metric keys of a train reply, each about the examples the round's local training actually used:
``train_examples`` (counted once per use), ``train_tokens`` (supervised tokens), ``train_loss``
(mean loss over those tokens; absent when there were none, as when every DP-SGD step's Poisson
sample came out empty), ``train_seconds`` (local training time). Beside them ``num-examples`` (the
client's training-set size, its aggregation weight), ``rank`` and ``partition-id``."""
EVAL_LOSS, EVAL_TOKENS = "eval_loss", "eval_tokens"
"""Metric keys of an evaluate reply: held-out loss and the response tokens it averages over."""
PRIVACY_ENTRY = "entry"
"""The key of the ledger entry (JSON) in a train reply's :data:`PRIVACY` record."""


class ProtocolError(ValueError):
    """A message lacks what this fedlora version expects (the server and the client run different
    versions, or something else sent it)."""


def _fields_of(cls: type, record: ConfigRecord) -> dict:
    data = dict(record)
    missing = [f.name for f in fields(cls) if f.name not in data]
    if missing:
        raise ProtocolError(f"{cls.__name__} record lacks {missing} (has {sorted(data)}); run the same fedlora "
                            "version on the server and every client")
    return data


@dataclass(frozen=True)
class RoundConfig:
    """The ``config`` record of a train or evaluate message: what the client is asked to do."""

    round: int
    """1-based round number (it drives the client's learning-rate schedule and seeds)."""
    num_rounds: int
    strategy: str
    rank: int
    """The client's LoRA rank r this round."""
    adapter_kind: str
    """``lora``, ``frozen_a`` or ``sb`` (see :data:`fedlora.aggregation.method.ADAPTER_KINDS`)."""
    parts: tuple[str, ...]
    """The adapter parts to send back (A and B; B; or R)."""

    def to_record(self) -> ConfigRecord:
        return ConfigRecord({**asdict(self), "parts": ",".join(self.parts)})

    @classmethod
    def from_record(cls, record: ConfigRecord) -> RoundConfig:
        """Raises :class:`ProtocolError` naming missing keys."""
        d = _fields_of(cls, record)
        return cls(int(d["round"]), int(d["num_rounds"]), str(d["strategy"]), int(d["rank"]), str(d["adapter_kind"]),
                   tuple(str(d["parts"]).split(",")))


@dataclass(frozen=True)
class SBInitQuery:
    """The ``config`` record of a Fed-SB init query (both passes use the same examples and Ω)."""

    query: str
    """:data:`SB_SKETCH` (pass 1: Y_i = G_i·Ω) or :data:`SB_PROJECT` (pass 2: Z_i = Qᵀ·G_i)."""
    n_examples: int
    """The client's first ``n_examples`` training examples give its gradient G_i."""
    seed: int
    """Seed of the sketch Ω, drawn identically by every client."""
    width: int
    """k = r + oversampling columns of Ω."""

    def to_record(self) -> ConfigRecord:
        return ConfigRecord(asdict(self))

    @classmethod
    def from_record(cls, record: ConfigRecord) -> SBInitQuery:
        """Raises :class:`ProtocolError` naming missing keys or an unknown pass."""
        d = _fields_of(cls, record)
        if d["query"] not in (SB_SKETCH, SB_PROJECT):
            raise ProtocolError(f"unknown Fed-SB init query {d['query']!r}; expected {SB_SKETCH} or {SB_PROJECT}")
        return cls(str(d["query"]), int(d["n_examples"]), int(d["seed"]), int(d["width"]))


def to_array_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def from_array_record(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in record.items()}


def base_terms_to_arrays(terms: dict[str, list[BaseTerm]]) -> dict[str, np.ndarray]:
    """``{layer}.term{k}.lora_A/.lora_B`` (scale folded into B), or ``.dense`` for a dense term."""
    out: dict[str, np.ndarray] = {}
    for name, layer_terms in terms.items():
        for k, t in enumerate(layer_terms):
            key = f"{name}.term{k}"
            if isinstance(t, DenseTerm):
                out[f"{key}.dense"] = (t.scale * t.weight.double()).float().cpu().numpy()
            else:
                out[f"{key}.lora_A"] = t.A.float().cpu().numpy()
                out[f"{key}.lora_B"] = (t.scale * t.B.double()).float().cpu().numpy()
    return out


def arrays_to_base_terms(arrays: dict[str, np.ndarray]) -> dict[str, list[BaseTerm]]:
    terms: dict[str, dict[int, BaseTerm]] = {}
    dense = {k[: -len(".dense")]: v for k, v in arrays.items() if k.endswith(".dense")}
    factored = {k: v for k, v in arrays.items() if not k.endswith(".dense")}
    for key, weight in dense.items():
        name, _, k = key.rpartition(".term")
        terms.setdefault(name, {})[int(k)] = DenseTerm(torch.from_numpy(np.array(weight)))
    if factored:
        scales = {k.rsplit(".", 1)[0] + ".scale": np.ones(1, np.float32) for k in factored}
        for key, f in arrays_to_state(factored | scales).items():
            name, _, k = key.rpartition(".term")
            terms.setdefault(name, {})[int(k)] = f
    return {name: [ts[k] for k in sorted(ts)] for name, ts in terms.items()}


def frame_to_arrays(frame: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for name, (b, a) in frame.items():
        out[f"{name}.frame_B"] = b.float().cpu().numpy()
        out[f"{name}.frame_A"] = a.float().cpu().numpy()
    return out


def arrays_to_frame(arrays: dict[str, np.ndarray]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    names = {k.rsplit(".", 1)[0] for k in arrays}
    return {n: (torch.from_numpy(np.array(arrays[f"{n}.frame_B"])), torch.from_numpy(np.array(arrays[f"{n}.frame_A"])))
            for n in names}


def train_content(
    start: AdapterState,
    base_terms: dict[str, list[BaseTerm]],
    config: RoundConfig,
    frame: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> RecordDict:
    """A train/evaluate message: the parts of ``start`` that ``config.parts`` names, the base terms,
    the config, and the Fed-SB frame when given."""
    content = RecordDict({GLOBAL: to_array_record(state_to_arrays(start, config.parts)), CONFIG: config.to_record()})
    if any(base_terms.values()):
        content[BASE] = to_array_record(base_terms_to_arrays(base_terms))
    if frame is not None:
        content[FRAME] = to_array_record(frame_to_arrays(frame))
    return content


def read_train_content(content: RecordDict, like: AdapterState) -> tuple[AdapterState, dict[str, list[BaseTerm]]]:
    """(start adapter, base terms); parts the payload leaves out come from ``like``. The config is
    :meth:`RoundConfig.from_record` of ``content[CONFIG]``."""
    adapter = arrays_to_state(from_array_record(content[GLOBAL]), like=like)
    base = arrays_to_base_terms(from_array_record(content[BASE])) if BASE in content else {}
    return adapter, base


def reply_content(update: AdapterState | None, metrics: dict[str, float | int], parts: tuple[str, ...] = ("A", "B")) -> RecordDict:
    content = RecordDict({METRICS: MetricRecord(metrics)})
    if update is not None:
        content[UPDATE] = to_array_record(state_to_arrays(update, parts))
    return content


def content_bytes(content: RecordDict) -> int:
    """Serialised payload bytes of a message's records (array data, keys and config values)."""
    return sum(record.count_bytes() for record in content.values())
