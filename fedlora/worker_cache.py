"""The per-process cache of simulation workers: bases, partitions and tokenised examples.

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

import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any


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
REPORTED = LRUCache(max_entries=10_000)
"""Keys of the one-time log lines this process has printed (:func:`first_time`); bounded, so a
process that meets very many datasets or checkpoints may repeat a line rather than grow."""


def first_time(key: str) -> bool:
    """True the first time this process asks about ``key`` (a log line said once, not per round
    or per load), False after that."""
    if key in REPORTED:
        return False
    REPORTED.get(key, lambda: True)
    return True


def clear_worker_cache() -> None:
    """Forget every cached base, partition and tokenised example of this process."""
    for cache in (BASES, PARTITIONS, EXAMPLES, REPORTED):
        cache.clear()
    _BUILT_ONCE.clear()


def worker_cache_info() -> dict[str, dict[str, float]]:
    return {"bases": BASES.info(), "partitions": PARTITIONS.info(), "examples": EXAMPLES.info()}


def _file_stamp(path: str) -> tuple:
    """(size, mtime) of a local file, so an edited file is never served from the cache."""
    from fedlora.data.records import resolve_path  # records imports this module to say lines once

    try:
        st = os.stat(resolve_path(path))
    except OSError:  # a hub name or a folder: keyed by name only
        return ()
    return (st.st_size, st.st_mtime_ns)
