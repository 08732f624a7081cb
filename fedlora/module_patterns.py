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
  have found ``v_proj`` anywhere.

This module imports nothing from fedlora, so the config, the math packages and the model layer can
all use it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

_NAME = re.compile(r"[A-Za-z0-9_]+(?:\.[A-Za-z0-9_]+)*")


class PatternError(ValueError):
    """A module pattern is empty or not a valid regular expression."""


@dataclass(frozen=True)
class ModulePattern:
    """One compiled pattern; :meth:`matches` applies the rule in the module docstring."""

    text: str
    regex: re.Pattern[str] | None
    """None for a plain name (suffix match by components); the compiled regex otherwise."""

    @property
    def kind(self) -> str:
        """``"name"`` or ``"regex"``."""
        return "name" if self.regex is None else "regex"

    def matches(self, name: str) -> bool:
        """Whether the dotted module ``name`` (as ``named_modules()`` gives it) is matched."""
        if self.regex is None:
            return name == self.text or name.endswith("." + self.text)
        return self.regex.fullmatch(name) is not None


def compile_pattern(text: str, key: str = "adapter.target_modules") -> ModulePattern:
    """``text`` as a :class:`ModulePattern`. Raises :class:`PatternError` naming ``key`` for an
    empty pattern or an invalid regular expression."""
    if not isinstance(text, str) or not text.strip():
        raise PatternError(f"{key} has an empty pattern {text!r}; give a module name like 'q_proj'")
    if _NAME.fullmatch(text):
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


def matches_any(name: str, patterns: Iterable[ModulePattern]) -> bool:
    """Whether any of ``patterns`` matches the dotted module ``name``."""
    return any(p.matches(name) for p in patterns)
