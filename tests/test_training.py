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


def _forward_calls(model) -> list[int]:
    """A counter of forward calls of the first adapter (a recompute calls it again)."""
    calls = [0]
    first = next(m for m in model.modules() if isinstance(m, LoRALinear))
    first.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_gradient_checkpointing_trains_the_same_adapter_and_leaves_eval_alone(tokenizer):
    # Prepare: dropout > 0, so the recompute must replay the same masks; float64 for a tight comparison
    from fedlora.model.tiny import build_tiny_model

    examples = _examples(tokenizer)
    runs = {}
    for checkpointing in (False, True):
        model = build_tiny_model(len(tokenizer), seed=0).double()
        inject_adapters(model, AdapterConfig(rank=4, alpha=8, dropout=0.2), LoRALinear)
        model.double()
        calls = _forward_calls(model)
        # Execute
        result = train_local(model, examples, TrainConfig(local_steps=3, batch_size=2, lr=1e-2,
                                                          gradient_checkpointing=checkpointing),
                             pad_id=tokenizer.pad_token_id, round_index=1, num_rounds=1, seed=5)  # fmt: skip
        evaluated = evaluate_loss(model, examples, batch_size=2, pad_id=tokenizer.pad_token_id)
        runs[checkpointing] = (result, get_adapter_state(model), calls[0], evaluated, model)
    # Assert
    (plain, plain_state, plain_calls, plain_eval, _), (ckpt, ckpt_state, ckpt_calls, ckpt_eval, model) = runs[False], runs[True]
    assert (plain_calls, ckpt_calls) == (3 + 1, 2 * 3 + 1)  # one forward per step (+ eval); the recompute doubles training's
    assert ckpt.loss == pytest.approx(plain.loss, rel=1e-12)
    for name in plain_state:
        assert (plain_state[name].B - ckpt_state[name].B).abs().max() < 1e-10, name
        assert (plain_state[name].A - ckpt_state[name].A).abs().max() < 1e-10, name
    assert plain_state[name].B.abs().max() > 1e-3  # the adapter moved
    assert ckpt_eval.loss == pytest.approx(plain_eval.loss, rel=1e-12)
    assert not model.is_activation_checkpointing and not hasattr(model, "_require_grads_hook")  # restored


def test_gradient_checkpointing_on_an_int8_base_reaches_the_adapter(tokenizer):
    from fedlora.config import QuantConfig
    from fedlora.model.tiny import build_tiny_model
    from fedlora.quant.model import quantize_model

    states = []
    for checkpointing in (False, True):
        model = build_tiny_model(len(tokenizer), seed=0)
        cfg = AdapterConfig(rank=4, alpha=8)
        inject_adapters(model, cfg, LoRALinear)
        quantize_model(model, QuantConfig(format="int8"), cfg.target_modules)
        train_local(model, _examples(tokenizer), TrainConfig(local_steps=2, batch_size=2, lr=1e-2,
                                                             gradient_checkpointing=checkpointing),
                    pad_id=tokenizer.pad_token_id, round_index=1, num_rounds=1, seed=0)  # fmt: skip
        states.append(get_adapter_state(model))
    for name in states[0]:
        assert states[0][name].B.abs().max() > 1e-4
        assert torch.allclose(states[0][name].B, states[1][name].B, atol=1e-6), name


def test_gradient_checkpointing_on_a_model_without_it_is_a_clear_error(adapted, tokenizer):
    adapted.supports_gradient_checkpointing = False
    with pytest.raises(ValueError, match="train.gradient_checkpointing=false"):
        train_local(adapted, _examples(tokenizer), TrainConfig(local_steps=1, gradient_checkpointing=True),
                    pad_id=0, round_index=1, num_rounds=1, seed=0)
