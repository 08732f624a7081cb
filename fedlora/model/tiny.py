"""A tiny causal LM and tokenizer built from code: random weights, no download.

Used by tests and smoke runs (``model=tiny``). The tokenizer is character-level over printable
ASCII, so any English/maths text (GSM8K included) tokenizes without an unknown token, and the
model is a real ``transformers`` Llama with the usual ``q/k/v/o/gate/up/down_proj`` names, so the
adapter code is exercised exactly as on a real model.

:data:`FAMILIES` builds the same kind of tiny random model for other architectures users bring
(Llama, Mistral, Qwen2, Phi-3 with fused ``qkv_proj``/``gate_up_proj``, GPT-NeoX/Pythia, GPT-2
with transposed ``Conv1D`` layers), and :func:`save_tiny_family` writes one as a local model
directory with the character tokenizer, which ``model.name_or_path=DIR`` loads like any
downloaded model (tests/test_model_families.py).
"""

from __future__ import annotations

import string
from collections.abc import Callable
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    Phi3Config,
    PretrainedConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]


def build_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Character-level tokenizer over printable ASCII plus pad/bos/eos/unk."""
    chars = sorted(set(string.printable) - set("\x0b\x0c"))
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + chars)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
    )


def build_tiny_model(
    vocab_size: int, *, hidden_size: int = 64, num_layers: int = 2, seed: int = 0
) -> LlamaForCausalLM:
    """A 2-layer Llama with random weights; deterministic for a given seed."""
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size + 32,  # ≠ hidden_size: MLP layers are non-square
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,  # k/v projections are non-square too
        max_position_embeddings=1024,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
        # std 0.02 (the default) leaves the frozen random head unable to produce a peaked
        # distribution (|logit| ≲ 1.3), so nothing could be learnt through adapters alone
        initializer_range=0.2,
    )
    gen = torch.random.fork_rng()
    with gen:
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model


_IDS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
_DECODER = {"hidden_size": 64, "intermediate_size": 160, "num_hidden_layers": 2, "num_attention_heads": 4,
            "max_position_embeddings": 1024, "initializer_range": 0.2, "tie_word_embeddings": False, **_IDS}
"""Shared by the Llama-like families: the sizes of :func:`build_tiny_model` (non-square MLP), and its
std 0.2 so a frozen random head can still learn through adapters."""

FAMILIES: dict[str, Callable[[int], PretrainedConfig]] = {
    "llama": lambda vocab: LlamaConfig(vocab_size=vocab, num_key_value_heads=2, **_DECODER),
    "mistral": lambda vocab: MistralConfig(vocab_size=vocab, num_key_value_heads=2, sliding_window=64, **_DECODER),
    "qwen2": lambda vocab: Qwen2Config(vocab_size=vocab, num_key_value_heads=2, **_DECODER),  # q/k/v carry biases
    "phi3": lambda vocab: Phi3Config(vocab_size=vocab, num_key_value_heads=4, **_DECODER),  # fused qkv_proj, gate_up_proj
    "gpt_neox": lambda vocab: GPTNeoXConfig(vocab_size=vocab, hidden_size=64, intermediate_size=160,
                                            num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=1024,
                                            rotary_pct=0.5, initializer_range=0.2, tie_word_embeddings=False, **_IDS),
    # GPT-2: Conv1D layers (weight stored (d_in, d_out)), head tied to the token embeddings; its
    # default dropout of 0.1 is switched off, as in the other families, so runs are deterministic
    "gpt2": lambda vocab: GPT2Config(vocab_size=vocab, n_embd=64, n_inner=160, n_layer=2, n_head=4, n_positions=1024,
                                     initializer_range=0.2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **_IDS),
}
"""Family name → its tiny config for a vocabulary size: 2 layers, hidden size 64, MLP width 160."""


def build_tiny_family(family: str, vocab_size: int, *, seed: int = 0) -> torch.nn.Module:
    """A tiny random-weight causal LM of ``family`` (a key of :data:`FAMILIES`), fp32, deterministic
    for a given seed. Raises ``KeyError`` naming the families for an unknown one."""
    if family not in FAMILIES:
        raise KeyError(f"unknown model family {family!r}; choose one of {sorted(FAMILIES)}")
    config = FAMILIES[family](vocab_size)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(config)


def _byte_symbols() -> dict[str, str]:
    """GPT-2's byte-level alphabet for the bytes 0–255 as characters (space → ``Ġ``, newline → ``Ċ``)."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    moved = [b for b in range(256) if b not in kept]
    return {chr(b): chr(b) for b in kept} | {chr(b): chr(256 + i) for i, b in enumerate(moved)}


def build_tiny_byte_level_tokenizer() -> PreTrainedTokenizerFast:
    """The character tokenizer of :func:`build_tiny_tokenizer` (same tokens, same ids on ASCII text)
    written the byte-level way: whitespace is stored as GPT-2's byte symbols (``Ġ``, ``Ċ``) behind a
    ``ByteLevel`` pre-tokenizer. transformers loads some model types' directories with their own
    tokenizer class whatever ``tokenizer_config.json`` says (``Qwen2Tokenizer`` for ``qwen2``), which
    rebuilds a byte-level pipeline around the saved vocabulary: with plain spaces in the vocabulary
    every space and newline would vanish; with the byte symbols the ids stay the same. A non-ASCII
    character becomes one ``<unk>`` per UTF-8 byte (one in all with :func:`build_tiny_tokenizer`)."""
    symbols = _byte_symbols()
    chars = sorted(set(string.printable) - set("\x0b\x0c"))
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + [symbols[c] for c in chars])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
                                                  pre_tokenizers.Split(pattern="", behavior="isolated")])
    core.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


def save_tiny_family(family: str, out_dir: str | Path, *, seed: int = 0) -> Path:
    """Write a tiny ``family`` model (:func:`build_tiny_family`) and the character tokenizer (its
    byte-level form, :func:`build_tiny_byte_level_tokenizer`, which every family's tokenizer class
    loads with the same ids) to ``out_dir`` as a local model directory (``config.json``,
    ``model.safetensors``, tokenizer files); returns the directory."""
    out = Path(out_dir)
    tokenizer = build_tiny_byte_level_tokenizer()
    build_tiny_family(family, len(tokenizer), seed=seed).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
