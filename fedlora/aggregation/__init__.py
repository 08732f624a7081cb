"""Pure aggregation math: client adapter states and weights in, global adapter state out.

No Flower, no I/O, no device choices here. One module per method, each ending in its declaration
``METHOD = Method(...)`` (:mod:`fedlora.aggregation.method`); :data:`METHODS` below is the only
place that lists them.
"""

from fedlora.aggregation import fedavg, fedex, fedsb, ffa, flora, hetlora, lorafair
from fedlora.aggregation.common import (
    AggregationError,
    GlobalState,
    aggregation_error,
    ideal_update,
    normalize_weights,
    round_update,
)
from fedlora.aggregation.method import Buffered, ClientDP, Method, RoundAggregate, Streaming
from fedlora.config import ConfigError, FedloraConfig


def _registry(*modules) -> dict[str, Method]:
    out: dict[str, Method] = {}
    for module in modules:
        method = module.METHOD
        if not isinstance(method, Method) or module.__name__.rsplit(".", 1)[-1] != method.name or method.name in out:
            raise TypeError(f"{module.__name__}.METHOD must be a Method named after its module, once")
        out[method.name] = method
    return out


METHODS: dict[str, Method] = _registry(fedavg, ffa, fedex, flora, fedsb, lorafair, hetlora)
"""``strategy=<name>`` → its declaration."""


def check_ranks(method: Method, ranks: list[int]) -> None:
    """Raise :class:`ConfigError` when ``ranks`` mix and ``method`` cannot aggregate mixed ranks."""
    if len(set(ranks)) > 1 and not method.mixed_ranks:
        mixed = ", ".join(name for name, m in METHODS.items() if m.mixed_ranks)
        raise ConfigError(
            f"strategy={method.name} cannot aggregate clients of different ranks {sorted(set(ranks))}; "
            f"give every client the same rank or use {mixed}"
        )


def resolve_method(cfg: FedloraConfig) -> Method:
    """The method ``cfg.strategy.name`` names, checked against the rest of the config before any
    work: known name, the configured client ranks, the adapter kind. Raises :class:`ConfigError`."""
    name = cfg.strategy.name
    if name not in METHODS:
        raise ConfigError(f"strategy={name!r} is unknown; choose one of {', '.join(sorted(METHODS))}")
    method = METHODS[name]
    if cfg.client_ranks:
        check_ranks(method, cfg.client_ranks)
    if method.adapter_kind != "lora" and cfg.adapter.kind not in ("lora", method.adapter_kind):
        raise ConfigError(f"strategy={name} trains adapter.kind={method.adapter_kind}; remove adapter.kind={cfg.adapter.kind}")
    return method


__all__ = [
    "METHODS",
    "AggregationError",
    "Buffered",
    "ClientDP",
    "GlobalState",
    "Method",
    "RoundAggregate",
    "Streaming",
    "aggregation_error",
    "check_ranks",
    "ideal_update",
    "normalize_weights",
    "resolve_method",
    "round_update",
]
