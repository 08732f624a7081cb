"""The records fedlora's ServerApp and ClientApp exchange (Flower Message API).

Both apps import this one module, so the keys live in one place. A train/evaluate message holds

- ``global``  (ArrayRecord): the global adapter, flattened by ``state_to_arrays``;
- ``base``    (ArrayRecord, optional): exact low-rank terms folded into the frozen base;
- ``config``  (ConfigRecord): ``round``, ``num_rounds`` and the strategy's instructions.

A train reply holds ``update`` (ArrayRecord) and ``metrics`` (MetricRecord with ``num-examples``,
``train_loss`` …); an evaluate reply holds ``metrics`` only.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedlora.adapters.state import AdapterState, LoraFactors, arrays_to_state, state_to_arrays

GLOBAL, BASE, CONFIG, UPDATE, METRICS = "global", "base", "config", "update", "metrics"


def to_array_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def from_array_record(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in record.items()}


def base_terms_to_arrays(terms: dict[str, list[LoraFactors]]) -> dict[str, np.ndarray]:
    """``{layer}.term{k}.lora_A`` … for every base term (scale folded into B)."""
    flat: AdapterState = {
        f"{name}.term{k}": LoraFactors(t.A, t.scale * t.B, 1.0) for name, ts in terms.items() for k, t in enumerate(ts)
    }
    return state_to_arrays(flat)


def arrays_to_base_terms(arrays: dict[str, np.ndarray]) -> dict[str, list[LoraFactors]]:
    terms: dict[str, list[tuple[int, LoraFactors]]] = {}
    for key, factors in arrays_to_state(arrays).items():
        name, _, k = key.rpartition(".term")
        terms.setdefault(name, []).append((int(k), factors))
    return {name: [f for _, f in sorted(ts)] for name, ts in terms.items()}


def train_content(
    adapter: AdapterState, base_terms: dict[str, list[LoraFactors]], config: dict
) -> RecordDict:
    content = RecordDict({GLOBAL: to_array_record(state_to_arrays(adapter)), CONFIG: ConfigRecord(config)})
    if any(base_terms.values()):
        content[BASE] = to_array_record(base_terms_to_arrays(base_terms))
    return content


def read_train_content(content: RecordDict) -> tuple[AdapterState, dict[str, list[LoraFactors]], dict]:
    adapter = arrays_to_state(from_array_record(content[GLOBAL]))
    base = arrays_to_base_terms(from_array_record(content[BASE])) if BASE in content else {}
    return adapter, base, dict(content[CONFIG])


def reply_content(update: AdapterState | None, metrics: dict[str, float | int]) -> RecordDict:
    content = RecordDict({METRICS: MetricRecord(metrics)})
    if update is not None:
        content[UPDATE] = to_array_record(state_to_arrays(update))
    return content


def content_bytes(content: RecordDict) -> int:
    """Serialised payload bytes of a message's records (array data, keys and config values)."""
    return sum(record.count_bytes() for record in content.values())
