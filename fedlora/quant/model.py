"""Quantize a model's frozen linear layers in place, and move the packed weights between processes.

Call order in ``build_model`` (both work; LoftQ needs the second):

1. ``quantize_model`` then ``inject_adapters`` — adapters wrap the ``QuantLinear`` bases;
2. ``inject_adapters`` then ``quantize_model`` — the ``.base`` of every matching adapter is
   quantized; with ``quant.init=loftq`` each adapter's A/B are overwritten with LoftQ's A₀/B₀.

Layers are validated before any is replaced (a bad group size never leaves a half-quantized
model), then replaced one at a time, so peak memory is the model plus one layer.
"""

from __future__ import annotations

import time
from collections import Counter

import torch
from torch import nn

from fedlora.config import QuantConfig
from fedlora.linear_layout import DENSE_TYPES, features, weight_view
from fedlora.module_patterns import PatternError, all_linear_layers, compile_patterns, wants_all_linear
from fedlora.quant.formats import quantize_weight, shape_problem
from fedlora.quant.linear import QuantLinear
from fedlora.quant.loftq import loftq
from fedlora.quant.weight import QuantError


def _is_adapter(module: nn.Module) -> bool:
    return hasattr(module, "lora_A") and hasattr(module, "lora_B") and hasattr(module, "base")


def _plain_lora(adapter: nn.Module) -> bool:
    """True for adapters whose update is s·lora_B·lora_A (not e.g. LoRA-SB's B·R·A)."""
    from fedlora.adapters.lora import LoRALinear  # lazy: fedlora.adapters imports this package

    return isinstance(adapter, LoRALinear) and type(adapter).lora_forward is LoRALinear.lora_forward


def _targets(model: nn.Module, cfg: QuantConfig, patterns: list[str]) -> dict[str, tuple[nn.Module, str, nn.Module, nn.Module | None]]:
    """Layer name (adapter name if wrapped) → (parent, attribute, dense layer, adapter or None).
    Dense layers are ``nn.Linear`` and ``Conv1D`` (:data:`fedlora.linear_layout.DENSE_TYPES`)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    try:
        compiled = compile_patterns(patterns)
    except PatternError as err:
        raise QuantError(str(err)) from err
    in_blocks = all_linear_layers(model, DENSE_TYPES) if wants_all_linear(compiled) else frozenset()
    out = {}
    for name, module in model.named_modules():
        if not isinstance(module, DENSE_TYPES) or module is head:
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        adapter = parent if child == "base" and _is_adapter(parent) else None
        key = parent_name if adapter is not None else name
        if cfg.targets == "all_linear" or any(p.matches(key, in_blocks) for p in compiled):
            out[key] = (parent, child, module, adapter)
    return out


def model_bytes(model: nn.Module) -> int:
    """Bytes of everything but trainable adapter factors: the frozen base in memory (each tensor
    once, tied weights included; non-persistent buffers counted too)."""
    seen: set[int] = set()
    total = 0
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if "lora_" in name.rsplit(".", 1)[-1] or id(t) in seen:  # adapters; tied weights once
            continue
        seen.add(id(t))
        total += t.numel() * t.element_size()
    return total


def _check_targets(targets: dict, cfg: QuantConfig, target_patterns: list[str]) -> None:
    if not targets:
        raise QuantError(f"quantization targets {target_patterns} match no linear layer of this model")
    problems = [p for n, (_, _, lin, _) in targets.items() if (p := shape_problem(n, *features(lin)[::-1], cfg))]
    if problems:
        raise QuantError("; ".join(problems[:3]) + (f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""))


def quantize_targets(model: nn.Module, cfg: QuantConfig, target_patterns: list[str]) -> list[str]:
    """The names of the dense layers :func:`quantize_model` would replace (an adapter's name where
    one wraps the layer), in the model's order, checked as it checks them: raises
    :class:`QuantError` when they match nothing or a layer's shape does not fit the format. Reads
    names, types and shapes only, so ``model`` may be a meta-device skeleton (what
    :mod:`fedlora.model.streaming` quantizes while loading)."""
    targets = _targets(model, cfg, target_patterns)
    _check_targets(targets, cfg, target_patterns)
    return list(targets)


@torch.no_grad()
def quantize_model(
    model: nn.Module,
    cfg: QuantConfig,
    target_patterns: list[str],
    *,
    state: dict[str, torch.Tensor] | None = None,
) -> dict:
    """Replace matching dense layers (``nn.Linear``, and GPT-2's ``Conv1D``, whose transposed weight
    becomes an ordinary (d_out, d_in) quantized weight) by :class:`QuantLinear` in place; return a
    report.

    ``target_patterns``: module patterns, normally ``cfg.adapter.target_modules``, matched as
    everywhere in fedlora (:mod:`fedlora.module_patterns`: a plain name matches trailing name
    components, a regex the whole dotted name, ``all-linear`` every linear layer inside the
    decoder blocks; an adapter's layer by the adapter's name); ignored with
    ``quant.targets=all_linear`` (every linear but the output head). ``state``: packed tensors from :func:`quantized_state` (e.g. the server's LoftQ
    result) to load instead of quantizing — clients then compute nothing.

    Report keys: ``format``, ``layers``, ``per_format`` ({kind: count}), ``quantized_params``,
    ``quantized_bytes``, ``bytes_per_param`` (persistent codes + scales per quantized parameter),
    ``dense_bytes`` (those layers' weights before), ``base_bytes_before`` / ``base_bytes_after``
    (every frozen parameter and buffer of the model), ``loftq`` (mean relative weight error with
    plain quantization and with LoftQ, or None), ``seconds``.
    """
    started = time.time()
    before = model_bytes(model)
    report = {"format": cfg.format, "targets": cfg.targets, "layers": 0, "per_format": {}, "quantized_params": 0,
              "quantized_bytes": 0, "bytes_per_param": None, "dense_bytes": 0, "base_bytes_before": before,
              "base_bytes_after": before, "loftq": None, "seconds": 0.0}  # fmt: skip
    if cfg.format == "none":
        return report
    targets = _targets(model, cfg, target_patterns)
    _check_targets(targets, cfg, target_patterns)
    use_loftq = cfg.init == "loftq" and state is None
    if use_loftq:
        missing = [n for n, (*_, adapter) in targets.items() if adapter is None or not _plain_lora(adapter)]
        if missing:
            raise QuantError(
                f"quant.init=loftq initialises LoRA adapters, but {missing[:3]} carry none (or not a plain "
                "s·B·A adapter); call inject_adapters before quantize_model, and quantize only adapted layers"
            )
    if state is not None:
        wanted = {f"{n}.q_" for n in targets}
        if not any(k.startswith(tuple(wanted)) for k in state):
            raise QuantError("the given quantized state holds none of this model's target layers")

    counts: Counter[str] = Counter()
    errors_q, errors_l = [], []
    for name, (parent, child, linear, adapter) in targets.items():
        w = weight_view(linear).detach().float()  # (d_out, d_in), a Conv1D's transposed storage included
        qweight = None
        if use_loftq:
            res = loftq(w, lambda m: quantize_weight(m, cfg), rank=adapter.rank, scale=adapter.scale, iters=cfg.loftq_iters)
            qweight = res.qweight
            adapter.lora_A.copy_(res.A)
            adapter.lora_B.copy_(res.B)
            errors_q.append(res.error_quant)
            errors_l.append(res.error_loftq)
        elif state is not None:
            template = quantize_weight(torch.zeros_like(w[:, :]), cfg)  # shapes only
            qweight = template.with_tensors(_take(state, name, template.tensors()))
        layer = QuantLinear.from_linear(linear, cfg, qweight=qweight)
        if state is not None and f"{name}.side_A" in state:
            layer.side_A = state[f"{name}.side_A"].float().to(w.device).clone()
            layer.side_B = state[f"{name}.side_B"].float().to(w.device).clone()
        setattr(parent, child, layer)
        counts[cfg.format] += 1
        report["quantized_params"] += w.numel()
        report["quantized_bytes"] += layer.nbytes
        report["dense_bytes"] += linear.weight.numel() * linear.weight.element_size()
        del linear, w
    report.update(
        layers=sum(counts.values()),
        per_format=dict(counts),
        bytes_per_param=report["quantized_bytes"] / report["quantized_params"],
        base_bytes_after=model_bytes(model),
        seconds=round(time.time() - started, 2),
    )
    if use_loftq:
        report["loftq"] = {"iters": cfg.loftq_iters, "error_quant": sum(errors_q) / len(errors_q),
                           "error_loftq": sum(errors_l) / len(errors_l)}  # fmt: skip
    return report


def _take(state: dict[str, torch.Tensor], name: str, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for field, ref in like.items():
        key = f"{name}.q_{field}"
        if key not in state:
            raise QuantError(f"quantized state lacks {key!r}; was it made with the same quant config and model?")
        t = state[key]
        if t.shape != ref.shape or t.dtype != ref.dtype:
            raise QuantError(f"{key}: state has {tuple(t.shape)} {t.dtype}, this config needs {tuple(ref.shape)} {ref.dtype}")
        out[field] = t.to(ref.device).clone()
    return out


def quant_layers(model: nn.Module) -> dict[str, QuantLinear]:
    """Every :class:`QuantLinear`, keyed by the adapter's name when it sits under one."""
    return {n.removesuffix(".base"): m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def quantized_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The packed weights and side terms of every quantized layer, as CPU tensors keyed
    ``{layer}.q_<field>`` / ``{layer}.side_A|side_B``: what a server ships so that clients load
    its Q (e.g. LoftQ's) with ``quantize_model(..., state=...)`` instead of recomputing it."""
    out = {}
    for name, layer in quant_layers(model).items():
        for buf, t in layer.named_buffers(recurse=False):
            if buf.startswith("q_") or buf.startswith("side_"):
                out[f"{name}.{buf}"] = t.detach().cpu()
    return out
