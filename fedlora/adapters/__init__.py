"""Adapters: one file per kind, an explicit registry, and the functions that move their state."""

from fedlora.adapters.frozen_a import FrozenALoRALinear
from fedlora.adapters.inject import (
    adapter_modules,
    get_adapter_state,
    inject_adapters,
    set_adapter_state,
    trainable_parameters,
)
from fedlora.adapters.lora import AdapterError, LoRALinear, lora_scale
from fedlora.adapters.sb import SBLinear
from fedlora.adapters.state import AdapterState, LoraFactors, arrays_to_state, state_to_arrays

ADAPTERS: dict[str, type[LoRALinear]] = {
    "lora": LoRALinear,
    "frozen_a": FrozenALoRALinear,
    "sb": SBLinear,
}


def adapter_class(kind: str) -> type[LoRALinear]:
    """The adapter class registered under ``kind``."""
    try:
        return ADAPTERS[kind]
    except KeyError:
        raise AdapterError(f"adapter.kind={kind!r} is unknown; choose one of {sorted(ADAPTERS)}") from None


__all__ = [
    "ADAPTERS",
    "AdapterError",
    "AdapterState",
    "FrozenALoRALinear",
    "LoRALinear",
    "LoraFactors",
    "SBLinear",
    "adapter_class",
    "adapter_modules",
    "arrays_to_state",
    "get_adapter_state",
    "inject_adapters",
    "lora_scale",
    "set_adapter_state",
    "state_to_arrays",
    "trainable_parameters",
]
