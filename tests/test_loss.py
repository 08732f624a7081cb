"""The response-only loss and the chunked linear cross-entropy behind it."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from fedlora.data.records import collate, tokenize_example
from fedlora.training.loss import response_loss
from fedlora_kernels import linear_cross_entropy


@pytest.mark.parametrize("softcap", [None, 30.0])
@pytest.mark.parametrize("n,chunk", [(37, 8), (5, 256), (64, 64)])
def test_linear_cross_entropy_matches_full_logits_value_and_gradients(n, chunk, softcap):
    # Prepare: a reference with the full logits materialised, in float64
    torch.manual_seed(0)
    h = torch.randn(n, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(101, 16, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 101, (n,))
    z = h @ w.t()
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    ref = F.cross_entropy(z, y, reduction="sum")
    ref_gh, ref_gw = torch.autograd.grad(3.0 * ref, (h, w))
    # Execute
    out = linear_cross_entropy(h, w, y, chunk_size=chunk, softcap=softcap)
    gh, gw = torch.autograd.grad(3.0 * out, (h, w))
    # Assert
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gh, ref_gh, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gw, ref_gw, rtol=1e-5, atol=1e-5)


def test_response_loss_counts_only_response_tokens(tiny_model, tokenizer):
    # Prepare: two examples whose prompt/response boundary we know
    examples = [
        tokenize_example("Question: 2+2?\nAnswer: ", "4 #### 4", tokenizer, 64),
        tokenize_example("Q: 10-3\nA: ", "7", tokenizer, 64),
    ]
    batch = collate(examples, tokenizer.pad_token_id)
    # Execute
    with torch.no_grad():
        summed, n = response_loss(tiny_model, batch)
        logits = tiny_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    # Assert: same as full-logit CE restricted to labelled positions; count = response chars (with the space after "Answer:") + EOS
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1),
                          ignore_index=-100, reduction="sum")
    assert n == (len(" 4 #### 4") + 1) + (len(" 7") + 1)  # the prompt's trailing space is the first response token
    torch.testing.assert_close(summed, ref, rtol=1e-5, atol=1e-5)


def test_eval_token_accuracy_equals_full_logit_argmax(tiny_model, tokenizer):
    # Prepare: three examples and the full logits of the model
    from fedlora.training.evaluation import evaluate_loss

    examples = [
        tokenize_example("Question: 2+2?\nAnswer: ", "4 #### 4", tokenizer, 64),
        tokenize_example("Q: 10-3\nA: ", "7", tokenizer, 64),
        tokenize_example("Q: say hello\nA: ", "hello hello hello", tokenizer, 64),
    ]
    batch = collate(examples, tokenizer.pad_token_id)
    model = copy.deepcopy(tiny_model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(2):  # fit the examples a little, so that some but not all tokens are right
        summed, n = response_loss(model, batch)
        opt.zero_grad()
        (summed / n).backward()
        opt.step()
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"][:, 1:]
    keep = labels != -100
    hits = int((logits[:, :-1].argmax(-1)[keep] == labels[keep]).sum())
    assert 0 < hits < int(keep.sum())  # a wrong count would show
    # Execute: batch size 2 so the evaluation sums over two batches
    result = evaluate_loss(model, examples, batch_size=2, pad_id=tokenizer.pad_token_id)
    # Assert
    assert result.tokens == int(keep.sum())
    assert result.token_accuracy == pytest.approx(hits / int(keep.sum()), abs=1e-12)
