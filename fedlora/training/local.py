"""Local training: the plain loop every client runs each round.

AdamW on the trainable adapter parameters only, a learning-rate schedule that continues across
rounds (round k starts where round k-1 ended instead of warming up again), gradient accumulation
and clipping. The loss is the mean over supervised (response) tokens of each micro-batch.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from fedlora.adapters import trainable_parameters
from fedlora.config import TrainConfig
from fedlora.data.records import collate, iterate_batches
from fedlora.linear_layout import as_out_in
from fedlora.training.loss import response_loss


@dataclass
class TrainResult:
    """What a client reports about its local training."""

    loss: float
    """Mean token loss over all micro-batches of the round."""
    steps: int
    examples: int
    """Examples seen (steps × grad_accum × batch_size)."""
    tokens: int
    """Supervised tokens seen."""
    seconds: float


def lr_multiplier(step: int, total_steps: int, warmup_steps: int, schedule: str) -> float:
    """Multiplier of the base learning rate at global step ``step`` (0-based)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))  # cosine


def move(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


@contextmanager
def activation_checkpointing(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Within the block, recompute each decoder layer's activations in the backward instead of
    keeping them (``train.gradient_checkpointing``); the model's previous setting is restored on exit.

    Uses transformers' own switch (non-reentrant ``torch.utils.checkpoint``, which needs no input
    that requires grad, so gradients reach the adapters over a frozen base) and acts only in
    ``train()`` mode: evaluation is unchanged. The recompute replays the saved RNG state, so
    dropout masks, and hence gradients, are the same as without it. Raises ``ValueError`` when the
    model cannot checkpoint (not a transformers model, or ``supports_gradient_checkpointing`` False).
    """
    if not enabled:
        yield
        return
    enable = getattr(model, "activation_checkpointing_enable", None) or getattr(model, "gradient_checkpointing_enable", None)
    if enable is None or not getattr(model, "supports_gradient_checkpointing", False):
        raise ValueError(f"{type(model).__name__} does not support activation checkpointing; "
                         "set train.gradient_checkpointing=false")  # fmt: skip
    was_on = any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    had_input_hook = hasattr(model, "_require_grads_hook")
    if not was_on:
        kwargs = {"use_reentrant": False}
        if enable.__name__ == "activation_checkpointing_enable":
            enable(activation_checkpointing_kwargs=kwargs)
        else:
            enable(gradient_checkpointing_kwargs=kwargs)
    try:
        yield
    finally:
        if not was_on:
            disable = getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable
            disable()
            if not had_input_hook and hasattr(model, "_require_grads_hook"):
                model.disable_input_require_grads()  # the embedding hook transformers added on enable


def train_local(
    model: nn.Module,
    examples: Sequence[dict[str, list[int]]],
    cfg: TrainConfig,
    *,
    pad_id: int,
    round_index: int,
    num_rounds: int,
    seed: int,
    on_step: Callable[[int, float], None] | None = None,
) -> TrainResult:
    """Run ``cfg.local_steps`` optimiser steps on ``examples`` (round ``round_index``, 1-based).

    ``on_step(step, loss)`` is called after every optimiser step (1-based) with that step's mean
    token loss, e.g. to show progress. With ``cfg.gradient_checkpointing`` the decoder layers'
    activations are recomputed in the backward (:func:`activation_checkpointing`): same result,
    less memory, about one more forward of compute.
    """
    if not examples:
        raise ValueError("this client has no training examples; check the partitioning")
    device = next(model.parameters()).device
    params = trainable_parameters(model)
    if not params:
        raise ValueError("the model has no trainable parameters; were adapters injected?")
    torch.manual_seed(seed)  # dropout masks
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    batches = iterate_batches(examples, cfg.batch_size, seed)
    offset = (round_index - 1) * cfg.local_steps
    total = num_rounds * cfg.local_steps
    loss_sum, tokens, seen = 0.0, 0, 0
    start = time.perf_counter()
    model.train()
    with activation_checkpointing(model, cfg.gradient_checkpointing):
        for step in range(cfg.local_steps):
            lr = cfg.lr * lr_multiplier(offset + step, total, cfg.warmup_steps, cfg.lr_schedule)
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.zero_grad(set_to_none=True)
            step_loss, step_tokens = 0.0, 0
            for _ in range(cfg.grad_accum):
                micro = next(batches)
                summed, n = response_loss(model, move(collate(micro, pad_id), device))
                (summed / max(n, 1) / cfg.grad_accum).backward()
                step_loss += float(summed.detach())
                step_tokens += n
                seen += len(micro)
            if cfg.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
            loss_sum += step_loss
            tokens += step_tokens
            if on_step is not None:
                on_step(step + 1, step_loss / max(step_tokens, 1))
    model.eval()
    return TrainResult(
        loss=loss_sum / max(tokens, 1),
        steps=cfg.local_steps,
        examples=seen,
        tokens=tokens,
        seconds=time.perf_counter() - start,
    )


def dense_gradients(
    model: nn.Module, examples: Sequence[dict[str, list[int]]], *, batch_size: int, pad_id: int
) -> dict[str, torch.Tensor]:
    """∂L/∂W of every adapted layer's frozen base weight, L the mean token loss over ``examples``
    (in order). Used once by Fed-SB's federated initialisation; the base stays frozen afterwards.
    Returns fp32 CPU tensors of shape (d_out, d_in)."""
    from fedlora.adapters import adapter_modules

    bases = {name: m.base for name, m in adapter_modules(model).items()}
    weights = {name: base.weight for name, base in bases.items()}
    device = next(model.parameters()).device
    total_tokens = sum(sum(label != -100 for label in e["labels"][1:]) for e in examples)
    try:
        for w in weights.values():
            w.requires_grad_(True)
        for start in range(0, len(examples), batch_size):
            summed, _ = response_loss(model, move(collate(list(examples[start : start + batch_size]), pad_id), device))
            (summed / max(total_tokens, 1)).backward()
        # (d_out, d_in) whatever the storage layout (a Conv1D's weight is (d_in, d_out))
        return {name: as_out_in(bases[name], w.grad).detach().float().cpu().contiguous().clone()
                for name, w in weights.items()}
    finally:
        model.zero_grad(set_to_none=True)
        for w in weights.values():
            w.grad = None
            w.requires_grad_(False)
