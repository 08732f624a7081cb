"""Save a fedlora adapter in PEFT's format, loadable with ``peft.PeftModel.from_pretrained``.

PEFT keys: ``base_model.model.{module}.lora_A.weight`` (r, d_in) and ``….lora_B.weight``
(d_out, r), scale ``lora_alpha / r`` (``/ √r`` with ``use_rslora``); per-module ranks go in
``rank_pattern``. Only plain LoRA maps onto PEFT; other adapter kinds are saved as their dense-
equivalent LoRA factors where that is exact.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import torch
from safetensors.torch import save_file

from fedlora.adapters.lora import lora_scale
from fedlora.adapters.state import AdapterState, LoraFactors
from fedlora.aggregation.common import GlobalState
from fedlora.config import AdapterConfig
from fedlora.rundir.files import PEFT_CONFIG_FILE, PEFT_WEIGHTS_FILE


def save_peft_adapter(
    state: AdapterState, cfg: AdapterConfig, out_dir: str | Path, *, base_model: str
) -> Path:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` to ``out_dir``."""
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
        "fan_in_fan_out": False,
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
