"""Pure aggregation math: client adapter states and weights in, global adapter state out.

No Flower, no I/O, no device choices here (HOUSE_STYLE §1). One module per method; the registry
below is the only place that lists them.
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

AGGREGATORS = {
    "fedavg": fedavg,
    "ffa": ffa,
    "fedex": fedex,
    "flora": flora,
    "fedsb": fedsb,
    "lorafair": lorafair,
    "hetlora": hetlora,
}

__all__ = [
    "AGGREGATORS",
    "AggregationError",
    "GlobalState",
    "aggregation_error",
    "ideal_update",
    "normalize_weights",
    "round_update",
]
