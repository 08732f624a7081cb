"""Which layers ``adapter.target_modules`` names in a model, checked whole before any adapter is made.

:func:`resolve_module_targets` applies the matching rule of :mod:`fedlora.module_patterns` (a
plain name matches trailing name components, anything else is a regex matched against the whole
dotted name, ``all-linear`` every linear layer inside the decoder blocks) to every module of a
model and refuses, naming the pattern and what it matched:

- a pattern that matches nothing (the message lists the model's linear layer names);
- a pattern that matches the output head: the loss and evaluation form logits from the head's
  weight directly, in chunks (``fedlora.training.loss``), so an adapter there would be neither
  trained nor applied, and on models that tie the head to the input embeddings (Gemma) it would
  change both;
- a pattern that matches the input embeddings, a norm, an activation, or a whole attention block,
  MLP or decoder layer: adapters wrap linear layers only (``nn.Linear``, ``transformers``'
  ``Conv1D`` of the GPT-2 family, and fedlora's ``QuantLinear``); the message names the linear
  layers inside such a block instead;
- a layer that already carries an adapter.

A pattern that matches only some layers (``layers.0.self_attn.q_proj``) is fine; the report says
how many each matched. The model may live on the meta device: only names and types are read.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from typing import Any

from torch import nn

from fedlora.adapters.lora import AdapterError
from fedlora.linear_layout import DENSE_TYPES
from fedlora.module_patterns import ALL_LINEAR, ModulePattern, PatternError, all_linear_layers, compile_patterns
from fedlora.quant.linear import QuantLinear

BASE_TYPES: tuple[type[nn.Module], ...] = (*DENSE_TYPES, QuantLinear)
"""Frozen layers an adapter can wrap: dense linears (``nn.Linear``, GPT-2's transposed ``Conv1D``:
:mod:`fedlora.linear_layout`) and quantized ones (``fedlora.quant``)."""

KEY = "adapter.target_modules"


class TargetError(AdapterError):
    """A ``target_modules`` pattern matches nothing, or matches modules that fedlora does not adapt;
    the message names the pattern, what it matched and the fix."""


@dataclass(frozen=True)
class PatternMatch:
    """What one pattern matched: only adaptable linear layers (otherwise :class:`TargetError`)."""

    pattern: str
    kind: str
    """``name`` (matches trailing name components), ``regex`` (matches the whole name) or
    ``all-linear`` (every linear layer inside the decoder blocks)."""
    layers: tuple[str, ...]
    """Matched module names, in the model's order."""
    types: dict[str, int]
    """Module class name → how many of :attr:`layers` are of it (e.g. ``{"Linear": 18}``)."""
    names: dict[str, int]
    """Last name component → how many of :attr:`layers` end in it, in first-seen order
    (``{"q_proj": 18, "k_proj": 18, …}``): what ``all-linear`` or a regex resolved to."""


@dataclass(frozen=True)
class TargetReport:
    """The layers a config's patterns adapt in one model; JSON-ready with :meth:`to_dict`."""

    architecture: str
    """The model's class name, e.g. ``Gemma3ForCausalLM``."""
    patterns: tuple[PatternMatch, ...]
    """One entry per pattern, in config order."""
    layers: tuple[str, ...]
    """Every adapted layer (the union over patterns), in the model's order."""
    types: dict[str, int]
    """Module class name → count over :attr:`layers`."""
    linear_layers: int
    """How many linear layers the model has that an adapter could wrap (the output head excluded)."""

    def to_dict(self) -> dict[str, Any]:
        """Plain types only: ``architecture``, ``layers`` (count), ``linear_layers``, ``types``,
        ``patterns`` (list of ``{pattern, kind, count, types, names, layers}``), ``adapted`` (names)."""
        return {
            "architecture": self.architecture,
            "layers": len(self.layers),
            "linear_layers": self.linear_layers,
            "types": dict(self.types),
            "patterns": [{"pattern": p.pattern, "kind": p.kind, "count": len(p.layers), "types": dict(p.types),
                          "names": dict(p.names), "layers": list(p.layers)} for p in self.patterns],
            "adapted": list(self.layers),
        }

    def format(self) -> str:
        """One line, e.g. ``adapters on 14 of 14 linear layers of LlamaForCausalLM (Linear: 14);
        layers per pattern: all-linear: 14 (q_proj 2, k_proj 2, …)``: a pattern that is not a plain
        name also says which layer names it resolved to."""
        types = ", ".join(f"{t}: {n}" for t, n in self.types.items())
        per = ", ".join(f"{p.pattern}: {len(p.layers)}" + (
            f" ({', '.join(f'{k} {v}' for k, v in p.names.items())})" if p.kind != "name" else "")
            for p in self.patterns)
        return (f"adapters on {len(self.layers)} of {self.linear_layers} linear layers of {self.architecture} "
                f"({types}); layers per pattern: {per}")


def _embeddings(model: nn.Module) -> tuple[nn.Module | None, nn.Module | None]:
    def get(name: str) -> nn.Module | None:
        try:
            return getattr(model, name)() if hasattr(model, name) else None
        except (NotImplementedError, AttributeError):
            return None

    return get("get_output_embeddings"), get("get_input_embeddings")


def _tied(head: nn.Module | None, embedding: nn.Module | None) -> bool:
    w_head, w_emb = getattr(head, "weight", None), getattr(embedding, "weight", None)
    return w_head is not None and w_head is w_emb


def _last_names(names: list[str]) -> list[str]:
    """Distinct last name components, in first-seen order."""
    return list(dict.fromkeys(n.rpartition(".")[2] for n in names))


def _examples(names: list[str], k: int = 3) -> str:
    shown = ", ".join(repr(n) for n in names[:k])
    return shown + (f" and {len(names) - k} more" if len(names) > k else "")


def _no_match(p: ModulePattern, arch: str, adaptable: list[str]) -> str:
    if p.kind == ALL_LINEAR:
        where = (f"; its linear layers, all outside them, are named like: {', '.join(_last_names(adaptable))} (full "
                 f"names like {adaptable[0]!r}): name them instead" if adaptable else "")
        return (f"{KEY} pattern {p.text!r} matches no linear layer of {arch}: it takes the linear layers inside the "
                f"decoder blocks (the elements of an nn.ModuleList such as model.layers), and {arch} has none{where}")
    msg = (f"{KEY} pattern {p.text!r} matches no linear layer of {arch}; its linear layers are named like: "
           f"{', '.join(_last_names(adaptable))} (full names like {adaptable[0]!r})" if adaptable else
           f"{KEY} pattern {p.text!r} matches no linear layer of {arch}, which has no linear layer fedlora can adapt")
    if p.regex is None:
        partial = [n for n in _last_names(adaptable) if p.text in n]
        if partial:
            msg += (f"; a name matches whole trailing name components, and {p.text!r} is only part of "
                    f"{', '.join(repr(n) for n in partial)}: to adapt such a layer, name it whole")
    elif any(p.regex.search(n) for n in adaptable):
        for hint in (f".*{p.text}", f".*(?:{p.text})", f".*(?:{p.text}).*"):
            try:
                hits = [n for n in adaptable if re.fullmatch(hint, n)]
            except re.error:
                continue
            if hits:
                msg += (f"; a regex must match the whole dotted module name (re.fullmatch): {hint!r} would "
                        f"match {len(hits)} linear layer(s)")
                break
    return msg


def resolve_module_targets(model: nn.Module, target_modules: list[str]) -> TargetReport:
    """Resolve ``target_modules`` (see :mod:`fedlora.module_patterns`) against ``model``'s modules.

    Returns a :class:`TargetReport` when every pattern matches at least one adaptable linear layer
    (``nn.Linear``, ``Conv1D`` or ``QuantLinear``, not the output head) and nothing else;
    ``all-linear`` resolves to every such layer inside the decoder blocks. Raises
    :class:`TargetError` listing every offending pattern and what it matched otherwise (an invalid
    regex included). Reads names and types only, so ``model`` may be a meta-device skeleton.
    """
    try:
        patterns = compile_patterns(target_modules, KEY)
    except PatternError as err:
        raise TargetError(str(err)) from err
    arch = type(model).__name__
    head, embedding = _embeddings(model)
    tied = _tied(head, embedding)
    modules = list(model.named_modules())
    name_of = {id(m): n for n, m in modules}
    adaptable = [n for n, m in modules if isinstance(m, BASE_TYPES) and m is not head]
    in_blocks = all_linear_layers(model, BASE_TYPES) if any(p.kind == ALL_LINEAR for p in patterns) else frozenset()
    problems: list[str] = []
    matches: list[PatternMatch] = []
    for p in patterns:
        hit = [(n, m) for n, m in modules if p.matches(n, in_blocks)]
        if not hit:
            problems.append(_no_match(p, arch, adaptable))
            continue
        bad = False
        for n, m in hit:
            if m is head:
                bad = True
                tie = (f", and {arch} ties it to the input embeddings {name_of.get(id(embedding), '?')!r}, so an "
                       "adapter would change both" if tied else "")
                problems.append(
                    f"{KEY} pattern {p.text!r} matches the output head {n!r}, which fedlora does not adapt: the "
                    "loss and evaluation form logits from the head's weight directly, in chunks "
                    f"(fedlora.training.loss), so an adapter there would be neither trained nor applied{tie}; "
                    f"remove it from {KEY}")
            elif m is embedding:
                bad = True
                tie = (f", and {arch} ties them to the output head {name_of.get(id(head), '?')!r}" if tied else "")
                problems.append(
                    f"{KEY} pattern {p.text!r} matches the input embeddings {n!r} ({type(m).__name__}), which "
                    f"fedlora does not adapt: adapters wrap linear layers only{tie}; remove it from {KEY}")
        hit = [(n, m) for n, m in hit if m is not head and m is not embedding]
        wrapped = [n for n, m in hit if hasattr(m, "lora_A") and hasattr(m, "base")]
        if wrapped:
            bad = True
            problems.append(f"{KEY} pattern {p.text!r} matches {len(wrapped)} layer(s) that already carry an "
                            f"adapter ({_examples(wrapped)}); inject adapters into a model once")
        other = [(n, m) for n, m in hit if not isinstance(m, BASE_TYPES) and n not in wrapped]
        if other:
            bad = True
            by_type: dict[str, list[str]] = {}
            for n, m in other:
                by_type.setdefault(type(m).__name__, []).append(n)
            what = "; ".join(f"{t} ×{len(ns)}: {_examples([n or '<the whole model>' for n in ns], 2)}"
                             for t, ns in by_type.items())
            inside = [c for n, _ in other for c in adaptable if n == "" or c.startswith(n + ".")]
            fix = (f"name the linear layers inside instead: {', '.join(_last_names(inside))}" if inside else
                   f"name linear layers instead, e.g. {', '.join(_last_names(adaptable)[:7])}")
            problems.append(
                f"{KEY} pattern {p.text!r} matches {len(other)} module(s) that are not linear layers ({what}); "
                f"adapters wrap linear layers only (nn.Linear, Conv1D, QuantLinear): {fix}")
        if not bad:
            counts = Counter(type(m).__name__ for _, m in hit)
            names = Counter(n.rpartition(".")[2] for n, _ in hit)
            matches.append(PatternMatch(p.text, p.kind, tuple(n for n, _ in hit), dict(counts), dict(names)))
    if problems:
        raise TargetError("\n".join(problems))
    chosen = {n for m in matches for n in m.layers}
    layers = tuple(n for n, _ in modules if n in chosen)
    types = Counter(type(m).__name__ for n, m in modules if n in chosen)
    return TargetReport(arch, tuple(matches), layers, dict(types), len(adaptable))
