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


def response_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Summed token loss over supervised positions and their count.

    ``batch`` holds ``input_ids``, ``attention_mask`` and ``labels`` (B, T); position t predicts
    ``labels[:, t + 1]``.
    """
    hidden = model.base_model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
    ).last_hidden_state  # (B, T, H)
    targets = batch["labels"][:, 1:]  # (B, T-1)
    keep = targets != IGNORE_INDEX
    h = hidden[:, :-1][keep]  # (N, H): only positions that are scored
    head = model.get_output_embeddings()
    softcap = getattr(model.config, "final_logit_softcapping", None)
    loss = linear_cross_entropy(h, head.weight, targets[keep], softcap=softcap)
    return loss, int(keep.sum())
