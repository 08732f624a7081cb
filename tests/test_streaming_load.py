"""Quantize while loading (:mod:`fedlora.model.streaming`): the streamed base equals the plain path
(``load_model`` then ``quantize_model``) bit for bit — packed codes and scales, dense tensors,
buffers, logits and the quantization report — for nf4, int8 and int4, on the tiny model and small
Llama / Qwen2 (biases) / GPT-2 (tied transposed Conv1D) / Gemma 3 (tied head, scaled embeddings,
two rotary tables) checkpoints, single-file and sharded, fp32 and bf16; ``build_model`` uses it;
the cases it leaves to the plain path; bad input fails before any weight is read.

Peak memory is measured in ``benchmarks/load_quantized.py``, not here.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, Gemma3TextConfig, LlamaConfig

from fedlora.adapters import LoRALinear, adapter_class, inject_adapters
from fedlora.adapters.targets import TargetError
from fedlora.config import FedloraConfig, ModelConfig, QuantConfig
from fedlora.model.build import build_model
from fedlora.model.loading import ModelError, load_model
from fedlora.model.streaming import INDEX_FILE, checkpoint_files, load_quantized, read_index
from fedlora.model.tiny import build_tiny_byte_level_tokenizer, build_tiny_model, build_tiny_tokenizer, save_tiny_family
from fedlora.quant import QuantError, QuantLinear, quantize_model

IDS = torch.tensor([[5, 17, 30, 42, 7, 9, 60, 3, 11, 25, 40, 8]])


def _cfg(path: Path, fmt: str, dtype: str = "float32", **quant) -> FedloraConfig:
    cfg = FedloraConfig()
    cfg.model = ModelConfig(name_or_path=str(path), dtype=dtype, device="cpu")
    cfg.quant = QuantConfig(format=fmt, **quant)
    return cfg


def _plain(cfg: FedloraConfig):
    model, _ = load_model(cfg.model)
    return model, quantize_model(model, cfg.quant, cfg.adapter.target_modules)


def _assert_same(streamed, report, plain, plain_report) -> None:
    """Every parameter and buffer (persistent or not) equal in value and dtype, the same
    QuantLinear layers, the same logits, the same report bar its timing."""
    a = dict(streamed.named_parameters()) | dict(streamed.named_buffers())
    b = dict(plain.named_parameters()) | dict(plain.named_buffers())
    assert sorted(a) == sorted(b)
    for name in b:
        assert a[name].dtype == b[name].dtype and a[name].device == b[name].device, name
        assert torch.equal(a[name], b[name]), name
    quant = lambda m: sorted(n for n, x in m.named_modules() if isinstance(x, QuantLinear))  # noqa: E731
    assert quant(streamed) == quant(plain) and quant(plain)
    assert not any(p.requires_grad for p in streamed.parameters()) and not streamed.training
    head, emb = streamed.get_output_embeddings().weight, streamed.get_input_embeddings().weight
    assert (head is emb) == (plain.get_output_embeddings().weight is plain.get_input_embeddings().weight)
    with torch.no_grad():
        assert torch.equal(streamed(IDS).logits, plain(IDS).logits)
    assert {k: v for k, v in report.items() if k != "seconds"} == {k: v for k, v in plain_report.items()
                                                                    if k != "seconds"}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    """The ``model=tiny`` model (2-layer Llama, hidden 64) saved as a local safetensors directory."""
    out = tmp_path_factory.mktemp("tiny")
    tokenizer = build_tiny_tokenizer()
    build_tiny_model(len(tokenizer), seed=0).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def sharded_llama_dir(tmp_path_factory) -> Path:
    """A small Llama (hidden 128, 3 layers, GQA) saved in several shards with an index."""
    out = tmp_path_factory.mktemp("llama_sharded")
    tokenizer = build_tiny_byte_level_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=320, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         initializer_range=0.2, tie_word_embeddings=False, pad_token_id=0, bos_token_id=1,
                         eos_token_id=2)  # fmt: skip
    with torch.random.fork_rng():
        torch.manual_seed(1)
        AutoModelForCausalLM.from_config(config).save_pretrained(out, max_shard_size="200KB")
    tokenizer.save_pretrained(out)
    return out


@pytest.mark.parametrize("fmt", ["nf4", "int8", "int4"])
def test_the_tiny_model_streamed_equals_load_then_quantize(tiny_dir, fmt):
    cfg = _cfg(tiny_dir, fmt, group_size=32)
    model, tokenizer, report = load_quantized(cfg)
    assert report is not None and report["layers"] == 14  # 7 projections × 2 layers
    assert tokenizer.padding_side == "right" and tokenizer.pad_token == "<pad>"
    _assert_same(model, report, *_plain(cfg))


@pytest.mark.parametrize("fmt,dtype", [("nf4", "float32"), ("int8", "bfloat16"), ("int4", "bfloat16")])
def test_a_sharded_llama_checkpoint_streams_shard_by_shard_equal_to_the_plain_path(sharded_llama_dir, fmt, dtype):
    files = checkpoint_files(sharded_llama_dir)
    assert (sharded_llama_dir / INDEX_FILE).is_file() and len(files) >= 3
    weight_map = json.loads((sharded_llama_dir / INDEX_FILE).read_text())["weight_map"]
    assert sorted(read_index(files)) == sorted(weight_map)
    cfg = _cfg(sharded_llama_dir, fmt, dtype)
    model, _, report = load_quantized(cfg)
    assert report["layers"] == 21
    assert model.get_input_embeddings().weight.dtype == getattr(torch, dtype)
    _assert_same(model, report, *_plain(cfg))


@pytest.mark.parametrize("family,fmt", [("qwen2", "int8"), ("gpt2", "nf4")])
def test_biases_and_tied_transposed_layers_stream_exactly(tmp_path, family, fmt):
    """Qwen2's q/k/v carry biases (a layer is quantized once weight and bias have arrived); GPT-2's
    Conv1D stores its weight transposed and ties the head to the token embeddings."""
    cfg = _cfg(save_tiny_family(family, tmp_path), fmt)
    model, _, report = load_quantized(cfg)
    assert report is not None
    _assert_same(model, report, *_plain(cfg))
    if family == "qwen2":
        layer = model.model.layers[0].self_attn.q_proj
        assert isinstance(layer, QuantLinear) and layer.bias is not None


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_gemma3_tied_head_scaled_embeddings_and_rotary_tables_are_rebuilt_exactly(tmp_path, dtype):
    tokenizer = build_tiny_byte_level_tokenizer()
    config = Gemma3TextConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=1, head_dim=16, max_position_embeddings=256,
                              sliding_window=8, initializer_range=0.2, pad_token_id=0, bos_token_id=1,
                              eos_token_id=2)  # fmt: skip
    with torch.random.fork_rng():
        torch.manual_seed(2)
        AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    assert "lm_head.weight" not in read_index(checkpoint_files(tmp_path))  # stored once, as the embeddings
    cfg = _cfg(tmp_path, "nf4", dtype)
    model, _, report = load_quantized(cfg)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert float(model.model.embed_tokens.embed_scale) == pytest.approx(64**0.5, rel=1e-2)
    assert all(not b.is_meta for b in model.buffers())
    _assert_same(model, report, *_plain(cfg))


def test_build_model_quantizes_while_loading_and_matches_the_old_order(tiny_dir):
    """The adapted model build_model makes now (stream, then inject) equals the old order (load,
    inject, quantize): same base, same adapter initialisation, same output."""
    cfg = _cfg(tiny_dir, "nf4")
    torch.manual_seed(3)
    model, _ = build_model(cfg)
    torch.manual_seed(3)
    old, _ = load_model(cfg.model)
    inject_adapters(old, cfg.adapter, adapter_class(cfg.adapter.kind))
    old_report = quantize_model(old, cfg.quant, cfg.adapter.target_modules)
    state, old_state = model.state_dict(), old.state_dict()
    assert sorted(state) == sorted(old_state)
    assert all(torch.equal(state[k], old_state[k]) for k in state)
    assert sum(isinstance(m, LoRALinear) and isinstance(m.base, QuantLinear) for m in model.modules()) == 14
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, old(IDS).logits)
    assert model.quant_report["layers"] == old_report["layers"] == 14
    assert model.quant_report["base_bytes_after"] == old_report["base_bytes_after"]


def test_cases_left_to_the_plain_path_return_no_report(tmp_path, tiny_dir, caplog):
    for cfg in (_cfg(tiny_dir, "none"), _cfg(tiny_dir, "nf4", init="loftq"), _cfg("tiny", "nf4")):
        model, _, report = load_quantized(cfg)
        assert report is None and not any(isinstance(m, QuantLinear) for m in model.modules())
    # GPT-NeoX checkpoints name the head embed_out; transformers renames it while loading, streaming does not
    neox = save_tiny_family("gpt_neox", tmp_path / "neox")
    with caplog.at_level(logging.WARNING, logger="fedlora.model.streaming"):
        model, _, report = load_quantized(_cfg(neox, "int8"))
    assert report is None and "lm_head.weight is not in the checkpoint" in caplog.text


def test_bad_input_fails_before_any_weight_is_read(tmp_path):
    """Patterns and shapes are checked on the skeleton: a truncated weight file is never reached."""
    save_tiny_family("llama", tmp_path)
    weights = tmp_path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(TargetError, match="no_such_proj"):
        cfg = _cfg(tmp_path, "nf4")
        cfg.adapter.target_modules = ["no_such_proj"]
        load_quantized(cfg)
    with pytest.raises(QuantError, match="group_size=256 does not divide d_in=64"):
        load_quantized(_cfg(tmp_path, "int4", group_size=256))
    with pytest.raises(ModelError, match="truncated"):
        load_quantized(_cfg(tmp_path, "nf4"))
