"""Put adapters into a Hugging Face causal LM by module-name patterns, and move their state.

``inject_adapters`` validates everything first (every ``target_modules`` pattern resolved by
:func:`fedlora.adapters.targets.resolve_module_targets`: it matches linear layers and nothing
else; ranks no larger than a layer) and only then replaces modules, so a bad config never leaves a
half-adapted model.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from fedlora.adapters.lora import AdapterError, LoRALinear, layer_generator
from fedlora.adapters.state import AdapterState, LoraFactors
from fedlora.adapters.targets import BASE_TYPES, resolve_module_targets
from fedlora.config import AdapterConfig
from fedlora.linear_layout import features

__all__ = ["BASE_TYPES", "adapter_modules", "get_adapter_state", "inject_adapters", "set_adapter_state",
           "trainable_parameters"]


def _module_rank(name: str, cfg: AdapterConfig, rank: int) -> int:
    for pattern, r in cfg.rank_pattern.items():
        if re.search(pattern, name):
            return r
    return rank


def inject_adapters(
    model: nn.Module, cfg: AdapterConfig, adapter_cls: type[LoRALinear], *, rank: int | None = None
) -> list[str]:
    """Wrap every linear layer (``nn.Linear``, ``Conv1D`` or ``QuantLinear``, :data:`BASE_TYPES`)
    that a ``cfg.target_modules`` pattern names (:mod:`fedlora.module_patterns`: a plain name
    matches trailing name components, a regex the whole dotted name, ``all-linear`` every linear
    layer inside the decoder blocks).

    ``rank`` overrides ``cfg.rank`` (a client's own rank); ``cfg.rank_pattern`` (regexes searched
    in the name, first match wins) still wins per module. Returns the adapted module names, sorted.
    All base parameters are frozen. Raises :class:`~fedlora.adapters.targets.TargetError` (an
    ``AdapterError``) for a pattern that matches nothing or anything but adaptable linear layers
    (the output head, embeddings, norms, whole blocks), and ``AdapterError`` for a rank that does
    not fit a layer, before any module is replaced.
    """
    rank = cfg.rank if rank is None else rank
    report = resolve_module_targets(model, cfg.target_modules)
    targets = {n: model.get_submodule(n) for n in report.layers}
    ranks = {n: _module_rank(n, cfg, rank) for n in targets}
    for name, module in targets.items():  # validate all before changing anything
        d_in, d_out = features(module)
        if not 1 <= ranks[name] <= min(d_in, d_out):
            raise AdapterError(
                f"rank {ranks[name]} for {name} does not fit its shape "
                f"(d_out={d_out}, d_in={d_in}); lower adapter.rank "
                "or add an adapter.rank_pattern entry for this module"
            )
    for p in model.parameters():
        p.requires_grad_(False)
    for name, module in targets.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        adapter = adapter_cls(
            module,
            ranks[name],
            cfg.alpha,
            dropout=cfg.dropout,
            rslora=cfg.rslora,
            generator=layer_generator(cfg.init_seed, name),
        )
        setattr(parent, child, adapter)
    return sorted(targets)


def adapter_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """Every adapter in ``model`` by module name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def get_adapter_state(model: nn.Module) -> AdapterState:
    """Detached fp32 CPU copies of every adapter's factors."""
    return {
        name: LoraFactors(m.lora_A.detach().float().cpu().clone(), m.lora_B.detach().float().cpu().clone(), m.scale)
        for name, m in adapter_modules(model).items()
    }


@torch.no_grad()
def set_adapter_state(model: nn.Module, state: AdapterState) -> None:
    """Load factors into the model's adapters; layer names, shapes and scales must match."""
    modules = adapter_modules(model)
    if set(state) != set(modules):
        missing, extra = sorted(set(modules) - set(state)), sorted(set(state) - set(modules))
        raise AdapterError(
            f"adapter state does not fit this model: missing layers {missing[:3]}, unknown layers "
            f"{extra[:3]}; was it trained with the same model and adapter.target_modules?"
        )
    for name, f in state.items():
        m = modules[name]
        if f.A.shape != m.lora_A.shape or f.B.shape != m.lora_B.shape:
            raise AdapterError(
                f"{name}: state has A{tuple(f.A.shape)} B{tuple(f.B.shape)} but the model's adapter "
                f"has A{tuple(m.lora_A.shape)} B{tuple(m.lora_B.shape)} (rank mismatch?)"
            )
        if abs(f.scale - m.scale) > 1e-6 * max(1.0, abs(m.scale)):
            raise AdapterError(f"{name}: state scale {f.scale} differs from the adapter's {m.scale}")
        m.lora_A.copy_(f.A)
        m.lora_B.copy_(f.B)


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]
