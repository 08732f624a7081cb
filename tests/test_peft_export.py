"""The saved adapter loads with the real peft library and gives fedlora's outputs."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel

from fedlora.adapters import LoRALinear, LoraFactors, get_adapter_state, inject_adapters, trainable_parameters
from fedlora.aggregation import GlobalState
from fedlora.adapters.base_terms import apply_base_terms
from fedlora.config import AdapterConfig
from fedlora.model.peft_export import export_state, save_peft_adapter
from fedlora.model.tiny import build_tiny_model


def _adapted(tokenizer, cfg: AdapterConfig):
    model = build_tiny_model(len(tokenizer), seed=0)
    inject_adapters(model, cfg, LoRALinear)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in trainable_parameters(model):
            p.normal_(std=0.05)
    return model.eval()


@pytest.mark.parametrize(
    "cfg",
    [
        AdapterConfig(rank=4, alpha=8.0),
        AdapterConfig(rank=4, alpha=8.0, rslora=True),
        AdapterConfig(rank=4, alpha=8.0, rank_pattern={r"layers\.1\.self_attn\.q_proj": 2, "mlp": 6}),
    ],
    ids=["plain", "rslora", "per-module-ranks"],
)
def test_peft_loads_the_adapter_with_identical_outputs(tmp_path, tokenizer, cfg):
    # Prepare
    model = _adapted(tokenizer, cfg)
    ids = torch.randint(3, len(tokenizer), (2, 11))
    # Execute
    save_peft_adapter(get_adapter_state(model), cfg, tmp_path, base_model="tiny")
    peft_model = PeftModel.from_pretrained(build_tiny_model(len(tokenizer), seed=0), tmp_path).eval()
    # Assert
    with torch.no_grad():
        torch.testing.assert_close(peft_model(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["use_rslora"] == cfg.rslora


def test_base_terms_are_folded_into_the_exported_adapter(tmp_path, tokenizer):
    # A FedEx/FLoRA-style global state: adapter + exact low-rank terms merged into the base.
    cfg = AdapterConfig(rank=4, alpha=8.0)
    model = _adapted(tokenizer, cfg)
    g = torch.Generator().manual_seed(3)
    state = get_adapter_state(model)
    terms = {
        name: [LoraFactors(0.05 * torch.randn(3, f.A.shape[1], generator=g), 0.05 * torch.randn(f.B.shape[0], 3, generator=g), 0.7)]
        for name, f in list(state.items())[:5]
    }
    apply_base_terms(model, terms)  # the fedlora model: W + terms, plus the adapter
    ids = torch.randint(3, len(tokenizer), (2, 9))
    save_peft_adapter(export_state(GlobalState(state, terms), cfg.alpha, cfg.rslora), cfg, tmp_path, base_model="tiny")
    peft_model = PeftModel.from_pretrained(build_tiny_model(len(tokenizer), seed=0), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)
