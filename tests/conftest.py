"""Shared fixtures: the tiny model and tokenizer (built from code, no download)."""

from __future__ import annotations

import pytest
import torch

from fedlora.tiny import build_tiny_model, build_tiny_tokenizer


@pytest.fixture
def tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture
def tiny_model(tokenizer):
    torch.manual_seed(0)
    return build_tiny_model(len(tokenizer), seed=0)
