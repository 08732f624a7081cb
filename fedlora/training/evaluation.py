"""Evaluation: held-out loss / perplexity, and GSM8K exact match by greedy decoding."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from fedlora.data.records import collate, extract_gsm8k_answer, split_boundary
from fedlora.training.loss import response_hits, scored_hidden
from fedlora.training.local import move
from fedlora_kernels import linear_cross_entropy


@dataclass
class EvalResult:
    loss: float
    """Mean token loss over supervised (response) tokens."""
    perplexity: float
    tokens: int
    examples: int
    token_accuracy: float = 0.0
    """Share of response tokens whose greedy next-token prediction is right (teacher forcing)."""


@torch.no_grad()
def evaluate_loss(
    model: nn.Module,
    examples: Sequence[dict[str, list[int]]],
    *,
    batch_size: int,
    pad_id: int,
    progress: bool = False,
) -> EvalResult:
    """Token-weighted mean loss of ``model`` on ``examples`` (in order, no shuffling)."""
    if not examples:
        raise ValueError("no evaluation examples")
    device = next(model.parameters()).device
    model.eval()
    total, tokens, hits = 0.0, 0, 0
    weight = model.get_output_embeddings().weight
    softcap = getattr(model.config, "final_logit_softcapping", None)
    starts = range(0, len(examples), batch_size)
    for start in tqdm(starts, desc="eval", leave=False, disable=not progress):
        h, targets = scored_hidden(model, move(collate(list(examples[start : start + batch_size]), pad_id), device))
        total += float(linear_cross_entropy(h, weight, targets, softcap=softcap))
        hits += response_hits(model, h, targets)
        tokens += len(targets)
    loss = total / max(tokens, 1)
    return EvalResult(loss=loss, perplexity=math.exp(min(loss, 50.0)), tokens=tokens, examples=len(examples),
                      token_accuracy=hits / max(tokens, 1))


@torch.no_grad()
def generate_greedy(model: nn.Module, tokenizer, prompts: Sequence[str], max_new_tokens: int) -> list[str]:
    """Greedy completions of ``prompts`` (one at a time: no padding effects on small models).

    Each prompt is fed as training saw it: without its trailing whitespace
    (:func:`~fedlora.data.records.split_boundary`), with the tokenizer's special prefix (BOS), so
    the model produces the space-joined first token of the answer itself (Gemma 3: ``▁Janet``)
    rather than continuing after a lone ``▁`` it never saw in training. The completion is decoded
    without special tokens and starts with that space."""
    device = next(model.parameters()).device
    outputs = []
    for prompt in prompts:
        prompt, _ = split_boundary(prompt, "")
        ids = tokenizer(prompt, return_tensors="pt").input_ids.to(device)
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        outputs.append(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True))
    return outputs


def gsm8k_accuracy(
    model: nn.Module,
    tokenizer,
    problems: Sequence[tuple[str, str]],
    *,
    max_new_tokens: int,
    progress: bool = False,
) -> dict[str, float | int]:
    """Exact match of the final number: ``problems`` are (prompt, reference answer) pairs as
    :func:`~fedlora.data.records.format_example` makes them; the prompt goes through
    :func:`generate_greedy`. Returns ``accuracy`` (0–1), ``correct`` and ``total``."""
    correct = 0
    for prompt, reference in tqdm(problems, desc="gsm8k", leave=False, disable=not progress):
        completion = generate_greedy(model, tokenizer, [prompt], max_new_tokens)[0]
        predicted = extract_gsm8k_answer(completion)
        correct += int(predicted is not None and predicted == extract_gsm8k_answer(reference))
    return {"accuracy": correct / max(len(problems), 1), "correct": correct, "total": len(problems)}
