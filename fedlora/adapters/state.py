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

_SUFFIXES = (".lora_A", ".lora_B", ".lora_R", ".scale")

PARTS = ("A", "B", "R")
"""What a payload may carry per layer: the factors A and B, or only the r×r core R of a B·R·A
adapter (whose state is ``LoraFactors(A=R, B=I)``, see :mod:`fedlora.adapters.sb`)."""


def state_to_arrays(state: AdapterState, parts: tuple[str, ...] = ("A", "B")) -> dict[str, np.ndarray]:
    """Flatten to fp32 numpy arrays keyed ``{layer}.lora_A`` / ``.lora_B`` / ``.lora_R`` / ``.scale``.

    ``parts`` selects what travels: ``("B",)`` for a frozen shared A (FFA-LoRA), ``("R",)`` for a
    core (Fed-SB); the receiver fills the rest from an adapter it already has (``like``).
    """
    if not set(parts) <= set(PARTS) or ("R" in parts and len(parts) > 1):
        raise AdapterError(f"payload parts {parts} must be a subset of (A, B), or (R,) alone")
    out: dict[str, np.ndarray] = {}
    for name, f in state.items():
        if "R" in parts:
            out[f"{name}.lora_R"] = (f.B.detach().double() @ f.A.detach().double()).float().cpu().numpy()
        if "A" in parts:
            out[f"{name}.lora_A"] = f.A.detach().to("cpu", torch.float32).numpy()
        if "B" in parts:
            out[f"{name}.lora_B"] = f.B.detach().to("cpu", torch.float32).numpy()
        out[f"{name}.scale"] = np.asarray([f.scale], dtype=np.float32)
    return out


def arrays_to_state(arrays: dict[str, np.ndarray], like: AdapterState | None = None) -> AdapterState:
    """Inverse of :func:`state_to_arrays`; factors a payload leaves out come from ``like``.

    Raises :class:`AdapterError` on a malformed payload (stray keys, missing parts, shapes that
    do not chain).
    """
    names = {k.rsplit(".", 1)[0] for k in arrays if k.endswith(_SUFFIXES)}
    stray = sorted(k for k in arrays if not k.endswith(_SUFFIXES))
    if stray:
        raise AdapterError(f"unexpected adapter keys {stray[:3]}; keys must end in {_SUFFIXES}")
    state: AdapterState = {}
    for name in sorted(names):
        if f"{name}.scale" not in arrays:
            raise AdapterError(f"adapter layer {name!r} lacks '{name}.scale'")
        s = arrays[f"{name}.scale"]
        if np.size(s) != 1:
            raise AdapterError(f"adapter layer {name!r} has a scale of shape {np.shape(s)}; expected one number")
        scale = float(np.ravel(s)[0])
        if f"{name}.lora_R" in arrays:
            R = torch.from_numpy(np.array(arrays[f"{name}.lora_R"]))
            if R.ndim != 2 or R.shape[0] != R.shape[1]:
                raise AdapterError(f"adapter layer {name!r}: core R must be square, got {tuple(R.shape)}")
            state[name] = LoraFactors(R, torch.eye(R.shape[0]), scale)
            continue
        factors = []
        for part in ("A", "B"):
            key = f"{name}.lora_{part}"
            if key in arrays:
                factors.append(torch.from_numpy(np.array(arrays[key])))
            elif like is not None and name in like:
                factors.append(getattr(like[name], part))
            else:
                raise AdapterError(f"adapter layer {name!r} lacks {key!r}")
        a, b = factors
        if a.ndim != 2 or b.ndim != 2 or b.shape[1] != a.shape[0]:
            raise AdapterError(
                f"adapter layer {name!r} has inconsistent shapes A{tuple(a.shape)} B{tuple(b.shape)}; "
                "expected A (r, d_in) and B (d_out, r)"
            )
        state[name] = LoraFactors(a, b, scale)
    return state


def layout_mismatch(reference: AdapterState, update: AdapterState) -> str | None:
    """Why ``update`` lacks ``reference``'s layers or factor shapes (None when they match): the one
    layout check behind aggregation, client-level DP and the server's reply checks."""
    if set(update) != set(reference):
        return f"layers differ: {sorted(set(update) ^ set(reference))[:3]}"
    for name, f in update.items():
        ref = reference[name]
        if f.A.shape != ref.A.shape or f.B.shape != ref.B.shape:
            return f"{name} has A{tuple(f.A.shape)} B{tuple(f.B.shape)}, expected A{tuple(ref.A.shape)} B{tuple(ref.B.shape)}"
    return None


def state_nbytes(state: AdapterState) -> int:
    """Bytes of the fp32 factors (A and B) of a state."""
    return sum(4 * (f.A.numel() + f.B.numel()) for f in state.values())
