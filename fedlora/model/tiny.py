"""A tiny causal LM and tokenizer built from code: random weights, no download.

Used by tests and smoke runs (``model=tiny``). The tokenizer is character-level over printable
ASCII, so any English/maths text (GSM8K included) tokenizes without an unknown token, and the
model is a real ``transformers`` Llama with the usual ``q/k/v/o/gate/up/down_proj`` names, so the
adapter code is exercised exactly as on a real model.
"""

from __future__ import annotations

import string

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

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
