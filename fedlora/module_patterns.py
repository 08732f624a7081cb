"""How a module pattern (an entry of ``adapter.target_modules``) names modules: the one rule every
part of fedlora uses (adapter injection, quantization, the worker cache's private copies, the
check before a run in :mod:`fedlora.model.targets`).

Each pattern is one of two kinds, as in PEFT (a list of names matches suffixes, a regex string
matches whole):

- **a name** — only letters, digits, ``_`` and ``.`` (``q_proj``, ``self_attn.q_proj``,
  ``layers.0.mlp.down_proj``): matches a module whose dotted name *ends with these whole
  components*, i.e. ``name == p`` or ``name.endswith("." + p)``. So ``v_proj`` matches
  ``model.layers.0.self_attn.v_proj`` but not ``…self_attn.qkv_proj``;
- **a regular expression** — anything else (``.*\\.layers\\.[0-3]\\..*_proj``): must match the
  *whole* dotted module name (``re.fullmatch``), so ``.*v_proj`` is needed where a search would
  have found ``v_proj`` anywhere;
- **``all-linear``** (:data:`ALL_LINEAR`, PEFT's name for it) — every linear layer inside the
  model's decoder blocks, resolved on the model at hand by :func:`all_linear_layers`: a linear
  layer (of the caller's types, or an adapter) that lies inside an element of an ``nn.ModuleList``
  (``model.layers.3``, ``transformer.h.3``, ``gpt_neox.layers.3``) and is not the output head. The
  input embeddings, norms and the head are never linear layers of a block. Its matches depend on
  the module tree, not only on a name, so :meth:`ModulePattern.matches` takes the set
  :func:`all_linear_layers` gives.

This module imports nothing from fedlora, so the config, the math packages and the model layer can
all use it.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable
from dataclasses import dataclass

from torch import nn

_NAME = re.compile(r"[A-Za-z0-9_]+(?:\.[A-Za-z0-9_]+)*")

ALL_LINEAR = "all-linear"
"""The pattern for every linear layer inside the decoder blocks (see the module docstring)."""


class PatternError(ValueError):
    """A module pattern is empty or not a valid regular expression."""


@dataclass(frozen=True)
class ModulePattern:
    """One compiled pattern; :meth:`matches` applies the rule in the module docstring."""

    text: str
    regex: re.Pattern[str] | None
    """None for a plain name (suffix match by components) and for ``all-linear``; the compiled
    regex otherwise."""

    @property
    def kind(self) -> str:
        """``"name"``, ``"regex"`` or ``"all-linear"``."""
        if self.text == ALL_LINEAR:
            return ALL_LINEAR
        return "name" if self.regex is None else "regex"

    def matches(self, name: str, all_linear: Collection[str] = ()) -> bool:
        """Whether the dotted module ``name`` (as ``named_modules()`` gives it) is matched.
        ``all_linear``: the model's :func:`all_linear_layers`, which the ``all-linear`` pattern
        matches (no other kind reads it)."""
        if self.text == ALL_LINEAR:
            return name in all_linear
        if self.regex is None:
            return name == self.text or name.endswith("." + self.text)
        return self.regex.fullmatch(name) is not None


def compile_pattern(text: str, key: str = "adapter.target_modules") -> ModulePattern:
    """``text`` as a :class:`ModulePattern`. Raises :class:`PatternError` naming ``key`` for an
    empty pattern or an invalid regular expression."""
    if not isinstance(text, str) or not text.strip():
        raise PatternError(f"{key} has an empty pattern {text!r}; give a module name like 'q_proj'")
    if _NAME.fullmatch(text) or text == ALL_LINEAR:
        return ModulePattern(text, None)
    try:
        return ModulePattern(text, re.compile(text))
    except re.error as err:
        raise PatternError(
            f"{key} pattern {text!r} is not a valid regular expression ({err}); write a module name "
            "like 'q_proj' (matches names ending in that component) or a regex matched against the "
            r"whole dotted module name like '.*\.layers\.[0-3]\..*_proj'"
        ) from err


def compile_patterns(texts: Iterable[str], key: str = "adapter.target_modules") -> list[ModulePattern]:
    """Every pattern compiled (see :func:`compile_pattern`)."""
    return [compile_pattern(t, key) for t in texts]


def matches_any(name: str, patterns: Iterable[ModulePattern], all_linear: Collection[str] = ()) -> bool:
    """Whether any of ``patterns`` matches the dotted module ``name`` (``all_linear``: as in
    :meth:`ModulePattern.matches`)."""
    return any(p.matches(name, all_linear) for p in patterns)


def wants_all_linear(patterns: Iterable[ModulePattern]) -> bool:
    """Whether one of ``patterns`` is ``all-linear`` (so the caller must compute
    :func:`all_linear_layers`)."""
    return any(p.text == ALL_LINEAR for p in patterns)


def _is_adapter(module: nn.Module) -> bool:
    return hasattr(module, "lora_A") and hasattr(module, "lora_B") and hasattr(module, "base")


def all_linear_layers(model: nn.Module, linear_types: tuple[type[nn.Module], ...]) -> frozenset[str]:
    """The dotted names ``all-linear`` matches in ``model``: every module of ``linear_types`` (or an
    adapter, a module with ``lora_A``, ``lora_B`` and ``base``) inside an element of an
    ``nn.ModuleList`` (a decoder block), except the output head (``get_output_embeddings()``) and
    modules nested inside another such layer (an adapter's ``base``). Reads names and types only,
    so ``model`` may live on the meta device."""
    head = None
    if hasattr(model, "get_output_embeddings"):
        try:
            head = model.get_output_embeddings()
        except (NotImplementedError, AttributeError):
            head = None
    blocks = tuple(f"{name}.{child}." if name else f"{child}."
                   for name, m in model.named_modules() if isinstance(m, nn.ModuleList)
                   for child, _ in m.named_children())
    found: list[str] = []
    for name, module in model.named_modules():
        if module is head or not (isinstance(module, linear_types) or _is_adapter(module)):
            continue
        if not name.startswith(blocks) or any(name.startswith(f + ".") for f in found):
            continue
        found.append(name)
    return frozenset(found)
