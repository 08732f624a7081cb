"""Adapter state as plain named tensors: what clients send, servers average and runs save.

An :data:`AdapterState` maps a layer's module name (``model.layers.0.self_attn.q_proj``) to its
:class:`LoraFactors`. On the wire and on disk it is flattened to ``{name}.lora_A``,
``{name}.lora_B`` and ``{name}.scale`` so it is self-describing: a reader needs no config to know
each layer's rank and scale.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from fedlora.adapters.lora import AdapterError


class LoraFactors(NamedTuple):
    """One layer's update s·B·A: A (r, d_in), B (d_out, r), scale s."""

    A: torch.Tensor
    B: torch.Tensor
    scale: float

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    def delta(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Dense s·B·A, shape (d_out, d_in)."""
        return self.scale * (self.B.to(dtype) @ self.A.to(dtype))


AdapterState = dict[str, LoraFactors]

_SUFFIXES = (".lora_A", ".lora_B", ".scale")


def state_to_arrays(state: AdapterState) -> dict[str, np.ndarray]:
    """Flatten to fp32 numpy arrays keyed ``{layer}.lora_A`` / ``.lora_B`` / ``.scale``."""
    out: dict[str, np.ndarray] = {}
    for name, f in state.items():
        out[f"{name}.lora_A"] = f.A.detach().to("cpu", torch.float32).numpy()
        out[f"{name}.lora_B"] = f.B.detach().to("cpu", torch.float32).numpy()
        out[f"{name}.scale"] = np.asarray([f.scale], dtype=np.float32)
    return out


def arrays_to_state(arrays: dict[str, np.ndarray]) -> AdapterState:
    """Inverse of :func:`state_to_arrays`; raises :class:`AdapterError` on a malformed payload."""
    names = {k.rsplit(".", 1)[0] for k in arrays if k.endswith(_SUFFIXES)}
    stray = sorted(k for k in arrays if not k.endswith(_SUFFIXES))
    if stray:
        raise AdapterError(f"unexpected adapter keys {stray[:3]}; keys must end in {_SUFFIXES}")
    state: AdapterState = {}
    for name in sorted(names):
        try:
            a, b, s = (arrays[f"{name}{suffix}"] for suffix in _SUFFIXES)
        except KeyError as missing:
            raise AdapterError(f"adapter layer {name!r} lacks {missing.args[0]!r}") from None
        if a.ndim != 2 or b.ndim != 2 or b.shape[1] != a.shape[0]:
            raise AdapterError(
                f"adapter layer {name!r} has inconsistent shapes A{a.shape} B{b.shape}; "
                "expected A (r, d_in) and B (d_out, r)"
            )
        if np.size(s) != 1:
            raise AdapterError(f"adapter layer {name!r} has a scale of shape {np.shape(s)}; expected one number")
        state[name] = LoraFactors(torch.from_numpy(np.array(a)), torch.from_numpy(np.array(b)), float(np.ravel(s)[0]))
    return state


def state_nbytes(state: AdapterState) -> int:
    """Bytes of the fp32 factors (A and B) of a state."""
    return sum(4 * (f.A.numel() + f.B.numel()) for f in state.values())
