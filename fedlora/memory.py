"""What a value holds in tensors: the measure behind the server's memory checks (tests and
``benchmarks/aggregation.py``), independent of the allocator and of what else the process holds."""

from __future__ import annotations

from typing import Any

import torch


def tensor_bytes(obj: Any, seen: set | None = None) -> int:
    """Bytes of the tensor storages reachable from ``obj`` through dicts (keys and values), lists,
    tuples, sets and object attributes, each storage counted once.

    ``seen`` (updated in place) holds what is already counted: pass the set a first call filled to
    count only what a second value adds (e.g. a round's aggregate beyond its starting state)."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return 0
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        key = ("storage", obj.untyped_storage().data_ptr())
        if key in seen:
            return 0
        seen.add(key)
        return obj.untyped_storage().nbytes()
    if isinstance(obj, dict):
        items = [*obj.keys(), *obj.values()]
    elif isinstance(obj, (list, tuple, set)):
        items = list(obj)
    elif hasattr(obj, "__dict__"):
        items = list(vars(obj).values())
    else:
        return 0
    return sum(tensor_bytes(item, seen) for item in items)
