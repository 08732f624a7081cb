"""Local training and evaluation on the tiny model: the loss goes down, the schedule spans rounds,
greedy decoding is scored by exact match."""

from __future__ import annotations

import math

import pytest
import torch

from fedlora.adapters import LoRALinear, get_adapter_state, inject_adapters
from fedlora.config import AdapterConfig, TrainConfig
from fedlora.data.records import tokenize_example
from fedlora.training.evaluation import evaluate_loss, gsm8k_accuracy
from fedlora.training.local import lr_multiplier, train_local

PROBLEMS = [("Question: 3+4?\nAnswer: ", "3+4=7\n#### 7"), ("Question: 9-5?\nAnswer: ", "9-5=4\n#### 4")]


@pytest.fixture
def adapted(tiny_model):
    inject_adapters(tiny_model, AdapterConfig(rank=8, alpha=16), LoRALinear)
    return tiny_model


def _examples(tokenizer):
    return [tokenize_example(p, r, tokenizer, 64) for p, r in PROBLEMS]


def test_local_training_lowers_the_loss_and_touches_only_the_adapter(adapted, tokenizer):
    # Prepare
    examples = _examples(tokenizer)
    base_before = {n: p.detach().clone() for n, p in adapted.named_parameters() if "lora_" not in n}
    before = evaluate_loss(adapted, examples, batch_size=2, pad_id=tokenizer.pad_token_id)
    steps = []
    # Execute
    result = train_local(adapted, examples, TrainConfig(local_steps=30, batch_size=2, lr=1e-2, lr_schedule="constant"),
                         pad_id=tokenizer.pad_token_id, round_index=1, num_rounds=1, seed=0,
                         on_step=lambda step, loss: steps.append((step, loss)))
    after = evaluate_loss(adapted, examples, batch_size=2, pad_id=tokenizer.pad_token_id)
    # Assert
    assert after.loss < 0.5 * before.loss
    assert after.perplexity == pytest.approx(math.exp(after.loss))
    assert [s for s, _ in steps] == list(range(1, 31)) and steps[-1][1] < steps[0][1]
    assert result.steps == 30 and result.examples == 60 and result.tokens == 30 * sum(
        sum(label != -100 for label in e["labels"]) for e in examples)
    for name, p in adapted.named_parameters():
        if "lora_" not in name:
            assert torch.equal(p, base_before[name]), name


def test_training_is_deterministic_for_a_seed(tokenizer):
    from fedlora.model.tiny import build_tiny_model

    states = []
    for _ in range(2):
        model = build_tiny_model(len(tokenizer), seed=0)
        inject_adapters(model, AdapterConfig(rank=4, dropout=0.1), LoRALinear)
        train_local(model, _examples(tokenizer), TrainConfig(local_steps=3, batch_size=1), pad_id=0,
                    round_index=2, num_rounds=3, seed=11)
        states.append(get_adapter_state(model))
    for name in states[0]:
        assert torch.equal(states[0][name].B, states[1][name].B)


def test_schedule_continues_across_rounds_instead_of_restarting():
    total = 3 * 4  # 3 rounds × 4 local steps
    per_round_start = [lr_multiplier((r - 1) * 4, total, 0, "cosine") for r in (1, 2, 3)]
    assert per_round_start[0] == 1.0 and per_round_start[0] > per_round_start[1] > per_round_start[2]
    assert lr_multiplier(0, 10, 2, "linear") == 0.5  # warm-up
    assert lr_multiplier(9, 10, 0, "linear") == pytest.approx(0.1)


def test_gsm8k_exact_match_scores_a_memorised_answer(adapted, tokenizer):
    # Teach the tiny model the two answers, then decode greedily and score the final numbers.
    train_local(adapted, _examples(tokenizer), TrainConfig(local_steps=120, batch_size=2, lr=2e-2, lr_schedule="constant"),
                pad_id=tokenizer.pad_token_id, round_index=1, num_rounds=1, seed=0)
    scored = gsm8k_accuracy(adapted, tokenizer, PROBLEMS, max_new_tokens=16)
    wrong = gsm8k_accuracy(adapted, tokenizer, [(PROBLEMS[0][0], "#### 8")], max_new_tokens=16)
    assert scored == {"accuracy": 1.0, "correct": 2, "total": 2}
    assert wrong["correct"] == 0
