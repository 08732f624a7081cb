"""The training objective: next-token cross-entropy on response tokens only.

Logits are computed only at the positions the loss needs (labels ≠ -100): the hidden states of
the decoder are gathered at those positions and pushed through the output head in chunks
(``fedlora_kernels.linear_cross_entropy``). With the default model's 262k-token head this is the
difference between a step that fits and one that spends most of its time on unused logits.
"""

from __future__ import annotations

import torch
from torch import nn

from fedlora_kernels import linear_cross_entropy

IGNORE_INDEX = -100


def scored_hidden(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Decoder hidden states at the supervised positions (N, H) and their target tokens (N,).

    ``batch`` holds ``input_ids``, ``attention_mask`` and ``labels`` (B, T); position t predicts
    ``labels[:, t + 1]``.
    """
    hidden = model.base_model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
    ).last_hidden_state  # (B, T, H)
    targets = batch["labels"][:, 1:]  # (B, T-1)
    keep = targets != IGNORE_INDEX
    return hidden[:, :-1][keep], targets[keep]


def response_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Summed token loss over supervised positions and their count."""
    h, targets = scored_hidden(model, batch)
    softcap = getattr(model.config, "final_logit_softcapping", None)
    loss = linear_cross_entropy(h, model.get_output_embeddings().weight, targets, softcap=softcap)
    return loss, len(targets)


@torch.no_grad()
def response_hits(model: nn.Module, h: torch.Tensor, targets: torch.Tensor, chunk_size: int = 256) -> int:
    """How many scored positions the model's greedy (arg-max) next token gets right.

    Logits are formed ``chunk_size`` positions at a time, as in the loss; the soft-cap is
    monotone, so it cannot change the arg-max and is skipped.
    """
    weight = model.get_output_embeddings().weight
    return sum(int(((h[i : i + chunk_size] @ weight.t()).argmax(-1) == targets[i : i + chunk_size]).sum())
               for i in range(0, len(targets), chunk_size))
