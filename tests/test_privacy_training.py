"""Example-level DP-SGD on the tiny model: exact per-example gradients of our adapters, clipping,
noise of the right size, a base that is never touched, budgets, and state carried across rounds."""

from __future__ import annotations

import math

import pytest
import torch

from fedlora.adapters import FrozenALoRALinear, LoRALinear, adapter_modules, get_adapter_state, inject_adapters
from fedlora.adapters.sb import SBLinear
from fedlora.config import AdapterConfig, DPConfig, QuantConfig, TrainConfig
from fedlora.data.records import collate, tokenize_example
from fedlora.privacy.accounting import AccountantState, BudgetSpentError, PrivacyConfigError, epsilon_rdp
from fedlora.privacy.dp_training import (
    clip_factors,
    clipped_gradient_sum,
    noisy_mean,
    per_example_losses,
    poisson_sample,
    private_dense_gradient,
    private_generators,
    train_local_dp,
)
from fedlora.privacy.grad_samplers import GradSampleCollector
from fedlora.quant.linear import QuantLinear
from fedlora.model.tiny import build_tiny_model

ADAPTERS = {"lora": LoRALinear, "frozen_a": FrozenALoRALinear, "sb": SBLinear}
TOL = 1e-5


def _examples(tokenizer, n: int = 6) -> list[dict[str, list[int]]]:
    # different lengths, so batches are padded
    return [tokenize_example(f"Question: {i}+{i * 7}?\nAnswer: ", f"{i}+{i * 7}={8 * i}" + "!" * (i % 3), tokenizer, 64)
            for i in range(1, n + 1)]  # fmt: skip


def _adapted(tokenizer, kind: str, dropout: float = 0.0, quant: str = "none"):
    model = build_tiny_model(len(tokenizer), seed=0)
    cfg = AdapterConfig(rank=4, alpha=8, dropout=dropout)
    inject_adapters(model, cfg, ADAPTERS[kind])
    if quant != "none":
        from fedlora.quant.model import quantize_model

        quantize_model(model, QuantConfig(format=quant), cfg.target_modules)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # B = 0 (or R = 0) at init would make the other factor's gradient zero
        for m in adapter_modules(model).values():
            target = m.lora_A if kind == "sb" else m.lora_B
            target.copy_(0.3 * torch.randn(target.shape, generator=gen))
    return model


def _params(model):
    return [p for p in model.parameters() if p.requires_grad]


@pytest.mark.parametrize("kind, quant", [("lora", "none"), ("frozen_a", "none"), ("sb", "none"), ("lora", "int8")])
def test_per_example_gradients_match_a_per_example_loop(tokenizer, kind, quant):
    # Prepare (an int8 base runs the fused quantized kernel: the taps must not care)
    model = _adapted(tokenizer, kind, quant=quant)
    examples, params = _examples(tokenizer), _params(model)
    model.train()
    # Execute: one batched backward with the taps
    with GradSampleCollector(model) as collector:
        losses, _ = per_example_losses(model, collate(examples, 0))
        losses.sum().backward()
    batched = [collector.grads[p] for p in params]  # (B, *shape) each
    # ... and each example alone, through plain autograd
    loop = []
    for ex in examples:
        for p in params:
            p.grad = None
        per_example_losses(model, collate([ex], 0))[0].sum().backward()
        loop.append([p.grad.clone() for p in params])
    # Assert
    assert len(params) == {"lora": 28, "frozen_a": 14, "sb": 14}[kind]
    for j in range(len(params)):
        reference = torch.stack([g[j] for g in loop])
        assert reference.abs().max() > 1e-4  # the gradient is not trivially zero
        assert (batched[j] - reference).abs().max() < TOL


def test_per_example_gradients_use_the_dropout_mask_of_the_forward(tokenizer):
    # Prepare: dropout 0.3; the reference differentiates each ℓ_i through the same forward (same masks)
    model = _adapted(tokenizer, "lora", dropout=0.3)
    examples, params = _examples(tokenizer), _params(model)
    model.train()
    torch.manual_seed(0)
    # Execute
    with GradSampleCollector(model) as collector:
        losses, _ = per_example_losses(model, collate(examples, 0))
        collector.taps.enabled = False
        reference = [torch.autograd.grad(losses[i], params, retain_graph=True) for i in range(len(examples))]
        collector.taps.enabled = True
        losses.sum().backward()
    # Assert
    no_dropout = _adapted(tokenizer, "lora", dropout=0.0)
    with GradSampleCollector(no_dropout) as plain:
        per_example_losses(no_dropout, collate(examples, 0))[0].sum().backward()
    for j, p in enumerate(params):
        ref = torch.stack([r[j] for r in reference])
        assert (collector.grads[p] - ref).abs().max() < TOL
        assert (plain.grads[_params(no_dropout)[j]] - ref).abs().max() > 1e-3  # the mask matters


def test_with_sigma_zero_every_clipped_per_example_norm_is_at_most_c(tokenizer):
    # Prepare: C far below the raw norms, so every example is clipped
    model = _adapted(tokenizer, "lora")
    examples, params, clip = _examples(tokenizer), _params(model), 1e-3
    model.train()
    # Execute
    with GradSampleCollector(model) as collector:
        per_example_losses(model, collate(examples, 0))[0].sum().backward()
        per_example = torch.cat([collector.grads[p].flatten(1) for p in params], dim=1)  # (B, P)
        norms = per_example.norm(dim=1)
        clipped = per_example * clip_factors(norms, clip)[:, None]
        summed = clipped_gradient_sum(model, params, examples, pad_id=0, clip=clip, physical_batch_size=4,
                                      collector=collector)  # fmt: skip
    private = noisy_mean(summed.grads, sigma=0.0, clip=clip, expected_batch_size=4, generator=torch.Generator())
    # Assert
    assert norms.min() > 100 * clip
    assert clipped.norm(dim=1).max() <= clip * (1 + 1e-5)
    flat = torch.cat([g.flatten() for g in summed.grads])
    assert (flat - clipped.sum(0)).abs().max() < 1e-6  # two micro-batches (4 + 2) sum like one
    assert torch.equal(torch.cat([g.flatten() for g in private]), flat / 4)
    assert torch.allclose(summed.norms, norms, rtol=1e-5)


def test_ghost_clipping_gives_the_same_clipped_sum(tokenizer):
    # Prepare
    model = _adapted(tokenizer, "lora")
    examples, params = _examples(tokenizer), _params(model)
    model.train()
    # Execute
    with GradSampleCollector(model, "grads") as c:
        standard = clipped_gradient_sum(model, params, examples, pad_id=0, clip=0.05, physical_batch_size=3, collector=c)
    with GradSampleCollector(model, "norms") as c:
        ghost = clipped_gradient_sum(model, params, examples, pad_id=0, clip=0.05, physical_batch_size=3,
                                     collector=c, ghost=True)  # fmt: skip
    # Assert
    assert torch.allclose(ghost.norms, standard.norms, rtol=1e-5)
    for a, b in zip(ghost.grads, standard.grads, strict=True):
        assert (a - b).abs().max() < TOL


def test_noise_std_is_sigma_c_over_the_expected_batch(tokenizer):
    # Prepare: the real adapter's clipped sum, σ = 2, C = 0.5, expected batch 4
    model = _adapted(tokenizer, "lora")
    params = _params(model)
    model.train()
    with GradSampleCollector(model) as c:
        summed = clipped_gradient_sum(model, params, _examples(tokenizer), pad_id=0, clip=0.5, physical_batch_size=6, collector=c)
    # Execute
    private = noisy_mean(summed.grads, sigma=2.0, clip=0.5, expected_batch_size=4, generator=torch.Generator().manual_seed(0))
    noise = torch.cat([(g - s / 4).flatten() for g, s in zip(private, summed.grads, strict=True)])
    # Assert
    assert noise.numel() > 8_000 and all(g.dtype == torch.float32 for g in private)
    assert float(noise.std()) == pytest.approx(2.0 * 0.5 / 4, rel=0.05)
    assert abs(float(noise.mean())) < 0.05 * 0.25


@pytest.mark.parametrize("kind, quant", [("lora", "none"), ("frozen_a", "none"), ("lora", "int8"), ("frozen_a", "nf4")])
def test_a_dp_step_changes_the_adapter_and_leaves_the_base_byte_identical(tokenizer, kind, quant):
    # Prepare
    model = _adapted(tokenizer, kind, quant=quant)
    frozen = {k: v.clone() for k, v in model.state_dict().items() if not k.endswith((".lora_A", ".lora_B"))}
    adapter_before = get_adapter_state(model)
    # Execute
    result, state = train_local_dp(
        model, _examples(tokenizer), TrainConfig(local_steps=1, batch_size=3, lr=1e-2),
        DPConfig(mode="example", noise_multiplier=1.0), pad_id=0, round_index=1, num_rounds=1, seed=0,
        accountant_state=None, dp_seed=0,
    )  # fmt: skip
    # Assert
    after = model.state_dict()
    assert all(torch.equal(after[k], v) and after[k].dtype == v.dtype for k, v in frozen.items())
    if quant != "none":  # the base really is quantized, and its packed codes did not move
        assert all(isinstance(m.base, QuantLinear) for m in adapter_modules(model).values())
        assert sum(k.endswith(".q_codes") for k in frozen) == 14
    adapter_after = get_adapter_state(model)
    assert all(not torch.equal(adapter_after[n].B, adapter_before[n].B) for n in adapter_before)
    a_moved = [not torch.equal(adapter_after[n].A, adapter_before[n].A) for n in adapter_before]
    assert all(a_moved) if kind == "lora" else not any(a_moved)
    assert result.dp_steps == 1 and state.history == [[1.0, 0.5, 1]]


def test_state_carries_across_rounds_and_budget_exhaustion_declines(tokenizer):
    # Prepare: σ = 1, q = 3/6, 2 steps a round; the budget fits two rounds, not three
    model = _adapted(tokenizer, "lora")
    examples = _examples(tokenizer)
    train = TrainConfig(local_steps=2, batch_size=3, lr=1e-2)
    two_rounds, _ = epsilon_rdp([[1.0, 0.5, 4]], 1e-5)
    three_rounds, _ = epsilon_rdp([[1.0, 0.5, 6]], 1e-5)
    dp = DPConfig(mode="example", noise_multiplier=1.0, max_epsilon=(two_rounds + three_rounds) / 2)
    state = None
    results = []
    # Execute: the state goes through JSON between rounds, as through context.state
    for rnd in (1, 2, 3):
        before = get_adapter_state(model)
        result, new = train_local_dp(model, examples, train, dp, pad_id=0, round_index=rnd, num_rounds=3, seed=rnd,
                                     accountant_state=state, dp_seed=rnd)  # fmt: skip
        state = new.to_json()
        results.append((result, before, get_adapter_state(model)))
    final = AccountantState.from_json(state)
    # Assert
    (r1, _, _), (r2, _, _), (r3, before3, after3) = results
    assert r1.epsilon < r2.epsilon == pytest.approx(two_rounds) and not r2.declined
    assert r3.declined and "declines" in r3.reason and r3.dp_steps == 0 and r3.epsilon == r2.epsilon
    assert all(torch.equal(before3[n].B, after3[n].B) for n in before3)  # nothing trained
    assert final.history == [[1.0, 0.5, 4]] and [r["declined"] for r in final.rounds] == [False, False, True]
    assert r3.metrics()["declined"] == 1 and r2.metrics()["epsilon"] == r2.epsilon


def test_bad_input_fails_before_any_training(tokenizer):
    # Prepare
    model = _adapted(tokenizer, "lora")
    before = get_adapter_state(model)
    examples = _examples(tokenizer)
    kwargs = {"pad_id": 0, "round_index": 1, "num_rounds": 3, "seed": 0, "accountant_state": None}
    # Execute / Assert
    with pytest.raises(BudgetSpentError, match="already spent at the start"):
        train_local_dp(model, examples, TrainConfig(local_steps=2, batch_size=3),
                       DPConfig(mode="example", noise_multiplier=1.0, max_epsilon=0.5), **kwargs)  # fmt: skip
    with pytest.raises(PrivacyConfigError, match="dataset too small for the sampling rate"):
        train_local_dp(model, examples, TrainConfig(batch_size=8), DPConfig(mode="example", noise_multiplier=1.0), **kwargs)
    with pytest.raises(PrivacyConfigError, match="not below 1/N_k"):
        train_local_dp(model, examples, TrainConfig(batch_size=2),
                       DPConfig(mode="example", noise_multiplier=1.0, delta=0.2), **kwargs)  # fmt: skip
    assert all(torch.equal(before[n].B, get_adapter_state(model)[n].B) for n in before)


def test_private_fedsb_init_gradient_is_the_clipped_dense_gradient_and_is_charged(tokenizer):
    # Prepare: q = 1 (batch = N) and σ = 0, so Ĝ = Σ_i clip_C(∇_W ℓ_i) / N exactly; C below the norms
    model = _adapted(tokenizer, "lora")
    examples, clip = _examples(tokenizer), 0.05
    n = len(examples)
    train = TrainConfig(local_steps=3, batch_size=n)
    # Execute
    estimate, result, state = private_dense_gradient(
        model, examples, train, DPConfig(mode="example", noise_multiplier=0.0, max_grad_norm=clip, physical_batch_size=4),
        pad_id=0, num_rounds=2, accountant_state=None, dp_seed=0,
    )  # fmt: skip
    # ... reference: each example alone, with the base weights made trainable for plain autograd
    modules = adapter_modules(model)
    for m in modules.values():
        m.base.weight.requires_grad_(True)
    per_example = []
    for ex in examples:
        for m in modules.values():
            m.base.weight.grad = None
        per_example_losses(model, collate([ex], 0))[0].sum().backward()
        per_example.append({name: m.base.weight.grad.clone() for name, m in modules.items()})
    norms = torch.stack([sum(g.pow(2).sum() for g in pe.values()).sqrt() for pe in per_example])
    factors = clip_factors(norms, clip)
    # Assert
    assert norms.min() > clip and set(estimate) == set(modules)
    for name in modules:
        reference = sum(f * pe[name] for f, pe in zip(factors, per_example, strict=True)) / n
        assert (estimate[name] - reference).abs().max() < 1e-6 * max(1.0, float(reference.abs().max()))
    assert state.history == [[0.0, 1.0, 1]] and state.rounds[0]["phase"] == "fedsb_init" and result.dp_steps == 1


def test_private_fedsb_init_counts_in_the_calibration_of_the_training_rounds(tokenizer):
    # Prepare
    model = _adapted(tokenizer, "lora")
    examples = _examples(tokenizer)
    train, dp = TrainConfig(local_steps=2, batch_size=1), DPConfig(mode="example", target_epsilon=8.0)  # q = 1/6
    # Execute: init (1 step), then a training round from the state it returned
    _, _, state = private_dense_gradient(model, examples, train, dp, pad_id=0, num_rounds=2, accountant_state=None, dp_seed=0)
    _, again, same = private_dense_gradient(model, examples, train, dp, pad_id=0, num_rounds=2, accountant_state=state,
                                            charge=False, dp_seed=0)  # fmt: skip
    result, final = train_local_dp(model, examples, train, dp, pad_id=0, round_index=1, num_rounds=2, seed=0,
                                   accountant_state=state, dp_seed=1)  # fmt: skip
    # Assert: σ was calibrated once over 2 rounds × 2 steps + 1 init step, and reused
    assert state.calibration["planned_steps"] == 5 and final.calibration == state.calibration
    assert final.history == [[state.sigma, 1 / 6, 3]] and result.sigma == state.sigma
    assert same.history == state.history and again.dp_steps == 0  # a recomputation is not charged twice
    assert epsilon_rdp([[state.sigma, 1 / 6, 5]], 1e-5)[0] == pytest.approx(8.0, abs=0.01)


def _draws(dp_seed: int, steps: int, n: int, q: float) -> list[list[int]]:
    """The Poisson samples train_local_dp draws for ``dp_seed`` (same generator, same order)."""
    sampling, _ = private_generators(torch.device("cpu"), dp_seed)
    return [poisson_sample(n, q, sampling) for _ in range(steps)]


def test_steps_that_sample_no_example_are_counted_and_give_no_loss(tokenizer):
    # Prepare: q = 1/6 over 6 examples, 3 steps: a step's sample is empty with probability (5/6)^6 ≈ 0.33
    examples, steps, q = _examples(tokenizer), 3, 1 / 6
    draws = {s: _draws(s, steps, len(examples), q) for s in range(200)}
    all_empty = next(s for s, d in draws.items() if not any(d))
    some_empty = next(s for s, d in draws.items() if any(d) and not all(d))
    train = TrainConfig(local_steps=steps, batch_size=1, lr=1e-2)
    dp = DPConfig(mode="example", noise_multiplier=1.0)
    results = {}
    for seed in (all_empty, some_empty):
        model = _adapted(tokenizer, "lora")
        before = get_adapter_state(model)
        # Execute
        result, _ = train_local_dp(model, examples, train, dp, pad_id=0, round_index=1, num_rounds=1, seed=0,
                                   accountant_state=None, dp_seed=seed)  # fmt: skip
        results[seed] = result, before, get_adapter_state(model)
    # Assert: no example used → no loss (NaN, never a 0.0 that reads as a perfect fit), yet the
    # noise-only steps moved the adapter and were charged; a partly empty round counts its examples
    r, before, after = results[all_empty]
    assert r.examples == 0 and r.tokens == 0 and r.empty_batches == steps and math.isnan(r.loss)
    assert r.dp_steps == steps and r.metrics()["dp_empty_steps"] == steps
    assert all(not torch.equal(before[n].B, after[n].B) for n in before)
    r, _, _ = results[some_empty]
    sampled = [i for d in draws[some_empty] for i in d]
    expected_tokens = sum(sum(label != -100 for label in examples[i]["labels"]) for i in sampled)
    assert r.examples == len(sampled) and r.tokens == expected_tokens and r.tokens > 0
    assert r.empty_batches == sum(not d for d in draws[some_empty]) > 0 and math.isfinite(r.loss) and r.loss > 0


@pytest.mark.parametrize("kind, dropout, quant", [("lora", 0.0, "none"), ("lora", 0.3, "none"), ("sb", 0.3, "none"),
                                                  ("lora", 0.0, "int8")])
def test_activation_checkpointing_keeps_per_example_gradients_exact(tokenizer, kind, dropout, quant):
    # Prepare: the recompute in the backward fires the adapters' forward hooks again; each call
    # must still be tapped once, with the same inputs (same dropout masks)
    from fedlora.training.local import activation_checkpointing

    model = _adapted(tokenizer, kind, dropout=dropout, quant=quant)
    examples, params = _examples(tokenizer), _params(model)
    model.train()
    per_example, summed = {}, {}
    for checkpointing in (False, True):
        with activation_checkpointing(model, checkpointing), GradSampleCollector(model) as collector:
            calls = [0]
            first = next(iter(collector.taps.modules.values()))
            hook = first.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
            # Execute
            torch.manual_seed(3)
            per_example_losses(model, collate(examples, 0))[0].sum().backward()
            per_example[checkpointing] = [collector.grads[p].clone() for p in params]
            hook.remove()
            assert calls[0] == (2 if checkpointing else 1)  # the recompute really ran
            torch.manual_seed(4)
            summed[checkpointing] = clipped_gradient_sum(model, params, examples, pad_id=0, clip=0.05,
                                                         physical_batch_size=4, collector=collector)  # fmt: skip
    # Assert: equal to the run without checkpointing, and (no dropout) to a per-example loop
    for a, b in zip(per_example[False], per_example[True], strict=True):
        assert a.abs().max() > 1e-4 and (a - b).abs().max() < 1e-6
    for a, b in zip(summed[False].grads, summed[True].grads, strict=True):
        assert (a - b).abs().max() < 1e-6
    assert torch.allclose(summed[False].norms, summed[True].norms, rtol=1e-6)
    if dropout == 0.0:
        for i, ex in enumerate(examples):
            for p in params:
                p.grad = None
            per_example_losses(model, collate([ex], 0))[0].sum().backward()
            for j, p in enumerate(params):
                assert (per_example[True][j][i] - p.grad).abs().max() < TOL


def test_ghost_clipping_and_a_dp_round_under_activation_checkpointing(tokenizer):
    # Ghost clipping backpropagates the same (checkpointed) graph twice: the second backward recomputes again
    from fedlora.training.local import activation_checkpointing

    model = _adapted(tokenizer, "lora", dropout=0.1)
    examples, params = _examples(tokenizer), _params(model)
    model.train()
    sums = []
    for checkpointing in (False, True):
        with activation_checkpointing(model, checkpointing), GradSampleCollector(model, "norms") as c:
            torch.manual_seed(0)
            sums.append(clipped_gradient_sum(model, params, examples, pad_id=0, clip=0.05, physical_batch_size=3,
                                             collector=c, ghost=True))  # fmt: skip
    for a, b in zip(sums[0].grads, sums[1].grads, strict=True):
        assert a.abs().max() > 1e-5 and (a - b).abs().max() < 1e-6
    # a whole DP round: same adapter with and without
    states = []
    for checkpointing in (False, True):
        m = _adapted(tokenizer, "lora", dropout=0.1)
        train_local_dp(m, examples, TrainConfig(local_steps=2, batch_size=3, gradient_checkpointing=checkpointing),
                       DPConfig(mode="example", noise_multiplier=1.0, max_grad_norm=0.1, physical_batch_size=2), pad_id=0,
                       round_index=1, num_rounds=1, seed=0, accountant_state=None, dp_seed=7)  # fmt: skip
        assert not m.is_activation_checkpointing
        states.append(get_adapter_state(m))
    for name in states[0]:
        assert torch.allclose(states[0][name].B, states[1][name].B, atol=1e-6), name
