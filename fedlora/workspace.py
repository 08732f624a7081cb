"""Set-up shared by the server and the clients: the adapted model and each side's data.

Everything a run needs is checked here before the first round (data readable, columns present,
patterns match, ranks fit, enough rows for the clients), so bad input fails fast with a clear error.

**Per-process cache (simulation workers).** Flower's simulation engine runs thousands of virtual
clients on a few long-lived worker processes (Ray actors), and a client is called afresh for every
message. Without a cache every call would load (and quantize) the frozen base and re-partition and
re-tokenise the data; with 100 clients the re-partitioning alone dominated a round. The house rule
is no module-level caches; this is the one place where it is broken on purpose, because the worker
process is the only thing that outlives a ClientApp call (Flower's ``Context`` travels with each
message, so it cannot hold a model). The caches are bounded LRUs keyed by everything their values
depend on, and invisible: ``build_model(..., reuse=True)`` hands out a private copy of a pristine
cached base, so nothing a client does to its model (adapters, base terms merged into weights or
quantized side terms, DP hooks, ``requires_grad`` flags) reaches the cache or the next client.
:func:`clear_worker_cache` empties them; :func:`worker_cache_info` counts hits and misses.
"""

from __future__ import annotations

import copy
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import datasets
from torch import nn

from fedlora.adapters import LoRALinear, adapter_class, inject_adapters
from fedlora.adapters.inject import BASE_TYPES
from fedlora.config import FedloraConfig
from fedlora.data import load_records, resolve_path, split_train_eval, tokenize_dataset
from fedlora.models import load_model
from fedlora.partition import partition_dataset
from fedlora.quant import quantize_model

Examples = list[dict[str, list[int]]]


# ---------------------------------------------------------------------------------------------
# the per-process cache


class LRUCache:
    """A thread-safe least-recently-used map bounded by entry count and by a total ``weight``
    (e.g. tokens); values are made on a miss by the caller's ``make``."""

    def __init__(self, max_entries: int, max_weight: float = float("inf")) -> None:
        self.max_entries, self.max_weight = max_entries, max_weight
        self._items: OrderedDict[str, tuple[Any, float]] = OrderedDict()
        self._weight = 0.0
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def get(self, key: str, make: Callable[[], Any], weight: Callable[[Any], float] = lambda _: 1.0) -> Any:
        with self._lock:  # a miss is made under the lock: two threads never load the same base twice
            if key in self._items:
                self._items.move_to_end(key)
                self.hits += 1
                return self._items[key][0]
            self.misses += 1
            value = make()
            w = float(weight(value))
            self._items[key] = (value, w)
            self._weight += w
            while len(self._items) > 1 and (len(self._items) > self.max_entries or self._weight > self.max_weight):
                _, (_, old) = self._items.popitem(last=False)
                self._weight -= old
            return value

    def __contains__(self, key: str) -> bool:
        with self._lock:
            return key in self._items

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._weight, self.hits, self.misses = 0.0, 0, 0

    def info(self) -> dict[str, float]:
        return {"entries": len(self._items), "weight": self._weight, "hits": self.hits, "misses": self.misses}


BASES = LRUCache(max_entries=2)
"""Pristine frozen bases (loaded, quantized; no adapters unless LoftQ needs them): one per model
and quant config, so a worker holds at most two (e.g. a run's and the next test's)."""
PARTITIONS = LRUCache(max_entries=2)
"""The train/held-out split and every client's partition of it, per dataset and client count
(1,000 partitions of GSM8K cost about 5 MB: they are index views of one Arrow table)."""
EXAMPLE_TOKENS = 2_000_000
"""Budget of :data:`EXAMPLES` per process, in list items (input ids + labels; at most about 75 MB
as Python lists of ints); all of GSM8K's training rows are about 0.5 M, so 1,000 small clients all
fit, while a large corpus is bounded."""
EXAMPLES = LRUCache(max_entries=10_000, max_weight=EXAMPLE_TOKENS)
"""Tokenised examples per client, split and limit."""


_BUILT_ONCE: set[str] = set()
"""Bases built once in this process without being cached (see :func:`build_model`)."""


def clear_worker_cache() -> None:
    """Forget every cached base, partition and tokenised example of this process."""
    for cache in (BASES, PARTITIONS, EXAMPLES):
        cache.clear()
    _BUILT_ONCE.clear()


def worker_cache_info() -> dict[str, dict[str, float]]:
    return {"bases": BASES.info(), "partitions": PARTITIONS.info(), "examples": EXAMPLES.info()}


def _file_stamp(path: str) -> tuple:
    """(size, mtime) of a local file, so an edited file is never served from the cache."""
    try:
        st = os.stat(resolve_path(path))
    except OSError:  # a hub name or a folder: keyed by name only
        return ()
    return (st.st_size, st.st_mtime_ns)


# ---------------------------------------------------------------------------------------------
# the model


def _loftq(cfg: FedloraConfig) -> bool:
    return cfg.quant.format != "none" and cfg.quant.init == "loftq"


def build_model(cfg: FedloraConfig, rank: int | None = None, kind: str | None = None, *, reuse: bool = False):
    """The frozen base with adapters of ``kind`` (default ``cfg.adapter.kind``) and ``rank``
    (default ``cfg.adapter.rank``) injected, the adapted layers' base quantized per ``cfg.quant``
    (the model's ``quant_report`` attribute says what that saved).

    ``reuse=True`` (clients): from the second build on, the base comes from this process's cache,
    loaded and quantized once, and the caller gets a private copy of it, equal to a fresh build bit
    for bit. The first build in a process is a plain one and nothing is kept, so a process that
    builds once (a deployed SuperNode runs every message in a fresh ``flwr-clientapp`` process)
    holds one model, not a cached one and its copy. The copy owns every layer an adapter wraps
    (base terms and merges write there) and aliases the other frozen tensors (embeddings, norms,
    the head: read-only everywhere) through new ``Parameter`` objects, which makes a copy of
    Gemma 3 270M take 0.5 s instead of 2.5 s (a fresh load takes 6 s).
    """
    kind = kind or cfg.adapter.kind
    if not reuse:
        model, tokenizer = load_model(cfg.model)
        inject_adapters(model, cfg.adapter, adapter_class(kind), rank=rank)
        model.quant_report = quantize_model(model, cfg.quant, cfg.adapter.target_modules)
        return model, tokenizer
    # LoftQ fits the quantized base to the adapter's rank, so only then is the adapter part of the
    # cached model; otherwise quantizing before injecting gives the same layers (fedlora.quant.model).
    key = repr((cfg.model, _file_stamp(cfg.model.name_or_path), cfg.quant,
                cfg.adapter.target_modules if cfg.quant.format != "none" else None,
                (cfg.adapter, rank, kind) if _loftq(cfg) else None))
    if key not in BASES and key not in _BUILT_ONCE:
        if len(_BUILT_ONCE) > 64:  # bounded: many configs in one process (tests) only forget marks
            _BUILT_ONCE.clear()
        _BUILT_ONCE.add(key)
        return build_model(cfg, rank, kind)
    cached, tokenizer = BASES.get(key, lambda: _pristine_base(cfg, rank, kind))
    model = private_copy(cached, cfg.adapter.target_modules)
    if not _loftq(cfg):
        inject_adapters(model, cfg.adapter, adapter_class(kind), rank=rank)
    model.quant_report = dict(cached.quant_report)
    return model, tokenizer


def _pristine_base(cfg: FedloraConfig, rank: int | None, kind: str):
    if _loftq(cfg):
        return build_model(cfg, rank=rank, kind=kind)
    model, tokenizer = load_model(cfg.model)
    model.quant_report = quantize_model(model, cfg.quant, cfg.adapter.target_modules)
    return model, tokenizer


def private_copy(model: nn.Module, target_modules: list[str]) -> nn.Module:
    """A deep copy of ``model`` that owns its adapter layers, the linears ``target_modules`` names
    (what adapters wrap) and every trainable tensor, and aliases all other frozen tensors through
    new ``Parameter`` objects (so flags set on the copy, or ``.data`` swapped by ``.to()``, stay in
    the copy). Module objects, hooks and attributes are always the copy's own."""
    patterns = [re.compile(p) for p in target_modules]
    owned = [n for n, m in model.named_modules()
             if isinstance(m, LoRALinear) or (isinstance(m, BASE_TYPES) and any(p.search(n) for p in patterns))]
    owned_ids = {id(t) for n in owned for t in [*model.get_submodule(n).parameters(), *model.get_submodule(n).buffers()]}
    memo: dict[int, Any] = {}
    for name, module in model.named_modules():
        if any(name == o or name.startswith(o + ".") for o in owned):
            continue
        for p in module.parameters(recurse=False):
            if id(p) not in owned_ids and id(p) not in memo and not p.requires_grad:
                memo[id(p)] = nn.Parameter(p.detach(), requires_grad=False)  # shares storage, not flags
        for b in module.buffers(recurse=False):
            if id(b) not in owned_ids:
                memo[id(b)] = b
    return copy.deepcopy(model, memo)


# ---------------------------------------------------------------------------------------------
# the data


def load_splits(cfg: FedloraConfig) -> tuple[datasets.Dataset, datasets.Dataset]:
    """The fixed train / held-out split of the configured dataset."""
    return split_train_eval(load_records(cfg.dataset), cfg.dataset)


@dataclass
class _Partitions:
    """Every client's training rows, and the held-out split whose IID shares are cut on first use."""

    train: list[datasets.Dataset]
    held_out: datasets.Dataset
    eval_cfg: Any
    eval_parts: list[datasets.Dataset] | None = field(default=None)

    def eval_share(self, partition_id: int) -> datasets.Dataset:
        n = len(self.train)
        if self.eval_parts is None and 0 < len(self.held_out) < n:  # more clients than rows: row i mod rows
            return self.held_out.select([partition_id % len(self.held_out)])
        if self.eval_parts is None:
            self.eval_parts = partition_dataset(self.held_out, self.eval_cfg, n)
        return self.eval_parts[partition_id]


def _partitions(cfg: FedloraConfig, num_partitions: int, data_path: str | None) -> _Partitions:
    if data_path:  # a deployed node's own file: all of it is this node's
        own = replace(cfg.dataset, path=data_path)
        train, held_out = split_train_eval(load_records(own), own)
        return _Partitions([train], held_out, own, [held_out])
    train, held_out = load_splits(cfg)
    eval_cfg = replace(cfg.dataset, partitioner="iid", partition_by=None)
    return _Partitions(partition_dataset(train, cfg.dataset, num_partitions), held_out, eval_cfg)


def _client_partitions(cfg: FedloraConfig, num_partitions: int, data_path: str | None) -> _Partitions:
    path = data_path or cfg.dataset.path
    key = repr((cfg.dataset, _file_stamp(path), num_partitions, data_path))
    return PARTITIONS.get(key, lambda: _partitions(cfg, num_partitions, data_path))


def client_split(
    cfg: FedloraConfig, partition_id: int, num_partitions: int, data_path: str | None = None, split: str = "train"
) -> datasets.Dataset:
    """A client's ``train`` rows or its ``eval`` share of held-out rows (see :func:`client_datasets`)."""
    parts = _client_partitions(cfg, num_partitions, data_path)
    index = 0 if data_path else partition_id
    return parts.train[index] if split == "train" else parts.eval_share(index)


def client_datasets(
    cfg: FedloraConfig, partition_id: int, num_partitions: int, data_path: str | None = None
) -> tuple[datasets.Dataset, datasets.Dataset]:
    """A client's training rows and its share of held-out rows.

    In simulation the client takes partition ``partition_id`` of the shared train split (by the
    configured partitioner) and the same IID share of the held-out split (with more clients than
    held-out rows, client i gets row i mod rows). A deployed node that points ``data-path`` at its
    own file uses all of that file, split train/held-out like the shared data. The partitions are
    computed once per process (cached).
    """
    return (client_split(cfg, partition_id, num_partitions, data_path, "train"),
            client_split(cfg, partition_id, num_partitions, data_path, "eval"))


def client_examples(
    cfg: FedloraConfig, tokenizer, partition_id: int, num_partitions: int, data_path: str | None = None,
    split: str = "train", limit: int = 0,
) -> Examples:
    """:func:`tokenize` of :func:`client_split`, tokenised once per process (cached; ``tokenizer``
    must be the one ``cfg.model`` loads). The list is the caller's; the examples are shared and
    must not be modified."""
    path = data_path or cfg.dataset.path
    key = repr((cfg.dataset, _file_stamp(path), num_partitions, data_path, partition_id if not data_path else 0,
                split, limit, cfg.model.name_or_path, cfg.model.gguf_package, cfg.model.gguf_file, cfg.model.cache_dir))

    def make() -> Examples:
        return tokenize(client_split(cfg, partition_id, num_partitions, data_path, split), tokenizer, cfg, limit)

    return list(EXAMPLES.get(key, make, weight=lambda ex: sum(2 * len(e["input_ids"]) for e in ex)))


def tokenize(ds: datasets.Dataset, tokenizer, cfg: FedloraConfig, limit: int = 0) -> Examples:
    """Tokenised prompt/response examples (the first ``limit`` rows when ``limit`` > 0)."""
    if limit and len(ds) > limit:
        ds = ds.select(range(limit))
    return tokenize_dataset(ds, tokenizer, cfg.dataset)
