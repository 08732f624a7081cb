"""Save a fedlora adapter in PEFT's format, loadable with ``peft.PeftModel.from_pretrained``.

PEFT keys: ``base_model.model.{module}.lora_A.weight`` (r, d_in) and ``….lora_B.weight``
(d_out, r), scale ``lora_alpha / r`` (``/ √r`` with ``use_rslora``); per-module ranks go in
``rank_pattern``. Only plain LoRA maps onto PEFT; other adapter kinds are saved as their dense-
equivalent LoRA factors where that is exact.

GPT-2-style ``Conv1D`` layers store their weight as (d_in, d_out). The factors are the same either
way (A (r, d_in), B (d_out, r): the LoRA branch of the forward never reads the base weight); only
PEFT's merge needs to know, through ``fan_in_fan_out=True``. PEFT sets that flag per layer from the
layer's type when it loads (with a warning when the config says otherwise), so the config value
:func:`peft_fan_in_fan_out` gives only keeps the warning away.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import torch
from safetensors.torch import save_file

from fedlora.adapters.lora import lora_scale
from fedlora.adapters.targets import TargetReport
from fedlora.adapters.state import AdapterState, LoraFactors
from fedlora.aggregation.common import GlobalState
from fedlora.config import AdapterConfig
from fedlora.rundir.files import PEFT_CONFIG_FILE, PEFT_WEIGHTS_FILE


def peft_fan_in_fan_out(report: TargetReport) -> bool:
    """PEFT's ``fan_in_fan_out`` for an adapter over the layers ``report`` (from
    :func:`fedlora.model.targets.resolve_targets` on the base model) names: True when they are
    ``Conv1D`` layers (GPT-2 family), whose weight is stored (d_in, d_out)."""
    return report.types.get("Conv1D", 0) > 0


def save_peft_adapter(
    state: AdapterState, cfg: AdapterConfig, out_dir: str | Path, *, base_model: str, fan_in_fan_out: bool = False
) -> Path:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` to ``out_dir``.

    ``fan_in_fan_out``: True for a base whose adapted layers are ``Conv1D`` (GPT-2;
    :func:`peft_fan_in_fan_out`); the tensors are the same either way. Returns ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ranks = {name: f.rank for name, f in state.items()}
    default_rank = Counter(ranks.values()).most_common(1)[0][0]
    tensors = {}
    for name, f in state.items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = f.A.float().contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = f.B.float().contiguous()
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": default_rank,
        "lora_alpha": cfg.alpha,
        "use_rslora": cfg.rslora,
        "lora_dropout": cfg.dropout,
        "bias": "none",
        "fan_in_fan_out": bool(fan_in_fan_out),
        # exact module names: PEFT matches a list entry against the end of each module name
        "target_modules": sorted(state),
        # full module names (escaped): PEFT anchors a pattern at a name's end after a dot
        "rank_pattern": {re.escape(n): r for n, r in ranks.items() if r != default_rank},
        "alpha_pattern": {},
        "init_lora_weights": True,
        "modules_to_save": None,
    }
    save_file(tensors, str(out / PEFT_WEIGHTS_FILE))
    (out / PEFT_CONFIG_FILE).write_text(json.dumps(config, indent=2))
    return out


def export_state(state: GlobalState, alpha: float, rslora: bool) -> AdapterState:
    """One plain LoRA per layer equal to the global model's total update.

    Without base terms this is the global adapter. With them (FedEx-LoRA residuals, FLoRA stacks)
    the terms are concatenated with the adapter: B = [s·B_g, s_1·B_1, …] / s_out,
    A = [A_g; A_1; …], so s_out·B·A = s·B_g·A_g + Σ s_k·B_k·A_k exactly, with s_out the scale PEFT
    derives from the concatenated rank.
    """
    out: AdapterState = {}
    for name, f in state.adapter.items():
        terms = state.base_terms.get(name, [])
        if not terms:
            out[name] = f
            continue
        parts = [f, *terms]
        rank = sum(p.rank for p in parts)
        s_out = lora_scale(alpha, rank, rslora)
        b = torch.cat([p.scale * p.B.float() for p in parts], dim=1) / s_out  # (d_out, Σr)
        a = torch.cat([p.A.float() for p in parts], dim=0)  # (Σr, d_in)
        out[name] = LoraFactors(a, b, s_out)
    return out
